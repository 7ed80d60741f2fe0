"""The health monitor against stub replicas on real sockets: rise and fall, timeouts, refusals, target churn.

A stub replica is a real HTTP/1.1 server on 127.0.0.1 whose readiness answer the test flips between
200 and 503, or freezes; probes run every 50 ms so each test takes a fraction of a second.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cloudml_os.serving.monitor import HealthMonitor, Target

FAST = {"interval": 0.05, "timeout": 0.2}


class StubReplica:
    """Answers ``GET /v2/health/ready`` with ``statuses`` in turn (cycled); counts probes and connections.
    ``frozen`` holds every probe unanswered; ``drop_idle`` closes the connection after each answer without
    saying so (as a server whose keep-alive timeout is shorter than the probe interval does)."""

    def __init__(self, *statuses: int, drop_idle: bool = False, port: int = 0):
        self.statuses = list(statuses or [200])
        self.drop_idle = drop_idle
        self.probes = self.connections = 0
        self.thawed = threading.Event()
        self.thawed.set()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                stub.connections += 1

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                stub.thawed.wait(10)
                status = stub.statuses[stub.probes % len(stub.statuses)] if self.path == "/v2/health/ready" else 404
                stub.probes += 1
                body = b'{"ready": %s}' % (b"true" if status == 200 else b"false")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = stub.drop_idle

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.port = self.server.server_address[1]

    def target(self, key, **options) -> Target:
        return Target(key, "127.0.0.1", self.port, **(FAST | options))

    def close(self) -> None:
        self.thawed.set()
        self.server.shutdown()
        self.server.server_close()


class Changes:
    """on_change that records transitions as (key, healthy, reason) for the test to wait on."""

    def __init__(self):
        self.seen: queue.Queue = queue.Queue()

    def __call__(self, target: Target, healthy: bool, reason: str) -> None:
        self.seen.put((target.key, healthy, reason))

    def next(self, timeout: float = 3.0) -> tuple:
        return self.seen.get(timeout=timeout)

    def none_within(self, seconds: float) -> bool:
        try:
            change = self.seen.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected change {change}")


@pytest.fixture
def stub() -> Iterator:
    made: list[StubReplica] = []

    def make(*statuses: int, **options) -> StubReplica:
        made.append(StubReplica(*statuses, **options))
        return made[-1]

    yield make
    for replica in made:
        replica.close()


@pytest.fixture
def monitor() -> Iterator:
    """Start a HealthMonitor in a thread on a mutable list of targets; stopped at the end of the test."""
    running = []

    def start(targets: list[Target], changes: Changes) -> HealthMonitor:
        health = HealthMonitor(lambda: list(targets), changes, refresh_interval=0.05)
        running.append(health.start_thread())
        return health

    yield start
    for thread in running:
        thread.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_target_rises_after_rise_successes_and_falls_after_fall_failures(stub, monitor):
    replica = stub(200)
    changes = Changes()
    health = monitor([replica.target("r1", rise=2, fall=3)], changes)
    assert changes.next() == ("r1", True, "2 probes succeeded")
    assert replica.probes >= 2
    assert health.states() == {"r1": True}
    replica.statuses = [503]
    before = replica.probes
    assert changes.next() == ("r1", False, "3 probes failed: HTTP 503")
    assert replica.probes - before >= 3
    replica.statuses = [200]
    assert changes.next() == ("r1", True, "2 probes succeeded")
    # Every probe went over the one kept-alive connection.
    assert replica.connections == 1


def test_alternating_answers_never_make_enough_consecutive_probes_to_change_state(stub, monitor):
    up, down = stub(503, 200), stub(200, 503)
    changes = Changes()
    monitor([up.target("up", initially_healthy=True, fall=2), down.target("down", rise=2)], changes)
    assert changes.none_within(0.8)
    assert up.probes >= 8 and down.probes >= 8


def test_a_replica_that_stops_answering_fails_by_timeout(stub, monitor):
    replica = stub(200)
    changes = Changes()
    monitor([replica.target("r1", initially_healthy=True, fall=2, timeout=0.1)], changes)
    time.sleep(0.2)
    replica.thawed.clear()
    assert changes.next() == ("r1", False, "2 probes failed: timeout after 0.1s")


def test_a_refused_port_fails_and_a_server_starting_there_rises(stub, monitor):
    changes = Changes()
    port = closed_port()
    health = monitor([Target("r1", "127.0.0.1", port, initially_healthy=True, fall=2, **FAST)], changes)
    assert changes.next() == ("r1", False, "2 probes failed: connection refused")
    assert health.states() == {"r1": False}
    stub(200, port=port)
    assert changes.next() == ("r1", True, "2 probes succeeded")


def test_a_garbage_answer_is_a_failed_probe(monitor):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)

        def answer_garbage() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                with connection:
                    connection.recv(4096)
                    connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

        threading.Thread(target=answer_garbage, daemon=True).start()
        changes = Changes()
        target = Target("r1", "127.0.0.1", listener.getsockname()[1], initially_healthy=True, fall=1, **FAST)
        monitor([target], changes)
        key, healthy, reason = changes.next()
    assert (key, healthy) == ("r1", False)
    assert reason.startswith("1 probe failed: malformed response: status line b'SSH-2.0")


def test_a_connection_the_replica_closes_between_probes_is_not_a_failure(stub, monitor):
    replica = stub(200, drop_idle=True)
    changes = Changes()
    monitor([replica.target("r1", initially_healthy=True, fall=1)], changes)
    assert changes.none_within(0.6)
    assert replica.probes >= 6
    assert replica.connections == replica.probes


def test_targets_come_and_go_and_a_listed_targets_state_persists(stub, monitor):
    first, second = stub(200), stub(200)
    targets = [first.target("a")]
    changes = Changes()
    health = monitor(targets, changes)
    assert changes.next() == ("a", True, "2 probes succeeded")
    targets.append(second.target("b"))
    assert changes.next() == ("b", True, "2 probes succeeded")
    assert health.states() == {"a": True, "b": True}
    # Changing a listed target's settings keeps its state: no new rise.
    targets[1] = second.target("b", interval=0.03)
    del targets[0]
    time.sleep(0.2)
    assert health.states() == {"b": True}
    probes = first.probes
    assert changes.none_within(0.3)
    assert first.probes == probes  # no longer probed
    # Listed again, it is a new target: it starts from initially_healthy and rises again.
    targets.append(first.target("a"))
    assert changes.next() == ("a", True, "2 probes succeeded")


def test_a_failing_on_change_or_targets_does_not_stop_the_monitor(stub, monitor):
    replica = stub(200)
    seen = Changes()
    calls = {"targets": 0}

    def targets() -> list[Target]:
        calls["targets"] += 1
        if calls["targets"] % 2:
            raise RuntimeError("database is down")
        return [replica.target("r1")]

    def on_change(target: Target, healthy: bool, reason: str) -> None:
        seen(target, healthy, reason)
        raise RuntimeError("callback bug")

    health = HealthMonitor(targets, on_change, refresh_interval=0.05)
    thread = health.start_thread()
    try:
        assert seen.next() == ("r1", True, "2 probes succeeded")
        replica.statuses = [503]
        assert seen.next() == ("r1", False, "3 probes failed: HTTP 503")
    finally:
        thread.stop()

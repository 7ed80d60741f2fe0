"""The router against stub replicas on real sockets: choice of replica, passthrough, failover, reuse, threads.

Each stub replica is a real HTTP/1.1 server on 127.0.0.1 (``http.server``) that answers the model server's
predict call the way a test sets it; a dead replica is a closed port, a frozen one a listening socket that
never accepts (the kernel completes the handshake, nothing ever answers).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cloudml_os.serving.router import Endpoint, NoReplicaAvailable, Router

PREDICT = "/v1/models/census:predict"


class StubReplica:
    """A model server stand-in: echoes ``instances`` as ``predictions`` after ``delay`` seconds, or answers
    ``status`` with an error body; counts requests and connections; ``gate`` holds requests while cleared;
    ``drop_reused`` closes a kept-alive connection, unanswered, when a second request arrives on it."""

    def __init__(self, replica_id: int, *, status: int = 200, delay: float = 0.0, drop_reused: bool = False):
        self.replica_id, self.status, self.delay, self.drop_reused = replica_id, status, delay, drop_reused
        self.requests = self.connections = 0
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: no delayed-ACK stall

            def setup(self) -> None:
                super().setup()
                self.served = 0
                with stub._lock:
                    stub.connections += 1

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if stub.drop_reused and self.served:
                    self.close_connection = True
                    return
                self.served += 1
                with stub._lock:
                    stub.requests += 1
                stub.gate.wait(10)
                time.sleep(stub.delay)
                if stub.status == 200:
                    answer = {"predictions": json.loads(body)["instances"]}
                else:
                    answer = {"error": "Input has the wrong shape"}
                data = json.dumps(answer).encode()
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.endpoint = Endpoint(replica_id, f"replica-{replica_id}", "127.0.0.1", self.server.server_address[1])

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def dead_endpoint(replica_id: int) -> Endpoint:
    """A port nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Endpoint(replica_id, f"dead-{replica_id}", "127.0.0.1", port)


@pytest.fixture
def replica() -> Iterator:
    made: list[StubReplica] = []

    def make(replica_id: int, **options) -> StubReplica:
        made.append(StubReplica(replica_id, **options))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


@pytest.fixture
def frozen_endpoint() -> Iterator[Endpoint]:
    """A replica that accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield Endpoint(90, "frozen", "127.0.0.1", sock.getsockname()[1])


class Failures(list):
    def __call__(self, endpoint: Endpoint, reason: str) -> None:
        self.append((endpoint, reason))


def make_router(endpoints: list[Endpoint], failures: Failures | None = None, **options) -> Router:
    return Router(lambda version_id: list(endpoints), failures if failures is not None else Failures(), **options)


def predict(router: Router, *instances) -> tuple[int, dict, str]:
    response = router.forward(7, PREDICT, json.dumps({"instances": list(instances)}).encode())
    return response.status, json.loads(response.body), response.replica


def test_a_request_goes_to_the_replica_with_fewest_requests_in_flight(replica):
    first, second = replica(1, delay=0), replica(2, delay=0)
    first.gate.clear()
    second.gate.clear()
    router = make_router([first.endpoint, second.endpoint])
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(predict, router, "held")
        while first.requests + second.requests == 0:
            time.sleep(0.005)
        busy, idle = (first, second) if first.requests else (second, first)
        idle.gate.set()
        answered_by = {predict(router, n)[2] for n in range(5)}
        busy.gate.set()
        assert held.result(5)[2] == busy.endpoint.name
    assert answered_by == {idle.endpoint.name}
    router.close()


def test_a_slow_replica_gets_few_requests_while_a_fast_one_is_free(replica):
    slow, fast = replica(1, delay=0.1), replica(2)
    router = make_router([slow.endpoint, fast.endpoint])
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: predict(router, n), range(80)))
    # Round robin would send it 40; least outstanding only when neither has a request in flight.
    assert slow.requests + fast.requests == 80
    assert slow.requests <= 8, (slow.requests, fast.requests)
    router.close()


def test_a_model_error_is_returned_as_is_and_not_retried(replica):
    first, second = replica(1, status=400), replica(2, status=400)
    failures = Failures()
    router = make_router([first.endpoint, second.endpoint], failures)
    status, body, _ = predict(router, [1, 2])
    assert (status, body) == (400, {"error": "Input has the wrong shape"})
    assert first.requests + second.requests == 1
    assert failures == []
    router.close()


def test_a_response_keeps_the_replicas_headers_and_names_the_replica(replica):
    only = replica(3)
    router = make_router([only.endpoint])
    response = router.forward(7, PREDICT, b'{"instances": [[1.0]]}',
                              {"Content-Type": "application/json", "Connection": "close"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body) == {"predictions": [[1.0]]}
    assert response.replica == "replica-3"
    router.close()


def test_a_dead_replica_is_reported_once_and_requests_are_served_by_another(replica):
    dead, alive = dead_endpoint(1), replica(2)
    failures = Failures()
    router = make_router([dead, alive.endpoint], failures)
    # Ties are taken in turn, so one of the first two requests goes to the dead replica first.
    answers = [predict(router, n) for n in range(6)]
    assert answers == [(200, {"predictions": [n]}, "replica-2") for n in range(6)]
    assert len(failures) == 1
    assert failures[0][0] == dead
    assert failures[0][1] == "connect failed: Connection refused"
    router.close()


def test_a_frozen_replica_is_reported_after_the_read_timeout_and_another_answers(replica, frozen_endpoint):
    alive = replica(2)
    failures = Failures()
    router = make_router([frozen_endpoint, alive.endpoint], failures, deadline=0.3)
    answers = [predict(router, n) for n in range(4)]
    assert [replica_name for _, _, replica_name in answers] == ["replica-2"] * 4
    # One read timeout, then the frozen replica is skipped: it is reported once, not per request.
    assert failures == [(frozen_endpoint, "no answer within 0.3s")]
    router.close()


def test_every_replica_failing_raises_no_replica_available(frozen_endpoint):
    first, second = dead_endpoint(1), dead_endpoint(2)
    failures = Failures()
    router = make_router([first, frozen_endpoint, second], failures, deadline=0.2)
    with pytest.raises(NoReplicaAvailable, match="no replica answered"):
        predict(router, 1)
    assert len(failures) == 2  # the chosen replica and one retry, no more
    # The next request tries the one replica left; when it fails too there is nothing to try.
    with pytest.raises(NoReplicaAvailable):
        predict(router, 1)
    assert {endpoint for endpoint, _ in failures} == {first, second, frozen_endpoint}
    with pytest.raises(NoReplicaAvailable, match="no healthy replica"):
        predict(router, 1)
    router.close()


def test_no_healthy_replica_raises_at_once():
    failures = Failures()
    router = make_router([], failures)
    with pytest.raises(NoReplicaAvailable, match="version 7 has no healthy replica"):
        predict(router, 1)
    assert failures == []


def test_connections_are_kept_alive_and_reused(replica):
    only = replica(1)
    router = make_router([only.endpoint])
    for n in range(20):
        assert predict(router, n)[0] == 200
    assert (only.requests, only.connections) == (20, 1)
    router.close()


def test_a_kept_alive_connection_the_replica_dropped_is_retried_not_reported(replica):
    only = replica(1, drop_reused=True)
    failures = Failures()
    router = make_router([only.endpoint], failures)
    assert [predict(router, n)[:2] for n in range(3)] == [(200, {"predictions": [n]}) for n in range(3)]
    assert failures == []
    assert only.connections == 3
    router.close()


def test_parallel_requests_each_get_their_own_answer(replica):
    first, second = replica(1), replica(2)
    failures = Failures()
    # Each request exactly once: no per-try timeout may send one again (a 50 ms stall of a busy machine
    # would, as designed; the per-try timeout has tests of its own).
    router = make_router([first.endpoint, second.endpoint], failures, pool_size=8, min_try_timeout=30.0)

    def one(n: int) -> tuple[int, dict, str]:
        return predict(router, {"request": n})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(400)))
    assert [(status, body) for status, body, _ in answers] == [
        (200, {"predictions": [{"request": n}]}) for n in range(400)]
    assert first.requests + second.requests == 400
    assert min(first.requests, second.requests) > 100
    assert failures == []
    # Keep-alive under concurrency: connections stay near the thread count, not one per request.
    assert first.connections + second.connections <= 40
    router.close()


def test_a_request_stuck_on_a_frozen_replica_goes_to_another_which_gets_the_next_ones(replica):
    fast, freezing = replica(1), replica(2)
    failures = Failures()
    router = make_router([fast.endpoint, freezing.endpoint], failures, deadline=10)
    for n in range(30):  # latencies for the per-try timeout: about a millisecond each
        assert predict(router, n)[0] == 200
    freezing.gate.clear()  # it accepts requests and holds them
    before = freezing.requests
    answers = [predict(router, n) for n in range(10)]
    assert [name for _, _, name in answers] == ["replica-1"] * 10
    # One request went to the frozen replica, was answered by the other, and made the router skip it since.
    assert freezing.requests - before == 1
    assert failures == []  # out-run, not reported: the monitor's probes judge it
    freezing.gate.set()
    router.close()


def test_a_model_whose_usual_latency_is_near_the_deadline_is_not_hedged_nor_reported(replica):
    slow = [replica(1, delay=0.1), replica(2, delay=0.1)]
    failures = Failures()
    router = make_router([stub.endpoint for stub in slow], failures, deadline=0.5)
    for n in range(25):
        assert predict(router, n)[0] == 200
    assert sum(stub.requests for stub in slow) == 25  # three times its latency is over half the deadline: no retry
    assert failures == []
    router.close()

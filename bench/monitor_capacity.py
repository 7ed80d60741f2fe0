"""How many replicas one health-monitor process can watch: 1000 endpoints probed every second.

One process (asyncio, a protocol per connection) listens on ``--endpoints`` ports of 127.0.0.1 and answers
every ``GET /v2/health/ready`` with 200, counting the probes it answers. A second process runs
:class:`HealthMonitor` on all of them (interval 1 s, timeout 1 s, rise 2, fall 3, every target starting
unhealthy), as ``cloudml-os monitor`` would. After ``--warmup`` seconds, the monitor's CPU time (utime +
stime of every thread, from ``/proc/PID/stat``) and the probes answered are sampled over ``--seconds``
seconds. Reported: the monitor's share of one core (target < 50 %), probes per second (expected: one per
endpoint per second), how long until every endpoint was reported healthy, and that none was ever reported
unhealthy.

Two scenarios: ``keep-alive`` (the stub keeps connections open, as the model server does, so a probe is one
request on an open connection) and ``close`` (the stub answers ``Connection: close`` and closes, so every
probe opens a new TCP connection: a worst case).

    .venv/bin/python -m bench.monitor_capacity [--endpoints 1000] [--seconds 20] [--scenarios keep-alive close]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import time
from multiprocessing.sharedctypes import Synchronized

from cloudml_os.platform import sample_writer
from cloudml_os.serving.monitor import HealthMonitor, Target
from cloudml_os.store import Store

TARGET_CPU_SHARE = 0.5
SAMPLE_SECONDS = 10.0  # the platform's default replica_sample_seconds


class _ReadyStub(asyncio.Protocol):
    """Answers each request on the connection with 200 and a small JSON body; ``close``: then hangs up."""

    def __init__(self, answered: Synchronized, close: bool):
        self.answered, self.close = answered, close
        body = b'{"ready": true}'
        self.response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                         % (len(body), b"Connection: close\r\n" if close else b"", body))

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        requests = self.buffer.count(b"\r\n\r\n")
        if requests:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4:]
            self.answered.value += requests  # one writer (this process's loop): no lock needed
            self.transport.write(self.response * requests)
            if self.close:
                self.transport.close()


def _serve(count: int, close: bool, answered: Synchronized, ready: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(lambda: _ReadyStub(answered, close), "127.0.0.1", 0, backlog=64)
                   for _ in range(count)]
        ready.send([server.sockets[0].getsockname()[1] for server in servers])
        await asyncio.Event().wait()

    asyncio.run(main())


def _monitor(ports: list[int], keys: list[int], healthy: Synchronized, unhealthy: Synchronized,
             sampled: Synchronized, database_url: str | None) -> None:
    targets = [Target(key, "127.0.0.1", port, interval=1.0, timeout=1.0, rise=2, fall=3)
               for key, port in zip(keys, ports, strict=True)]

    def on_change(target: Target, now_healthy: bool, reason: str) -> None:
        counter = healthy if now_healthy else unhealthy
        with counter.get_lock():
            counter.value += 1

    # The platform's sample writer (one batch insert per window, then retention) when given a database;
    # else the samples are only counted (the aggregation's own cost).
    write = sample_writer(Store(database_url), 24.0) if database_url else len

    def on_samples(samples: list) -> None:
        count = write(samples)
        with sampled.get_lock():
            sampled.value += count

    HealthMonitor(lambda: targets, on_change, refresh_interval=1.0, on_samples=on_samples,
                  sample_interval=SAMPLE_SECONDS).run_forever()


def _replica_rows(database_url: str, count: int) -> list[int]:
    """A migrated database's model version with ``count`` replicas (made once per run); their ids."""
    from cloudml_os.store import migrate
    from cloudml_os.store.models import Model, Replica, Version

    migrate(database_url)
    store = Store(database_url)
    with store.session() as session:
        model = Model(project="bench", name=f"capacity_{os.getpid()}")
        session.add(model)
        session.flush()
        version = Version(model_id=model.id, name="v1", state="READY", deployment_uri="store://bench/model",
                          framework="TENSORFLOW", runtime_version="2.21", machine_type="standard")
        session.add(version)
        session.flush()
        replicas = [Replica(version_id=version.id, name=f"replica-{i}", state="READY") for i in range(count)]
        session.add_all(replicas)
        session.flush()
        ids = [replica.id for replica in replicas]
    store.engine.dispose()
    return ids


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(scenario: str, endpoints: int, warmup: float, seconds: float, database_url: str | None = None) -> bool:
    """Run one scenario; prints its figures; whether the target was met and every endpoint stayed healthy."""
    answered = multiprocessing.Value("q", 0, lock=False)
    healthy, unhealthy = multiprocessing.Value("q", 0), multiprocessing.Value("q", 0)
    sampled = multiprocessing.Value("q", 0)
    receive, send = multiprocessing.Pipe(duplex=False)
    stub = multiprocessing.Process(target=_serve, args=(endpoints, scenario == "close", answered, send), daemon=True)
    stub.start()
    ports = receive.recv()
    keys = _replica_rows(database_url, len(ports)) if database_url else ports  # made before the clock starts
    monitor = multiprocessing.Process(target=_monitor, args=(ports, keys, healthy, unhealthy, sampled, database_url),
                                      daemon=True)
    try:
        started = time.monotonic()
        monitor.start()
        all_healthy_after = None
        while time.monotonic() - started < warmup:
            if all_healthy_after is None and healthy.value == endpoints:
                all_healthy_after = time.monotonic() - started
            time.sleep(0.05)
        wall0, cpu0, stub_cpu0, probes0 = time.monotonic(), _cpu_seconds(monitor.pid), _cpu_seconds(stub.pid), \
            answered.value
        time.sleep(seconds)
        wall1, cpu1, stub_cpu1, probes1 = time.monotonic(), _cpu_seconds(monitor.pid), _cpu_seconds(stub.pid), \
            answered.value
        if all_healthy_after is None and healthy.value == endpoints:
            all_healthy_after = time.monotonic() - started
    finally:
        monitor.terminate()
        monitor.join(10)
        stub.terminate()
        stub.join(10)
    elapsed = wall1 - wall0
    share, stub_share = (cpu1 - cpu0) / elapsed, (stub_cpu1 - stub_cpu0) / elapsed
    rate = (probes1 - probes0) / elapsed
    ok = share < TARGET_CPU_SHARE and healthy.value == endpoints and unhealthy.value == 0
    became = f"{all_healthy_after:.2f} s" if all_healthy_after is not None else "never"
    print(f"{scenario:>10}: monitor CPU {share:6.1%} of one core (target < {TARGET_CPU_SHARE:.0%}); "
          f"{rate:7.1f} probes/s ({rate / endpoints:.3f} per endpoint per s); "
          f"{share / rate * 1e6 if rate else float('nan'):5.1f} µs CPU per probe; "
          f"all {endpoints} healthy after {became}; {healthy.value} reported healthy, {unhealthy.value} unhealthy; "
          f"{sampled.value} replica samples {'written' if database_url else 'made'}; "
          f"stub CPU {stub_share:.1%} → {'met' if ok else 'MISSED'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scenarios", nargs="+", choices=["keep-alive", "close"], default=["keep-alive", "close"])
    parser.add_argument("--database-url", help="write the replica samples there, as the platform's monitor does")
    args = parser.parse_args()
    # 1000 listening sockets and 1000 accepted connections in the stub: lift the soft limit on descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * args.endpoints + 100
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))
    print(f"{args.endpoints} endpoints on 127.0.0.1, probed every 1 s; {args.warmup:g} s warm-up, "
          f"{args.seconds:g} s measured; {os.cpu_count()} CPUs")
    verdicts = [measure(scenario, args.endpoints, args.warmup, args.seconds, args.database_url)
                for scenario in args.scenarios]
    print("all targets met" if all(verdicts) else "some target MISSED")


if __name__ == "__main__":
    main()

"""What the router adds to a prediction: Router.forward against direct urllib3 to the same single replica.

One stub replica (an asyncio process answering every ``POST /v1/models/bench:predict`` with the same small
predictions JSON, over keep-alive connections) serves both clients, side by side in one run:

- direct: a ``urllib3.HTTPConnectionPool`` to the replica, ``urlopen("POST", …)`` and the body read;
- router: ``Router.forward`` with ``endpoints`` returning that one replica (what the API will call).

For each client concurrency (threads, each sending back to back), the two alternate for ``--rounds`` rounds of
``--seconds`` each, in an order that flips every round. Reported per mode: p50 and p99 latency over all its
requests and the median of its rounds' throughputs; then what the router adds at p50 and p99 and its
throughput ratio, each the median over the rounds of router-versus-direct of the same round (robust to
other load on the machine, which comes and goes). Also reported: the client process's CPU time per request
(``time.process_time``), which other processes' load hardly touches and which bounds a GIL-bound client's
throughput. Targets: ≤ 1 ms added at p50, ≥ 0.9× throughput.

    .venv/bin/python -m bench.router_overhead [--threads 1 8] [--rounds 40] [--seconds 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable

import urllib3

from cloudml_os.serving.router import Endpoint, Router

PATH = "/v1/models/bench:predict"
REQUEST = json.dumps({"instances": [[1.0, 2.0, 3.0, 4.0]] * 4}).encode()
ANSWER = json.dumps({"predictions": [[0.1, 0.9]] * 4}).encode()
TARGET_ADDED_P50_MS, TARGET_THROUGHPUT = 1.0, 0.9


class _PredictStub(asyncio.Protocol):
    """Answers each request (headers + Content-Length body) with ANSWER in one write, keeping the connection."""

    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(ANSWER)) + ANSWER

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(self.response)


def _serve(ready: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_PredictStub, "127.0.0.1", 0, backlog=128)
        ready.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def _run(call: Callable[[], bytes], threads: int, seconds: float) -> tuple[list[float], float, float]:
    """Call back to back from ``threads`` threads for ``seconds``; every latency (s), the requests per second and
    this process's CPU seconds per request."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(mine: list[float]) -> None:
        start.wait()
        clock = time.perf_counter
        while (began := clock()) < stop_at[0]:
            assert call() == ANSWER
            mine.append(clock() - began)

    workers = [threading.Thread(target=worker, args=(mine,)) for mine in latencies]
    for thread in workers:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    began, cpu_began = time.perf_counter(), time.process_time()
    start.wait()
    for thread in workers:
        thread.join()
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    every = [latency for mine in latencies for latency in mine]
    return every, len(every) / elapsed, cpu / len(every)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def compare(port: int, threads: int, rounds: int, seconds: float) -> bool:
    """Direct and router side by side at one concurrency; prints their figures; whether the targets are met."""
    headers = {"Content-Type": "application/json"}
    direct_pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=threads, retries=False,
                                             timeout=urllib3.Timeout(connect=1.0, read=30.0))
    endpoint = Endpoint(1, "replica-1", "127.0.0.1", port)
    router = Router(lambda version_id: [endpoint], lambda endpoint, reason: None, pool_size=threads)
    modes = {
        "direct": lambda: direct_pool.urlopen("POST", PATH, body=REQUEST, headers=headers, redirect=False,
                                              assert_same_host=False).data,
        "router": lambda: router.forward(1, PATH, REQUEST, headers).body,
    }
    for call in modes.values():  # warm-up: connections opened, code paths hot
        _run(call, threads, 0.5)
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    figures: dict[str, list[tuple[float, ...]]] = {mode: [] for mode in modes}  # per round: p50, p99, rate, cpu
    for round_number in range(rounds):
        for mode in list(modes) if round_number % 2 == 0 else reversed(modes):
            every, rate, cpu = _run(modes[mode], threads, seconds)
            latencies[mode] += every
            figures[mode].append((_percentile(every, 0.5) * 1e3, _percentile(every, 0.99) * 1e3, rate, cpu))
    router.close()
    direct_pool.close()
    for mode in modes:
        p50, p99 = _percentile(latencies[mode], 0.50) * 1e3, _percentile(latencies[mode], 0.99) * 1e3
        rate = statistics.median(figure[2] for figure in figures[mode])
        cpu = statistics.median(figure[3] for figure in figures[mode]) * 1e6
        print(f"{threads:>7} {mode:>6} {p50:8.3f} {p99:8.3f} {rate:8.0f} {cpu:10.0f}")
    pairs = list(zip(figures["direct"], figures["router"], strict=True))
    added = statistics.median(router[0] - direct[0] for direct, router in pairs)
    added_p99 = statistics.median(router[1] - direct[1] for direct, router in pairs)
    ratio = statistics.median(router[2] / direct[2] for direct, router in pairs)
    added_cpu = statistics.median(router[3] - direct[3] for direct, router in pairs) * 1e6
    ok = added <= TARGET_ADDED_P50_MS and ratio >= TARGET_THROUGHPUT
    print(f"{threads:>7} router adds {added:+.3f} ms at p50 (target ≤ {TARGET_ADDED_P50_MS:g}), "
          f"{added_p99:+.3f} ms at p99, {added_cpu:+.0f} µs CPU per request; throughput ×{ratio:.3f} "
          f"(target ≥ {TARGET_THROUGHPUT}) → {'met' if ok else 'MISSED'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.25)
    args = parser.parse_args()

    receive, send = multiprocessing.Pipe(duplex=False)
    stub = multiprocessing.Process(target=_serve, args=(send,), daemon=True)
    stub.start()
    port = receive.recv()
    print(f"stub replica 127.0.0.1:{port}; request {len(REQUEST)} B, answer {len(ANSWER)} B; "
          f"{args.rounds} rounds × {args.seconds:g} s per mode; {os.cpu_count()} CPUs")
    print(f"{'threads':>7} {'mode':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'CPU µs/req':>10}")
    try:
        verdicts = [compare(port, threads, args.rounds, args.seconds) for threads in args.threads]
    finally:
        stub.terminate()
        stub.join()
    print("all targets met" if all(verdicts) else "some target MISSED")


if __name__ == "__main__":
    main()

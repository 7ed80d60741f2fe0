"""The whole online prediction path: ``:predict`` through the API (auth, version lookup, router) against the
same request sent straight to the replica's model server, and ``:predict`` with 64 concurrent clients.

A real platform serves the TensorFlow example's model on one replica. Clients are separate processes
(``--processes``, threads inside each, a keep-alive session per thread) so that the client's own GIL is not
what is measured. For 1 and 8 clients, rounds of ``--seconds`` alternate between the two paths (order flipped
each round); each round gives requests/s, p50 and p99, and CPU milliseconds per request of the API process
and of the model server (utime + stime, /proc): on 2 cores the API and the replica compete for the same CPU,
so CPU per request is the noise-free figure. Then 64 clients through the API.
Targets (issue #22): p50 added <= 1 ms, throughput through the API >= 0.9x direct, >= 500 requests/s with 64.

    .venv/bin/python -m bench.api_predict [--seconds 3] [--rounds 4] [--processes 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time
from pathlib import Path

import requests

from bench.api_jobs import api_pid, cpu_seconds
from bench.serving_platform import deploy, platform_with_model
from tests.harness import node_processes

BODY = b'{"instances": [[0.0], [1.0]]}'


def _client_process(url: str, headers: dict, threads: int, seconds: float, out) -> None:
    latencies: list[float] = []
    failed = [0]
    ends = time.monotonic() + seconds

    def run() -> None:
        session = requests.Session()
        while time.monotonic() < ends:
            started = time.monotonic()
            answer = session.post(url, data=BODY, headers=headers, timeout=60)
            if answer.status_code == 200:
                latencies.append(time.monotonic() - started)
            else:
                failed[0] += 1

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((latencies, failed[0]))


def load(url: str, headers: dict, clients: int, processes: int, seconds: float, pids: list[int]) -> dict:
    """``clients`` clients spread over ``processes`` processes for ``seconds``: rps, p50/p99 ms, CPU ms per
    request of each of ``pids``."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    counts = [clients // processes + (1 if n < clients % processes else 0) for n in range(min(processes, clients))]
    workers = [context.Process(target=_client_process, args=(url, headers, count, seconds, out)) for count in counts]
    for worker in workers:
        worker.start()
    time.sleep(0.5)  # the clients' start-up (imports) is not measured...
    cpu_before = [cpu_seconds(pid) for pid in pids]
    results = [out.get(timeout=seconds + 120) for _ in workers]
    cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
    for worker in workers:
        worker.join()
    latencies = sorted(latency for found, _ in results for latency in found)
    failed = sum(f for _, f in results)
    assert failed == 0, f"{failed} requests failed"
    answered = len(latencies)
    return {"rps": answered / seconds, "p50": 1000 * latencies[answered // 2],
            "p99": 1000 * latencies[min(answered - 1, int(answered * 0.99))],
            "cpu_ms": [1000 * c / answered for c in cpu]}  # ...nor in CPU: it is over before the first read


def replica_server_pid(version_replicas: list[dict]) -> int:
    marker = f"/nodes/{version_replicas[0]['name']}/"
    for pid in node_processes(marker):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if command[0].endswith(b"python") and any(part.endswith(b"model_server.py") for part in command):
            return pid
    raise RuntimeError("no model server process found")


def median_range(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    with platform_with_model() as (platform, client, job):
        deploy(client, job, "v1", ready=1, manualScaling={"nodes": 1})
        replica = [r for r in client.request("GET", "/models/m/versions/v1").json()["replicas"]
                   if r["state"] == "READY"]
        api, server = api_pid(platform), replica_server_pid(replica)
        paths = {"api": (f"{client.base_url}/v1/projects/bench/models/m/versions/v1:predict",
                         {"Authorization": f"Bearer {client.token}", "Content-Type": "application/json"}),
                 "direct": (f"http://{replica[0]['address']}/v1/models/m:predict",
                            {"Content-Type": "application/json"})}
        results: dict[tuple[str, int], list[dict]] = {}
        for clients in (1, 8):
            processes = min(args.processes, clients)
            load(*paths["api"], clients, processes, 1.0, [api, server])  # warm-up
            for round_ in range(args.rounds):
                for side in ("api", "direct") if round_ % 2 == 0 else ("direct", "api"):
                    results.setdefault((side, clients), []).append(
                        load(*paths[side], clients, processes, args.seconds, [api, server]))
        many = [load(*paths["api"], 64, args.processes, args.seconds, [api, server]) for _ in range(args.rounds)]

    print(f"\n:predict through the API vs straight to the replica (TF example, 1 replica, 2 cores; {args.rounds} "
          f"interleaved rounds of {args.seconds:g} s; clients in {args.processes} processes; median (range))")
    print(f"  {'clients':>7s} {'path':7s} {'req/s':>18s} {'p50 ms':>16s} {'p99 ms':>16s} {'API CPU ms/req':>18s} "
          f"{'replica CPU ms/req':>20s}")
    for (side, clients), runs in results.items():
        print(f"  {clients:7d} {side:7s} {median_range([r['rps'] for r in runs], 0):>18s} "
              f"{median_range([r['p50'] for r in runs], 2):>16s} {median_range([r['p99'] for r in runs], 2):>16s} "
              f"{median_range([r['cpu_ms'][0] for r in runs], 3) if side == 'api' else '-':>18s} "
              f"{median_range([r['cpu_ms'][1] for r in runs], 3):>20s}")
    for clients in (1, 8):
        pairs = list(zip(results[("api", clients)], results[("direct", clients)], strict=True))
        added = [a["p50"] - d["p50"] for a, d in pairs]
        ratio = [a["rps"] / d["rps"] for a, d in pairs]
        print(f"  {clients} client(s): p50 added {median_range(added, 2)} ms (target <= 1), throughput api/direct "
              f"{median_range(ratio, 2)} (target >= 0.9)")
    print(f"  64 clients through the API: {median_range([r['rps'] for r in many], 0)} req/s (target >= 500), "
          f"p50 {median_range([r['p50'] for r in many])} ms, p99 {median_range([r['p99'] for r in many])} ms, "
          f"API CPU {median_range([r['cpu_ms'][0] for r in many], 3)} ms/req, replica CPU "
          f"{median_range([r['cpu_ms'][1] for r in many], 3)} ms/req")


if __name__ == "__main__":
    main()

"""Online prediction on a real platform (API + router, monitor, worker, 2 TensorFlow replicas): what request
logging costs, and what a frozen replica costs the clients.

- Request logging: 4 clients predict as fast as they can for ``--seconds`` with the version's
  ``requestLoggingConfig.samplingPercentage`` at 0, then at 1 (every request spooled and shipped to the
  store), order flipped every round; throughput on / off per round (target >= 0.95).
- Frozen replica: 4 clients predict for ``--seconds``, then one replica's model server is frozen (SIGSTOP)
  and they go on for ``--seconds`` more; latency percentiles and the worst request before and during the
  freeze, failed requests (target: worst during <= the version's deadline + the p99 before).

    .venv/bin/python -m bench.prediction_path [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import requests

from bench.serving_platform import deploy, platform_with_model
from tests.harness import node_processes

CLIENTS = 4
BODY = {"instances": [[0.0], [1.0]]}


def load(client, seconds: float) -> tuple[list[float], int]:
    """CLIENTS threads predicting for ``seconds``: (every answered request's latency, failed requests)."""
    url = f"{client.base_url}/v1/projects/bench/models/m/versions/v1:predict"
    latencies: list[float] = []
    failed = [0]
    ends = time.monotonic() + seconds

    def run() -> None:
        session = requests.Session()
        while time.monotonic() < ends:
            started = time.monotonic()
            answer = session.post(url, json=BODY, headers={"Authorization": f"Bearer {client.token}"}, timeout=120)
            if answer.status_code == 200:
                latencies.append(time.monotonic() - started)
            else:
                failed[0] += 1

    threads = [threading.Thread(target=run) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failed[0]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def set_logging(client, fraction: float) -> None:
    response = client.request("PATCH", "/models/m/versions/v1?updateMask=requestLoggingConfig",
                              json={"requestLoggingConfig": {"samplingPercentage": fraction}})
    assert response.status_code == 200, response.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with platform_with_model() as (_, client, job):
        deploy(client, job, "v1")
        load(client, 2)  # warm-up: connections, the router's latency history

        rates: dict[str, list[float]] = {"off": [], "on": []}
        for round_ in range(args.rounds):
            for side in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                set_logging(client, 1.0 if side == "on" else 0.0)
                latencies, failed = load(client, args.seconds)
                assert failed == 0
                rates[side].append(len(latencies) / args.seconds)
        set_logging(client, 0.0)
        logged = 0
        listing = client.request("GET", "/objects", params={"prefix": "request-logs/m/v1/", "pageSize": 1000}).json()
        for item in listing["objects"]:
            logged += client.request("GET", f"/objects/{item['name']}").text.count("\n")

        deadline = client.request("GET", "/models/m/versions/v1").json()["predictionDeadline"]
        before, failed_before = load(client, args.seconds)
        victim = next(r["name"] for r in client.request("GET", "/models/m/versions/v1").json()["replicas"]
                      if r["state"] == "READY")
        server = [pid for pid in node_processes(f"/nodes/{victim}/")
                  if b"model_server.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
                  and Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"python")]
        assert len(server) == 1, server
        os.kill(server[0], signal.SIGSTOP)
        during, failed_during = load(client, args.seconds)
        try:
            os.kill(server[0], signal.SIGCONT)
        except ProcessLookupError:
            pass

    ratios = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
    print(f"\nOnline prediction through the API, {CLIENTS} clients, 2 TensorFlow replicas (2 CPU cores, local nodes)")
    print(f"  request logging off: {statistics.median(rates['off']):7.0f} requests/s "
          f"(range {min(rates['off']):.0f}-{max(rates['off']):.0f})")
    print(f"  request logging on:  {statistics.median(rates['on']):7.0f} requests/s "
          f"(range {min(rates['on']):.0f}-{max(rates['on']):.0f}); {logged} lines in the store")
    print(f"  on / off: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}; "
          f"target >= 0.95)")
    for label, values, failed in (("before the freeze", before, failed_before),
                                  ("one replica frozen", during, failed_during)):
        print(f"  {label:19s} p50 {percentile(values, 0.5) * 1000:7.1f} ms  "
              f"p99 {percentile(values, 0.99) * 1000:7.1f} ms  worst {max(values) * 1000:7.1f} ms  "
              f"{len(values)} answered, {failed} failed")
    target = deadline + percentile(before, 0.99)
    print(f"  worst during the freeze <= deadline {deadline:g} s + p99 before = {target:.2f} s: "
          f"{'met' if max(during) <= target else 'NOT met'} "
          "(before the router had deadlines and per-try timeouts: worst 6.9 s)")


if __name__ == "__main__":
    main()

"""Failover of a 2-replica TensorFlow version on a real platform (API + router, monitor, worker).

Two faults, one after the other, each measured from the fault to what the platform recorded:
- passive: a replica's node is killed (SIGKILL of its PID 1) under a steady request loop; the router
  sees the connection fail, ejects it, and retries the request elsewhere;
- active: another replica's model server is frozen (SIGSTOP) with no traffic; only the monitor's
  probes can notice. Measured twice: with the default health check (interval 1 s, timeout 1 s, rise 2,
  fall 3) and with a version whose ``healthCheck`` halves interval and timeout (0.5 s, 0.5 s, 2, 3).
Printed: time to eject, failed client requests, time back to 2 healthy replicas, beside the defaults
of the anchors (Kubernetes/KServe readiness probes: 10 s period x 3 failures = 30 s; Octavia's health
manager: heartbeat timeout 60 s).

    .venv/bin/python -m bench.failover
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
from pathlib import Path

import requests
from sqlalchemy import create_engine, text

from bench.serving_platform import deploy, platform_with_model, ready_replicas
from tests.harness import node_processes

INSTANCES = {"instances": [[0.0], [1.0]]}
FAST_CHECK = {"interval": 0.5, "timeout": 0.5, "rise": 2, "fall": 3}


def _events(client, version: str) -> list[dict]:
    return client.request("GET", f"/models/m/versions/{version}/events").json()["events"]


def _time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _node(database_url: str, version: str, replica: str) -> str:
    """The marker of a replica's node in its processes' command lines (its folder in the local driver)."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        version_id = connection.execute(text("SELECT id FROM versions WHERE name = :v"), {"v": version}).scalar()
    engine.dispose()
    return f"/clusters/cml-serve-{version_id}/nodes/{replica}/"


def _freeze(client, database_url: str, version: str) -> tuple[float, float, str]:
    """SIGSTOP one replica's model server; return (seconds to eject, seconds back to 2 healthy, reason)."""
    victim = ready_replicas(client, version)[0]["name"]
    server = [pid for pid in node_processes(_node(database_url, version, victim))
              if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"python")]
    frozen = time.time()
    os.kill(server[0], signal.SIGSTOP)
    ejected, reason = _ejected_at(client, version, victim)
    _wait(lambda: _replaced(client, version, victim))
    back = time.time()
    try:
        os.kill(server[0], signal.SIGCONT)
    except ProcessLookupError:
        pass
    return ejected - frozen, back - frozen, reason


def _replaced(client, version: str, victim: str) -> bool:
    """Two healthy replicas again, neither of them ``victim``."""
    ready = {r["name"] for r in ready_replicas(client, version)}
    return len(ready) == 2 and victim not in ready


def _wait(condition, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError


def _ejected_at(client, version: str, replica: str) -> float:
    event = _wait(lambda: next((e for e in _events(client, version)
                                if e.get("replica") == replica and e["kind"] == "EJECTED"), None))
    return _time(event["time"]), event["message"]


def main() -> None:
    with platform_with_model() as (platform, client, job):
        database_url = f"sqlite:///{platform.data_dir}/cloudml-os.db"
        deploy(client, job, "v1")

        # Passive: kill a node under load.
        failures, successes, stop = [], [], threading.Event()
        url = f"{client.base_url}/v1/projects/bench/models/m/versions/v1:predict"

        def load() -> None:
            session = requests.Session()
            while not stop.is_set():
                answer = session.post(url, json=INSTANCES, headers={"Authorization": f"Bearer {client.token}"},
                                      timeout=60)
                (successes if answer.status_code == 200 else failures).append((answer.status_code, answer.text[:200]))

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(2)
        victim = ready_replicas(client, "v1")[0]["name"]
        killed = time.time()
        for pid in node_processes(_node(database_url, "v1", victim)):
            os.kill(pid, signal.SIGKILL)
        passive_eject, passive_reason = _ejected_at(client, "v1", victim)
        _wait(lambda: _replaced(client, "v1", victim))
        passive_back = time.time()
        stop.set()
        loader.join()

        # Active: freeze a model server, no traffic; the default check, then a faster one.
        active = _freeze(client, database_url, "v1")
        deploy(client, job, "v2", healthCheck=FAST_CHECK)
        fast = _freeze(client, database_url, "v2")

    print("\nFailover of a 2-replica TensorFlow version (2 CPU cores, local nodes; health check interval / timeout / "
          "rise / fall)")
    print(f"  {'':34s} {'eject':>8s} {'target':>7s} {'failed requests':>16s} {'back to 2 healthy':>18s}")
    print(f"  {'passive (node killed, under load)':34s} {passive_eject - killed:7.2f}s {'<= 1s':>7s} "
          f"{len(failures):>10d} of {len(failures) + len(successes):<5d} {passive_back - killed:16.1f}s")
    for label, (eject, back, _) in (("active, default check 1/1/2/3", active),
                                    ("active, healthCheck 0.5/0.5/2/3", fast)):
        print(f"  {label:34s} {eject:7.2f}s {'<= 3s':>7s} {'-':>16s} {back:16.1f}s")
    print("  anchors' defaults: Kubernetes/KServe readiness 10 s x 3 = 30 s to eject; Octavia heartbeat timeout 60 s")
    for status, body in failures:
        print(f"  failed request: HTTP {status} {body}")
    print(f"  passive reason: {passive_reason}\n  active reason:  {active[2]}\n  fast reason:    {fast[2]}")


if __name__ == "__main__":
    main()

"""Control-plane overhead of a 4-node TensorFlow job (master + 3 workers), on a real running platform.

Two figures per run, both excluding the nodes' own start-up and the trainer's work:
- start overhead: POST → every trainer process started, minus the driver's node creation time;
- finish overhead: the master's exit → the job reads SUCCEEDED (detection, export check, teardown).
Targets: ≤ 2 s and ≤ 1 s. Runs against the embedded default (SQLite + SQLAlchemy broker) and against
PostgreSQL + RabbitMQ when they answer on this machine.

    .venv/bin/python -m bench.control_plane [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import re
import statistics
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.harness import start_platform

HERE = Path(__file__).resolve().parent
TARGET_START, TARGET_FINISH = 2.0, 1.0


def _time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _package() -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as archive:
        archive.add(HERE / "trainers" / "overhead" / "overhead_trainer", arcname="overhead_trainer")
    return data.getvalue()


def measure(client, package_uri: str, job_id: str) -> tuple[float, float]:
    body = {"jobId": job_id, "trainingInput": {
        "scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard", "workerCount": 3,
        "packageUris": [package_uri], "pythonModule": "overhead_trainer.task"}}
    posted = dt.datetime.now(dt.UTC).timestamp()
    response = client.request("POST", "/jobs", json=body)
    assert response.status_code == 200, response.text
    job = client.wait(job_id, timeout=300)
    assert job["state"] == "SUCCEEDED", job
    events = client.events(job_id)
    preparing = next(_time(e["time"]) for e in events if e["message"] == "Job PREPARING")
    ready = next(_time(e["time"]) for e in events if e["message"].startswith("Cluster ") and "ready" in e["message"])
    logs = client.logs(job_id)
    started = max(float(m) for text in logs.values() for m in re.findall(r"STARTED ([0-9.]+)", text))
    exited = float(re.search(r"EXIT ([0-9.]+)", logs["chief-0"]).group(1))
    start_overhead = (started - posted) - (ready - preparing)
    finish_overhead = _time(job["endTime"]) - exited
    return start_overhead, finish_overhead


def run(name: str, runs: int, **settings: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, start_platform(Path(tmp), **settings) as platform:
        client = platform.client("bench")
        response = client.request("POST", "/packages", files={"file": ("overhead.tar.gz", _package())})
        assert response.status_code == 200, response.text
        uri = response.json()["uri"]
        measure(client, uri, f"warmup_{uuid.uuid4().hex[:6]}")
        results = [measure(client, uri, f"bench_{i}_{uuid.uuid4().hex[:6]}") for i in range(runs)]
    starts, finishes = zip(*results, strict=True)
    print(f"\n{name} ({runs} runs, 4 nodes)")
    for label, values, target in (("POST → all trainers started (excl. node start)", starts, TARGET_START),
                                  ("master exit → SUCCEEDED", finishes, TARGET_FINISH)):
        median = statistics.median(values)
        print(f"  {label:48s} median {median:6.3f} s  max {max(values):6.3f} s  "
              f"target {target:.1f} s  median/target {median / target:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only-embedded", action="store_true")
    args = parser.parse_args()
    run("embedded default: SQLite + SQLAlchemy broker", args.runs, local_address_prefix="127.4",
        local_port_base=22000)
    if not args.only_embedded:
        with _postgres_database() as database_url:
            run("PostgreSQL + RabbitMQ", args.runs, database_url=database_url,
                broker_url="amqp://guest:guest@127.0.0.1:5672//", task_queue=f"bench-{uuid.uuid4().hex[:8]}",
                local_address_prefix="127.5", local_port_base=23000)


@contextlib.contextmanager
def _postgres_database() -> Iterator[str]:
    """A scratch database on this machine's PostgreSQL, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"cloudml_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()

"""The API itself under read load: ``jobs.get`` and ``jobs.list`` with 10,000 jobs in the database, on the
embedded default (SQLite) and on PostgreSQL, through the real gunicorn API process.

The database gets ``--jobs`` finished jobs of one project (inserted in bulk, as the workflow leaves them:
trainingInput, trainingOutput, labels), plus 100 of another project. Then, for each database and each client
concurrency (``--clients``, threads with a keep-alive session each), ``--seconds`` of back-to-back
``GET …/jobs/ID`` (a random job) and of ``GET …/jobs?pageSize=100`` (the first page, newest first), in
alternating rounds. Printed: requests/s, p50 and p99 latency, and the API process's CPU milliseconds per
request (utime + stime of all its threads, /proc) — the noise-free figure on this shared 2-core machine.
Targets (issue #22): p99 <= 50 ms for gets, >= 500 requests/s.

    .venv/bin/python -m bench.api_jobs [--jobs 10000] [--clients 1 8] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from sqlalchemy import create_engine, insert

from cloudml_os.store.models import Job
from tests.conftest import new_postgres_database
from tests.harness import start_platform

PROJECT = "bench"
TARGET_P99_MS, TARGET_RPS = 50.0, 500.0


def fill(database_url: str, count: int) -> list[str]:
    """``count`` finished jobs of PROJECT and 100 of another project, inserted in batches; their jobIds."""
    engine = create_engine(database_url)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    ids = [f"job_{n:05d}" for n in range(count)]

    def row(project: str, job_id: str, n: int) -> dict:
        return {"project": project, "job_id": job_id, "state": "SUCCEEDED" if n % 10 else "FAILED", "step": "DONE",
                "framework": "TENSORFLOW", "labels": {"team": f"t{n % 5}", "stage": "dev"},
                "training_input": {"scaleTier": "BASIC", "packageUris": [f"store://{project}/packages/p.tar.gz"],
                                   "pythonModule": "trainer.task", "region": "local", "args": ["--epochs", "5"]},
                "training_output": {"exportedModelUri": f"store://{project}/jobs/{job_id}/model"},
                "create_time": now - dt.timedelta(seconds=count - n), "start_time": now, "end_time": now,
                "prediction_output": {}, "error_message": "" if n % 10 else "chief-0 exited with status 1"}

    with engine.begin() as connection:
        for start in range(0, count, 1000):
            connection.execute(insert(Job), [row(PROJECT, ids[n], n) for n in range(start, min(start + 1000, count))])
        connection.execute(insert(Job), [row("elsewhere", f"other_{n}", n) for n in range(100)])
    engine.dispose()
    return ids


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_pid(platform) -> int:
    """The gunicorn worker serving requests (the API process's one child), else the process itself."""
    leader = platform.processes["api"].pid
    children = Path(f"/proc/{leader}/task/{leader}/children")
    found = children.read_text().split() if children.exists() else []
    return int(found[0]) if found else leader


def load(base_url: str, token: str, paths, clients: int, seconds: float, pid: int) -> dict[str, float]:
    """``clients`` threads GET ``paths()`` back to back for ``seconds``: rps, p50/p99 ms, API CPU ms/request."""
    latencies: list[float] = []
    failed = [0]
    ends = time.monotonic() + seconds

    def run() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        while time.monotonic() < ends:
            started = time.monotonic()
            answer = session.get(base_url + paths(), timeout=60)
            if answer.status_code == 200:
                latencies.append(time.monotonic() - started)
            else:
                failed[0] += 1

    threads = [threading.Thread(target=run) for _ in range(clients)]
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before
    ordered = sorted(latencies)
    assert failed[0] == 0, f"{failed[0]} requests failed"
    return {"rps": len(ordered) / elapsed, "p50": 1000 * ordered[len(ordered) // 2],
            "p99": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "cpu_ms": 1000 * cpu / max(len(ordered), 1)}


@contextlib.contextmanager
def database(kind: str) -> Iterator[dict[str, str]]:
    """Settings of a platform on ``kind`` (sqlite: the embedded default; postgresql: a new database)."""
    if kind == "sqlite":
        yield {}
    else:
        with new_postgres_database("cloudml_bench") as url:
            yield {"database_url": url}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    args = parser.parse_args()
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for kind in args.databases:
        with tempfile.TemporaryDirectory() as tmp, database(kind) as settings, \
                start_platform(Path(tmp), **settings) as platform:
            url = settings.get("database_url") or f"sqlite:///{tmp}/cloudml-os.db"
            ids = fill(url, args.jobs)
            token = platform.token(PROJECT)
            base = f"{platform.base_url}/v1/projects/{PROJECT}"
            calls = {"jobs.get": lambda ids=ids: f"/jobs/{random.choice(ids)}",  # noqa: S311 - a benchmark's draw
                     "jobs.list": lambda: "/jobs?pageSize=100"}
            pid = api_pid(platform)
            for clients in args.clients:
                load(base, token, calls["jobs.get"], clients, 1.0, pid)  # warm-up
                for round_ in range(args.rounds):
                    for call in (calls if round_ % 2 == 0 else reversed(list(calls))):
                        results.setdefault((kind, call, clients), []).append(
                            load(base, token, calls[call], clients, args.seconds, pid))

    print(f"\nAPI reads with {args.jobs} jobs in the project, gunicorn gthread API on this 2-core machine, "
          f"{args.rounds} rounds of {args.seconds:g} s (median, range)")
    print(f"  {'database':10s} {'call':9s} {'clients':>7s} {'req/s':>16s} {'p50 ms':>14s} {'p99 ms':>16s} "
          f"{'API CPU ms/req':>16s}")
    def cell(runs: list[dict[str, float]], key: str, width: int, digits: int = 1) -> str:
        values = [r[key] for r in runs]
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})" \
            .rjust(width)

    for (kind, call, clients), runs in results.items():
        print(f"  {kind:10s} {call:9s} {clients:7d} {cell(runs, 'rps', 16, 0)} {cell(runs, 'p50', 14)} "
              f"{cell(runs, 'p99', 16)} {cell(runs, 'cpu_ms', 16, 2)}")
    print(f"  targets: p99 <= {TARGET_P99_MS:g} ms for gets, >= {TARGET_RPS:g} requests/s")


if __name__ == "__main__":
    main()

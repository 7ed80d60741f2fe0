"""Ways to hurt a running platform on purpose, and to prove where the blow landed.

A worker is killed mid-step without any hook in the product, in one of two ways. Either the test takes a
row lock in PostgreSQL (``SELECT … FOR UPDATE``) on a row the step must write before it can hand over,
waits until one of the worker's queries is blocked behind that lock, and kills the worker's whole process
group with SIGKILL; or it waits until a node runs a command the step started (``pip install``) and kills
the worker then. Either way the step provably had started (its delivery holds the job's step lease) and
had not finished (afterwards the job is still in that step with that delivery's lease).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import text

from tests.harness import Platform, cluster_processes

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 300, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something true; give up (fail) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a platform process and everything in its process group (a prefork pool's children too)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    wait_for(lambda: not _group_alive(process.pid), "the killed process group to be gone", timeout=60)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def job_row(store, job_pk: int) -> dict[str, Any]:
    with store.engine.connect() as connection:
        row = connection.execute(text("SELECT state, step, step_seq, lease_owner, lease_until, outcome "
                                      "FROM jobs WHERE id = :id"), {"id": job_pk}).mappings().one()
    return dict(row)


def job_pk_of(store, project: str, job_id: str) -> int:
    with store.engine.connect() as connection:
        return connection.execute(text("SELECT id FROM jobs WHERE project = :p AND job_id = :j"),
                                  {"p": project, "j": job_id}).scalar_one()


def cluster_rows(store, job_pk: int) -> list[dict[str, Any]]:
    with store.engine.connect() as connection:
        return [dict(r) for r in connection.execute(
            text("SELECT id, name, state FROM clusters WHERE job_id = :id ORDER BY id"), {"id": job_pk}).mappings()]


@dataclasses.dataclass
class Kill:
    """Evidence of one kill: the step and its delivery's lease, the worker query that was blocked, and the
    job's step after the kill."""

    step: str
    owner: str
    blocked_query: str
    step_after: str
    owner_after: str | None
    seq: int
    seq_after: int


def kill_worker_mid_step(platform: Platform, store, job_pk: int, step: str, *, lock: str = "job",
                         ready: Callable[[dict[str, Any]], bool] = lambda row: True, timeout: float = 600) -> Kill:
    """Kill the worker while it runs ``step`` of the job; see the module docstring.

    :param lock: "job" locks the job's row (every step writes it before handing over); "cluster" locks the
        job's cluster row (provisioning records the created nodes there before handing over).
    :param ready: a further condition on the job's row before the lock is taken.
    """
    row = wait_for(lambda: (r := job_row(store, job_pk))["step"] == step and r["lease_owner"] and ready(r) and r,
                   f"a delivery of {step} to hold the job's lease", timeout=timeout, interval=0.005)
    with store.engine.connect() as connection:
        transaction = connection.begin()
        ours = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        if lock == "cluster":
            cluster_id = wait_for(lambda: (rows := cluster_rows(store, job_pk)) and rows[-1]["id"],
                                  "the job's cluster row", timeout=timeout, interval=0.005)
            connection.execute(text("SELECT id FROM clusters WHERE id = :id FOR UPDATE"), {"id": cluster_id})
        else:
            connection.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_pk})

        def blocked() -> str | None:
            return connection.execute(text(
                "SELECT query FROM pg_stat_activity WHERE :ours = ANY(pg_blocking_pids(pid)) LIMIT 1"),
                {"ours": ours}).scalar()

        query = wait_for(blocked, f"the worker to block inside {step}", timeout=timeout, interval=0.01)
        kill_group(platform.processes["worker"])
        after = connection.execute(text("SELECT step, step_seq, lease_owner FROM jobs WHERE id = :id"),
                                   {"id": job_pk}).mappings().one()
        transaction.rollback()
    return Kill(step=step, owner=row["lease_owner"], blocked_query=query, step_after=after["step"],
                owner_after=after["lease_owner"], seq=row["step_seq"], seq_after=after["step_seq"])


def kill_worker_while_node_runs(platform: Platform, store, job_pk: int, step: str, cluster: str, word: str,
                                timeout: float = 600) -> Kill:
    """Kill the worker while a node of ``cluster`` runs a command with ``word`` in it that ``step`` started
    (e.g. bootstrapping's ``pip install``), so the step's work on the node is cut off half way."""
    row = wait_for(lambda: (r := job_row(store, job_pk))["step"] == step and r["lease_owner"] and r,
                   f"a delivery of {step} to hold the job's lease", timeout=timeout, interval=0.005)

    def running() -> str | None:
        for pid in cluster_processes(platform, cluster):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if word.encode() in argv:
                return " ".join(a.decode(errors="replace") for a in argv)
        return None

    command = wait_for(running, f"a node to run {word!r} in {step}", timeout=timeout, interval=0.005)
    kill_group(platform.processes["worker"])
    after = job_row(store, job_pk)
    return Kill(step=step, owner=row["lease_owner"], blocked_query=f"node ran: {command}", step_after=after["step"],
                owner_after=after["lease_owner"], seq=row["step_seq"], seq_after=after["step_seq"])


def assert_landed_mid_step(kill: Kill) -> None:
    """The kill came while the step's delivery held its lease and was blocked writing: it had started and
    not handed over."""
    assert kill.blocked_query, kill
    assert (kill.step_after, kill.seq_after, kill.owner_after) == (kill.step, kill.seq, kill.owner), kill


def driver_host_keys(platform: Platform, cluster: str) -> dict[str, list[str]]:
    """The host keys of the local driver's nodes of ``cluster``, as its boot records on disk hold them."""
    nodes = platform.data_dir / "nodes" / "clusters" / cluster / "nodes"
    return {path.parent.name: json.loads(path.read_text())["host_keys"] for path in nodes.glob("*/node.json")}


def assert_no_node_left(platform: Platform, cluster: str) -> None:
    assert cluster_processes(platform, cluster) == []
    assert list((platform.data_dir / "nodes").rglob(f"*{cluster}*")) == []


def record_figure(platform: Platform, name: str, seconds: float) -> None:
    """Keep a measured duration for docs/reliability.md (printed too; never asserted)."""
    with Path(platform.data_dir / "figures.jsonl").open("a") as out:
        out.write(json.dumps({"figure": name, "seconds": round(seconds, 2)}) + "\n")
    print(f"FIGURE {name}: {seconds:.2f}s")


def freeze(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGSTOP)


def thaw(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGCONT)


def _open_transactions(store) -> int:
    """Transactions other than ours open on the database (a frozen worker may hold row locks in one)."""
    with store.engine.connect() as connection:
        return connection.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")).scalar_one()


def freeze_worker_mid_step(platform: Platform, store, job_pk: int, step: str, *, state: str | None = None,
                           timeout: float = 600) -> dict:
    """Stop (SIGSTOP) the worker's process group while a delivery of ``step`` holds the job's lease (the job
    in ``state``, if given) and no transaction of it is open; returns the job's row as it stands, frozen.
    Thaw it with :func:`thaw`."""
    worker = platform.processes["worker"]
    deadline = time.monotonic() + timeout
    while True:
        row = wait_for(lambda: (r := job_row(store, job_pk))["step"] == step and r["lease_owner"]
                       and (state is None or r["state"] == state) and r,
                       f"a delivery of {step} to hold the job's lease", timeout=timeout, interval=0.005)
        freeze(worker)
        frozen = job_row(store, job_pk)
        if frozen["lease_owner"] == row["lease_owner"] and frozen["step"] == step and not _open_transactions(store):
            return frozen
        thaw(worker)
        if frozen["step"] != step or time.monotonic() > deadline:
            raise AssertionError(f"{step} ended before the worker could be stopped in it: {frozen}")
        time.sleep(0.005)


def submit_overhead(client, job_id: str, uri: str, seconds: float) -> dict:
    """Submit the overhead trainer (see the ``overhead_uri`` fixture), running for ``seconds``."""
    return client.submit(job_id, uri, args=["--run-seconds", str(seconds)], pythonModule="overhead_trainer.task")

"""Replica latency and health over time: the monitor's per-window samples, their rows in PostgreSQL
(batched insert, retention in batches) and the ``replicaStats`` endpoint of a version.

The monitor probes stub replicas on real sockets (tests/unit/test_monitor.py's); the store is a real
PostgreSQL database migrated with Alembic; the API is the real application through Flask's test client.
"""

from __future__ import annotations

import datetime as dt
import queue
import socket
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from cloudml_os.auth.tokens import create_token
from cloudml_os.platform import sample_row
from cloudml_os.serving.monitor import HealthMonitor, ProbeSample, Target
from cloudml_os.store import Store, migrate
from cloudml_os.store.models import Model, Replica, ReplicaSample, Version, utcnow
from tests.unit.test_api import Env
from tests.unit.test_monitor import FAST, StubReplica


def test_a_sample_gives_the_median_and_the_maximum_of_the_answered_probes():
    sample = ProbeSample("r1", probes=5, failures=1, latencies=[0.004, 0.001, 0.009, 0.002])
    assert sample.latency_p50 == pytest.approx(0.003)
    assert sample.latency_max == pytest.approx(0.009)
    assert ProbeSample("r2", probes=3, failures=3).latency_p50 is None
    row = sample_row(sample, dt.datetime(2026, 12, 2, 12, 0, 0))
    assert row == {"replica_id": "r1", "time": dt.datetime(2026, 12, 2, 12, 0, 0), "probes": 5, "failures": 1,
                   "latency_p50_ms": 3.0, "latency_max_ms": 9.0, "healthy": False}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stubs() -> Iterator[list[StubReplica]]:
    made: list[StubReplica] = []
    yield made
    for stub in made:
        stub.close()


def test_the_monitor_hands_over_one_sample_per_target_and_window(stubs):
    ready = StubReplica(200)
    stubs.append(ready)
    targets = [ready.target("ready", rise=1), Target("refused", "127.0.0.1", closed_port(), **FAST, rise=1)]
    batches: queue.Queue = queue.Queue()
    thread = HealthMonitor(lambda: targets, lambda *change: None, refresh_interval=0.05,
                           on_samples=batches.put, sample_interval=0.5).start_thread()
    try:
        seen: list[list[ProbeSample]] = [batches.get(timeout=30) for _ in range(3)]
    finally:
        thread.stop()
    for batch in seen:
        assert sorted(sample.key for sample in batch) == ["ready", "refused"]  # one per target, per window
        by_key = {sample.key: sample for sample in batch}
        good, bad = by_key["ready"], by_key["refused"]
        assert good.probes >= 1 and good.failures == 0 and len(good.latencies) == good.probes
        assert 0 < good.latency_p50 <= good.latency_max < 0.2  # answered within the probe's timeout
        assert bad.probes >= 1 and bad.failures == bad.probes and bad.latency_p50 is None
        assert bad.healthy is False
    assert {sample.key: sample.healthy for sample in seen[-1]} == {"ready": True, "refused": False}
    # A window holds only its own probes: at 20 probes/s, a 0.5 s window cannot count a second's worth twice.
    assert all(sample.probes < 40 for batch in seen for sample in batch)


def test_a_target_no_longer_listed_still_reports_its_last_window(stubs):
    ready = StubReplica(200)
    stubs.append(ready)
    targets = [ready.target("stays"), Target("ejected", "127.0.0.1", closed_port(), **FAST)]
    batches: queue.Queue = queue.Queue()
    thread = HealthMonitor(lambda: list(targets), lambda *change: None, refresh_interval=0.05,
                           on_samples=batches.put, sample_interval=0.5).start_thread()
    try:
        assert {s.key for s in batches.get(timeout=30)} == {"stays", "ejected"}
        targets.pop()  # as an ejected replica leaves the READY ones the monitor lists
        keys = [{s.key for s in batches.get(timeout=30)} for _ in range(3)]
    finally:
        thread.stop()
    assert keys[0] == {"stays", "ejected"}  # the window it was dropped in: probes up to the drop
    assert keys[1:] == [{"stays"}, {"stays"}]


def test_no_samples_are_handed_over_for_a_window_without_probes():
    batches: queue.Queue = queue.Queue()
    thread = HealthMonitor(lambda: [], lambda *change: None, refresh_interval=0.05,
                           on_samples=batches.put, sample_interval=0.1).start_thread()
    try:
        with pytest.raises(queue.Empty):
            batches.get(timeout=0.5)
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def pg_store(database_url) -> Iterator[Store]:
    migrate(database_url)
    store = Store(database_url)
    yield store
    store.engine.dispose()


def make_version(store: Store, model: str, replicas: int) -> tuple[int, list[int]]:
    with store.session() as session:
        parent = Model(project="p", name=model)
        session.add(parent)
        session.flush()
        version = Version(model_id=parent.id, name="v1", state="READY", deployment_uri="store://p/m",
                          framework="TENSORFLOW", runtime_version="2.21", machine_type="standard")
        session.add(version)
        session.flush()
        rows = [Replica(version_id=version.id, name=f"replica-{i}", state="READY") for i in range(replicas)]
        session.add_all(rows)
        session.flush()
        return version.id, [row.id for row in rows]


def test_samples_are_written_in_one_batch_and_pruned_in_batches(pg_store):
    version_id, replica_ids = make_version(pg_store, "stats_store", 2)
    now = utcnow()
    old = now - dt.timedelta(hours=25)
    rows = [sample_row(ProbeSample(key, probes=10, failures=1, latencies=[0.002] * 9, healthy=True), when)
            for key in replica_ids for when in [old - dt.timedelta(seconds=10 * i) for i in range(7)] + [now]]
    rows.append(sample_row(ProbeSample(987654321, probes=1), now))  # a replica the database does not know
    assert pg_store.add_replica_samples(rows) == 16
    with pg_store.session() as session:
        stored = session.scalars(select(ReplicaSample).where(ReplicaSample.version_id == version_id)).all()
        assert {(s.replica, s.probes, s.failures, s.latency_p50_ms, s.healthy) for s in stored} == {
            ("replica-0", 10, 1, 2.0, True), ("replica-1", 10, 1, 2.0, True)}
    assert pg_store.prune_replica_samples(now - dt.timedelta(hours=24), batch=3) == 14  # 5 batches of ≤ 3
    with pg_store.session() as session:
        left = session.scalars(select(ReplicaSample).where(ReplicaSample.version_id == version_id)).all()
        assert sorted(s.replica for s in left) == ["replica-0", "replica-1"]
        assert all(s.time == now for s in left)
    assert pg_store.prune_replica_samples(now - dt.timedelta(hours=24)) == 0


def test_a_versions_replica_stats_are_served_to_its_project_only(pg_store, tmp_path):
    env = Env(tmp_path, pg_store)
    version_id, replica_ids = make_version(pg_store, "stats_api", 1)
    now = utcnow()
    pg_store.add_replica_samples([
        sample_row(ProbeSample(replica_ids[0], probes=10, latencies=[0.001, 0.003], healthy=True), now),
        sample_row(ProbeSample(replica_ids[0], probes=10, failures=10), now - dt.timedelta(minutes=30)),
        sample_row(ProbeSample(replica_ids[0], probes=10, failures=10), now - dt.timedelta(hours=3))])
    url = "/v1/projects/p/models/stats_api/versions/v1/replicaStats"
    viewer = {"Authorization": "Bearer " + create_token(pg_store, "p", "viewer")}
    answer = env.client.get(url, headers=viewer)
    assert answer.status_code == 200, answer.get_json()
    samples = answer.get_json()["samples"]
    assert [(s["replica"], s["probes"], s["failures"], s["healthy"]) for s in samples] == [
        ("replica-0", 10, 10, False), ("replica-0", 10, 0, True)]  # the last hour, oldest first
    assert samples[0]["latencyP50Ms"] is None
    assert samples[1]["latencyP50Ms"] == 2.0 and samples[1]["latencyMaxMs"] == 3.0
    assert samples[1]["time"].endswith("Z")
    assert len(env.client.get(url + "?minutes=1440", headers=viewer).get_json()["samples"]) == 3
    bad = env.client.get(url + "?minutes=0", headers=viewer)
    assert bad.status_code == 400 and bad.get_json()["error"]["status"] == "INVALID_ARGUMENT"
    other = {"Authorization": "Bearer " + create_token(pg_store, "q", "admin")}
    refused = env.client.get(url.replace("/p/", "/q/"), headers=other)
    assert refused.status_code == 404  # project q has no such model
    assert env.client.get(url, headers=other).status_code in (403, 404)
    assert env.client.get(url).status_code == 401
    with pg_store.session() as session:
        assert session.scalar(select(func.count()).select_from(ReplicaSample)
                              .where(ReplicaSample.version_id == version_id)) == 3

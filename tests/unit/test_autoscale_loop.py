"""The autoscaler's loop on a real database: readings in, scale operations out, stopped by the quota, undone
when the operation queue is down, and never changing a version whose operation is under way."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from cloudml_os.config import Settings
from cloudml_os.serving.autoscaler import CPU_USAGE, REQUESTS_IN_FLIGHT
from cloudml_os.store import Store, migrate
from cloudml_os.store.models import Model, Operation, ProjectQuota, Replica, Version, VersionEvent
from cloudml_os.workflows.autoscale import Autoscaling

POLICY = {"minNodes": 1, "maxNodes": 4, "metrics": [{"name": REQUESTS_IN_FLIGHT, "target": 1.0}],
          "stableWindow": 10.0, "panicWindow": 2.0}


@pytest.fixture
def store(tmp_path) -> Store:
    url = f"sqlite:///{tmp_path}/db.sqlite"
    migrate(url)
    return Store(url)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def a_version(store: Store, replicas: int = 1, policy: dict | None = None, model: str = "m") -> tuple[int, list[int]]:
    model = store.add(Model(project="p", name=model))
    version = store.add(Version(model_id=model.id, name="v", state="READY", deployment_uri="store://p/x",
                                framework="TENSORFLOW", runtime_version="2.21", machine_type="standard",
                                replicas=replicas, auto_scaling=policy or POLICY))
    ids = [store.add(Replica(version_id=version.id, name=f"replica-{n}", state="READY", healthy=True)).id
           for n in range(replicas)]
    return version.id, ids


def rows(store: Store, kind):
    with store.session() as session:
        return list(session.scalars(select(kind)))


def loop(store: Store, load: dict, started: list, clock: Clock, start_operation=None) -> Autoscaling:
    settings = Settings(data_dir=Path("/nonexistent"), database_url="sqlite://", broker_url="memory://")
    return Autoscaling(store, settings, lambda: load, start_operation or started.append, clock)


def test_a_load_step_becomes_one_scale_operation_with_an_event_saying_why(store):
    version_id, [replica] = a_version(store)
    load, started, clock = {replica: {REQUESTS_IN_FLIGHT: 0.5, CPU_USAGE: 10.0}}, [], Clock()
    autoscaling = loop(store, load, started, clock)
    for _ in range(5):
        assert autoscaling.tick() == []
        clock.now += 1
    load[replica] = {REQUESTS_IN_FLIGHT: 3.0, CPU_USAGE: 90.0}
    done = autoscaling.tick()
    assert [(v, d.replicas) for v, d in done] == [(version_id, 2)]  # the 2 s panic window's mean: 1.75
    [version] = rows(store, Version)
    assert (version.state, version.replicas) == ("UPDATING", 2)
    [operation] = rows(store, Operation)
    assert started == [operation.id] and operation.kind == "UPDATE_VERSION" and not operation.done
    [event] = [e for e in rows(store, VersionEvent) if e.kind == "AUTOSCALE"]
    assert event.message.startswith("1 → 2 replicas: REQUESTS_IN_FLIGHT 1.75") and "(panic)" in event.message
    clock.now += 1
    assert autoscaling.tick() == []  # UPDATING: observed, not changed
    assert len(rows(store, Operation)) == 1


def test_a_scale_out_stops_at_the_quota_with_one_event(store):
    version_id, [replica] = a_version(store)
    store.add(ProjectQuota(project="p", replicas=2))
    load, started, clock = {replica: {REQUESTS_IN_FLIGHT: 4.0}}, [], Clock()
    autoscaling = loop(store, load, started, clock)
    done = autoscaling.tick()
    assert [d.replicas for _, d in done] == [4]  # the decision; the quota lets 2 happen
    [version] = rows(store, Version)
    assert version.replicas == 2
    quota = [e.message for e in rows(store, VersionEvent) if e.kind == "QUOTA"]
    assert quota == ["autoscaling wants 4 replicas; the project's quota allows 2"]
    autoscale = [e.message for e in rows(store, VersionEvent) if e.kind == "AUTOSCALE"]
    assert autoscale[0].startswith("1 → 2 replicas:") and autoscale[0].endswith(
        "(wanted 4; the project's quota allows 2)")
    with store.session() as session:  # the operation finished; the load goes on: no second QUOTA event
        session.get(Version, version_id).state = "READY"
        session.add(Replica(version_id=version_id, name="replica-1", state="READY", healthy=True))
    clock.now += 1
    assert autoscaling.tick() == []
    assert len([e for e in rows(store, VersionEvent) if e.kind == "QUOTA"]) == 1


def test_a_decision_whose_operation_cannot_be_queued_is_undone(store):
    version_id, [replica] = a_version(store)

    def queue_down(operation_id: int) -> None:
        raise ConnectionError("broker unreachable")

    autoscaling = loop(store, {replica: {REQUESTS_IN_FLIGHT: 4.0}}, [], Clock(), queue_down)
    assert autoscaling.tick() == []
    [version] = rows(store, Version)
    assert (version.state, version.replicas) == ("READY", 1)
    assert rows(store, Operation) == [] and not [e for e in rows(store, VersionEvent) if e.kind == "AUTOSCALE"]


def test_versions_without_autoscaling_are_left_alone(store):
    model = store.add(Model(project="p", name="m"))
    store.add(Version(model_id=model.id, name="fixed", state="READY", deployment_uri="store://p/x",
                      framework="TENSORFLOW", runtime_version="2.21", machine_type="standard", replicas=1))
    autoscaling = loop(store, {}, [], Clock())
    assert autoscaling.tick() == [] and rows(store, Operation) == []


def test_a_request_wakes_a_version_at_zero_once_and_gives_up_with_retry_after(store):
    from cloudml_os.errors import Unavailable
    from cloudml_os.platform import HealthyReplicas, _wait_for_replica

    version_id, _ = a_version(store, replicas=0, policy={**POLICY, "minNodes": 0})
    settings = Settings(data_dir=Path("/nonexistent"), database_url="sqlite://", broker_url="memory://",
                        scale_from_zero_wait=0.3)
    started: list[int] = []
    for _ in range(2):  # two requests: one operation
        with pytest.raises(Unavailable) as refused:
            _wait_for_replica(settings, store, HealthyReplicas(store), version_id, started.append)
        assert refused.value.headers == {"Retry-After": "10"}
        assert "No replica of this version started within 0.3 s" in refused.value.message
    [operation] = rows(store, Operation)
    assert started == [operation.id]
    [version] = rows(store, Version)
    assert (version.state, version.replicas) == ("UPDATING", 1)
    assert [e.message for e in rows(store, VersionEvent) if e.kind == "AUTOSCALE"] == [
        "0 → 1 replicas: a prediction arrived while no replica served"]
    fixed, _ = a_version(store, replicas=0, policy={**POLICY, "minNodes": 1}, model="m2")
    assert _wait_for_replica(settings, store, HealthyReplicas(store), fixed, started.append) is False


def test_a_request_arriving_while_its_version_scales_in_to_zero_wakes_it_once_that_ends(store):
    from cloudml_os.platform import HealthyReplicas, _wait_for_replica

    version_id, _ = a_version(store, replicas=0, policy={**POLICY, "minNodes": 0}, model="m3")
    with store.session() as session:
        session.get(Version, version_id).state = "UPDATING"  # the scale-in to zero under way
    settings = Settings(data_dir=Path("/nonexistent"), database_url="sqlite://", broker_url="memory://",
                        scale_from_zero_wait=5)
    started: list[int] = []

    def scale_in_ends_then_replica_serves() -> None:
        time.sleep(0.5)
        with store.session() as session:
            session.get(Version, version_id).state = "READY"
        while not started:
            time.sleep(0.05)
        store.add(Replica(version_id=version_id, name="replica-9", state="READY", healthy=True))

    worker = threading.Thread(target=scale_in_ends_then_replica_serves)
    worker.start()
    assert _wait_for_replica(settings, store, HealthyReplicas(store, ttl=0.1), version_id, started.append)
    worker.join()
    assert len(started) == 1

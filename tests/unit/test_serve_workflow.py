"""Failover rules of the serving workflow, on a real (SQLite) store."""

from __future__ import annotations

import pytest

from cloudml_os.store import Store, migrate
from cloudml_os.store.models import Model, Replica, Version, VersionEvent
from cloudml_os.workflows.serve import FAILOVER_LIMIT, eject


@pytest.fixture
def store(tmp_path) -> Store:
    url = f"sqlite:///{tmp_path}/db.sqlite"
    migrate(url)
    return Store(url)


def a_version(store: Store) -> int:
    model = store.add(Model(project="p", name="m"))
    version = store.add(Version(model_id=model.id, name="v", state="READY", deployment_uri="store://p/x",
                                framework="TENSORFLOW", runtime_version="2.21", machine_type="standard", replicas=2))
    return version.id


def a_replica(store: Store, version_id: int, index: int, replaces: int | None = None) -> int:
    return store.add(Replica(version_id=version_id, name=f"replica-{index}", cluster_name=f"c-{version_id}-{index}",
                             state="READY", healthy=True, replaces=replaces)).id


def events(store: Store) -> list[str]:
    with store.session() as session:
        return [e.kind for e in session.query(VersionEvent).order_by(VersionEvent.id)]


def test_a_failed_replica_leaves_the_pool_once_and_is_replaced_once(store):
    version_id = a_version(store)
    replica_id = a_replica(store, version_id, 0)
    replaced = []
    assert eject(store, replica_id, "router: connection refused", replaced.append) is True
    assert eject(store, replica_id, "health check: 3 probes failed", replaced.append) is False  # already out
    assert replaced == [replica_id]
    with store.session() as session:
        replica = session.get(Replica, replica_id)
        assert (replica.state, replica.healthy) == ("EJECTED", False)
    assert events(store) == ["EJECTED"]


def test_the_failover_rate_limit_stops_a_flapping_version_from_burning_nodes(store):
    version_id = a_version(store)
    previous = a_replica(store, version_id, 0)
    for index in range(1, FAILOVER_LIMIT + 1):  # replacements made recently
        previous = a_replica(store, version_id, index, replaces=previous)
    replaced = []
    assert eject(store, previous, "health check: 3 probes failed", replaced.append) is True
    assert replaced == []
    assert events(store) == ["EJECTED", "FAILOVER_LIMIT"]

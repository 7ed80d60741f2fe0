"""Failover rules, the version's one cluster and its lease, on a real (SQLite) store and a fake driver."""

from __future__ import annotations

import threading
import time

import pytest

from cloudml_os.cloud.base import ClusterSpec, Driver, NodeInfo
from cloudml_os.config import Settings
from cloudml_os.store import Cluster, Node, Store, migrate
from cloudml_os.store.models import Model, Operation, Replica, Version, VersionEvent
from cloudml_os.workflows import serve
from cloudml_os.workflows.serve import (
    FAILOVER_LIMIT,
    ServeError,
    ServingContext,
    _delete_version,
    delete_replica,
    eject,
    start_replica,
)


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
    return store.add(Replica(version_id=version_id, name=f"replica-{index}", state="READY", healthy=True,
                             replaces=replaces)).id


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


# ---- the cluster lease -----------------------------------------------------------------------------

def a_cluster(store: Store, name: str = "cml-serve-1") -> Cluster:
    return store.create_cluster(Cluster(job_id=None, name=name, driver="fake", state="CREATING", private_key="k",
                                        public_key="p"))


def test_the_cluster_lease_is_exclusive_between_owners(store):
    a_cluster(store)
    with store.lease_cluster("cml-serve-1", "a", ttl=60):
        with pytest.raises(TimeoutError, match="being changed by a"):
            with store.lease_cluster("cml-serve-1", "b", ttl=60, timeout=0.3):
                pass
    with store.lease_cluster("cml-serve-1", "b", ttl=60, timeout=0.3):  # released: free again
        pass


def test_a_waiting_owner_gets_the_lease_once_it_is_released(store):
    a_cluster(store)
    order = []

    def second() -> None:
        with store.lease_cluster("cml-serve-1", "b", ttl=60, timeout=10):
            order.append("b")

    with store.lease_cluster("cml-serve-1", "a", ttl=60):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("a")
    thread.join(timeout=10)
    assert order == ["a", "b"]


def test_the_cluster_lease_is_taken_back_at_once_by_its_owner(store):
    a_cluster(store)
    held = store.lease_cluster("cml-serve-1", "task-7", ttl=600)
    held.__enter__()  # a worker that died holding it: never released
    with store.lease_cluster("cml-serve-1", "task-7", ttl=600, timeout=0):  # the redelivered task, at once
        pass
    with store.lease_cluster("cml-serve-1", "other", ttl=600, timeout=0):  # released by the block's end
        pass


def test_an_expired_lease_is_taken_over(store):
    a_cluster(store)
    held = store.lease_cluster("cml-serve-1", "dead", ttl=0.2)
    held.__enter__()
    with pytest.raises(TimeoutError):
        with store.lease_cluster("cml-serve-1", "alive", ttl=60, timeout=0):
            pass
    with store.lease_cluster("cml-serve-1", "alive", ttl=60, timeout=5):
        with store.session() as session:
            assert session.query(Cluster).one().lock_owner == "alive"
    held.__exit__(None, None, None)  # the late holder's release does not free someone else's lease
    with store.session() as session:
        assert session.query(Cluster).one().lock_owner is None


def test_a_lease_of_an_unknown_cluster_is_refused(store):
    with pytest.raises(LookupError):
        with store.lease_cluster("nope", "a", ttl=60):
            pass


# ---- one cluster per version -----------------------------------------------------------------------

class FakeDriver(Driver):
    """Clusters in memory: name -> node names, in the order of the last spec."""

    name = "fake"

    def __init__(self) -> None:
        self.clusters: dict[str, list[str]] = {}
        self.calls: list[tuple[str, str, tuple[str, ...]]] = []

    def _infos(self, spec: ClusterSpec) -> list[NodeInfo]:
        return [NodeInfo(n.name, n.task_type, n.task_index, f"127.9.0.{n.task_index + 1}", 22, "u", ("k",),
                         31000, 31009, "/w", "/r") for n in spec.nodes]

    def create_cluster(self, spec: ClusterSpec) -> list[NodeInfo]:
        raise AssertionError("serving resizes its cluster, it never creates one")

    def resize_cluster(self, spec: ClusterSpec) -> list[NodeInfo]:
        assert [n.task_type for n in spec.nodes] == ["replica"] * len(spec.nodes)
        assert all(n.name == f"replica-{n.task_index}" for n in spec.nodes)
        self.calls.append(("resize", spec.name, tuple(n.name for n in spec.nodes)))
        self.clusters[spec.name] = [n.name for n in spec.nodes]
        return self._infos(spec)

    def replace_node(self, spec: ClusterSpec, node: str) -> NodeInfo:
        raise AssertionError("not used")

    def delete_cluster(self, name: str) -> None:
        self.calls.append(("delete", name, ()))
        self.clusters.pop(name, None)

    def list_clusters(self) -> list[str]:
        return sorted(self.clusters)


class FakeFramework:
    def runtime(self, version: str) -> str:
        return f"tensorflow-{version}"


def a_context(store: Store, driver: Driver, connect, tmp_path) -> ServingContext:
    settings = Settings(data_dir=tmp_path, database_url="sqlite://", broker_url="memory://")
    return ServingContext(settings=settings, store=store, driver=driver, artifacts=None,
                          frameworks={"TENSORFLOW": FakeFramework()}, connect=connect,
                          replace=lambda replica_id: None)


def refused(node, private_key):
    raise OSError(f"connection to {node.address} refused")


def node_names(store: Store) -> list[str]:
    with store.session() as session:
        return [n.name for n in session.query(Node).order_by(Node.name)]


def replica(store: Store, replica_id: int) -> Replica:
    with store.session() as session:
        return session.get(Replica, replica_id)


def version_of(store: Store, version_id: int) -> Version:
    with store.session() as session:
        return session.get(Version, version_id)


def test_replicas_are_nodes_of_the_one_cluster_of_their_version(store, tmp_path):
    driver = FakeDriver()
    ctx = a_context(store, driver, refused, tmp_path)
    version_id = a_version(store)
    first, second = a_replica(store, version_id, 0), a_replica(store, version_id, 1)
    starting = store.add(Replica(version_id=version_id, name="replica-2", state="PROVISIONING")).id
    with pytest.raises(ServeError, match="replica-2: connection to 127.9.0.3 refused"):
        start_replica(ctx, version_of(store, version_id), replica(store, starting))
    # The node was added next to the others, then removed again when the server could not start.
    name = f"cml-serve-{version_id}"
    assert driver.calls == [("resize", name, ("replica-0", "replica-1", "replica-2")),
                            ("resize", name, ("replica-0", "replica-1"))]
    assert replica(store, starting).state == "FAILED"
    assert node_names(store) == ["replica-0", "replica-1"]
    with store.session() as session:
        [cluster] = session.query(Cluster).all()
        assert (cluster.name, cluster.job_id, cluster.state, cluster.lock_owner) == (name, None, "READY", None)

    delete_replica(ctx, replica(store, first))
    assert driver.clusters == {name: ["replica-1"]}
    assert replica(store, first).state == "DELETED"
    assert node_names(store) == ["replica-1"]

    eject(store, second, "probes failed", lambda replica_id: None)
    _delete_version(ctx, version_of(store, version_id))
    assert driver.clusters == {}
    assert driver.calls[-1] == ("delete", name, ())
    assert replica(store, second).state == "DELETED"
    assert node_names(store) == []
    with store.session() as session:
        cluster = session.query(Cluster).one()
        assert cluster.state == "DELETED" and cluster.deleted_at is not None


def test_a_scale_in_drains_the_extra_replicas_and_a_rerun_finishes_one_a_crash_left_draining(store, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setattr(serve, "DRAIN_GRACE", 0.0)
    driver = FakeDriver()
    ctx = a_context(store, driver, refused, tmp_path)
    version_id = a_version(store)
    replicas = [a_replica(store, version_id, index) for index in range(3)]
    serve._resize(ctx, version_of(store, version_id), serve._ensure_cluster(ctx, version_of(store, version_id)),
                  "test")
    # A crashed run had taken replica-2 out of the pool; the re-delivered run (to 1 replica) ends its drain too.
    with store.session() as session:
        session.get(Replica, replicas[2]).state = "DRAINING"
    with store.session() as session:
        session.get(Version, version_id).replicas = 1
    serve._scale_to(ctx, version_of(store, version_id))
    assert [replica(store, r).state for r in replicas] == ["READY", "DELETED", "DELETED"]
    assert driver.clusters == {f"cml-serve-{version_id}": ["replica-0"]}
    assert events(store).count("DRAINING") == 1  # replica-1's; replica-2's drain began in the crashed run


def test_replicas_named_at_once_by_a_scale_and_a_replacement_get_distinct_names(store):
    version_id = a_version(store)
    names, errors, start = [], [], threading.Barrier(4)

    def name_some() -> None:
        start.wait()
        try:
            for _ in range(15):
                names.append(serve._new_replica(store, version_id).name)
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    workers = [threading.Thread(target=name_some) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and sorted(names, key=lambda n: int(n.split("-")[1])) == [f"replica-{n}" for n in range(60)]


def test_a_replacement_that_failed_is_tried_afresh_and_the_old_replica_is_not_deleted_for_it(store, tmp_path):
    driver = FakeDriver()
    ctx = a_context(store, driver, refused, tmp_path)
    version_id = a_version(store)
    old = a_replica(store, version_id, 0)
    eject(store, old, "probes failed", lambda replica_id: None)
    for _ in range(2):  # the task, then its re-delivery: each start is refused
        with pytest.raises(ServeError, match="connection to .* refused"):
            serve.replace_replica(ctx, old)
    assert replica(store, old).state == "EJECTED"  # still out of the pool, not deleted for a failed attempt
    assert events(store).count("REPLACING") == 2 and "REPLACED" not in events(store)
    with store.session() as session:
        attempts = session.query(Replica).filter(Replica.replaces == old).order_by(Replica.id).all()
        assert [(r.name, r.state) for r in attempts] == [("replica-1", "FAILED"), ("replica-2", "FAILED")]


def test_an_operation_that_raises_an_unexpected_error_still_ends_and_its_version_keeps_no_node(store, tmp_path):
    class Broken(FakeDriver):
        def resize_cluster(self, spec):
            raise RuntimeError("the cloud's answer was not JSON")

    ctx = a_context(store, Broken(), refused, tmp_path)
    version_id = a_version(store)
    with store.session() as session:
        session.get(Version, version_id).state = "CREATING"
    operation = store.add(Operation.new("p", "CREATE_VERSION", "projects/p/models/m/versions/v", version_id))
    serve.run_operation(ctx, operation.id)
    with store.session() as session:
        ended = session.get(Operation, operation.id)
        assert ended.done and ended.error["code"] == 13
        assert ended.error["message"].startswith("internal error: ") and "answer was not JSON" in ended.error["message"]
        assert {r.state for r in session.query(Replica).filter(Replica.version_id == version_id)} == {"DELETED"}
    assert version_of(store, version_id).state == "FAILED"

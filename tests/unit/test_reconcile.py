"""The reconciler's pass on a database of its own (SQLite and PostgreSQL): repairs of jobs a lost race left
behind, and garbage collection that touches only this installation's clusters (local driver, on-disk layout
only: no node boots).

tests/reliability/test_reconciler.py runs the same rules against the whole platform.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.cloud.base import ClusterSpec, Driver, DriverError, NodeSpec, load_driver
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import ConfigError, Settings, load_settings
from cloudml_os.states import Step
from cloudml_os.store import Job, Store, migrate
from cloudml_os.workflows.reconcile import ReconcileContext, reconcile


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/db.sqlite"
    else:
        url = request.getfixturevalue("own_database_url")
    migrate(url)
    return url


@pytest.fixture
def store(url: str):
    store = Store(url)
    yield store
    store.engine.dispose()


def settings_of(tmp_path: Path, url: str, installation_id: str = "") -> Settings:
    return load_settings(environ={}, data_dir=tmp_path, database_url=url,
                         installation_id=installation_id or None)


class NoClusters(Driver):
    name = "none"

    def create_cluster(self, spec):
        raise NotImplementedError

    def resize_cluster(self, spec):
        raise NotImplementedError

    def replace_node(self, spec, node):
        raise NotImplementedError

    def delete_cluster(self, name):
        raise AssertionError(f"nothing is to be deleted, not {name}")

    def list_clusters(self):
        return []


def context(settings: Settings, store: Store, driver: Driver, sent: list | None = None) -> ReconcileContext:
    return ReconcileContext(settings=settings, store=store, driver=driver,
                            artifacts=LocalArtifactStore(settings.artifacts_root),
                            send_step=lambda *message: (sent if sent is not None else []).append(message))


def a_job(store: Store, job_id: str, **fields) -> Job:
    return store.create_job(Job(**{"project": "p", "job_id": job_id, "state": "RUNNING", "step": "TRAINING",
                                   "framework": "TENSORFLOW", "training_input": {}, "labels": {}, **fields}))


# ---- jobs whose teardown ended without their final state ------------------------------------------------

def test_a_job_left_cancelling_after_its_teardown_ended_is_repaired_to_cancelled(store, url, tmp_path):
    """What a cancel landing during teardown left before teardown's final state was one compare-and-set."""
    stuck = a_job(store, "stuck", state="CANCELLING", step=Step.DONE.value, outcome="SUCCEEDED")
    sent: list = []
    report = reconcile(context(settings_of(tmp_path, url), store, NoClusters(), sent))
    job = store.get_job(stuck.id)
    assert job.state == "CANCELLED"
    assert job.end_time is not None
    assert report.repaired == [stuck.id]
    assert sent == []  # nothing runs again: the cluster was deleted before the step became DONE
    kinds = [event.kind for event in store.events(stuck.id)]
    assert kinds[-2:] == ["STATE", "RECONCILE"]
    assert store.live_jobs() == []  # no longer counted against the jobs quota
    assert reconcile(context(settings_of(tmp_path, url), store, NoClusters())).repaired == []


def test_a_job_whose_teardown_ended_without_a_final_state_gets_its_outcome(store, url, tmp_path):
    stuck = a_job(store, "stuck", state="RUNNING", step=Step.DONE.value, outcome="SUCCEEDED")
    reconcile(context(settings_of(tmp_path, url), store, NoClusters()))
    assert store.get_job(stuck.id).state == "SUCCEEDED"


def test_jobs_still_tearing_down_are_not_repaired(store, url, tmp_path):
    cancelling = a_job(store, "cancelling", state="CANCELLING", step=Step.TEARING_DOWN.value,
                       lease_owner="a-worker", lease_until=store.now().replace(year=2999))
    assert reconcile(context(settings_of(tmp_path, url), store, NoClusters())).repaired == []
    assert store.get_job(cancelling.id).state == "CANCELLING"


# ---- the installation's id -----------------------------------------------------------------------------

def test_the_installation_id_is_made_once_and_every_process_of_the_database_reads_the_same(url):
    first, second = Store(url), Store(url)
    try:
        made = first.installation_id()
        assert made and second.installation_id() == made == first.installation_id()
    finally:
        first.engine.dispose()
        second.engine.dispose()


def test_a_configured_installation_id_is_kept_and_a_different_one_later_is_refused(store):
    assert store.installation_id("prod-eu") == "prod-eu"
    assert store.installation_id("") == "prod-eu"
    with pytest.raises(ConfigError, match="installation_id"):
        store.installation_id("staging")


# ---- garbage collection, local driver ----------------------------------------------------------------

def on_disk(settings: Settings, name: str, installation: str | None) -> Path:
    """A local-driver cluster as its folder records it (module docstring of cloud/local.py): made by the
    installation ``installation``, or by a version from before installations had ids (None)."""
    cluster_dir = settings.data_dir / "nodes" / "clusters" / name
    (cluster_dir / "nodes").mkdir(parents=True)
    if installation is not None:
        (cluster_dir / "installation").write_text(installation + "\n")
    (cluster_dir / "cluster.json").write_text(json.dumps({"name": name, "nodes": []}))
    return cluster_dir


def test_the_local_driver_lists_and_deletes_only_its_own_installations_clusters(tmp_path, url):
    ours = LocalDriver(settings_of(tmp_path, url, "ours"))
    theirs = LocalDriver(settings_of(tmp_path, url, "theirs"))
    settings = settings_of(tmp_path, url, "ours")
    on_disk(settings, "cml-train-1-p-a", "ours")
    their_dir = on_disk(settings, "cml-train-1-q-b", "theirs")
    legacy_dir = on_disk(settings, "cml-train-2-p-c", None)
    assert ours.list_clusters() == ["cml-train-1-p-a"]
    assert theirs.list_clusters() == ["cml-train-1-q-b"]
    ours.delete_cluster("cml-train-1-q-b")
    assert their_dir.is_dir()
    ours.delete_cluster("cml-train-2-p-c")  # made before ids (by this installation's own job): its teardown deletes it
    assert not legacy_dir.exists()


def test_the_local_driver_neither_takes_over_nor_changes_another_installations_cluster_of_the_same_name(
        tmp_path, url):
    ours = LocalDriver(settings_of(tmp_path, url, "ours"))
    their_dir = on_disk(settings_of(tmp_path, url), "cml-serve-7", "theirs")
    spec = ClusterSpec("cml-serve-7", (NodeSpec("replica-0", "replica", 0, "m1.small"),), "ssh-ed25519 AAAA test")
    for change in (ours.create_cluster, ours.resize_cluster, lambda spec: ours.replace_node(spec, "replica-0")):
        with pytest.raises(DriverError, match="another cloudml-os installation"):
            change(spec)
    assert json.loads((their_dir / "cluster.json").read_text())["nodes"] == []


def test_garbage_collection_leaves_another_installations_cluster_whose_number_matches_an_ended_job(
        store, url, tmp_path):
    """Two installations share one host's node folder; this one's job N ended, the other's job N runs."""
    settings = settings_of(tmp_path, url, "ours")
    ended = a_job(store, "ended", state="SUCCEEDED", step=Step.DONE.value)
    our_garbage = on_disk(settings, f"cml-train-{ended.id}-p-ended", "ours")
    their_live = on_disk(settings, f"cml-train-{ended.id}-q-running", "theirs")
    legacy = on_disk(settings, f"cml-train-{ended.id}-p-from-before-ids", None)
    report = reconcile(context(settings, store, LocalDriver(settings)))
    assert report.deleted_clusters == [our_garbage.name]
    assert not our_garbage.exists()
    assert their_live.is_dir() and legacy.is_dir()


def test_the_loaded_driver_carries_the_installation_id_kept_in_the_database(store, url, tmp_path):
    settings = settings_of(tmp_path, url)
    on_disk(settings, "cml-serve-1", store.installation_id())
    on_disk(settings, "cml-serve-2", "another")
    assert load_driver(settings).list_clusters() == ["cml-serve-1"]


def test_upload_sessions_unused_past_their_ttl_are_removed_with_their_bytes(store, url, tmp_path):
    import datetime as dt
    import io

    from cloudml_os.store.models import ObjectUpload

    settings = settings_of(tmp_path, url)
    artifacts = LocalArtifactStore(settings.artifacts_root)
    old = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=settings.upload_session_ttl + 60)
    for upload_id, updated in (("stale0", old), ("fresh0", dt.datetime.now(dt.UTC).replace(tzinfo=None))):
        store.add(ObjectUpload(upload_id=upload_id, project="p", name="data/x", size=10, chunk_bytes=1 << 20,
                               updated_at=updated))
        artifacts.upload_write("p", upload_id, 0, io.BytesIO(b"12345"), 5, 10, 1 << 20, None)
    report = reconcile(context(settings, store, NoClusters()))
    assert report.expired_uploads == ["stale0"]
    assert store.object_upload("p", "stale0") is None and store.object_upload("p", "fresh0") is not None
    assert artifacts.upload_received("p", "stale0", 10, 1 << 20) == 0
    assert artifacts.upload_received("p", "fresh0", 10, 1 << 20) == 5
    assert reconcile(context(settings, store, NoClusters())).expired_uploads == []

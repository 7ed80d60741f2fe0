"""The reconciler (Celery beat → workflows/reconcile.py): lost step messages, garbage clusters, time limits,
and two passes at once.

The first tests run against the platform (its beat, its worker); the last drives reconcile() directly on a
database of its own, two passes in parallel threads, to show that racing passes do each thing once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
import uuid

import kombu
import pytest

from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.cloud.base import ClusterSpec, NodeSpec, load_driver
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import load_settings
from cloudml_os.keys import generate_keypair
from cloudml_os.states import Step
from cloudml_os.store import Job, Store
from cloudml_os.workflows.reconcile import ReconcileContext, reconcile
from tests.reliability.conftest import RELIABILITY_SETTINGS
from tests.reliability.faults import assert_no_node_left, job_pk_of, job_row, kill_group, wait_for

pytestmark = pytest.mark.integration

PROJECT = "team-reconcile"


def training_input(uri: str, seconds: float, **extra) -> dict:
    return {"scaleTier": "BASIC", "packageUris": [uri], "pythonModule": "overhead_trainer.task", "region": "local",
            "framework": "TENSORFLOW", "args": ["--run-seconds", str(seconds)], **extra}


def insert_job_without_message(store, job_id: str, body: dict) -> int:
    """What the API records for a job, with its first message lost (the API died before sending it)."""
    job = store.create_job(Job(project=PROJECT, job_id=job_id, state="QUEUED", step="PROVISIONING",
                               framework="TENSORFLOW", training_input=body, labels={}))
    return job.id


def kinds(client, job_id: str) -> list[str]:
    return [event["kind"] for event in client.events(job_id)]


def test_a_job_whose_first_message_was_lost_is_started_by_the_reconciler(platform, store, client, overhead_uri):
    insert_job_without_message(store, "lost_message", training_input(overhead_uri, 1))
    job = client.wait("lost_message", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert "RECONCILE" in kinds(client, "lost_message")


def test_max_wait_time_fails_a_job_no_worker_picked_up_and_creates_nothing(platform, store, client, overhead_uri):
    job_pk = insert_job_without_message(store, "waited_too_long",
                                        training_input(overhead_uri, 1, scheduling={"maxWaitTime": "1s"}))
    job = client.wait("waited_too_long", timeout=300)
    assert job["state"] == "FAILED"
    assert "maxWaitTime" in job["errorMessage"]
    assert "TIMEOUT" in kinds(client, "waited_too_long")
    with store.session() as session:
        from sqlalchemy import func, select

        from cloudml_os.store import Cluster

        assert session.scalar(select(func.count()).select_from(Cluster).where(Cluster.job_id == job_pk)) == 0


def test_max_running_time_is_enforced_while_no_step_of_the_job_runs(platform, store, client, overhead_uri):
    """The worker dies while the job trains and its step message is lost too (the queue is purged): no step
    runs, yet the job fails once past maxRunningTime and its cluster is deleted."""
    client.submit("ran_too_long", overhead_uri, args=["--run-seconds", "600"], pythonModule="overhead_trainer.task",
                  scheduling={"maxRunningTime": "5s"})
    job_pk = job_pk_of(store, PROJECT, "ran_too_long")
    wait_for(lambda: job_row(store, job_pk)["step"] == "TRAINING", "the job to train")
    kill_group(platform.processes["worker"])
    with kombu.Connection(platform.env["CLOUDML_OS_BROKER_URL"]) as connection:
        connection.default_channel.queue_purge(platform.env["CLOUDML_OS_TASK_QUEUE"])
    started = dt.datetime.fromisoformat(client.job("ran_too_long")["startTime"].rstrip("Z"))
    wait_for(lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None) > started + dt.timedelta(seconds=6),
             "maxRunningTime to pass", interval=0.5)
    platform.start("worker")
    job = client.wait("ran_too_long", timeout=300)
    assert job["state"] == "FAILED"
    assert "maxRunningTime" in job["errorMessage"]
    assert "TIMEOUT" in kinds(client, "ran_too_long")
    name = next(e["message"].split()[1] for e in client.events("ran_too_long")
                if e["message"].startswith("Cluster ") and e["message"].endswith(" deleted"))
    assert_no_node_left(platform, name)


def _boot(driver: LocalDriver, name: str) -> None:
    _, public_key = generate_keypair("cloudml-os-test")
    driver.create_cluster(ClusterSpec(name, (NodeSpec("chief-0", "chief", 0, "m1.medium"),), public_key))


def deleted_version(store) -> int:
    """A version whose DELETE operation finished, as the serving workflow leaves it."""
    from cloudml_os.store.models import Model, Version

    model = store.add(Model(project=PROJECT, name=f"gone_{uuid.uuid4().hex[:6]}"))
    return store.add(Version(model_id=model.id, name="v1", state="DELETED", deployment_uri="store://x/y",
                             framework="TENSORFLOW", runtime_version="2.21", machine_type="standard")).id


def test_clusters_of_no_live_job_or_version_are_deleted_and_no_other(platform, store, client, overhead_uri):
    driver = load_driver(load_settings(environ=platform.env))  # the platform's installation, as its processes
    # Another installation sharing the nodes (a cloud project): its clusters carry its own id.
    another = LocalDriver(dataclasses.replace(load_settings(environ=platform.env),
                                              installation_id="another-installation"))
    client.submit("live_job", overhead_uri, args=["--run-seconds", "600"], pythonModule="overhead_trainer.task")
    live_pk = job_pk_of(store, PROJECT, "live_job")
    wait_for(lambda: job_row(store, live_pk)["step"] == "TRAINING", "the live job to train")
    live_cluster = next(name for name in driver.list_clusters() if name.startswith(f"cml-train-{live_pk}-"))
    unknown = f"cml-train-{10**8 + live_pk}-not-ours"  # no job, no row here: maybe another installation's
    finished = store.create_job(Job(project=PROJECT, job_id="finished_job", state="SUCCEEDED", step="DONE",
                                    framework="TENSORFLOW", training_input={}, labels={}))
    finished_cluster = f"cml-train-{finished.id}-left-after-the-end"
    deleted_version_cluster = f"cml-serve-{deleted_version(store)}"
    foreign = f"someone-elses-{uuid.uuid4().hex[:6]}"
    # Its job number is one of this installation's ended jobs; only the installation's id tells it apart.
    another_installations = f"cml-train-{finished.id}-another-installations-job"
    try:
        for name in (unknown, finished_cluster, deleted_version_cluster, foreign):
            _boot(driver, name)
        _boot(another, another_installations)
        wait_for(lambda: not {finished_cluster, deleted_version_cluster} & set(driver.list_clusters()),
                 "the reconciler to delete the garbage clusters", timeout=300, interval=0.5)
        for name in (finished_cluster, deleted_version_cluster):
            assert_no_node_left(platform, name)
        # Several passes later, the live job's cluster and the ones not provably ours are still there.
        time.sleep(3 * float(RELIABILITY_SETTINGS["reconcile_interval"]))
        assert {live_cluster, unknown, foreign} <= set(driver.list_clusters())
        assert another.list_clusters() == [another_installations]
        assert job_row(store, live_pk)["state"] == "RUNNING"
    finally:
        another.delete_cluster(another_installations)
        driver.delete_cluster(foreign)
        driver.delete_cluster(unknown)
        client.request("POST", "/jobs/live_job:cancel", json={})
    assert client.wait("live_job", timeout=300)["state"] == "CANCELLED"


def test_two_reconciler_passes_at_once_resend_a_lost_step_once_and_time_out_a_job_once(scratch_database, tmp_path):
    """Two beats (or a beat and a manual pass) racing on one database: each job gets one message, one timeout."""
    url = scratch_database
    store = Store(url)
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=url, step_pickup_seconds=5)
    long_ago = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=10)
    lost = store.create_job(Job(project="p", job_id="lost", state="RUNNING", step="TRAINING", step_seq=3,
                                framework="TENSORFLOW", training_input={}, create_time=long_ago,
                                start_time=long_ago, lease_owner="dead-worker", lease_until=long_ago))
    overdue = store.create_job(Job(project="p", job_id="overdue", state="QUEUED", step="PROVISIONING",
                                   framework="TENSORFLOW", create_time=long_ago,
                                   training_input={"scheduling": {"maxWaitTime": "60s"}}))
    sent: list[tuple[int, Step, int]] = []
    lock = threading.Lock()

    def send_step(job_pk: int, step: Step, seq: int) -> None:
        with lock:
            sent.append((job_pk, step, seq))

    contexts = [ReconcileContext(settings=settings, store=Store(url), driver=LocalDriver(settings),
                                 artifacts=LocalArtifactStore(settings.artifacts_root), send_step=send_step)
                for _ in range(2)]
    start = threading.Barrier(2)
    reports = []

    def run(ctx: ReconcileContext) -> None:
        start.wait()
        reports.append(reconcile(ctx))

    threads = [threading.Thread(target=run, args=(ctx,)) for ctx in contexts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert sent == [(lost.id, Step.TRAINING, 3)]
        assert sum(len(report.timed_out) for report in reports) == 1
        assert store.get_job(overdue.id).state == "FAILED"
        assert [e.kind for e in store.events(overdue.id)].count("TIMEOUT") == 1
        # The re-sent step has a fresh pickup lease: the next pass leaves it alone.
        assert reconcile(contexts[0]).resent == []
    finally:
        for ctx in contexts:
            ctx.store.engine.dispose()
        store.engine.dispose()

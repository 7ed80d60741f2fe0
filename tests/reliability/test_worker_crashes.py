"""A Celery worker killed with SIGKILL in every step of a job, for TensorFlow and MXNet.

One job per framework: its worker (the whole process group) is killed once in each step — provisioning
(after the driver created the nodes, before they were recorded), bootstrapping (while the node runs
``pip install`` of the trainer package), launching, training, exporting, tearing down — each time while
the step provably runs (see faults.py), and a new worker is started. The job still ends SUCCEEDED with
one cluster ever created (one cluster row; the nodes the driver booted during the first provisioning are
the ones the job ran on, by their host keys) and no node left.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from cloudml_os.store import Cluster, Node
from tests.reliability.faults import (
    assert_landed_mid_step,
    assert_no_node_left,
    cluster_rows,
    driver_host_keys,
    job_pk_of,
    job_row,
    kill_worker_mid_step,
    kill_worker_while_node_runs,
    record_figure,
    wait_for,
)

pytestmark = pytest.mark.integration

STEPS = ("PROVISIONING", "BOOTSTRAPPING", "LAUNCHING", "TRAINING", "EXPORTING", "TEARING_DOWN")

# Each framework's example trainer, made to sleep before training so that the job is still training
# after the worker killed while launching has been replaced.
JOBS = {
    "TENSORFLOW": ("tf_package", ["--sleep-before-training", "40", "--epochs", "2"]),
    "MXNET": ("mxnet_package", ["--sleep-before-training", "40", "--epochs", "2"]),
}


def recorded_nodes(store, job_pk: int) -> dict[str, list[str]]:
    """The node rows of the job's cluster: name → host keys."""
    with store.session() as session:
        rows = session.scalars(select(Node).join(Cluster).where(Cluster.job_id == job_pk))
        return {node.name: list(node.host_keys) for node in rows}


@pytest.mark.parametrize("framework", sorted(JOBS))
def test_a_worker_killed_in_every_step_leaves_one_cluster_and_a_succeeded_job(platform, store, request,
                                                                               framework):
    package_fixture, args = JOBS[framework]
    client = platform.client("team-crash")
    uri = client.upload(request.getfixturevalue(package_fixture))
    job_id = f"crash_{framework.lower()}"
    client.submit(job_id, uri, args=args, framework=framework)
    job_pk = job_pk_of(store, "team-crash", job_id)

    host_keys = None
    for step in STEPS:
        if step == "PROVISIONING":
            kill = kill_worker_mid_step(platform, store, job_pk, step, lock="cluster")
            # Killed between the driver's create (its record of a complete cluster is written last) and the
            # database's record of the nodes.
            name = cluster_rows(store, job_pk)[0]["name"]
            assert (platform.data_dir / "nodes" / "clusters" / name / "cluster.json").exists()
            assert recorded_nodes(store, job_pk) == {}
            host_keys = driver_host_keys(platform, name)
            assert host_keys and all(host_keys.values())
        elif step == "BOOTSTRAPPING":
            # Killed while the node installs the trainer package: the install is cut off half way.
            kill = kill_worker_while_node_runs(platform, store, job_pk, step, name, "pip")
            assert not list((platform.data_dir / "nodes" / "clusters" / name).rglob("bootstrap.done"))
        else:
            kill = kill_worker_mid_step(platform, store, job_pk, step)
        assert_landed_mid_step(kill)
        restarted = time.monotonic()
        platform.start("worker")
        # Resumed: a new delivery holds the step (or it has moved on, or the job ended).
        wait_for(lambda kill=kill: (r := job_row(store, job_pk))["step"] != kill.step
                 or r["lease_owner"] not in (None, kill.owner), f"{step} to resume")
        record_figure(platform, f"{framework}: worker restart to {step} resumed", time.monotonic() - restarted)

    job = client.wait(job_id, timeout=900)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert job["trainingOutput"].get("exportedModelUri")
    clusters = cluster_rows(store, job_pk)
    assert len(clusters) == 1 and clusters[0]["state"] == "DELETED", clusters
    # The nodes booted before the first kill are the ones the job ran on.
    assert recorded_nodes(store, job_pk) == host_keys
    assert_no_node_left(platform, clusters[0]["name"])
    kinds = [event["kind"] for event in client.events(job_id)]
    assert kinds.count("RECONCILE") >= 1  # expired leases were picked up by the reconciler

"""A training node dies or is cut off mid-run: the job's restart policy decides, and nothing hangs or leaks.

Everything is real: PostgreSQL, RabbitMQ, a Celery worker process, sshd nodes in PID namespaces of their own
reached with paramiko, TensorFlow training (tiny synthetic data). A node is killed as a VM is powered off:
SIGKILL to its namespace's PID 1. Times are printed (for docs/reliability.md), never asserted. A node cut off
from the network: test_network_cut.py.
"""

from __future__ import annotations

import re

import pytest

from tests.recovery.jobs import (
    GIVE_UP,
    assert_no_node_left,
    cluster_name,
    event_time,
    messages,
    power_off,
    print_events,
    wait_for_log,
)

pytestmark = pytest.mark.integration

SLOW_EPOCHS = ["--epochs", "6", "--samples", "512", "--sleep-after-epoch", "3"]


@pytest.fixture(scope="module")
def client(recovery_platform):
    return recovery_platform.client("team-recovery")


@pytest.fixture(scope="module")
def package(client, tf_package):
    return client.upload(tf_package)


@pytest.fixture(autouse=True)
def show_events(client):
    yield
    print_events(client)


def test_on_failure_replaces_a_killed_worker_node_and_training_resumes_from_its_checkpoint(
        recovery_platform, client, package):
    client.submit("killed_worker", package, args=SLOW_EPOCHS, scaleTier="CUSTOM", masterType="standard",
                  workerType="standard", workerCount=1,
                  scheduling={"restartPolicy": "ON_FAILURE", "backoffLimit": 2})
    wait_for_log(client, "killed_worker", "chief-0", "epoch 2/6")
    cluster = cluster_name(client, "killed_worker")
    killed_at = power_off(recovery_platform, cluster, "worker-0")

    job = client.wait("killed_worker", timeout=GIVE_UP)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert job["restartCount"] == 1, messages(client, job["jobId"])
    events = messages(client, "killed_worker")
    assert any(m.startswith("Node worker-0 is unreachable") for m in events), events
    assert any(m.startswith("Node worker-0 replaced by a new node") for m in events), events
    assert any(m.startswith("Restarting the trainers (1 of at most 2") for m in events), events
    assert sum(m.startswith("Trainer started on 2 node(s)") for m in events) == 2, events
    # The restarted chief found the checkpoint of the first run and went on from it, not from epoch 1.
    chief_log = client.logs("killed_worker")["chief-0"]
    first_run, _, restarted = chief_log.partition("resumed from checkpoint")
    assert "epoch 2/6" in first_run
    done = int(re.match(r"\S+: (\d+) epoch\(s\) already done", restarted.strip()).group(1))
    assert done >= 2
    assert "epoch 1/6" not in restarted and "epoch 6/6" in restarted
    assert "resumed from checkpoint" in client.logs("killed_worker")["worker-0"]
    assert job["trainingOutput"]["exportedModelUri"]
    assert_no_node_left(recovery_platform, cluster)

    detected = event_time(client, "killed_worker", r"^Node worker-0 is unreachable")
    relaunched = event_time(client, "killed_worker", r"^Trainer started on", after=detected)
    print(f"\nFIGURES node power-off -> detected {(detected - killed_at).total_seconds():.1f} s, "
          f"-> trainers restarted {(relaunched - killed_at).total_seconds():.1f} s")


def test_never_fails_the_job_promptly_naming_the_killed_node(recovery_platform, client, package):
    client.submit("never_restarted", package, args=["--sleep-before-training", "600"])
    wait_for_log(client, "never_restarted", "chief-0", "sleeping")
    cluster = cluster_name(client, "never_restarted")
    killed_at = power_off(recovery_platform, cluster, "chief-0")

    job = client.wait("never_restarted", timeout=GIVE_UP)
    assert job["state"] == "FAILED"
    assert "Node chief-0 stopped answering" in job["errorMessage"]
    assert job["restartCount"] == 0
    assert not any(m.startswith("Restarting") for m in messages(client, "never_restarted"))
    assert_no_node_left(recovery_platform, cluster)
    failed = event_time(client, "never_restarted", r"failed: Node chief-0")
    print(f"\nFIGURES node power-off -> job failed {(failed - killed_at).total_seconds():.1f} s")


def test_past_the_backoff_limit_the_job_fails_saying_so(recovery_platform, client, package):
    client.submit("always_failing", package, args=["--fail-at-step", "2"],
                  scheduling={"restartPolicy": "ON_FAILURE", "backoffLimit": 1})
    job = client.wait("always_failing", timeout=GIVE_UP)
    assert job["state"] == "FAILED"
    assert job["restartCount"] == 1, messages(client, job["jobId"])
    assert "scheduling.backoffLimit (1) is reached" in job["errorMessage"]
    assert "Injected failure" in job["errorMessage"]  # the last failure's own log lines follow
    assert sum("Injected failure at step 2" in line
               for line in client.logs("always_failing")["chief-0"].splitlines()) == 2  # first run and restart

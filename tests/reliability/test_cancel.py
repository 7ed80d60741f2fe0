"""Cancel in every state and step: QUEUED, each step of PREPARING, RUNNING (training), exporting and tearing
down. Each job ends CANCELLED with no node left.

The worker's process group is stopped (SIGSTOP) while the step runs, so the cancel provably arrives while
that step's delivery holds the job (see faults.freeze_worker_mid_step), then it is let go.
"""

from __future__ import annotations

import kombu
import pytest

from tests.reliability.faults import (
    assert_no_node_left,
    cluster_rows,
    freeze,
    freeze_worker_mid_step,
    job_pk_of,
    job_row,
    submit_overhead,
    thaw,
    wait_for,
)

pytestmark = pytest.mark.integration

PROJECT = "team-cancel"
# The trainer's run time per step cancelled in: long where the job must still train, short where it must
# have finished training to reach the step.
STEPS = {"PROVISIONING": 600, "BOOTSTRAPPING": 600, "LAUNCHING": 600, "TRAINING": 600, "EXPORTING": 1,
         "TEARING_DOWN": 1}


def cancel(client, job_id: str) -> None:
    response = client.request("POST", f"/jobs/{job_id}:cancel", json={})
    assert response.status_code == 200, response.text


def test_cancel_while_queued_ends_cancelled_at_once_and_creates_nothing(platform, store, client, overhead_uri):
    worker = platform.processes["worker"]
    freeze(worker)  # no worker takes the job: it stays QUEUED
    try:
        assert submit_overhead(client, "cancel_queued", overhead_uri, 600)["state"] == "QUEUED"
        cancel(client, "cancel_queued")
        assert client.job("cancel_queued")["state"] == "CANCELLED"
    finally:
        thaw(worker)
    job_pk = job_pk_of(store, PROJECT, "cancel_queued")
    # Its first step, delivered now, finds it cancelled and creates nothing.
    wait_for(lambda: queued_messages(platform) == 0, "the worker to take the queued messages", timeout=120)
    assert cluster_rows(store, job_pk) == []
    assert job_row(store, job_pk)["state"] == "CANCELLED"


def queued_messages(platform) -> int:
    with kombu.Connection(platform.env["CLOUDML_OS_BROKER_URL"]) as connection:
        return connection.default_channel.queue_declare(platform.env["CLOUDML_OS_TASK_QUEUE"],
                                                        passive=True).message_count


@pytest.mark.parametrize("step", list(STEPS))
def test_cancel_during_a_step_ends_cancelled_with_no_node_left(platform, store, client, overhead_uri, step):
    job_id = f"cancel_{step.lower()}"
    submit_overhead(client, job_id, overhead_uri, STEPS[step])
    job_pk = job_pk_of(store, PROJECT, job_id)
    # Provisioning starts by moving the job from QUEUED (where a cancel ends it at once) to PREPARING.
    frozen = freeze_worker_mid_step(platform, store, job_pk, step,
                                    state="PREPARING" if step == "PROVISIONING" else None)
    try:
        cancel(client, job_id)
        assert client.job(job_id)["state"] == "CANCELLING"
        assert job_row(store, job_pk)["step"] == step  # the cancel came while the step was running
    finally:
        thaw(platform.processes["worker"])
    assert frozen["state"] in ("PREPARING", "RUNNING")
    job = client.wait(job_id, timeout=600)
    assert job["state"] == "CANCELLED", job
    clusters = cluster_rows(store, job_pk)
    if clusters:
        assert [c["state"] for c in clusters] == ["DELETED"]
        assert_no_node_left(platform, clusters[0]["name"])

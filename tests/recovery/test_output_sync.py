"""Outputs while the job runs: what the trainer writes under ``--job-dir`` is in the store seconds later, the
metrics API draws live curves from its event files, and a chief that dies resumes from the last synced checkpoint.

Everything is real: PostgreSQL, RabbitMQ, a Celery worker process, sshd nodes, the TensorFlow example trainer
(a checkpoint and a summary after every epoch, ``max_to_keep=2``; one epoch a second here). The store is the
local artifact folder, read directly. Times are printed, never asserted (bench/output_sync.py measures them).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.recovery.jobs import (
    GIVE_UP,
    assert_no_node_left,
    cluster_name,
    messages,
    power_off,
    print_events,
)

pytestmark = pytest.mark.integration

EPOCHS = ["--epochs", "20", "--samples", "256", "--sleep-after-epoch", "1"]
PROJECT = "team-outputs"


@pytest.fixture(scope="module")
def client(recovery_platform):
    return recovery_platform.client(PROJECT)


@pytest.fixture(scope="module")
def package(client, tf_package):
    return client.upload(tf_package)


@pytest.fixture(autouse=True)
def show_events(client):
    yield
    print_events(client)


def stored_epochs(job_dir) -> list[int]:
    """The epochs of the checkpoints in the job's directory in the store, by their index files."""
    return sorted(int(m.group(1)) for path in (job_dir / "checkpoints").glob("ckpt-*.index")
                  if (m := re.fullmatch(r"ckpt-(\d+)\.index", path.name)))


def stored_latest(job_dir) -> int | None:
    """The epoch TensorFlow's ``checkpoint`` index file in the store names as the latest checkpoint."""
    try:
        text = (job_dir / "checkpoints" / "checkpoint").read_text()
    except FileNotFoundError:
        return None
    found = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', text, re.MULTILINE)
    return int(found.group(1)) if found else None


def wait_until(condition, what: str, client, job_id: str, interval: float = 0.2):
    deadline = time.monotonic() + GIVE_UP
    while not (value := condition()):
        job = client.job(job_id)
        assert time.monotonic() < deadline and job["state"] in ("QUEUED", "PREPARING", "RUNNING"), \
            (what, job["state"], job.get("errorMessage"), messages(client, job_id))
        time.sleep(interval)
    return value


def test_checkpoints_and_summaries_are_listed_in_the_job_directory_while_the_job_runs(recovery_platform, client,
                                                                                    package):
    client.submit("synced_outputs", package, args=EPOCHS)
    job_dir = recovery_platform.data_dir / "artifacts" / PROJECT / "jobs" / "synced_outputs"

    def third_checkpoint_and_summaries():
        events = list((job_dir / "tensorboard" / "chief-0" / "tensorboard").glob("events.out.tfevents.*"))
        return events if (stored_latest(job_dir) or 0) >= 3 else None

    events = wait_until(third_checkpoint_and_summaries, "a third checkpoint in the store", client, "synced_outputs")
    curves = client.request("GET", "/jobs/synced_outputs/metrics").json()
    logs = client.logs("synced_outputs")["chief-0"]
    assert client.job("synced_outputs")["state"] == "RUNNING"
    assert "epoch 20/20" not in logs
    assert len(events) == 1 and stored_latest(job_dir) in stored_epochs(job_dir)
    # Live curves, from the event file copied while the trainer writes it (not from the log lines).
    assert curves["source"] == "tensorboard", curves
    assert len(curves["series"]["chief-0: loss"]) >= 2
    # TensorFlow keeps 2 checkpoints; the copies of older ones are deleted from the store too (a round or two later).
    wait_until(lambda: stored_epochs(job_dir)[:1] >= [4], "the first checkpoints deleted", client, "synced_outputs")

    job = client.wait("synced_outputs", timeout=GIVE_UP)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert stored_epochs(job_dir) == [19, 20] and stored_latest(job_dir) == 20
    assert (job_dir / "model" / "saved_model.pb").exists()
    assert (job_dir / "logs" / "chief-0.log").exists() and (job_dir / ".cloudml-os" / "outputs.json").exists()
    final = [m for m in messages(client, "synced_outputs") if m.startswith("Outputs copied to")]
    assert len(final) == 1 and final[0].endswith(
        f"of chief-0's job directory, 1 TensorBoard event file(s) in store://{PROJECT}/jobs/synced_outputs/tensorboard/")
    loss = client.request("GET", "/jobs/synced_outputs/metrics").json()["series"]["chief-0: loss"]
    assert len(loss) == 20


def test_a_killed_chief_resumes_from_the_latest_checkpoint_synced_before_it_died(recovery_platform, client, package):
    client.submit("chief_killed", package, args=EPOCHS, scheduling={"restartPolicy": "ON_FAILURE", "backoffLimit": 1})
    job_dir = recovery_platform.data_dir / "artifacts" / PROJECT / "jobs" / "chief_killed"
    wait_until(lambda: (stored_latest(job_dir) or 0) >= 3, "a third checkpoint in the store", client, "chief_killed")
    cluster = cluster_name(client, "chief_killed")
    power_off(recovery_platform, cluster, "chief-0")  # the only node: its disk, checkpoints included, is gone
    first_run = client.logs("chief_killed")["chief-0"]
    last_logged = max(int(n) for n in re.findall(r"epoch (\d+)/20 step", first_run))

    # Once the trainers are stopped nothing writes the store until the restarted trainer has resumed.
    wait_until(lambda: any(m.startswith("Trainers stopped; restart 1") for m in messages(client, "chief_killed")),
               "the restart", client, "chief_killed")
    synced = stored_latest(job_dir)
    assert "resumed from checkpoint" not in client.logs("chief_killed")["chief-0"]

    job = client.wait("chief_killed", timeout=GIVE_UP)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert job["restartCount"] == 1
    events = messages(client, "chief_killed")
    assert any(m.startswith("Node chief-0 replaced by a new node") for m in events), events
    assert any(m.startswith(f"Job directory restored from store://{PROJECT}/jobs/chief_killed/") for m in events)
    restarted = client.logs("chief_killed")["chief-0"][len(first_run):]
    resumed = re.search(r"resumed from checkpoint \S+/ckpt-(\d+): (\d+) epoch\(s\) already done", restarted)
    assert resumed, restarted[:2000]
    assert int(resumed.group(1)) == int(resumed.group(2)) == synced
    assert f"epoch {synced}/20" not in restarted and f"epoch {synced + 1}/20" in restarted
    assert_no_node_left(recovery_platform, cluster)
    print(f"\nFIGURES chief killed after logging epoch {last_logged}; resumed from epoch {synced} "
          f"({last_logged - synced} epoch(s) of 1 s behind)")

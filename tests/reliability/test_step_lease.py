"""The step lease (workflows/train.py run_step): a step never runs twice at once, and a dead holder's lease
stops holding the step once it expires. Driven directly on a PostgreSQL database of its own."""

from __future__ import annotations

import time

from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import load_settings
from cloudml_os.states import Step
from cloudml_os.store import Job, Store
from cloudml_os.workflows.train import TrainingContext, run_step


def context(url: str, tmp_path) -> TrainingContext:
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=url, step_lease_seconds=30)
    return TrainingContext(settings=settings, store=Store(url), driver=LocalDriver(settings),
                           artifacts=LocalArtifactStore(tmp_path / "artifacts"), frameworks={},
                           connect=lambda node, key: None)


def test_a_delivery_finding_the_lease_held_does_nothing_until_the_holder_s_lease_expires(scratch_database,
                                                                                        tmp_path):
    ctx = context(scratch_database, tmp_path)
    # A job whose teardown is due (its cluster is gone already), held by a delivery that then died.
    job = ctx.store.create_job(Job(project="p", job_id="held", state="RUNNING", step="TEARING_DOWN",
                                   framework="TENSORFLOW", training_input={}, outcome="SUCCEEDED"))
    assert ctx.store.claim_step(job.id, Step.TEARING_DOWN, 0, "dead-worker", ttl=1.0)
    try:
        assert run_step(ctx, job.id, Step.TEARING_DOWN, 0) is None  # e.g. the message redelivered at once
        held = ctx.store.get_job(job.id)
        assert (held.state, held.step, held.lease_owner) == ("RUNNING", "TEARING_DOWN", "dead-worker")
        time.sleep(1.5)  # the dead holder's lease expires
        assert run_step(ctx, job.id, Step.TEARING_DOWN, 0) is None  # ran: DONE sends nothing more
        done = ctx.store.get_job(job.id)
        assert (done.state, done.step, done.lease_owner) == ("SUCCEEDED", "DONE", None)
    finally:
        ctx.store.engine.dispose()

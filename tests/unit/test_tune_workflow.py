"""The TUNING step's delivery rules with the training workflow tests' in-memory driver and node sessions."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cloudml_os.states import Step
from cloudml_os.workflows.train import run_step
from tests.unit.test_train_workflow import FakeSession, deliver, drive, submit
from tests.unit.test_train_workflow import world as training_world  # noqa: F401 (a fixture)

SPEC = {"goal": "MAXIMIZE", "hyperparameterMetricTag": "acc", "maxTrials": 2, "maxParallelTrials": 1,
        "params": [{"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 4}]}


@pytest.fixture
def world(training_world):  # noqa: F811
    """The training world, whose nodes also hold cloudml-hypertune metric files (``metrics[node]``)."""
    ctx, driver, exits, started, nodes = training_world
    metrics: dict[str, bytes] = {}
    process_dirs: set[tuple[str, str]] = set()

    @dataclasses.dataclass
    class TuningSession(FakeSession):
        def start_process(self, proc_dir, argv, *, env, cwd):
            if (self.node, proc_dir) in process_dirs:  # as on a node: a process folder is started once
                return
            process_dirs.add((self.node, proc_dir))
            self.exits[self.node] = None  # the node's next trial: a new trainer, no metrics yet
            metrics.pop(self.node, None)
            super().start_process(proc_dir, argv, env=env, cwd=cwd)

        def read_file(self, path, offset=0, limit=1 << 20):
            if path.endswith("output.metrics"):
                return metrics.get(self.node, b"")[offset:offset + limit]
            return super().read_file(path, offset, limit)

    ctx = dataclasses.replace(ctx, connect=lambda node, key: TuningSession(node.name, exits, started, nodes))
    return ctx, driver, exits, started, metrics


def report(value: float, step: int = 1) -> bytes:
    return json.dumps({"acc": str(value), "global_step": str(step), "trial": "1", "timestamp": 0.0}).encode() + b"\n"


def _until_tuning(ctx, job_pk):
    message = deliver(ctx, job_pk, Step.PROVISIONING)
    while message[0] != Step.TUNING:
        message = run_step(ctx, job_pk, *message[:2])
    return message


def test_a_study_runs_its_trials_one_after_another_on_one_slot_and_succeeds(world):
    ctx, driver, exits, started, metrics = world
    job_pk = submit(ctx, hyperparameters=SPEC)
    message = _until_tuning(ctx, job_pk)
    assert [n.name for n in driver.clusters[driver.creates[0]]] == ["slot0-chief-0"]
    message = run_step(ctx, job_pk, *message[:2])  # starts trial 1
    assert [t.state for t in ctx.store.trials(job_pk)] == ["RUNNING"]
    metrics["slot0-chief-0"], exits["slot0-chief-0"] = report(0.5), 0
    message = run_step(ctx, job_pk, *message[:2])  # trial 1 ends (the window too: watch_window is 0)
    message = run_step(ctx, job_pk, *message[:2])  # trial 2 starts on the same slot
    assert [t.state for t in ctx.store.trials(job_pk)] == ["SUCCEEDED", "RUNNING"]
    metrics["slot0-chief-0"], exits["slot0-chief-0"] = report(0.75), 0
    drive(ctx, job_pk, message)
    job = ctx.store.get_job(job_pk)
    assert (job.state, job.step) == ("SUCCEEDED", "DONE")
    assert [t["finalMetric"]["objectiveValue"] for t in job.training_output["trials"]] == [0.75, 0.5]
    assert len(driver.creates) == 1 and driver.deletes == driver.creates


def test_a_worker_shutting_down_between_trials_hands_the_study_over_instead_of_ending_it(world):
    ctx, _, exits, _, metrics = world
    job_pk = submit(ctx, hyperparameters=SPEC)
    message = run_step(ctx, job_pk, *_until_tuning(ctx, job_pk)[:2])  # trial 1 runs
    metrics["slot0-chief-0"], exits["slot0-chief-0"] = report(0.5), 0
    message = run_step(ctx, job_pk, *message[:2])  # trial 1 ends with the window; none runs now
    assert [t.state for t in ctx.store.trials(job_pk)] == ["SUCCEEDED"]
    ctx.stopping.set()  # what the worker's shutdown signal does
    message = run_step(ctx, job_pk, *message[:2])
    assert message[0] == Step.TUNING  # handed over, not concluded with one trial of two
    assert [t.state for t in ctx.store.trials(job_pk)] == ["SUCCEEDED"]
    ctx.stopping.clear()  # the next worker
    message = run_step(ctx, job_pk, *message[:2])
    assert [t.state for t in ctx.store.trials(job_pk)] == ["SUCCEEDED", "RUNNING"]


def test_a_trial_that_reports_nothing_fails_and_with_max_failed_trials_1_fails_the_job(world):
    ctx, _, exits, _, _ = world
    job_pk = submit(ctx, hyperparameters={**SPEC, "maxFailedTrials": 1})
    message = run_step(ctx, job_pk, *_until_tuning(ctx, job_pk)[:2])
    exits["slot0-chief-0"] = 0  # exits 0 without reporting "acc"
    drive(ctx, job_pk, message)
    job = ctx.store.get_job(job_pk)
    assert job.state == "FAILED"
    assert "1 trial(s) failed (maxFailedTrials 1)" in job.error_message
    assert "reported no value for the metric 'acc'" in job.error_message
    assert [t.state for t in ctx.store.trials(job_pk)] == ["FAILED"]

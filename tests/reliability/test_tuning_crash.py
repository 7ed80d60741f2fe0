"""A Celery worker SIGKILLed in the middle of a hyperparameter tuning study: the study goes on where it was.

The worker is killed while it runs the TUNING step after a trial has finished, with another running; a new
worker takes the step over once its lease expires. Every trial runs exactly once (its trainer started once,
one "started" event), the job succeeds, and no node is left.
"""

from __future__ import annotations

import pytest

from tests.reliability.faults import (
    assert_landed_mid_step,
    assert_no_node_left,
    cluster_rows,
    job_pk_of,
    kill_worker_mid_step,
)

pytestmark = pytest.mark.integration


def test_a_worker_killed_mid_study_resumes_it_without_repeating_a_finished_trial(platform, store, tuning_packages):
    client = platform.client("team-tune-crash")
    uris = [client.upload(path) for path in tuning_packages]
    spec = {"hyperparameterMetricTag": "objective", "maxTrials": 5, "maxParallelTrials": 2,
            "params": [{"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 5}]}
    client.submit("tune_crash", uris[0], args=["--steps", "4", "--step_seconds", "0.5"], packageUris=uris,
                  hyperparameters=spec)
    job_pk = job_pk_of(store, "team-tune-crash", "tune_crash")

    def a_trial_finished_and_one_runs(_row: dict) -> bool:
        states = [trial.state for trial in store.trials(job_pk)]
        return "SUCCEEDED" in states and "RUNNING" in states

    kill = kill_worker_mid_step(platform, store, job_pk, "TUNING", ready=a_trial_finished_and_one_runs)
    assert_landed_mid_step(kill)
    platform.start("worker")

    job = client.wait("tune_crash", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    trials = store.trials(job_pk)
    assert [t.trial_id for t in trials] == [1, 2, 3, 4, 5]
    assert {t.state for t in trials} == {"SUCCEEDED"}
    assert len({t.optuna_number for t in trials}) == 5
    started = [e["node"] for e in client.events("tune_crash") if e["kind"] == "TRIAL" and " started " in e["message"]]
    assert sorted(started) == [f"trial-{n}" for n in range(1, 6)]
    for trial in trials:
        response = client.request("GET", "/jobs/tune_crash/logs", params={"trial": trial.trial_id, "node": "chief-0"})
        text = response.json()["logs"][0]["text"]
        assert text.count(f"TRIAL {trial.trial_id} task chief") == 1, text  # the trainer ran once
    assert_no_node_left(platform, cluster_rows(store, job_pk)[0]["name"])

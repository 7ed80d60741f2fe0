"""Hyperparameter tuning end to end: a v1 HyperparameterSpec run as trials on a real platform (API, Celery
worker, sshd nodes), with a trainer that reports its metric through the real cloudml-hypertune package."""

from __future__ import annotations

import math

import google.oauth2.credentials
import pytest
from googleapiclient import discovery

from tests.harness import cluster_processes

pytestmark = pytest.mark.integration

PROJECT = "tuning"


@pytest.fixture(scope="module")
def client(platform):
    return platform.client(PROJECT, "member")


@pytest.fixture(scope="module")
def packages(client, tuning_packages):
    return [client.upload(path) for path in tuning_packages]


def _trials_started_together(events: list[dict]) -> bool:
    """Whether two trials ran at once: a trial started before an earlier one ended."""
    running, most = set(), 0
    for event in events:
        if event["kind"] == "TRIAL":
            trial = event["node"]
            if " started " in event["message"]:
                running.add(trial)
            else:
                running.discard(trial)
            most = max(most, len(running))
    return most >= 2


def test_the_ml_v1_client_runs_a_tuning_job_with_every_parameter_type(platform, client, packages):
    token = platform.token(PROJECT, "member")
    ml = discovery.build("ml", "v1", static_discovery=True, client_options={"api_endpoint": platform.base_url + "/"},
                         credentials=google.oauth2.credentials.Credentials(token))
    spec = {
        "goal": "MAXIMIZE", "hyperparameterMetricTag": "objective", "maxTrials": 4, "maxParallelTrials": 2,
        "params": [
            {"parameterName": "learning_rate", "type": "DOUBLE", "minValue": 0.0001, "maxValue": 1,
             "scaleType": "UNIT_LOG_SCALE"},
            {"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 5,
             "scaleType": "UNIT_LINEAR_SCALE"},
            {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]},
            {"parameterName": "batch_size", "type": "DISCRETE", "discreteValues": [16, 32, 64]},
        ],
    }
    body = {"jobId": "tune_all_types", "trainingInput": {
        "scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard", "workerCount": "1",
        "packageUris": packages, "pythonModule": "trainer.task", "region": "local",
        "args": ["--worker_seconds", "30"], "hyperparameters": spec}}
    ml.projects().jobs().create(parent=f"projects/{PROJECT}", body=body).execute()
    job = client.wait("tune_all_types", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")

    output = job["trainingOutput"]
    assert output["isHyperparameterTuningJob"] is True
    assert output["hyperparameterMetricTag"] == "objective"
    assert output["completedTrialCount"] == "4"
    trials = output["trials"]
    assert sorted(t["trialId"] for t in trials) == ["1", "2", "3", "4"]
    for trial in trials:
        values = trial["hyperparameters"]
        assert 0.0001 <= float(values["learning_rate"]) <= 1
        assert values["layers"] in {"1", "2", "3", "4", "5"}
        assert values["optimizer"] in {"adam", "sgd"}
        assert values["batch_size"] in {"16", "32", "64"}
        assert trial["state"] == "SUCCEEDED" and trial["isTrialStoppedEarly"] is False
        expected = (1 - (math.log10(float(values["learning_rate"])) + 2) ** 2 / 4
                    - 0.1 * (int(values["layers"]) - 3) ** 2 + (0.3 if values["optimizer"] == "adam" else 0)
                    + int(values["batch_size"]) / 640)
        assert trial["finalMetric"]["objectiveValue"] == pytest.approx(expected)
        assert trial["finalMetric"]["trainingStep"] == "3"
    # Best first, as Cloud ML Engine lists them at the end; the job's model is the best trial's.
    objectives = [t["finalMetric"]["objectiveValue"] for t in trials]
    assert objectives[0] == max(objectives)
    model = platform.data_dir / "artifacts" / PROJECT / "jobs" / "tune_all_types" / "model" / "saved_model.pb"
    assert f'"trial": "{trials[0]["trialId"]}"' in model.read_text()

    events = client.events("tune_all_types")
    assert _trials_started_together(events)
    # Each trial's logs are its own; the trainer saw its trial id in TF_CONFIG and the environment.
    logs = client.request("GET", "/jobs/tune_all_types/logs", params={"trial": 2, "node": "chief-0"}).json()
    text = logs["logs"][0]["text"]
    assert "TRIAL 2 task chief 0 tf_config_trial 2" in text
    assert f"--learning_rate={next(t for t in trials if t['trialId'] == '2')['hyperparameters']['learning_rate']}" \
        in text
    worker_log = client.request("GET", "/jobs/tune_all_types/logs", params={"trial": 2, "node": "worker-0"}).json()
    assert "TRIAL 2 task worker 0" in worker_log["logs"][0]["text"]

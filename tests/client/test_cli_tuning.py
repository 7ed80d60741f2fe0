"""A hyperparameter tuning job submitted with ``cloudml jobs submit training --config hptuning_config.yaml``,
a gcloud-style file, on a real platform: the job the API stores is exactly the v1 body docs/api.md's
"Hyperparameter tuning" section describes (defaults filled in), and following it shows every trial's log."""

from __future__ import annotations

import json

import pytest

from tests.client.cli_helpers import cli_env, run
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

PROJECT = "cli-tuning"

# As gcloud users write it (https://cloud.google.com/ai-platform/training/docs/using-hyperparameter-tuning).
HPTUNING_CONFIG = """\
trainingInput:
  scaleTier: BASIC
  hyperparameters:
    goal: MAXIMIZE
    hyperparameterMetricTag: objective
    maxTrials: 3
    maxParallelTrials: 2
    params:
      - parameterName: learning_rate
        type: DOUBLE
        minValue: 0.0001
        maxValue: 1
        scaleType: UNIT_LOG_SCALE
      - parameterName: layers
        type: INTEGER
        minValue: 1
        maxValue: 5
        scaleType: UNIT_LINEAR_SCALE
      - parameterName: optimizer
        type: CATEGORICAL
        categoricalValues:
          - adam
          - sgd
      - parameterName: batch_size
        type: DISCRETE
        discreteValues:
          - 16
          - 32
          - 64
"""

HYPERPARAMETERS = {  # what the API stores: the file's spec with v1's defaults filled in
    "goal": "MAXIMIZE", "hyperparameterMetricTag": "objective", "maxTrials": 3, "maxParallelTrials": 2,
    "maxFailedTrials": 0, "algorithm": "ALGORITHM_UNSPECIFIED", "enableTrialEarlyStopping": False,
    "params": [
        {"parameterName": "learning_rate", "type": "DOUBLE", "minValue": 0.0001, "maxValue": 1.0,
         "scaleType": "UNIT_LOG_SCALE"},
        {"parameterName": "layers", "type": "INTEGER", "minValue": 1.0, "maxValue": 5.0,
         "scaleType": "UNIT_LINEAR_SCALE"},
        {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]},
        {"parameterName": "batch_size", "type": "DISCRETE", "discreteValues": [16.0, 32.0, 64.0]},
    ],
}


def test_a_gcloud_hptuning_config_submits_the_v1_tuning_job_and_its_trials_are_followed(platform, tuning_packages,
                                                                                        tmp_path):
    config = tmp_path / "hptuning_config.yaml"
    config.write_text(HPTUNING_CONFIG)
    env = cli_env(tmp_path / "config.json", endpoint=platform.base_url, project=PROJECT,
                  token=platform.token(PROJECT, "member"))
    hypertune = tuning_packages[1]
    result = run(env, "jobs", "submit", "training", "cli_tune", "--package-path", str(ROOT / "tests" / "trainers" /
                 "tuning"), "--module-name", "trainer.task", "--config", str(config), "--packages", str(hypertune),
                 "--region", "local", "--stream-logs", "--polling-interval", "0.3", "--", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert f"Uploaded {hypertune.name}" in result.stderr and "Uploaded tuning-trainer-0.1.tar.gz" in result.stderr
    for trial in (1, 2, 3):
        assert f"trial-{trial}/chief-0: TRIAL {trial} task chief 0" in result.stdout, result.stdout
    assert all(line.split(": ", 1)[0].startswith("trial-") for line in result.stdout.splitlines())

    job = json.loads(run(env, "jobs", "describe", "cli_tune", "--format", "json").stdout)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    training = job["trainingInput"]
    uris = training.pop("packageUris")
    assert [uri.rsplit("/", 1)[1] for uri in uris] == ["tuning-trainer-0.1.tar.gz", hypertune.name]
    assert training == {"scaleTier": "BASIC", "pythonModule": "trainer.task", "region": "local",
                        "args": ["--steps", "2"], "framework": "TENSORFLOW", "hyperparameters": HYPERPARAMETERS}
    assert job["trainingOutput"]["completedTrialCount"] == "3"
    trials = run(env, "jobs", "describe", "cli_tune", "--format", "value(trainingOutput.trials)")
    assert trials.exit_code == 0 and trials.stdout.count("objectiveValue") == 3

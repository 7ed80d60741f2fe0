"""Hyperparameter tuning end to end: a v1 HyperparameterSpec run as trials on a real platform (API, Celery
worker, sshd nodes), with a trainer that reports its metric through the real cloudml-hypertune package."""

from __future__ import annotations

import math
import time

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
    # One cluster for the whole study (two slots of master + worker), bootstrapped once, reused by every trial.
    ready = [e["message"] for e in events if e["kind"] == "CLUSTER" and " ready " in e["message"]]
    assert len(ready) == 1 and ready[0].endswith("ready with 4 node(s)")
    assert len([e for e in events if e["kind"] == "BOOTSTRAP"]) == 1
    # Each trial's logs are its own; the trainer saw its trial id in TF_CONFIG and the environment.
    logs = client.request("GET", "/jobs/tune_all_types/logs", params={"trial": 2, "node": "chief-0"}).json()
    text = logs["logs"][0]["text"]
    assert "TRIAL 2 task chief 0 tf_config_trial 2" in text
    assert f"--learning_rate={next(t for t in trials if t['trialId'] == '2')['hyperparameters']['learning_rate']}" \
        in text
    worker_log = client.request("GET", "/jobs/tune_all_types/logs", params={"trial": 2, "node": "worker-0"}).json()
    assert "TRIAL 2 task worker 0" in worker_log["logs"][0]["text"]
    curves = client.request("GET", "/jobs/tune_all_types/metrics", params={"trial": 2}).json()
    assert curves["source"] == "logs"
    assert [point["x"] for point in curves["series"]["trial-2/chief-0: objective"]] == [1, 2, 3]
    assert all(name.startswith("trial-2/") for name in curves["series"])


def _submit(client, job_id: str, packages: list[str], spec: dict, args: list[str] = (), **training_input) -> None:
    body = {"jobId": job_id, "trainingInput": {
        "scaleTier": "BASIC", "packageUris": packages, "pythonModule": "trainer.task", "region": "local",
        "args": list(args), "hyperparameters": spec, **training_input}}
    response = client.request("POST", "/jobs", json=body)
    assert response.status_code == 200, response.text


CRASHING_GRID = {"algorithm": "GRID_SEARCH", "hyperparameterMetricTag": "objective", "maxTrials": 10,
                 "maxParallelTrials": 2, "params": [
                     {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "crash"]},
                     {"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 2}]}


def test_failed_trials_under_max_failed_trials_do_not_fail_the_job(client, packages):
    # A grid of 4 points (maxTrials 10 is cut to the grid), two of which crash.
    _submit(client, "tune_some_fail", packages, {**CRASHING_GRID, "maxFailedTrials": 3})
    job = client.wait("tune_some_fail", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    trials = {t["trialId"]: t for t in job["trainingOutput"]["trials"]}
    assert len(trials) == 4
    assert sorted((t["hyperparameters"]["optimizer"], t["hyperparameters"]["layers"]) for t in trials.values()) == \
        [("adam", "1"), ("adam", "2"), ("crash", "1"), ("crash", "2")]
    for trial in trials.values():
        if trial["hyperparameters"]["optimizer"] == "crash":
            assert trial["state"] == "FAILED"
            assert "exited with code 1" in trial["errorMessage"]
            assert "crashes, as asked" in trial["errorMessage"]  # the trainer's traceback
            assert "finalMetric" not in trial
        else:
            assert trial["state"] == "SUCCEEDED"
    assert job["trainingOutput"]["completedTrialCount"] == "2"
    assert job["trainingOutput"]["trials"][0]["hyperparameters"] == {"optimizer": "adam", "layers": "2"}


def test_reaching_max_failed_trials_fails_the_job_naming_the_trials_errors(client, packages):
    _submit(client, "tune_too_many_fail", packages, {**CRASHING_GRID, "maxFailedTrials": 1})
    job = client.wait("tune_too_many_fail", timeout=600)
    assert job["state"] == "FAILED"
    assert "1 trial(s) failed (maxFailedTrials 1)" in job["errorMessage"]
    assert "crashes, as asked" in job["errorMessage"]
    failed = [t for t in job["trainingOutput"]["trials"] if t["state"] == "FAILED"]
    assert len(failed) == 1
    assert all(t["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") for t in job["trainingOutput"]["trials"])


def test_early_stopping_stops_trials_whose_metric_trails(client, packages):
    # The objective is minus the trial id: after two completed trials every later one trails their median
    # from its first report on, and is stopped; without early stopping all would run their 6 steps.
    spec = {"algorithm": "RANDOM_SEARCH", "hyperparameterMetricTag": "objective", "maxTrials": 4,
            "enableTrialEarlyStopping": True,
            "params": [{"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 5}]}
    _submit(client, "tune_early_stop", packages, spec,
            args=["--objective_is_minus_trial", "--steps", "6", "--step_seconds", "0.7"])
    job = client.wait("tune_early_stop", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    trials = {t["trialId"]: t for t in job["trainingOutput"]["trials"]}
    for trial_id in ("1", "2"):
        assert trials[trial_id]["isTrialStoppedEarly"] is False
        assert trials[trial_id]["finalMetric"]["trainingStep"] == "6"
    for trial_id in ("3", "4"):
        assert trials[trial_id]["isTrialStoppedEarly"] is True, trials[trial_id]
        assert int(trials[trial_id]["finalMetric"]["trainingStep"]) < 6
    assert job["trainingOutput"]["trials"][0]["trialId"] == "1"  # the best, and the stopped ones are not candidates
    assert job["trainingOutput"]["completedTrialCount"] == "4"


def test_cancel_mid_study_stops_every_trial_and_leaves_no_node_process(platform, client, packages):
    spec = {"hyperparameterMetricTag": "objective", "maxTrials": 6, "maxParallelTrials": 2,
            "params": [{"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 5}]}
    _submit(client, "tune_cancel", packages, spec, args=["--steps", "600", "--step_seconds", "1",
                                                         "--worker_seconds", "600"],
            scaleTier="CUSTOM", masterType="standard", workerType="standard", workerCount=1)
    job = client.wait("tune_cancel", states={"RUNNING"}, timeout=300)
    deadline = 1500
    while sum(t["state"] == "RUNNING" for t in job.get("trainingOutput", {}).get("trials", [])) < 2:
        deadline -= 1
        assert deadline > 0, job
        time.sleep(0.2)
        job = client.job("tune_cancel")
    cluster = next((platform.data_dir / "nodes" / "clusters").glob("*tuning-tune-cancel*")).name
    assert cluster_processes(platform, cluster)
    assert client.request("POST", "/jobs/tune_cancel:cancel").status_code == 200
    job = client.wait("tune_cancel", timeout=300)
    assert job["state"] == "CANCELLED"
    assert {t["state"] for t in job["trainingOutput"]["trials"]} == {"CANCELLED"}
    assert cluster_processes(platform, cluster) == []


def test_resume_previous_job_continues_its_study(client, packages):
    spec = {"hyperparameterMetricTag": "objective", "maxTrials": 2, "algorithm": "RANDOM_SEARCH",
            "params": [{"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 5}]}
    _submit(client, "tune_first", packages, spec)
    assert client.wait("tune_first", timeout=600)["state"] == "SUCCEEDED"
    _submit(client, "tune_resumed", packages, {**spec, "resumePreviousJobId": "tune_first"})
    job = client.wait("tune_resumed", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert len(job["trainingOutput"]["trials"]) == 2
    assert any("Study resumed from job tune_first with its 2 finished trial(s)" in e["message"]
               for e in client.events("tune_resumed"))


def test_a_tensorflow_summary_with_the_metric_tag_is_read_when_hypertune_reported_nothing(platform, client,
                                                                                          packages):
    spec = {"hyperparameterMetricTag": "accuracy", "maxTrials": 1,
            "params": [{"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam"]}]}
    _submit(client, "tune_tf_summary", packages, spec,
            args=["--report_with_tf_summary", "--metric_tag", "accuracy", "--learning_rate", "0.01"])
    job = client.wait("tune_tf_summary", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    [trial] = job["trainingOutput"]["trials"]
    assert trial["finalMetric"] == {"trainingStep": "3", "objectiveValue": pytest.approx(1.35)}
    # The trial's event file was copied under its trial, and its curve is the trial's.
    curves = client.request("GET", "/jobs/tune_tf_summary/metrics", params={"trial": 1}).json()
    assert curves["source"] == "tensorboard"
    assert [point["x"] for point in curves["series"]["trial-1/chief-0: accuracy"]] == [1, 2, 3]
    # The trial's job directory (output/1 on its chief) is JOB_DIR/1 in the store, its event file only under
    # tensorboard/.
    job_dir = platform.data_dir / "artifacts" / PROJECT / "jobs" / "tune_tf_summary"
    assert (job_dir / "1" / "model" / "saved_model.pb").exists() and not (job_dir / "1" / "summaries").exists()
    assert len(list((job_dir / "tensorboard" / "trial-1" / "chief-0" / "summaries").glob("events.out.tfevents.*"))) == 1
    assert any(e["message"].startswith(f"Outputs copied to store://{PROJECT}/jobs/tune_tf_summary/1/: 1 file(s) "
                                       "of slot0-chief-0's job directory") for e in client.events("tune_tf_summary"))


def test_a_trial_reporting_no_value_for_the_tag_fails_saying_so(client, packages):
    spec = {"hyperparameterMetricTag": "not_reported", "maxTrials": 1,
            "params": [{"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 2}]}
    _submit(client, "tune_wrong_tag", packages, spec)
    job = client.wait("tune_wrong_tag", timeout=600)
    assert job["state"] == "FAILED"
    assert "reported no value for the metric 'not_reported'" in job["errorMessage"]


@pytest.mark.parametrize(("framework", "runtime"), [("MXNET", "mxnet_runtime"), ("PYTORCH", "pytorch_runtime")])
def test_mxnet_and_pytorch_trials_get_their_trial_id_and_values(request, client, packages, framework, runtime):
    request.getfixturevalue(runtime)
    job_id = f"tune_{framework.lower()}"
    spec = {"hyperparameterMetricTag": "objective", "maxTrials": 2, "algorithm": "GRID_SEARCH",
            "params": [{"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]}]}
    _submit(client, job_id, packages, spec, framework=framework)
    job = client.wait(job_id, timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    trials = {t["trialId"]: t for t in job["trainingOutput"]["trials"]}
    assert {t["hyperparameters"]["optimizer"] for t in trials.values()} == {"adam", "sgd"}
    for trial_id, trial in trials.items():
        logs = client.request("GET", f"/jobs/{job_id}/logs", params={"trial": trial_id}).json()["logs"]
        text = "".join(entry["text"] for entry in logs)
        assert f"TRIAL {trial_id} " in text and f"--optimizer={trial['hyperparameters']['optimizer']}" in text
        expected = 1.35 if trial["hyperparameters"]["optimizer"] == "adam" else 1.05
        assert trial["finalMetric"]["objectiveValue"] == pytest.approx(expected)

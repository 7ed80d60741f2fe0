"""The v1 request and response shapes: what a Job body must look like, and how a stored job is shown."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from marshmallow import ValidationError

from cloudml_os.api.schemas import JobCreateSchema, JobSchema, LogsQuerySchema
from cloudml_os.errors import flatten_messages
from cloudml_os.store import Job


def body(**training_input: Any) -> dict[str, Any]:
    ti = {"packageUris": ["store://p/packages/abc/trainer-0.1.tar.gz"], "pythonModule": "trainer.task",
          **training_input}
    return {"jobId": "job_1", "trainingInput": ti}


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        JobCreateSchema().load(data)
    return flatten_messages(info.value.messages)


def test_minimal_body_gets_v1_defaults_and_our_framework():
    loaded = JobCreateSchema().load(body())
    assert loaded == {
        "jobId": "job_1", "labels": {},
        "trainingInput": {"packageUris": ["store://p/packages/abc/trainer-0.1.tar.gz"],
                          "pythonModule": "trainer.task", "scaleTier": "BASIC", "framework": "TENSORFLOW"},
    }


def test_int64_counts_accept_strings_and_integers():
    loaded = JobCreateSchema().load(body(scaleTier="CUSTOM", masterType="standard", workerType="standard",
                                         workerCount="4", parameterServerType="standard", parameterServerCount=2))
    assert loaded["trainingInput"]["workerCount"] == 4
    assert loaded["trainingInput"]["parameterServerCount"] == 2


@pytest.mark.parametrize("count", ["-1", -3])
def test_negative_counts_are_refused(count):
    assert errors_of(body(workerCount=count)) == ["trainingInput.workerCount: must not be negative"]


@pytest.mark.parametrize("count", ["four", 1.5, True, "", None])
def test_non_integer_counts_are_refused(count):
    assert errors_of(body(evaluatorCount=count))[0].startswith("trainingInput.evaluatorCount:")


@pytest.mark.parametrize("tier", ["BASIC_TPU", "basic", "HUGE"])
def test_unknown_scale_tier_lists_the_valid_ones(tier):
    [message] = errors_of(body(scaleTier=tier))
    assert message.startswith(f"trainingInput.scaleTier: unknown tier {tier!r}")
    assert "BASIC, STANDARD_1, PREMIUM_1, BASIC_GPU, CUSTOM" in message


def test_missing_python_module_and_packages_are_named():
    data = body()
    del data["trainingInput"]["pythonModule"]
    data["trainingInput"]["packageUris"] = []
    assert sorted(errors_of(data)) == ["trainingInput.packageUris: give 1 to 100 package URIs",
                                       "trainingInput.pythonModule: Missing data for required field."]


@pytest.mark.parametrize("module", ["trainer task", "trainer.", "1trainer", "trainer;rm", ""])
def test_python_module_must_be_a_dotted_name(module):
    assert errors_of(body(pythonModule=module)) == ["trainingInput.pythonModule: must be a dotted Python module name"]


@pytest.mark.parametrize("job_id", ["1job", "job-1", "job 1", "", "a" * 129, "_job"])
def test_bad_job_ids_are_refused(job_id):
    data = body()
    data["jobId"] = job_id
    assert errors_of(data)[0].startswith("jobId: must start with a letter")


def test_longest_job_id_is_accepted():
    data = body()
    data["jobId"] = "J" + "a_1" * 42 + "b"
    assert JobCreateSchema().load(data)["jobId"] == data["jobId"]


def test_unknown_fields_are_refused_at_every_level():
    data = body(tpuSpeed=3, scheduling={"maxRunningTime": "3600s", "soon": True})
    data["colour"] = "red"
    assert sorted(errors_of(data)) == ["colour: Unknown field.", "trainingInput.scheduling.soon: Unknown field.",
                                       "trainingInput.tpuSpeed: Unknown field."]


def test_v1_fields_we_do_not_act_on_are_accepted_and_kept():
    extra = {"region": "us-central1", "useChiefInTfConfig": True, "pythonVersion": "3.7", "runtimeVersion": "2.11",
             "jobDir": "store://p/out", "network": "n", "serviceAccount": "sa", "enableWebAccess": False,
             "scheduling": {"maxRunningTime": "3600s", "maxWaitTime": "1.5s", "priority": 1},
             "masterConfig": {"acceleratorConfig": {"count": "2", "type": "NVIDIA_TESLA_T4"},
                              "diskConfig": {"bootDiskSizeGb": 100, "bootDiskType": "pd-ssd"}},
             "hyperparameters": {"goal": "MAXIMIZE", "maxTrials": 4, "hyperparameterMetricTag": "acc",
                                 "params": [{"parameterName": "lr", "type": "DOUBLE", "minValue": 0.001,
                                             "maxValue": 0.1, "scaleType": "UNIT_LOG_SCALE"}]},
             "encryptionConfig": {"kmsKeyName": "k"}}
    loaded = JobCreateSchema().load(body(**extra))["trainingInput"]
    assert loaded["region"] == "us-central1"
    assert loaded["masterConfig"]["acceleratorConfig"]["count"] == 2
    assert loaded["hyperparameters"]["params"][0]["parameterName"] == "lr"


def test_durations_must_be_in_seconds():
    assert errors_of(body(scheduling={"maxRunningTime": "1h"})) == [
        "trainingInput.scheduling.maxRunningTime: must be a duration like '3600s'"]


def test_args_are_strings_kept_literally():
    args = ["--x=$(rm -rf /)", "a; b && c", "`id`", "'quoted' \"twice\"", "--glob=*"]
    assert JobCreateSchema().load(body(args=args))["trainingInput"]["args"] == args
    assert errors_of(body(args=["ok", 3])) == ["trainingInput.args[1]: Not a valid string."]


@pytest.mark.parametrize("labels, fragment", [
    ({"Team": "ml"}, "invalid label key 'Team'"),
    ({"1team": "ml"}, "invalid label key '1team'"),
    ({"team": "ML"}, "invalid label value 'ML'"),
    ({"team": "a" * 64}, "invalid label value"),
    ({"team": 3}, "Not a valid string"),
    ({f"k{i}": "v" for i in range(65)}, "at most 64 labels"),
])
def test_bad_labels_are_refused(labels, fragment):
    data = body()
    data["labels"] = labels
    messages = errors_of(data)
    assert messages[0].startswith("labels") and fragment in " ".join(messages)


def test_labels_follow_v1_rules_including_international_letters():
    data = body()
    data["labels"] = {"team": "ml", "cost-centre_2": "", "équipe": "données"}
    assert JobCreateSchema().load(data)["labels"] == data["labels"]


def test_output_only_fields_of_a_fetched_job_are_ignored():
    data = body()
    data.update(state="SUCCEEDED", createTime="2020-01-01T00:00:00Z", etag="MQ==", step="DONE", errorMessage="x")
    assert set(JobCreateSchema().load(data)) == {"jobId", "trainingInput", "labels"}


def prediction(**fields: Any) -> dict[str, Any]:
    return {"jobId": "batch_1", "predictionInput": {"dataFormat": "JSON", "inputPaths": ["store://p/data/*.json"],
                                                    "outputPath": "store://p/out", "modelName": "projects/p/models/m",
                                                    **fields}}


def test_a_prediction_job_gets_v1_defaults():
    loaded = JobCreateSchema().load(prediction(region="us-central1"))
    assert loaded["predictionInput"] == {
        "dataFormat": "JSON", "inputPaths": ["store://p/data/*.json"], "outputPath": "store://p/out",
        "modelName": "projects/p/models/m", "region": "us-central1", "outputDataFormat": "JSON",
        "maxWorkerCount": 10, "batchSize": 64, "signatureName": "serving_default"}
    assert "trainingInput" not in loaded


@pytest.mark.parametrize("data, message", [
    (dict(body(), predictionInput=prediction()["predictionInput"]),
     "trainingInput: give exactly one of trainingInput (a training job) and predictionInput (a batch prediction job)"),
    ({"jobId": "j"},
     "trainingInput: give exactly one of trainingInput (a training job) and predictionInput (a batch prediction job)"),
    (prediction(uri="store://p/model"), "predictionInput.modelName: give exactly one of modelName, versionName and "
                                        "uri (got modelName, uri)"),
    (prediction(dataFormat="PARQUET"), "predictionInput.dataFormat: Must be one of: JSON, TEXT, CSV, TF_RECORD, "
                                       "TF_RECORD_GZIP."),
    (prediction(maxWorkerCount=0), "predictionInput.maxWorkerCount: must be 1 to 1000"),
    (prediction(batchSize="many"), "predictionInput.batchSize: Not a valid integer."),
    (prediction(signatureName="other"), "predictionInput.signatureName: only serving_default is served (the "
                                        "signature online prediction uses)"),
    (prediction(framework="MXNET"), "predictionInput.framework: only with uri: a version's framework is the "
                                    "version's"),
    (prediction(dataFormat="JSON", inputPaths=[]), "predictionInput.inputPaths: give 1 to 100 paths"),
    (prediction(accelerator={"count": 1}), "predictionInput.accelerator: Unknown field."),
])
def test_bad_prediction_inputs_are_refused_naming_the_field(data, message):
    assert errors_of(data) == [message]


def test_job_resource_is_v1_shaped():
    job = Job(id=7, project="p", job_id="job_1", state="RUNNING", step="TRAINING", framework="TENSORFLOW",
              training_input={"scaleTier": "CUSTOM", "masterType": "standard", "workerCount": 4,
                              "packageUris": ["store://p/x.tar.gz"], "pythonModule": "t.task",
                              "framework": "TENSORFLOW"},
              labels={"team": "ml"}, create_time=dt.datetime(2026, 11, 27, 16, 0, 0, 123456),
              start_time=dt.datetime(2026, 11, 27, 16, 5), end_time=None, error_message="", training_output={},
              etag=3)
    assert JobSchema().dump(job) == {
        "jobId": "job_1", "state": "RUNNING", "step": "TRAINING", "framework": "TENSORFLOW",
        "trainingInput": {"scaleTier": "CUSTOM", "masterType": "standard", "workerCount": "4",
                          "packageUris": ["store://p/x.tar.gz"], "pythonModule": "t.task",
                          "framework": "TENSORFLOW"},
        "labels": {"team": "ml"}, "createTime": "2026-11-27T16:00:00.123456Z",
        "startTime": "2026-11-27T16:05:00.000000Z",
        "etag": "Mw==",
    }


def test_logs_offset_and_follow_need_a_node():
    with pytest.raises(ValidationError) as info:
        LogsQuerySchema().load({"offset": "5", "follow": "true"})
    assert info.value.messages == {"offset": ["offset needs node"]}
    assert LogsQuerySchema().load({"node": "master-0", "follow": "true"})["follow"] is True


def test_flatten_messages_names_nested_fields_and_list_items():
    messages = {"a": {"b": ["bad."], "c": {1: ["worse."]}}, "_schema": ["whole."]}
    assert flatten_messages(messages) == ["a.b: bad.", "a.c[1]: worse.", "whole."]


@pytest.mark.parametrize(("data", "field"), [
    ({**body(), "jobId": "job_1\n"}, "jobId"),
    (body(pythonModule="trainer.task\n"), "trainingInput.pythonModule"),
    (body(scheduling={"maxRunningTime": "3600s\n"}), "trainingInput.scheduling.maxRunningTime"),
])
def test_a_trailing_newline_does_not_pass_for_an_id(data, field):
    assert any(message.startswith(field) for message in errors_of(data)), errors_of(data)

"""Batch prediction jobs: real exported models over files in the store, on real nodes, equal to online :predict.

The models come from real training jobs (shared with the serving tests); each framework gets a deployed
version whose ``:predict`` answers are what every batch output line must equal.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.harness import cluster_processes
from tests.integration.test_serving import deploy, wait_for

pytestmark = pytest.mark.integration

RUNTIMES = {"TENSORFLOW": "2.21", "MXNET": "1.9", "PYTORCH": "2.13"}
BAD_LINES = ["not json", "[1.0, 2.0]", '{"nope": [1.0]}', "[[", '"text"']  # unreadable, or refused by the model


@pytest.fixture(scope="module")
def client(serving_client):
    return serving_client


@pytest.fixture(scope="module")
def versions(client, trained_job) -> dict[str, dict]:
    """One deployed version per framework, of model ``batch`` (TensorFlow's is its default)."""
    response = client.request("POST", "/models", json={"name": "batch"})
    assert response.status_code == 200, response.text
    return {framework: deploy(client, "batch", framework.lower(), trained_job(framework), framework, runtime)
            for framework, runtime in RUNTIMES.items()}


def put(client, name: str, data: bytes) -> None:
    response = client.request("PUT", f"/objects/{name}", data=data)
    assert response.status_code == 200, response.text


def get(client, name: str) -> bytes:
    response = client.request("GET", f"/objects/{name}")
    assert response.status_code == 200, response.text
    return response.content


def listing(client, prefix: str) -> list[str]:
    response = client.request("GET", "/objects", params={"prefix": prefix})
    assert response.status_code == 200, response.text
    return [item["name"] for item in response.json().get("objects", [])]


def instances_of(files: int, per_file: int, seed: int) -> list[list[list[float]]]:
    return [[[round((seed + f * per_file + i) * 0.01 - 5, 4)] for i in range(per_file)] for f in range(files)]


def submit(client, job_id: str, **prediction_input) -> dict:
    body = {"jobId": job_id, "predictionInput": {"region": "local", **prediction_input}}
    response = client.request("POST", "/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def online(client, version: str, instances: list) -> list:
    response = client.request("POST", f"/models/batch/versions/{version}:predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def outputs(client, folder: str, job: dict) -> tuple[list[str], list[dict]]:
    """The result lines (in shard order) and the error records of a finished job."""
    names = listing(client, f"{folder}/")
    shards = job["predictionOutput"]["shardsTotal"]
    results = sorted(name for name in names if "/prediction.results-" in name)
    errors = sorted(name for name in names if "/prediction.errors_stats-" in name)
    assert len(results) == len(errors) == shards, names
    assert results[-1].endswith(f"-{shards - 1:05d}-of-{shards:05d}")
    lines = [line for name in results for line in get(client, name).decode().splitlines()]
    bad = [json.loads(line) for name in errors for line in get(client, name).decode().splitlines()]
    return lines, bad


def assert_equal_predictions(batch: list, expected: list) -> None:
    assert len(batch) == len(expected)
    for got, want in zip(batch, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_tensorflow_json_over_three_nodes_equals_online_prediction_and_counts_bad_records(client, versions):
    files = instances_of(3, 700, seed=0)
    expected_errors = []
    for index, rows in enumerate(files):
        lines = [json.dumps(row) for row in rows]
        for k in range(7):  # 1 % malformed, spread through the file
            position = 50 + k * 95
            lines.insert(position, BAD_LINES[(index + k) % len(BAD_LINES)])
            expected_errors.append(lines[position])
        put(client, f"batch/tf/in-{index}.json", "\n".join(lines).encode() + b"\n")
    job = submit(client, "batch_tf_json", dataFormat="JSON", inputPaths=["store://team-serving/batch/tf/in-*.json"],
                 outputPath="store://team-serving/batch/tf/out", modelName="projects/team-serving/models/batch",
                 maxWorkerCount=3, batchSize=50)
    assert job["state"] == "QUEUED" and job["predictionInput"]["maxWorkerCount"] == 3
    job = client.wait("batch_tf_json")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    output = job["predictionOutput"]
    assert output["predictionCount"] == "2100" and output["errorCount"] == "21", output
    assert output["recordsDone"] == output["recordsTotal"] == "2121"
    assert output["outputPath"] == "store://team-serving/batch/tf/out" and output["nodeHours"] > 0
    assert output["modelUri"] == versions["TENSORFLOW"]["deploymentUri"]

    lines, errors = outputs(client, "batch/tf/out", job)
    instances = [row for rows in files for row in rows]
    assert [json.loads(line)["instance"] for line in lines] == instances
    assert_equal_predictions([json.loads(line)["prediction"] for line in lines],
                             online(client, "tensorflow", instances))
    assert sorted(error["line"] for error in errors) == sorted(expected_errors)
    assert all(error["inputPath"].startswith("store://team-serving/batch/tf/in-") and error["error"]
               for error in errors)

    messages = [event["message"] for event in client.events("batch_tf_json")]
    assert any(message.endswith("ready with 3 node(s)") for message in messages), messages
    started_on = {event.get("node") for event in client.events("batch_tf_json") if event["kind"] == "SHARD"}
    assert started_on == {"worker-0", "worker-1", "worker-2"}
    logs = client.logs("batch_tf_json")
    assert any("done:" in text for text in logs.values()), logs


TF_RECORD_WRITER = """
import json, sys
import tensorflow as tf
for path, rows in json.loads(sys.argv[1]).items():
    options = "GZIP" if path.endswith(".gz") else None
    with tf.io.TFRecordWriter(path, options=options) as writer:
        for row in rows:
            writer.write(json.dumps(row).encode())
"""


def test_tensorflow_tf_records_written_by_tensorflow(client, versions, tf_runtime, tmp_path):
    # TF_RECORD_GZIP differs only in the reader's gzip layer: tests/unit/test_batch_predict.py reads both.
    data_format, suffix = "TF_RECORD", ""
    files = instances_of(2, 300, seed=1)
    paths = {str(tmp_path / f"in-{index}.tfrecord{suffix}"): rows for index, rows in enumerate(files)}
    subprocess.run([str(tf_runtime / "bin" / "python"), "-c", TF_RECORD_WRITER, json.dumps(paths)], check=True)
    for path in paths:
        put(client, f"batch/{data_format}/{path.rsplit('/', 1)[1]}", open(path, "rb").read())
    job_id = f"batch_{data_format.lower()}"
    submit(client, job_id, dataFormat=data_format, inputPaths=[f"store://team-serving/batch/{data_format}/*"],
           outputPath=f"store://team-serving/batch/{data_format}/out/",
           uri=versions["TENSORFLOW"]["deploymentUri"], batchSize=64, maxWorkerCount=2)
    job = client.wait(job_id)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    lines, errors = outputs(client, f"batch/{data_format}/out", job)
    assert errors == [] and job["predictionOutput"]["predictionCount"] == "600"
    instances = [row for rows in files for row in rows]
    assert [json.loads(line)["instance"] for line in lines] == instances
    assert_equal_predictions([json.loads(line)["prediction"] for line in lines],
                             online(client, "tensorflow", instances))


def test_mxnet_csv_by_version_name(client, versions):
    files = instances_of(2, 1000, seed=3)
    for index, rows in enumerate(files):
        put(client, f"batch/mx/part-{index}.csv", "".join(f"{row[0]}\n" for row in rows).encode())
    submit(client, "batch_mxnet_csv", dataFormat="CSV", inputPaths=["store://team-serving/batch/mx/part-*.csv"],
           outputPath="store://team-serving/batch/mx/out",
           versionName="projects/team-serving/models/batch/versions/mxnet",
           maxWorkerCount=2, batchSize=32)
    job = client.wait("batch_mxnet_csv")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert job["framework"] == "MXNET" and job["predictionOutput"]["predictionCount"] == "2000"
    lines, errors = outputs(client, "batch/mx/out", job)
    instances = [row for rows in files for row in rows]
    assert errors == [] and [json.loads(line)["instance"] for line in lines] == instances
    assert_equal_predictions([json.loads(line)["prediction"] for line in lines], online(client, "mxnet", instances))


def test_pytorch_json_from_the_exported_model_uri_with_csv_output(client, versions):
    files = instances_of(2, 1000, seed=7)
    for index, rows in enumerate(files):
        put(client, f"batch/pt/in-{index}.json", "".join(json.dumps(row) + "\n" for row in rows).encode())
    submit(client, "batch_pytorch", dataFormat="JSON", outputDataFormat="CSV",
           inputPaths=["store://team-serving/batch/pt/in-0.json", "store://team-serving/batch/pt/in-1.json"],
           outputPath="store://team-serving/batch/pt/out", uri=versions["PYTORCH"]["deploymentUri"])
    job = client.wait("batch_pytorch")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert job["framework"] == "PYTORCH"
    lines, errors = outputs(client, "batch/pt/out", job)
    instances = [row for rows in files for row in rows]
    assert errors == []
    assert_equal_predictions([[float(value) for value in line.split(",")] for line in lines],
                             online(client, "pytorch", instances))


def test_a_cancelled_job_leaves_no_node(platform, client, versions):
    rows = instances_of(4, 3000, seed=11)
    for index, shard in enumerate(rows):
        put(client, f"batch/cancel/in-{index}.json", "".join(json.dumps(row) + "\n" for row in shard).encode())
    submit(client, "batch_cancel", dataFormat="JSON", inputPaths=["store://team-serving/batch/cancel/*.json"],
           outputPath="store://team-serving/batch/cancel/out", versionName="batch/versions/tensorflow",
           maxWorkerCount=2, batchSize=1)
    wait_for(lambda: any(event["kind"] == "SHARD" for event in client.events("batch_cancel")), timeout=300,
             interval=0.2)
    cluster = next(event["message"].split()[1] for event in client.events("batch_cancel")
                   if event["kind"] == "CLUSTER")
    assert cluster_processes(platform, cluster)
    response = client.request("POST", "/jobs/batch_cancel:cancel")
    assert response.status_code == 200, response.text
    job = client.wait("batch_cancel")
    assert job["state"] == "CANCELLED"
    assert int(job["predictionOutput"]["predictionCount"]) < 12000
    deadline = time.monotonic() + 30
    while cluster_processes(platform, cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster_processes(platform, cluster) == []
    assert not (platform.data_dir / "nodes" / "clusters" / cluster).exists()


@pytest.mark.parametrize("prediction_input, message", [
    ({"modelName": "projects/team-serving/models/nothing"},
     "predictionInput.modelName: projects/team-serving/models/nothing not found"),
    ({"versionName": "projects/other/models/batch/versions/tensorflow"},
     "predictionInput.versionName: 'projects/other/models/batch/versions/tensorflow' is not in project team-serving"),
    ({"uri": "store://team-serving/batch/tf"}, "predictionInput.uri: 'store://team-serving/batch/tf' holds no exported "
                                              "model (none of ['model-symbol.json', 'model.pt', 'saved_model.pb'])"),
    ({"modelName": "batch", "inputPaths": ["store://other/data.json"]},
     "predictionInput.inputPaths[0]: 'store://other/data.json' is not in project team-serving"),
    ({"modelName": "batch", "outputPath": "store://team-serving/../x"},
     "predictionInput.outputPath: "),
    ({"modelName": "batch", "runtimeVersion": "0.1"}, "predictionInput.runtimeVersion: "),
    ({"modelName": "batch", "inputPaths": ["store://team-serving/batch/tf/in-0.json",
                                           "store://team-serving/batch/none/*.json"]},
     "predictionInput.inputPaths[1]: 'store://team-serving/batch/none/*.json' names no object of project "
     "team-serving"),
    ({"modelName": "batch", "dataFormat": "PARQUET"}, "predictionInput.dataFormat: Must be one of:"),
])
def test_bad_prediction_jobs_are_refused_and_change_nothing(client, versions, prediction_input, message):
    body = {"dataFormat": "JSON", "inputPaths": ["store://team-serving/batch/tf/in-0.json"],
            "outputPath": "store://team-serving/batch/bad", **prediction_input}
    response = client.request("POST", "/jobs", json={"jobId": "batch_bad", "predictionInput": body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(message), response.json()
    assert client.request("GET", "/jobs/batch_bad").status_code == 404


def test_the_ml_v1_client_submits_and_polls_a_batch_prediction_job(platform, client, versions):
    import google.oauth2.credentials
    from googleapiclient import discovery

    ml = discovery.build("ml", "v1", static_discovery=True, client_options={"api_endpoint": platform.base_url + "/"},
                         credentials=google.oauth2.credentials.Credentials(platform.token("team-serving", "member")))
    jobs = ml.projects().jobs()
    created = jobs.create(parent="projects/team-serving", body={"jobId": "batch_ml_client", "predictionInput": {
        "dataFormat": "JSON", "inputPaths": ["store://team-serving/batch/tf/in-0.json"],
        "outputPath": "store://team-serving/batch/ml_client", "region": "us-central1", "maxWorkerCount": "2",
        "versionName": "projects/team-serving/models/batch/versions/tensorflow"}}).execute()
    assert created["state"] == "QUEUED"
    deadline = time.monotonic() + 600
    while (job := jobs.get(name="projects/team-serving/jobs/batch_ml_client").execute())["state"] not in (
            "SUCCEEDED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert (job["predictionOutput"]["predictionCount"], job["predictionOutput"]["errorCount"]) == ("700", "7")
    listed = jobs.list(parent="projects/team-serving").execute()
    assert "batch_ml_client" in [j["jobId"] for j in listed["jobs"]]

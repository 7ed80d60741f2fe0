"""TensorFlow training jobs end to end: REST API → Celery worker → sshd nodes → exported model.

Everything is real: PostgreSQL, RabbitMQ, a worker process, paramiko to local sshd nodes, TensorFlow.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import zipfile

import pytest
import requests

from tests.conftest import ROOT
from tests.harness import cluster_processes

pytestmark = pytest.mark.integration

PREDICT = """
import json, sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
serve = model.signatures["serving_default"]
name = next(iter(serve.structured_input_signature[1]))
out = serve(**{name: tf.constant([[0.0], [1.0], [2.0]])})
print(json.dumps(next(iter(out.values())).numpy().ravel().tolist()))
"""


@pytest.fixture(scope="module")
def client(platform):
    return platform.client("team-train")


@pytest.fixture(scope="module")
def package(client, tf_package):
    return client.upload(tf_package)


def assert_no_node_left(platform, client, job_id: str) -> None:
    """The job's cluster was deleted: no process or folder of it remains on this host."""
    deleted = [m.split()[1] for m in events(client, job_id) if m.startswith("Cluster ") and m.endswith(" deleted")]
    assert len(deleted) == 1, events(client, job_id)
    name = deleted[0]
    assert cluster_processes(platform, name) == []
    assert list((platform.data_dir / "nodes").rglob(f"*{name}*")) == []


def events(client, job_id: str) -> list[str]:
    return [e["message"] for e in client.events(job_id)]


def test_basic_job_succeeds_and_its_exported_saved_model_predicts(platform, client, package, tf_runtime):
    created = client.submit("basic_job", package)
    assert created["state"] == "QUEUED"
    job = client.wait("basic_job")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert job["createTime"] <= job["startTime"] <= job["endTime"]
    uri = job["trainingOutput"]["exportedModelUri"]
    model_dir = platform.data_dir / "artifacts" / uri.removeprefix("store://")
    assert (model_dir / "saved_model.pb").exists()
    out = subprocess.run([str(tf_runtime / "bin" / "python"), "-c", PREDICT, str(model_dir)],
                         capture_output=True, text=True, check=True)
    predictions = json.loads(out.stdout.strip().splitlines()[-1])
    assert predictions == pytest.approx([2.0, 5.0, 8.0], abs=0.5)  # the synthetic data is y = 3x + 2
    logs = client.logs("basic_job")
    assert "chief-0" in logs
    # The logs also outlive the database: copied next to the job's outputs in the artifact store.
    archived = model_dir.parents[0] / "logs" / "chief-0.log"
    assert logs["chief-0"] and logs["chief-0"] in archived.read_text()
    assert_no_node_left(platform, client, job["jobId"])


def test_chief_and_two_workers_train_with_multi_worker_mirrored_strategy(platform, client, package):
    client.submit("mwms_job", package, scaleTier="CUSTOM", masterType="standard",
                  workerType="standard", workerCount="2")
    job = client.wait("mwms_job")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    logs = client.logs("mwms_job")
    assert set(logs) == {"chief-0", "worker-0", "worker-1"}
    assert "MultiWorkerMirroredStrategy" in logs["chief-0"]
    assert_no_node_left(platform, client, job["jobId"])


def test_parameter_server_job_succeeds_and_its_servers_are_stopped(platform, client, package):
    client.submit("ps_job", package, scaleTier="CUSTOM", masterType="standard", workerType="standard",
                  workerCount=1, parameterServerType="standard", parameterServerCount=1)
    job = client.wait("ps_job")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    logs = client.logs("ps_job")
    assert set(logs) == {"chief-0", "worker-0", "ps-0"}
    assert "ParameterServerStrategy" in logs["chief-0"]
    assert_no_node_left(platform, client, job["jobId"])


def test_a_trainer_that_raises_fails_the_job_with_its_last_log_lines(platform, client, package):
    client.submit("failing_job", package, args=["--fail-at-step", "2"])
    job = client.wait("failing_job")
    assert job["state"] == "FAILED"
    assert "chief-0" in job["errorMessage"]
    assert "Injected failure" in job["errorMessage"]
    assert_no_node_left(platform, client, job["jobId"])


def test_cancel_while_running_ends_cancelled_with_no_process_left(platform, client, package):
    client.submit("cancelled_job", package, args=["--sleep-before-training", "600"])
    running = client.wait("cancelled_job", states={"RUNNING"}, timeout=300)
    assert running["state"] == "RUNNING"
    follow = client.request("GET", "/jobs/cancelled_job/logs?node=chief-0&follow=true", stream=True)
    assert follow.status_code == 200
    followed = ""
    lines = follow.iter_lines(decode_unicode=True)
    while "sleeping" not in followed:  # the trainer's log reaches us while it runs
        followed += next(lines) + "\n"
    response = client.request("POST", "/jobs/cancelled_job:cancel", json={})
    assert response.status_code == 200, response.text
    followed += "".join(line + "\n" for line in lines)  # the stream ends once the job has ended
    job = client.job("cancelled_job")
    assert job["state"] == "CANCELLED"
    assert followed == client.logs("cancelled_job")["chief-0"]
    assert_no_node_left(platform, client, job["jobId"])


def test_500_followers_of_a_running_job_leave_the_api_answering_everyone_else(platform, client, package):
    """Long requests do not hold a small fixed pool: 500 follow=true streams stay open while /healthz and
    another project's calls answer; cancelling the job ends every stream with the whole log."""
    client.submit("followed_job", package, args=["--sleep-before-training", "600"])
    client.wait("followed_job", states={"RUNNING"}, timeout=300)
    wait_for_log = time.monotonic() + 60
    while "sleeping" not in client.logs("followed_job").get("chief-0", ""):
        assert time.monotonic() < wait_for_log
        time.sleep(0.5)
    host, port = platform.base_url.removeprefix("http://").split(":")
    request = (f"GET /v1/projects/{client.project}/jobs/followed_job/logs?node=chief-0&follow=true HTTP/1.1\r\n"
               f"Host: {host}:{port}\r\nAuthorization: Bearer {client.token}\r\n\r\n").encode()
    streams = []
    try:
        for _ in range(500):
            stream = socket.create_connection((host, int(port)), timeout=120)
            stream.sendall(request)
            streams.append(stream)
        received = [b""] * len(streams)
        for index, stream in enumerate(streams):  # each has answered and sent the log so far
            while b"sleeping" not in received[index]:
                chunk = stream.recv(65536)
                assert chunk, received[index]
                received[index] += chunk
            assert received[index].startswith(b"HTTP/1.1 200"), received[index][:200]
        other = platform.client("team-elsewhere")
        for _ in range(3):  # while all 500 are open
            assert requests.get(f"{platform.base_url}/healthz", timeout=30).status_code == 200
            assert other.request("GET", "/jobs").status_code == 200
            assert other.request("GET", "/jobs/nobody").status_code == 404
        assert client.request("POST", "/jobs/followed_job:cancel", json={}).status_code == 200
        for index, stream in enumerate(streams):  # every stream ends with the job, as chunked encoding says
            while not received[index].endswith(b"0\r\n\r\n"):
                chunk = stream.recv(65536)
                assert chunk, received[index][-200:]
                received[index] += chunk
    finally:
        for stream in streams:
            stream.close()
    assert client.job("followed_job")["state"] == "CANCELLED"


def test_arguments_with_shell_metacharacters_reach_the_trainer_literally(platform, client, package, tmp_path):
    canary = tmp_path / "pwned"
    tricky = f"$(touch {canary}); `touch {canary}` | rm -rf /nonexistent && echo 'quoted \"twice\"'\n;"
    client.submit("literal_args", package, args=["--note", tricky])
    job = client.wait("literal_args")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert not canary.exists()
    assert json.dumps(tricky) in client.logs("literal_args")["chief-0"]


def test_a_plain_zip_archive_is_put_on_the_python_path(platform, client, tmp_path):
    """Not every trainer is a source distribution: a plain archive of modules runs as it is."""
    archive = tmp_path / "overhead.zip"
    trainer = ROOT / "bench" / "trainers" / "overhead" / "overhead_trainer"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in trainer.glob("*.py"):
            bundle.write(path, f"overhead_trainer/{path.name}")
    uri = client.upload(archive)
    response = client.request("POST", "/jobs", json={"jobId": "zip_job", "trainingInput": {
        "packageUris": [uri], "pythonModule": "overhead_trainer.task", "args": ["--run-seconds", "0"]}})
    assert response.status_code == 200, response.text
    job = client.wait("zip_job")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert "EXIT" in client.logs("zip_job")["chief-0"]
    assert "exportedModelUri" not in job.get("trainingOutput", {})


def test_a_worker_asked_to_stop_while_a_job_trains_stops_at_once_and_the_job_goes_on(platform, client, package):
    # The platform runs with the default watch_window (30 s): without the shutdown signal ending the polling
    # window, a warm shutdown started a second into the window would wait for the rest of it.
    client.submit("stopped_worker_job", package, args=["--sleep-before-training", "20", "--epochs", "2"])
    assert client.wait("stopped_worker_job", states={"RUNNING"}, timeout=300)["state"] == "RUNNING"
    time.sleep(1)
    worker = platform.processes["worker"]
    worker.terminate()  # SIGTERM: Celery's warm shutdown waits for the running tasks
    try:
        worker.wait(timeout=15)
    finally:
        platform.start("worker")
    job = client.wait("stopped_worker_job", timeout=300)
    assert job["state"] == "SUCCEEDED", job
    assert_no_node_left(platform, client, job["jobId"])

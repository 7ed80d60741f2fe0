"""Models, versions and online prediction on real serving nodes, with health-checked failover.

Real training jobs produce the models; versions become replica nodes running the model server; the
API's router and the monitor process keep the pool healthy while the tests kill and freeze replicas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import google.oauth2.credentials
import pytest
import requests
from googleapiclient import discovery

from tests.harness import node_processes
from tests.integration.test_frameworks import MXNET_PREDICT, PYTORCH_PREDICT, model_dir, predict
from tests.integration.test_training import PREDICT as TENSORFLOW_PREDICT

pytestmark = pytest.mark.integration

INSTANCES = [[0.0], [1.0], [2.0], [-1.5]]
FAST_HEALTH = {"interval": 0.5, "timeout": 0.5, "rise": 2, "fall": 2}


@pytest.fixture(scope="module")
def client(serving_client):
    return serving_client


@pytest.fixture(scope="module")
def tf_job(trained_job):
    return trained_job("TENSORFLOW")


@pytest.fixture(scope="module")
def model(client):
    response = client.request("POST", "/models", json={"name": "regression", "description": "y = 3x + 2"})
    assert response.status_code == 200, response.text
    return "regression"


def deploy(client, model: str, version: str, job: dict, framework: str, runtime: str, nodes: int = 1,
           health: dict | None = None) -> dict:
    body = {"name": version, "deploymentUri": job["trainingOutput"]["exportedModelUri"], "framework": framework,
            "runtimeVersion": runtime, "machineType": "standard", "manualScaling": {"nodes": nodes}}
    if health:
        body["healthCheck"] = health
    response = client.request("POST", f"/models/{model}/versions", json=body)
    assert response.status_code == 200, response.text
    operation = response.json()
    assert operation["done"] is False
    operation_id = operation["name"].rsplit("/", 1)[1]
    deadline = time.monotonic() + 600
    while not operation["done"]:
        assert time.monotonic() < deadline, operation
        time.sleep(0.5)
        operation = client.request("GET", f"/operations/{operation_id}").json()
    assert "error" not in operation, operation
    version = client.request("GET", f"/models/{model}/versions/{version}").json()
    assert version["state"] == "READY", version
    return version


def predict_via_api(client, path: str, instances=INSTANCES) -> requests.Response:
    return client.request("POST", path, json={"instances": instances})


def replicas(client, model: str, version: str) -> list[dict]:
    return client.request("GET", f"/models/{model}/versions/{version}").json().get("replicas", [])


def version_events(client, model: str, version: str) -> list[str]:
    response = client.request("GET", f"/models/{model}/versions/{version}/events")
    assert response.status_code == 200, response.text
    return [e["message"] for e in response.json()["events"]]


def wait_for(condition, timeout: float = 300, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def flatten(predictions) -> list[float]:
    out = []
    for p in predictions:
        out.extend(flatten(p) if isinstance(p, list) else [p])
    return out


@pytest.fixture(scope="module")
def tf_version(client, model, tf_job):
    return deploy(client, model, "tf_v1", tf_job, "TENSORFLOW", "2.21", nodes=2, health=FAST_HEALTH)


def test_predictions_through_the_router_equal_loading_the_model_directly(platform, client, model, tf_job,
                                                                         tf_version, tf_runtime):
    assert len([r for r in tf_version["replicas"] if r["state"] == "READY"]) == 2
    # The two replicas are two nodes of the version's one cluster.
    assert cluster_nodes(platform, "tf_v1") == (["replica-0", "replica-1"], ["replica-0", "replica-1"])
    response = predict_via_api(client, f"/models/{model}/versions/tf_v1:predict")
    assert response.status_code == 200, response.text
    direct = predict(tf_runtime, TENSORFLOW_PREDICT.replace("[[0.0], [1.0], [2.0]]", str(INSTANCES)),
                     model_dir(platform, tf_job))
    assert flatten(response.json()["predictions"]) == pytest.approx(direct, abs=1e-5)
    # The first version is the model's default: the model-level :predict uses it.
    default = predict_via_api(client, f"/models/{model}:predict")
    assert default.status_code == 200 and default.json() == response.json()


def test_the_ml_v1_client_predicts(platform, client, model, tf_version):
    ml = discovery.build("ml", "v1", static_discovery=True,
                         client_options={"api_endpoint": platform.base_url + "/"},
                         credentials=google.oauth2.credentials.Credentials(client.token))
    result = ml.projects().predict(name=f"projects/{client.project}/models/{model}/versions/tf_v1",
                                   body={"instances": INSTANCES}).execute()
    assert flatten(result["predictions"]) == pytest.approx([2.0, 5.0, 8.0, -2.5], abs=0.5)


def test_bad_instances_unknown_versions_and_other_projects_get_v1_errors(platform, client, model, tf_version):
    bad = predict_via_api(client, f"/models/{model}/versions/tf_v1:predict", instances=[["not a number"]])
    assert bad.status_code == 400
    assert bad.json()["error"]["status"] == "INVALID_ARGUMENT" and bad.json()["error"]["message"]
    assert predict_via_api(client, f"/models/{model}/versions/nope:predict").status_code == 404
    assert predict_via_api(client, "/models/nope:predict").status_code == 404
    other = platform.client("team-elsewhere")
    other.project = client.project
    assert predict_via_api(other, f"/models/{model}/versions/tf_v1:predict").status_code == 404


def test_killing_a_replica_node_under_load_loses_no_request_and_it_is_replaced(platform, client, model,
                                                                                  tf_version):
    before = {r["name"] for r in replicas(client, model, "tf_v1") if r["state"] == "READY"}
    assert len(before) == 2
    failures, successes, stop = [], [], threading.Event()

    def load() -> None:
        session = requests.Session()
        url = f"{client.base_url}/v1/projects/{client.project}/models/{model}/versions/tf_v1:predict"
        while not stop.is_set():
            response = session.post(url, json={"instances": INSTANCES}, timeout=30,
                                    headers={"Authorization": f"Bearer {client.token}"})
            (successes if response.status_code == 200 else failures).append(response.status_code)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1.0)
        victim = sorted(before)[0]
        kill_node(platform, victim)
        wait_for(lambda: len([r for r in replicas(client, model, "tf_v1")
                              if r["state"] == "READY" and r["name"] not in before]) == 1)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert failures == []
    assert len(successes) > 10
    messages = version_events(client, model, "tf_v1")
    assert any(victim in m and "ejected" in m for m in messages), messages
    assert any(victim in m and "replaced by" in m for m in messages), messages
    assert len([r for r in replicas(client, model, "tf_v1") if r["state"] == "READY"]) == 2
    assert_one_cluster_of_the_ready_replicas(platform, client, model, "tf_v1")


def kill_node(platform, replica: str, version: str = "tf_v1") -> None:
    """SIGKILL the node's PID 1: every process of the node ends at once, like a VM losing power."""
    pids = node_processes(node_marker(platform, version, replica))
    assert pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def query(platform, sql: str, **params) -> list[tuple]:
    from sqlalchemy import create_engine, text

    engine = create_engine(platform.env["CLOUDML_OS_DATABASE_URL"])
    with engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(text(sql), params)]
    engine.dispose()
    return rows


def serving_cluster(platform, version: str, model: str = "regression") -> str:
    """The one cluster a version's replicas are nodes of."""
    [(version_id,)] = query(platform, "SELECT v.id FROM versions v JOIN models m ON m.id = v.model_id "
                                      "WHERE m.name = :m AND v.name = :v", m=model, v=version)
    return f"cml-serve-{version_id}"


def node_marker(platform, version: str, replica: str, model: str = "regression") -> str:
    """What the command line of every process of a replica's node (driver ``local``) contains."""
    return f"/clusters/{serving_cluster(platform, version, model)}/nodes/{replica}/"


def cluster_nodes(platform, version: str) -> tuple[list[str], list[str]]:
    """The version's cluster's node names as the database records them and as the local driver holds them."""
    name = serving_cluster(platform, version)
    recorded = [n for (n,) in query(platform, "SELECT n.name FROM nodes n JOIN clusters c ON c.id = n.cluster_id "
                                              "WHERE c.name = :c ORDER BY n.name", c=name)]
    # One cluster row, and none of the single-node clusters per replica that versions used to have.
    assert query(platform, "SELECT count(*) FROM clusters WHERE name = :c OR name LIKE :p",
                 c=name, p=f"{name}-%") == [(1,)]
    folder = Path(platform.data_dir) / "nodes" / "clusters" / name / "nodes"
    held = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    return recorded, held


def ready_names(client, model: str, version: str) -> list[str]:
    return sorted(r["name"] for r in replicas(client, model, version) if r["state"] == "READY")


def assert_one_cluster_of_the_ready_replicas(platform, client, model: str, version: str) -> None:
    ready = ready_names(client, model, version)
    assert cluster_nodes(platform, version) == (ready, ready)
    for name in ready:
        assert node_processes(node_marker(platform, version, name))


def test_a_frozen_replica_is_ejected_and_replaced_and_does_not_come_back(platform, client, model, tf_version):
    ready = sorted(r["name"] for r in replicas(client, model, "tf_v1") if r["state"] == "READY")
    victim = ready[0]
    server = node_processes(node_marker(platform, "tf_v1", victim))
    server = [pid for pid in server  # the python process itself, not the shell that waits for it
              if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"python")
              and b"model_server.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(server) == 1
    deadline = client.request("GET", f"/models/{model}/versions/tf_v1").json()["predictionDeadline"]
    failures, latencies, stop = [], [], threading.Event()

    def load() -> None:  # a steady client: the freeze costs no request, and none waits past the deadline + retry
        session = requests.Session()
        url = f"{client.base_url}/v1/projects/{client.project}/models/{model}/versions/tf_v1:predict"
        while not stop.is_set():
            started = time.monotonic()
            response = session.post(url, json={"instances": INSTANCES}, timeout=60,
                                    headers={"Authorization": f"Bearer {client.token}"})
            latencies.append(time.monotonic() - started)
            if response.status_code != 200:
                failures.append((response.status_code, response.text))

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(1.0)
    os.kill(server[0], signal.SIGSTOP)
    try:
        wait_for(lambda: any(victim in m and "ejected" in m for m in version_events(client, model, "tf_v1")))
        wait_for(lambda: any(victim in m and "replaced by" in m for m in version_events(client, model, "tf_v1")))
    finally:
        stop.set()
        thread.join(timeout=60)
        try:
            os.kill(server[0], signal.SIGCONT)
        except ProcessLookupError:
            pass  # deleted with its node, as it should be
    assert failures == []
    assert len(latencies) > 10 and max(latencies) < 2 * deadline + 1, max(latencies)
    time.sleep(2)
    now = {r["name"]: r for r in replicas(client, model, "tf_v1")}
    assert victim not in now or now[victim]["state"] in ("DELETED", "DELETING")
    assert len([r for r in now.values() if r["state"] == "READY"]) == 2
    assert_one_cluster_of_the_ready_replicas(platform, client, model, "tf_v1")  # the victim's node is gone
    assert node_processes(node_marker(platform, "tf_v1", victim)) == []
    response = predict_via_api(client, f"/models/{model}/versions/tf_v1:predict")
    assert response.status_code == 200


SLOW_MODEL = """
import sys
import tensorflow as tf

class Slow(tf.Module):
    # y = 3x + 2 after sleeping argv[2] seconds (a tf.data sleep: the graph waits, the CPU does not).

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
    def serve(self, x):
        source = tf.data.Dataset.range(1)
        slept = tf.data.experimental.from_variant(tf.raw_ops.SleepDataset(
            input_dataset=source._variant_tensor, sleep_microseconds=tf.constant(int(float(sys.argv[2]) * 1e6),
            tf.int64), output_types=[tf.int64], output_shapes=[[]]), source.element_spec)
        waited = slept.take(1).reduce(tf.constant(0, tf.int64), lambda total, value: total + value)
        return {"y": x * 3.0 + 2.0 + tf.cast(waited, tf.float32) * 0.0}

module = Slow()
tf.saved_model.save(module, sys.argv[1], signatures={"serving_default": module.serve})
"""


def test_a_slow_model_answering_within_its_deadline_is_not_ejected(platform, client, model, tf_runtime, tmp_path):
    export = tmp_path / "slow"
    subprocess.run([tf_runtime / "bin" / "python", "-c", SLOW_MODEL, str(export), "5"], check=True,
                   capture_output=True)
    for path in sorted(p for p in export.rglob("*") if p.is_file()):
        response = client.request("PUT", f"/objects/slow-model/{path.relative_to(export).as_posix()}",
                                  data=path.read_bytes())
        assert response.status_code == 200, response.text
    response = client.request("POST", f"/models/{model}/versions", json={
        "name": "slow", "deploymentUri": f"store://{client.project}/slow-model", "framework": "TENSORFLOW",
        "runtimeVersion": "2.21", "manualScaling": {"nodes": 1}, "predictionDeadline": 10, "healthCheck": FAST_HEALTH})
    assert response.status_code == 200, response.text
    wait_for(lambda: client.request("GET", f"/models/{model}/versions/slow").json()["state"] == "READY", timeout=600)
    [serving] = ready_names(client, model, "slow")
    # One after the other (its graph's sleeps share TensorFlow's small inter-op pool on 2 cores).
    answers = [predict_via_api(client, f"/models/{model}/versions/slow:predict", [[1.0]]) for _ in range(3)]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"predictions": [[5.0]]})] * 3
    assert ready_names(client, model, "slow") == [serving]  # the same replica, never ejected
    assert not [m for m in version_events(client, model, "slow") if "ejected" in m]


def test_scaling_a_version_adds_and_removes_replicas(platform, client, model, tf_version):
    def scale(nodes: int) -> None:
        response = client.request("PATCH", f"/models/{model}/versions/tf_v1?updateMask=manualScaling.nodes",
                                  json={"manualScaling": {"nodes": nodes}})
        assert response.status_code == 200, response.text
        operation_id = response.json()["name"].rsplit("/", 1)[1]
        operation = wait_for(lambda: (lambda o: o if o["done"] else None)(
            client.request("GET", f"/operations/{operation_id}").json()))
        assert "error" not in operation, operation

    before = ready_names(client, model, "tf_v1")
    scale(3)
    assert len(ready_names(client, model, "tf_v1")) == 3
    assert set(before) < set(ready_names(client, model, "tf_v1"))  # the serving ones were left alone
    assert_one_cluster_of_the_ready_replicas(platform, client, model, "tf_v1")
    scale(1)
    assert len(ready_names(client, model, "tf_v1")) == 1
    assert_one_cluster_of_the_ready_replicas(platform, client, model, "tf_v1")
    assert predict_via_api(client, f"/models/{model}/versions/tf_v1:predict").status_code == 200


@pytest.mark.parametrize("framework, runtime, runtime_fixture, script", [
    ("MXNET", "1.9", "mxnet_runtime", MXNET_PREDICT),
    ("PYTORCH", "2.13", "pytorch_runtime", PYTORCH_PREDICT),
])
def test_mxnet_and_pytorch_versions_serve_what_they_trained(platform, client, model, request, trained_job, framework,
                                                             runtime, runtime_fixture, script):
    job = trained_job(framework)
    version = f"{framework.lower()}_v1"
    deploy(client, model, version, job, framework, runtime)
    response = predict_via_api(client, f"/models/{model}/versions/{version}:predict")
    assert response.status_code == 200, response.text
    direct = predict(request.getfixturevalue(runtime_fixture), script.replace("[[0.0], [1.0], [2.0]]", str(INSTANCES)),
                     model_dir(platform, job))
    assert flatten(response.json()["predictions"]) == pytest.approx(direct, abs=1e-5)


def test_a_traffic_split_shares_the_models_predictions_and_shifting_it_under_load_fails_none(client, model):
    """tf_v1 and mxnet_v1 (deployed above) share the model's traffic 90/10; then all of it moves to mxnet_v1
    while four clients predict without a pause."""
    def split(shares: dict[str, int]) -> None:
        response = client.request("PATCH", f"/models/{model}?updateMask=trafficSplit", json={"trafficSplit": shares})
        assert response.status_code == 200, response.text

    split({"tf_v1": 90, "mxnet_v1": 10})
    answered = []
    for _ in range(2000):
        response = predict_via_api(client, f"/models/{model}:predict")
        assert response.status_code == 200, response.text
        answered.append(response.headers["X-Model-Version"])
    # Binomial(2000, 0.1): 200 expected, standard deviation 13.4; 5 of them either way.
    assert 133 <= answered.count("mxnet_v1") <= 267 and answered.count("tf_v1") == 2000 - answered.count("mxnet_v1")

    failures, after_shift, stop, shifted = [], [], threading.Event(), threading.Event()

    def load() -> None:
        while not stop.is_set():
            sent_after_shift = shifted.is_set()
            response = predict_via_api(client, f"/models/{model}:predict")
            if response.status_code != 200:
                failures.append((response.status_code, response.text))
            elif sent_after_shift:
                after_shift.append(response.headers["X-Model-Version"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    split({"tf_v1": 0, "mxnet_v1": 100})
    shifted.set()
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == []
    assert after_shift and set(after_shift) == {"mxnet_v1"}
    assert client.request("GET", f"/models/{model}").json()["trafficSplit"] == {"mxnet_v1": 100}
    assert client.request("POST", f"/models/{model}/versions/tf_v1:setDefault", json={}).status_code == 200


def logged_request_ids(client, model: str, version: str) -> list[str]:
    """Every request id in the version's request log objects in the store, as often as it is there."""
    ids, token = [], ""
    while True:
        listing = client.request("GET", "/objects", params={"prefix": f"request-logs/{model}/{version}/",
                                                             "pageToken": token}).json()
        for item in listing["objects"]:
            text = client.request("GET", f"/objects/{item['name']}").text
            ids += [json.loads(line)["request_id"] for line in text.splitlines()]
        token = listing.get("nextPageToken")
        if not token:
            return ids


def test_request_logging_keeps_every_answered_request_once_across_an_api_kill(platform, client, model):
    """At 100 %, a client predicts without a pause while the API is SIGKILLed and started again: every request
    that was answered is in the store once (one the API logged but could not answer may be there too)."""
    response = client.request("PATCH", f"/models/{model}/versions/tf_v1?updateMask=requestLoggingConfig",
                              json={"requestLoggingConfig": {"samplingPercentage": 1}})
    assert response.status_code == 200, response.text
    answered, sent, stop = [], [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            request_id = f"rl-{len(sent)}"
            sent.append(request_id)
            try:
                response = client.request("POST", f"/models/{model}/versions/tf_v1:predict",
                                          json={"instances": INSTANCES}, headers={"X-Request-Id": request_id})
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            if response.status_code == 200:
                assert response.headers["X-Request-Id"] == request_id
                answered.append(request_id)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: len(answered) >= 100, timeout=60, interval=0.05)
        api = platform.processes["api"]
        os.killpg(api.pid, signal.SIGKILL)
        api.wait()
        before_kill = len(answered)
        platform.start("api")
        wait_for(lambda: len(answered) >= before_kill + 100, timeout=120, interval=0.1)
    finally:
        stop.set()
        thread.join()
    assert len(answered) > 200
    logged = wait_for(lambda: (lambda ids: ids if set(answered) <= set(ids) else None)(
        logged_request_ids(client, model, "tf_v1")), timeout=60, interval=1)
    assert len(logged) == len(set(logged)), "a request logged twice"
    assert set(logged) <= set(sent)
    client.request("PATCH", f"/models/{model}/versions/tf_v1?updateMask=requestLoggingConfig",
                   json={"requestLoggingConfig": {"samplingPercentage": 0}})


def test_deleting_a_version_leaves_no_node_process(platform, client, model):
    name = serving_cluster(platform, "pytorch_v1")
    assert cluster_nodes(platform, "pytorch_v1") == (["replica-0"], ["replica-0"])
    response = client.request("DELETE", f"/models/{model}/versions/pytorch_v1")
    assert response.status_code == 200, response.text
    operation_id = response.json()["name"].rsplit("/", 1)[1]
    wait_for(lambda: client.request("GET", f"/operations/{operation_id}").json()["done"])
    assert node_processes(f"/clusters/{name}/") == []
    assert cluster_nodes(platform, "pytorch_v1") == ([], [])
    assert query(platform, "SELECT state FROM clusters WHERE name = :c", c=name) == [("DELETED",)]

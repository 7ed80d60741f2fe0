"""MXNet and PyTorch jobs end to end, on real sshd nodes, with their real runtimes.

TensorFlow has its own file (test_training.py); these prove the same workflow carries other frameworks
through the plugin contract: roles and environment, success policy, prompt failure, export, teardown.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_training import assert_no_node_left

pytestmark = pytest.mark.integration

MXNET_PREDICT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import mxnet as mx
d = sys.argv[1]
net = mx.gluon.SymbolBlock.imports(f"{d}/model-symbol.json", ["data"], f"{d}/model-0000.params")
print(json.dumps(net(mx.nd.array([[0.0], [1.0], [2.0]])).asnumpy().ravel().tolist()))
"""

PYTORCH_PREDICT = """
import json, sys, torch
model = torch.jit.load(sys.argv[1] + "/model.pt")
print(json.dumps(model(torch.tensor([[0.0], [1.0], [2.0]])).detach().ravel().tolist()))
"""


def params_by_node(logs: dict[str, str]) -> dict[str, dict]:
    """The final parameters each training process logged (``PARAMS {json}``)."""
    found = {}
    for node, text in logs.items():
        match = re.search(r"^.*PARAMS (\{.*\})\s*$", text, re.MULTILINE)
        if match:
            found[node] = json.loads(match.group(1))
    return found


def predict(runtime: Path, script: str, model_dir: Path) -> list[float]:
    out = subprocess.run([str(runtime / "bin" / "python"), "-c", script, str(model_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_dir(platform, job: dict) -> Path:
    return platform.data_dir / "artifacts" / job["trainingOutput"]["exportedModelUri"].removeprefix("store://")


@pytest.fixture(scope="module")
def client(platform):
    return platform.client("team-frameworks")


# ---- MXNet ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mxnet_uri(client, mxnet_package):
    return client.upload(mxnet_package)


def test_a_single_mxnet_worker_trains_and_its_exported_model_predicts(platform, client, mxnet_uri,
                                                                       mxnet_runtime):
    client.submit("mxnet_single", mxnet_uri, framework="MXNET")
    job = client.wait("mxnet_single")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    predictions = predict(mxnet_runtime, MXNET_PREDICT, model_dir(platform, job))
    assert predictions == pytest.approx([2.0, 5.0, 8.0], abs=0.5)
    assert_no_node_left(platform, client, "mxnet_single")


def test_mxnet_dist_sync_workers_end_equal_and_the_scheduler_and_server_are_stopped(platform, client,
                                                                                    mxnet_uri, mxnet_runtime):
    client.submit("mxnet_dist", mxnet_uri, framework="MXNET", scaleTier="CUSTOM", masterType="standard",
                  workerType="standard", workerCount=1, parameterServerType="standard", parameterServerCount=1)
    job = client.wait("mxnet_dist")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    logs = client.logs("mxnet_dist")
    assert set(logs) == {"worker-0", "worker-1", "server-0", "scheduler-0"}
    params = params_by_node(logs)
    assert set(params) == {"worker-0", "worker-1"}
    assert params["worker-0"] == params["worker-1"]  # dist_sync: every worker holds the same model
    assert predict(mxnet_runtime, MXNET_PREDICT, model_dir(platform, job)) == pytest.approx([2.0, 5.0, 8.0],
                                                                                            abs=0.5)
    assert_no_node_left(platform, client, "mxnet_dist")


def test_an_mxnet_worker_that_raises_fails_the_job_instead_of_hanging(platform, client, mxnet_uri):
    client.submit("mxnet_failing", mxnet_uri, framework="MXNET", scaleTier="CUSTOM", masterType="standard",
                  workerType="standard", workerCount=1, parameterServerType="standard", parameterServerCount=1,
                  args=["--fail-at-step", "5", "--epochs", "50"])
    job = client.wait("mxnet_failing", timeout=180)  # a hang in the kvstore would never get here
    assert job["state"] == "FAILED"
    assert "Injected failure" in job["errorMessage"]
    assert re.search(r"worker-\d exited with code 1", job["errorMessage"])
    assert_no_node_left(platform, client, "mxnet_failing")


# ---- PyTorch ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pytorch_uri(client, pytorch_package):
    return client.upload(pytorch_package)


def test_two_pytorch_ranks_synchronise_gradients_and_export_torchscript(platform, client, pytorch_uri,
                                                                        pytorch_runtime):
    client.submit("pytorch_ddp", pytorch_uri, framework="PYTORCH", scaleTier="CUSTOM", masterType="standard",
                  workerType="standard", workerCount=1, args=["--epochs", "2", "--threads", "1"])
    job = client.wait("pytorch_ddp")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    logs = client.logs("pytorch_ddp")
    assert all("device cpu, 1 intra-op thread(s)" in text for text in logs.values()), logs
    params = params_by_node(logs)
    assert set(params) == {"master-0", "worker-0"}
    assert params["master-0"] == params["worker-0"]  # DDP all-reduced every gradient
    predictions = predict(pytorch_runtime, PYTORCH_PREDICT, model_dir(platform, job))
    assert predictions == pytest.approx([2.0, 5.0, 8.0], abs=0.5)
    assert_no_node_left(platform, client, "pytorch_ddp")


def test_a_failing_pytorch_rank_fails_the_job(platform, client, pytorch_uri):
    client.submit("pytorch_failing", pytorch_uri, framework="PYTORCH", scaleTier="CUSTOM", masterType="standard",
                  workerType="standard", workerCount=1, args=["--fail-at-step", "5", "--fail-rank", "1"])
    job = client.wait("pytorch_failing", timeout=180)
    assert job["state"] == "FAILED"
    assert "exited with code" in job["errorMessage"]
    assert "Injected failure" in client.logs("pytorch_failing")["worker-0"]
    assert_no_node_left(platform, client, "pytorch_failing")


def test_a_topology_pytorch_cannot_run_is_refused(client, pytorch_uri):
    response = client.request("POST", "/jobs", json={"jobId": "pytorch_with_ps", "trainingInput": {
        "framework": "PYTORCH", "scaleTier": "STANDARD_1", "packageUris": [pytorch_uri],
        "pythonModule": "trainer.task"}})
    assert response.status_code == 400
    assert "parameterServerCount" in response.json()["error"]["message"]

"""The model server (cloudml_os/serving/runtime/model_server.py) run as a node runs it, with each framework.

Each framework's example trainer exports a model once per module (trained locally, no cluster); one
server per framework answers every test of that framework, and its answers are compared with the model
loaded directly in the same runtime.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.harness import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "cloudml_os" / "serving" / "runtime" / "model_server.py"
RUNTIMES = {"TENSORFLOW": "tf_runtime", "MXNET": "mxnet_runtime", "PYTORCH": "pytorch_runtime"}
EXAMPLES = {"TENSORFLOW": "tensorflow", "MXNET": "mxnet", "PYTORCH": "pytorch"}
INSTANCES = [[0.0], [1.0], [2.5], [-1.25]]
NAME = "linear"

# Each prints the predictions of the model loaded directly, for the instances in argv[2] (JSON).
PREDICT_DIRECTLY = {
    "TENSORFLOW": """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
print(json.dumps(serve(x=tf.constant(json.loads(sys.argv[2]), tf.float32))["y"].numpy().tolist()))
""",
    "MXNET": """
import json, sys, warnings
warnings.filterwarnings("ignore")
import mxnet as mx
d = sys.argv[1]
net = mx.gluon.SymbolBlock.imports(f"{d}/model-symbol.json", ["data"], f"{d}/model-0000.params")
print(json.dumps(net(mx.nd.array(json.loads(sys.argv[2]))).asnumpy().tolist()))
""",
    "PYTORCH": """
import json, sys, torch
model = torch.jit.load(sys.argv[1] + "/model.pt")
print(json.dumps(model(torch.tensor(json.loads(sys.argv[2]))).detach().tolist()))
""",
}


@dataclass
class Server:
    framework: str
    runtime: Path
    model_dir: Path
    url: str
    process: subprocess.Popen
    log: Path
    ready_statuses: list[int | None]
    direct_predictions: dict[str, list] = field(default_factory=dict)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)


def start_server(runtime: Path, framework: str, model_dir: Path, log: Path,
                 *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log.open("w") as handle:
        process = subprocess.Popen(
            [str(runtime / "bin" / "python"), str(SERVER), "--framework", framework, "--model-dir", str(model_dir),
             "--model-name", NAME, "--host", "127.0.0.1", "--port", str(port), *extra],
            stdout=handle, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def poll_ready(process: subprocess.Popen, url: str, timeout: float = 60) -> list[int]:
    """Every status of /v2/health/ready until 200 or the process ended (None: refused, not listening yet)."""
    statuses = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            status = requests.get(f"{url}/v2/health/ready", timeout=5).status_code
        except requests.ConnectionError:
            status = None
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        if status == 200:
            break
        time.sleep(0.02)
    return statuses


def train(runtime: Path, framework: str, job_dir: Path) -> Path:
    """The example trainer run locally (one process, no cluster): JOB_DIR/model."""
    subprocess.run([str(runtime / "bin" / "python"), "-m", "trainer.task", "--job-dir", str(job_dir),
                    "--epochs", "1", "--samples", "1024"],
                   cwd=ROOT / "examples" / EXAMPLES[framework], check=True, capture_output=True)
    return job_dir / "model"


def predict_directly(server: Server, instances: list) -> list:
    key = json.dumps(instances)
    if key not in server.direct_predictions:  # a runtime's start costs seconds: once per server and input
        server.direct_predictions[key] = run_directly(server, instances)
    return server.direct_predictions[key]


def run_directly(server: Server, instances: list) -> list:
    out = subprocess.run([str(server.runtime / "bin" / "python"), "-c", PREDICT_DIRECTLY[server.framework],
                          str(server.model_dir), json.dumps(instances)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    """``trained(framework)``: the runtime and the example's exported model, trained once per module."""
    models = {}

    def get(framework: str) -> tuple[Path, Path]:
        if framework not in models:
            runtime = request.getfixturevalue(RUNTIMES[framework])
            models[framework] = runtime, train(runtime, framework, tmp_path_factory.mktemp("job"))
        return models[framework]

    return get


@pytest.fixture(scope="module", params=list(RUNTIMES))
def server(request, tmp_path_factory, trained) -> Server:
    framework = request.param
    runtime, model_dir = trained(framework)
    work = tmp_path_factory.mktemp(framework.lower())
    process, url = start_server(runtime, framework, model_dir, work / "server.log")
    try:
        statuses = poll_ready(process, url)
        assert statuses[-1:] == [200], f"not ready: {statuses}\n{(work / 'server.log').read_text()}"
        yield Server(framework, runtime, model_dir, url, process, work / "server.log", statuses)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_close(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_ready_only_after_the_model_loaded_and_warmed_up(server):
    assert [status for status in server.ready_statuses if status is not None] == [503, 200]
    assert server.get("/v2/health/live").status_code == 200
    assert server.get(f"/v2/models/{NAME}/ready").json() == {"name": NAME, "ready": True}
    assert server.get(f"/v1/models/{NAME}").json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    source = "the signature" if server.framework == "TENSORFLOW" else "2 instances from warmup.json"
    assert source in server.log.read_text()


def test_examples_write_warmup_instances_beside_the_model(server):
    warmup = server.model_dir / "warmup.json"
    if server.framework == "TENSORFLOW":  # its server derives the warm-up from the signature
        assert not warmup.exists()
    else:
        assert json.loads(warmup.read_text()) == [[0.0], [1.0]]


def test_v1_predictions_equal_the_model_loaded_directly(server):
    response = server.post(f"/v1/models/{NAME}:predict", json={"instances": INSTANCES})
    assert response.status_code == 200, response.text
    assert_close(response.json()["predictions"], predict_directly(server, INSTANCES))


def test_v1_row_format_names_the_input(server):
    metadata = server.get(f"/v2/models/{NAME}").json()
    (model_input,) = metadata["inputs"]
    rows = [{model_input["name"]: instance} for instance in INSTANCES]
    by_name = server.post(f"/v1/models/{NAME}:predict", json={"instances": rows}).json()["predictions"]
    plain = server.post(f"/v1/models/{NAME}:predict", json={"instances": INSTANCES}).json()["predictions"]
    assert by_name == plain


def test_v2_infer_gives_the_same_numbers(server):
    metadata = server.get(f"/v2/models/{NAME}").json()
    assert metadata["name"] == NAME and metadata["versions"] == ["1"]
    (model_input,) = metadata["inputs"]
    (model_output,) = metadata["outputs"]
    assert model_input["datatype"] == "FP32" and model_input["shape"] == [-1, 1]
    body = {"id": "r1", "inputs": [{"name": model_input["name"], "shape": [len(INSTANCES), 1], "datatype": "FP32",
                                    "data": [value for (value,) in INSTANCES]}]}
    response = server.post(f"/v2/models/{NAME}/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == NAME and answer["id"] == "r1"
    (output,) = answer["outputs"]
    assert output["name"] == model_output["name"]
    assert output["shape"] == [len(INSTANCES), 1] and output["datatype"] == "FP32"
    expected = predict_directly(server, INSTANCES)
    assert output["data"] == pytest.approx([value for (value,) in expected], abs=1e-5)


def test_tritonclient_infers_unchanged_with_its_binary_tensors(server):
    """The v2 client as users have it: tritonclient's HTTP client sends and asks for tensors as binary data
    (Inference-Header-Content-Length) by default; the numbers are those of the JSON form."""
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata(NAME)
    (model_input,), (model_output,) = metadata["inputs"], metadata["outputs"]
    tensor = triton.InferInput(model_input["name"], [len(INSTANCES), 1], "FP32")
    tensor.set_data_from_numpy(np.array(INSTANCES, dtype=np.float32))  # binary_data=True: the default
    result = client.infer(NAME, [tensor], outputs=[triton.InferRequestedOutput(model_output["name"])])
    assert result.get_output(model_output["name"])["parameters"]["binary_data_size"] == 4 * len(INSTANCES)
    expected = predict_directly(server, INSTANCES)
    assert_close(result.as_numpy(model_output["name"]).ravel().tolist(), [value for (value,) in expected])
    as_json = client.infer(NAME, [tensor], outputs=[triton.InferRequestedOutput(model_output["name"],
                                                                                 binary_data=False)])
    assert_close(as_json.as_numpy(model_output["name"]).ravel().tolist(), [value for (value,) in expected])
    client.close()


def test_bad_binary_tensors_are_400(server):
    name = server.get(f"/v2/models/{NAME}").json()["inputs"][0]["name"]
    header = json.dumps({"inputs": [{"name": name, "shape": [2, 1], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    for tail, length in ((b"\0" * 4, len(header)), (b"\0" * 12, len(header)), (b"\0" * 8, len(header) + 100),
                         (b"\0" * 7 + b"", len(header))):
        response = server.post(f"/v2/models/{NAME}/infer", data=header + tail,
                               headers={"Inference-Header-Content-Length": str(length)})
        assert response.status_code == 400, response.text
    good = server.post(f"/v2/models/{NAME}/infer", data=header + b"\0" * 8,
                       headers={"Inference-Header-Content-Length": str(len(header))})
    assert good.status_code == 200 and good.json()["outputs"][0]["data"] is not None


BAD_PREDICT_BODIES = {
    "wrong shape": json.dumps({"instances": [[1.0, 2.0]]}),
    "not numbers": json.dumps({"instances": [["one"]]}),
    "ragged": json.dumps({"instances": [[1.0], [1.0, 2.0]]}),
    "missing key": json.dumps({"instances": [{"no_such_input": [1.0]}]}),
    "not a list": json.dumps({"instances": 3.0}),
    "empty": json.dumps({"instances": []}),
    "no instances": json.dumps({"inputs": [[1.0]]}),
    "invalid JSON": '{"instances": [[1.0]',
    "not an object": "[[1.0]]",
}


@pytest.mark.parametrize("body", list(BAD_PREDICT_BODIES.values()), ids=list(BAD_PREDICT_BODIES))
def test_bad_instances_are_400_and_the_server_keeps_serving(server, body):
    response = server.post(f"/v1/models/{NAME}:predict", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message and "Traceback" not in message
    good = server.post(f"/v1/models/{NAME}:predict", json={"instances": [[1.0]]})
    assert good.status_code == 200, good.text


def test_bad_v2_inputs_are_400(server):
    name = server.get(f"/v2/models/{NAME}").json()["inputs"][0]["name"]
    bodies = [
        {"inputs": [{"name": name, "shape": [3, 1], "datatype": "FP32", "data": [1.0, 2.0]}]},
        {"inputs": [{"name": "no_such_input", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]},
        {"inputs": [{"name": name, "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}]},
        {"inputs": [{"name": name, "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]},
        {"inputs": []},
    ]
    for body in bodies:
        response = server.post(f"/v2/models/{NAME}/infer", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]


def test_unknown_model_is_404(server):
    assert server.post("/v1/models/other:predict", json={"instances": INSTANCES}).status_code == 404
    assert server.get("/v1/models/other").status_code == 404
    assert server.get(f"/v1/models/{NAME}/versions/2").status_code == 404
    assert server.post("/v2/models/other/infer", json={"inputs": []}).status_code == 404
    response = server.get("/v2/models/other/ready")
    assert response.status_code == 404 and "other" in response.json()["error"]


def test_wrong_method_is_405(server):
    response = server.get(f"/v1/models/{NAME}:predict")
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert server.post("/v2/health/ready").status_code == 405


def test_connections_are_kept_alive(server):
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    body = json.dumps({"instances": INSTANCES})
    connection.request("GET", "/v2/health/ready")
    connection.getresponse().read()
    sock = connection.sock
    for path, payload in [(f"/v1/models/{NAME}:predict", body), (f"/v1/models/{NAME}:predict", "not json"),
                          ("/v1/models/other:predict", body)]:
        connection.request("POST", path, body=payload)
        response = connection.getresponse()
        assert response.getheader("Content-Length") is not None
        response.read()
        assert connection.sock is sock, "the server closed the connection"
    connection.close()


def test_concurrent_predictions_are_all_correct(server):
    expected = predict_directly(server, INSTANCES)

    def predict(_):
        with requests.Session() as session:
            return [session.post(f"{server.url}/v1/models/{NAME}:predict", json={"instances": INSTANCES},
                                 timeout=30).json()["predictions"] for _ in range(10)]

    with ThreadPoolExecutor(8) as pool:
        for answers in pool.map(predict, range(8)):
            for predictions in answers:
                assert_close(predictions, expected)


def test_sigterm_stops_the_server_cleanly(server):
    server.process.terminate()
    assert server.process.wait(timeout=20) == 0, server.log.read_text()
    assert "stopped" in server.log.read_text()


@pytest.mark.parametrize("framework", list(RUNTIMES))
def test_a_model_that_does_not_load_ends_the_process_never_ready(request, tmp_path, framework):
    runtime = request.getfixturevalue(RUNTIMES[framework])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"not a model")
    (tmp_path / "model" / "model.pt").write_bytes(b"not a model")
    process, url = start_server(runtime, framework, tmp_path / "model", tmp_path / "server.log")
    try:
        statuses = poll_ready(process, url)
        assert process.wait(timeout=60) != 0
    finally:
        if process.poll() is None:
            process.kill()
    assert 200 not in statuses
    assert "did not load" in (tmp_path / "server.log").read_text()


def test_a_failing_warmup_ends_the_process_never_ready(tmp_path, trained):
    runtime, model_dir = trained("PYTORCH")
    process, url = start_server(runtime, "PYTORCH", model_dir, tmp_path / "server.log",
                                "--warmup-instances", "[[1.0, 2.0]]")
    try:
        statuses = poll_ready(process, url)
        assert process.wait(timeout=60) != 0
    finally:
        if process.poll() is None:
            process.kill()
    assert 200 not in statuses
    assert "warm-up prediction failed" in (tmp_path / "server.log").read_text()

"""OpenStack mode: a job's VMs see their project's Swift container under /store, with a credential of that job.
A batch prediction job reads its input the same way and writes every prediction to Swift once.

The platform runs against the test cloud (real Keystone, Heat, Swift; Nova's servers are sshd nodes in
namespaces of their own, which reach Keystone and Swift through the tenant network's gateway). A CSV data set
put through the objects API and given as a ``store://`` arg is read by TensorFlow, MXNet and PyTorch trainers
through their nodes' rclone mounts; another job shows what its credential reaches while it runs, and the test
then finds that credential, and the token made from it, refused once the job has ended.
"""

from __future__ import annotations

import json
import random
import re
import subprocess

import pytest
import requests

from tests.conftest import ROOT
from tests.harness import build_sdist
from tests.openstack.test_openstack_platform import alice, platform  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

PROJECT = "team-a"


@pytest.fixture(scope="module")
def package(alice, tmp_path_factory, tf_runtime) -> str:  # noqa: F811
    sdist = build_sdist(ROOT / "tests" / "trainers" / "storedata", tmp_path_factory.mktemp("sdist"),
                        tf_runtime / "bin" / "python")
    return alice.upload(sdist)


def test_jobs_read_a_csv_from_swift_given_as_a_store_uri_and_their_credential_ends_with_them(
        alice, package, test_cloud, mxnet_runtime, pytorch_runtime):  # noqa: F811
    rng = random.Random(7)
    for name in ("data/train-0.csv", "data/train-1.csv"):
        xs = [round(rng.uniform(-1, 1), 4) for _ in range(48)]
        data = ("x,y\n" + "".join(f"{x},{4 * x - 1}\n" for x in xs)).encode()
        response = alice.request("PUT", f"/objects/{name}", data=data)
        assert response.status_code == 200, response.text
    pattern = f"store://{PROJECT}/data/train-*.csv"
    jobs = {  # the same ways of writing a store:// arg as the local driver's test
        "os_store_tf": dict(framework="TENSORFLOW", pythonModule="trainer.tf_csv", args=["--train-files", pattern]),
        "os_store_mx": dict(framework="MXNET", pythonModule="trainer.mx_csv", args=[
            "--train-files", f"store://{PROJECT}/data/train-0.csv", f"store://{PROJECT}/data/train-1.csv"]),
        "os_store_torch": dict(framework="PYTORCH", pythonModule="trainer.torch_csv",
                               args=[f"--train-files={pattern}"]),
    }
    for job_id, training_input in jobs.items():
        alice.submit(job_id, package, **training_input)
    alice.submit("os_store_credential", package, pythonModule="trainer.credential",
                 args=["--container", f"cloudml-os-{PROJECT}"])

    for job_id in jobs:
        job = alice.wait(job_id)
        assert job["state"] == "SUCCEEDED", (job_id, job.get("errorMessage"))
        [log] = alice.logs(job_id).values()
        assert f'FILES ["/store/{PROJECT}/data/train-0.csv", "/store/{PROJECT}/data/train-1.csv"]' in log, log
        assert "ROWS 96" in log
        params = json.loads(re.search(r"^PARAMS (\{.*\})$", log, re.MULTILINE).group(1))
        assert params == pytest.approx({"slope": 4.0, "intercept": -1.0}, abs=0.05)

    job = alice.wait("os_store_credential")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    [log] = alice.logs("os_store_credential").values()
    assert "CONTAINER 200" in log, log  # the project's container: readable while the job runs
    assert "ACCOUNT 401" in log, log  # anything else (here the account's listing): refused by the access rules
    credential = json.loads(re.search(r"^CREDENTIAL (\{.*\})$", log, re.MULTILINE).group(1))

    conn = test_cloud.connect("cloudml-os")
    swift = conn.object_store.get_endpoint()
    used = requests.get(f"{swift}/cloudml-os-{PROJECT}", headers={"X-Auth-Token": credential["token"]}, timeout=30)
    assert used.status_code == 401, used.text
    login = requests.post(f"{test_cloud.auth_url}/auth/tokens", timeout=30, json={"auth": {"identity": {
        "methods": ["application_credential"],
        "application_credential": {"id": credential["id"], "secret": credential["secret"]}}}})
    assert login.status_code in (401, 404), login.text  # Keystone: no such application credential
    assert not [c.name for c in conn.identity.application_credentials(conn.current_user_id)
                if c.name.startswith("cloudml-os-")]


MODEL = """
import sys, torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval()
torch.jit.save(torch.jit.script(net), sys.argv[1])
print(net(torch.tensor([[float(i)] for i in range(400)])).detach().ravel().tolist())
"""


def test_a_batch_job_on_vms_reads_swift_through_the_mount_and_writes_every_prediction_once(
        alice, test_cloud, pytorch_runtime, tmp_path):  # noqa: F811
    made = subprocess.run([str(pytorch_runtime / "bin" / "python"), "-c", MODEL, str(tmp_path / "model.pt")],
                          check=True, capture_output=True, text=True)
    expected = json.loads(made.stdout.strip().splitlines()[-1])
    assert alice.request("PUT", "/objects/batch/model/model.pt",
                         data=(tmp_path / "model.pt").read_bytes()).status_code == 200
    for index in range(4):
        lines = "".join(f"[{float(i)}]\n" for i in range(index * 100, (index + 1) * 100)) + ("bad\n" if index else "")
        assert alice.request("PUT", f"/objects/batch/in/part-{index}.json", data=lines.encode()).status_code == 200
    response = alice.request("POST", "/jobs", json={"jobId": "os_batch", "predictionInput": {
        "dataFormat": "JSON", "inputPaths": [f"store://{PROJECT}/batch/in/part-*.json"],
        "outputPath": f"store://{PROJECT}/batch/out", "uri": f"store://{PROJECT}/batch/model", "maxWorkerCount": 2,
        "batchSize": 16}})
    assert response.status_code == 200, response.text
    job = alice.wait("os_batch", timeout=900)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    output = job["predictionOutput"]
    assert (output["predictionCount"], output["errorCount"], output["shardsTotal"]) == ("400", "3", 4), output
    assert any(e["message"].endswith("ready with 2 node(s)") for e in alice.events("os_batch"))
    listed = alice.request("GET", "/objects", params={"prefix": "batch/out/"}).json()["objects"]
    names = sorted(item["name"] for item in listed if "/prediction.results-" in item["name"])
    lines = [json.loads(line) for name in names for line in alice.request("GET", f"/objects/{name}").text.splitlines()]
    assert [line["instance"] for line in lines] == [[float(i)] for i in range(400)]
    assert [line["prediction"][0] for line in lines] == pytest.approx(expected, rel=1e-5, abs=1e-5)

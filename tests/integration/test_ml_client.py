"""A real Cloud ML Engine client: google-api-python-client's bundled ml v1 discovery document."""

from __future__ import annotations

import google.oauth2.credentials
import pytest
from googleapiclient import discovery
from googleapiclient.errors import HttpError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ml(platform):
    token = platform.token("ml-client", "member")
    return discovery.build(
        "ml", "v1", static_discovery=True,
        client_options={"api_endpoint": platform.base_url + "/"},
        credentials=google.oauth2.credentials.Credentials(token),
    )


@pytest.fixture(scope="module")
def package(platform, tf_package):
    return platform.client("ml-client", "member").upload(tf_package)


def test_the_ml_v1_client_creates_gets_lists_and_cancels_jobs(platform, ml, package):
    jobs = ml.projects().jobs()
    body = {
        "jobId": "from_ml_client",
        "labels": {"team": "vision"},
        "trainingInput": {"scaleTier": "BASIC", "packageUris": [package], "pythonModule": "trainer.task",
                          "region": "us-central1", "runtimeVersion": "2.21", "pythonVersion": "3.11",
                          "args": ["--sleep-before-training", "600"]},
    }
    created = jobs.create(parent="projects/ml-client", body=body).execute()
    assert created["jobId"] == "from_ml_client"
    assert created["state"] == "QUEUED"

    got = jobs.get(name="projects/ml-client/jobs/from_ml_client").execute()
    assert got["trainingInput"]["pythonModule"] == "trainer.task"
    assert got["labels"] == {"team": "vision"}

    listed = jobs.list(parent="projects/ml-client", filter="labels.team=vision").execute()
    assert [j["jobId"] for j in listed["jobs"]] == ["from_ml_client"]

    assert jobs.cancel(name="projects/ml-client/jobs/from_ml_client", body={}).execute() == {}
    client = platform.client("ml-client", "viewer")
    assert client.wait("from_ml_client", timeout=300)["state"] == "CANCELLED"


def test_the_ml_v1_client_sees_v1_errors(ml):
    with pytest.raises(HttpError) as raised:
        ml.projects().jobs().get(name="projects/ml-client/jobs/no_such_job").execute()
    assert raised.value.resp.status == 404
    assert raised.value.error_details == "" or raised.value.reason


@pytest.mark.parametrize("framework, package_fixture, runtime_version", [
    ("TENSORFLOW", "tf_package", "2.21"),
    ("MXNET", "mxnet_package", "1.9"),
    ("PYTORCH", "pytorch_package", "2.13"),
])
def test_the_ml_v1_client_runs_every_framework_with_the_added_field(platform, ml, request, framework,
                                                                    package_fixture, runtime_version):
    uploader = platform.client("ml-client", "member")
    uri = uploader.upload(request.getfixturevalue(package_fixture))
    job_id = f"client_{framework.lower()}"
    body = {"jobId": job_id, "trainingInput": {
        "scaleTier": "BASIC", "packageUris": [uri], "pythonModule": "trainer.task", "region": "local",
        "framework": framework, "runtimeVersion": runtime_version, "args": ["--epochs", "2"]}}
    created = ml.projects().jobs().create(parent="projects/ml-client", body=body).execute()
    assert created["trainingInput"]["framework"] == framework
    job = uploader.wait(job_id)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert job["trainingOutput"]["exportedModelUri"].endswith(f"jobs/{job_id}/model")


def test_get_config_through_the_client_lists_every_framework(ml):
    config = ml.projects().getConfig(name="projects/ml-client").execute()
    frameworks = {(r["framework"], r["runtimeVersion"]) for r in config["runtimes"]}
    assert frameworks >= {("TENSORFLOW", "2.21"), ("MXNET", "1.9"), ("PYTORCH", "2.13")}

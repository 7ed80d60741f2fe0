"""Bad input against the running platform: a clear v1 error, and nothing created or enqueued."""

from __future__ import annotations

import io
import tarfile

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(platform):
    return platform.client("team-bad")


@pytest.fixture(scope="module")
def package(client, tf_package):
    return client.upload(tf_package)


def body(package: str, **training_input) -> dict:
    return {"jobId": "bad_job", "trainingInput": {
        "scaleTier": "BASIC", "packageUris": [package], "pythonModule": "trainer.task", **training_input}}


@pytest.mark.parametrize("change, field", [
    ({"scaleTier": "GIGANTIC"}, "scaleTier"),
    ({"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard", "workerCount": -1},
     "workerCount"),
    ({"pythonModule": None}, "pythonModule"),
    ({"pythonModule": "trainer.task; rm -rf /"}, "pythonModule"),
    ({"packageUris": ["store://someone-else/packages/x/trainer.tar.gz"]}, "packageUris"),
    ({"scaleTier": "CUSTOM"}, "masterType"),
    ({"runtimeVersion": "0.1"}, "runtimeVersion"),
])
def test_an_invalid_job_is_refused_with_a_v1_error_and_nothing_is_created(client, package, change, field):
    payload = body(package, **change)
    payload["trainingInput"] = {k: v for k, v in payload["trainingInput"].items() if v is not None}
    response = client.request("POST", "/jobs", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
    assert field in error["message"]
    assert client.request("GET", "/jobs/bad_job").status_code == 404


def test_a_tar_slip_package_is_refused_and_nothing_is_stored(platform, client):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as archive:
        member = tarfile.TarInfo("../../escaped.py")
        member.size = 4
        archive.addfile(member, io.BytesIO(b"x=1\n"))
    response = client.request("POST", "/packages", files={"file": ("evil.tar.gz", data.getvalue())})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert not list(platform.data_dir.rglob("escaped.py"))
    assert not list(platform.data_dir.rglob("evil.tar.gz"))


def test_a_token_of_another_project_cannot_see_or_cancel_its_jobs(platform, client, package):
    response = client.request("POST", "/jobs", json={**body(package, args=["--sleep-before-training", "600"]),
                                                      "jobId": "private_job"})
    assert response.status_code == 200, response.text
    other = platform.client("team-other")
    other.project = "team-bad"
    for method, path in [("GET", "/jobs/private_job"), ("POST", "/jobs/private_job:cancel"), ("GET", "/jobs")]:
        response = other.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["status"] == "NOT_FOUND"
    assert client.request("POST", "/jobs/private_job:cancel", json={}).status_code == 200
    assert client.wait("private_job", timeout=300)["state"] == "CANCELLED"


def test_requests_without_a_token_are_unauthenticated(platform, client):
    client_without = type(client)(client.base_url, client.project, "not-a-token")
    response = client_without.request("GET", "/jobs")
    assert response.status_code == 401
    assert response.json()["error"]["status"] == "UNAUTHENTICATED"

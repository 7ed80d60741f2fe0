"""Request limits on the real API server (gunicorn): a body over ``max_request_bytes`` or a package over
``max_package_bytes`` is answered 413 with the v1 error body and stores nothing (a body without a length,
411); a package that is no archive is 400; a value past what the database can hold is 400, not a 500."""

from __future__ import annotations

import io
import os
import tarfile

import requests

from tests.security.conftest import MAX_PACKAGE_BYTES, MAX_REQUEST_BYTES


def assert_v1_error(response: requests.Response, code: int, status: str) -> str:
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["status"] == status
    return body["error"]["message"]


def _job_body(size: int) -> dict:
    return {"jobId": "too_big", "labels": {"padding": "x" * size},
            "trainingInput": {"scaleTier": "BASIC", "packageUris": ["store://limits/p.tgz"],
                              "pythonModule": "trainer.task", "region": "local"}}


def _stored(client) -> tuple[list, list]:
    jobs = client.request("GET", "/jobs").json().get("jobs", [])
    packages = client.request("GET", "/packages").json().get("packages", [])
    return jobs, packages


def test_a_json_body_over_the_limit_is_413_and_creates_nothing(secure):
    client = secure.client("limits", "member")
    assert_v1_error(client.request("POST", "/jobs", json=_job_body(MAX_REQUEST_BYTES)), 413, "RESOURCE_EXHAUSTED")

    def chunks():  # no Content-Length: refused before anything is read (werkzeug would cut it short silently)
        yield b'{"jobId": "chunked", '
        yield b" " * (MAX_REQUEST_BYTES + 1024)
    response = client.request("POST", "/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert "Content-Length" in assert_v1_error(response, 411, "INVALID_ARGUMENT")
    assert _stored(client) == ([], [])


def _archive(size: int) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        payload = os.urandom(size)  # incompressible, so the archive is as big as its content
        info = tarfile.TarInfo("trainer/blob.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return data.getvalue()


def test_a_package_over_the_limit_is_413_and_stores_nothing(secure):
    client = secure.client("limits-pkg", "member")
    big = _archive(MAX_PACKAGE_BYTES + 1024)
    response = client.request("POST", "/packages", files={"file": ("big.tar.gz", big)})
    message = assert_v1_error(response, 413, "RESOURCE_EXHAUSTED")
    assert str(MAX_PACKAGE_BYTES) in message or "too large" in message.lower()
    assert _stored(client) == ([], [])
    assert not (secure.platform.data_dir / "artifacts" / "limits-pkg").exists()


def test_a_package_that_is_no_archive_is_400_and_one_under_the_limit_is_accepted(secure):
    client = secure.client("limits-ok", "member")
    assert_v1_error(client.request("POST", "/packages", files={"file": ("x.tar.gz", b"not a tarball")}),
                    400, "INVALID_ARGUMENT")
    assert _stored(client) == ([], [])
    response = client.request("POST", "/packages", files={"file": ("small.tar.gz", _archive(1024))})
    assert response.status_code == 200, response.text


def test_an_id_past_the_databases_range_is_400_not_a_server_error(secure):
    admin = secure.platform_admin()
    response = requests.delete(f"{admin.base_url}/v1/admin/tokens/{1 << 70}", timeout=60,
                               headers={"Authorization": f"Bearer {admin.token}"})
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["status"] in ("INVALID_ARGUMENT", "NOT_FOUND")

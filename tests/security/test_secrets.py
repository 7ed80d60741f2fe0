"""Secrets at rest and in transit, proven on a real platform running a real TensorFlow job to success and
another to failure.

- While a job runs, its cluster's SSH private key is in the database only as a Fernet token of the
  configured key-encryption key (no PEM); once the job is torn down the column is empty.
- Afterwards no secret (API tokens, the database password, the key-encryption key, any cluster's private
  key) appears in any file the platform wrote (process logs, node folders, node logs, artifacts), in any
  event, error message or API response body the tests received, including error answers.
"""

from __future__ import annotations

import time

import pytest
import requests
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from tests.harness import FINAL_STATES
from tests.security.conftest import KEY_ENCRYPTION_KEY, PEM_MARKER, files_under, response_texts

FERNET_PREFIX = "gAAAAA"  # version byte 0x80 and a timestamp, base64


class Observer:
    """Polls a job through the API and its cluster rows straight from the database, keeping everything."""

    def __init__(self, secure, client):
        self.client = client
        self.engine = create_engine(secure.database_url)
        self.responses: list[requests.Response] = []
        self.stored_keys: dict[str, set[str]] = {}  # cluster name -> raw column values seen

    def get(self, path: str, **kwargs) -> requests.Response:
        response = self.client.request("GET", path, **kwargs)
        self.responses.append(response)
        return response

    def raw_clusters(self) -> dict[str, tuple[str, str]]:
        with self.engine.connect() as connection:
            rows = connection.execute(text("SELECT name, state, private_key FROM clusters")).all()
        return {name: (state, key) for name, state, key in rows}

    def run(self, job_id: str, package: str, args: list[str], timeout: float = 900) -> dict:
        self.responses.append(self.client.request("POST", "/jobs", json={"jobId": job_id, "trainingInput": {
            "scaleTier": "BASIC", "packageUris": [package], "pythonModule": "trainer.task", "region": "local",
            "args": args}}))
        assert self.responses[-1].status_code == 200, self.responses[-1].text
        deadline = time.monotonic() + timeout
        while True:
            for name, (_state, key) in self.raw_clusters().items():
                self.stored_keys.setdefault(name, set()).add(key)
            job = self.get(f"/jobs/{job_id}").json()
            if job["state"] in FINAL_STATES:
                break
            assert time.monotonic() < deadline, f"{job_id} still {job['state']} after {timeout}s"
            time.sleep(0.2)
        for path in (f"/jobs/{job_id}/events", f"/jobs/{job_id}/logs", "/jobs", "/packages", ":getConfig",
                     "/quotas"):
            assert self.get(path).status_code == 200, path
        return job


@pytest.fixture(scope="module")
def observed(secure, secure_package):
    observer = Observer(secure, secure.client("team-a", "member"))
    succeeded = observer.run("secret_ok", secure_package, ["--epochs", "1"])
    failed = observer.run("secret_fail", secure_package, ["--fail-at-step", "2"])
    yield observer, succeeded, failed
    observer.engine.dispose()


def test_private_keys_are_encrypted_at_rest_and_deleted_at_teardown(secure, observed):
    observer, succeeded, failed = observed
    assert (succeeded["state"], failed["state"]) == ("SUCCEEDED", "FAILED"), (succeeded, failed)
    assert len(observer.stored_keys) == 2
    fernet = Fernet(KEY_ENCRYPTION_KEY.encode())
    for name, values in observer.stored_keys.items():
        live = [value for value in values if value]
        assert live, f"{name}: the key was never seen while the job ran"
        for value in live:
            assert PEM_MARKER not in value and value.startswith(FERNET_PREFIX)
            assert PEM_MARKER in fernet.decrypt(value.encode()).decode()  # the configured key made it
    for name, (state, key) in observer.raw_clusters().items():
        assert (state, key) == ("DELETED", ""), name


def test_no_secret_reaches_logs_events_errors_or_responses(secure, observed):
    observer, _succeeded, _failed = observed
    fernet = Fernet(KEY_ENCRYPTION_KEY.encode())
    private_keys = {fernet.decrypt(value.encode()).decode() for values in observer.stored_keys.values()
                    for value in values if value}
    # A key's base64 lines: found even if a log wrapped or re-indented the PEM.
    key_lines = {line for key in private_keys for line in key.splitlines() if len(line) >= 40}
    assert key_lines

    # Error answers must not echo what the caller sent either.
    token = observer.client.token
    base = f"{observer.client.base_url}/v1/projects"
    errors = [
        requests.get(f"{base}/team-a/jobs", headers={"Authorization": f"Bearer {token}x"}, timeout=60),
        requests.get(f"{base}/team-a/jobs", headers={"Authorization": f"Basic {token}"}, timeout=60),
        requests.get(f"{base}/team-b/jobs/secret_ok", headers={"Authorization": f"Bearer {token}"}, timeout=60),
        requests.post(f"{base}/team-a/jobs", headers={"Authorization": f"Bearer {token}",
                                                      "Content-Type": "application/json"},
                      data='{"jobId": "x"', timeout=60),
        requests.post(f"{base}/team-a/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=60,
                      json={"jobId": "x", "trainingInput": {"scaleTier": "BASIC", "pythonModule": "m",
                                                            "region": "local", "packageUris": ["store://b/x.tgz"]}}),
        requests.get(f"{base}/team-a/jobs/no_such_job/logs", headers={"Authorization": f"Bearer {token}"},
                     timeout=60),
    ]
    assert [r.status_code for r in errors] == [401, 401, 404, 400, 400, 404]
    texts = response_texts(observer.responses + errors)
    assert any("secret_fail" in t and "FAILED" in t for t in texts)  # the failure's message is among them
    secrets = [*secure.secrets, *key_lines]
    leaks = [(secret[:12] + "…", where[:200]) for secret in secrets for where in texts if secret in where]
    assert not leaks, leaks

    files = list(files_under(secure.platform.data_dir))
    logs = [path for path in files if path.suffix == ".log"]
    assert {path.name for path in logs} >= {"worker.log", "api.log", "monitor.log"}
    assert any(path.parent.name == "logs" and "artifacts" in path.parts for path in logs), "no archived node log"
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"a secret ({secret[:12]}…) is in {path}"
    for path in logs:
        assert PEM_MARKER.encode() not in path.read_bytes(), f"a private key is in {path}"


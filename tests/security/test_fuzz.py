"""Property-based fuzzing of the whole ``/v1`` API with schemathesis, against the real running platform.

schemathesis reads ``/v1/openapi.json`` and sends generated requests, valid and invalid, to every
operation, with a platform admin's token so that every project's paths reach their views (another
token would stop most requests at authorization), on a platform of its own where a project holds a
real job, model and operation that path parameters name most of the time. Every request and response
is kept in a HAR file and checked here: no 5xx, no error answer showing internals (a stack trace, an
exception class, a file path, SQL), no secret in any answer. The request count is printed (``-s`` shows
it) and must reach 1000; schemathesis itself must end without errors.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.security.conftest import secure_platform

MIN_REQUESTS = 1000
INTERNALS = re.compile(
    r"Traceback|File \"|[\w-]+/\w+\.py\b|\b[A-Z]\w*(Error|Exception)\b|sqlalchemy|psycopg|\bSELECT\b"
    r"|\bINSERT INTO\b|\bUPDATE \w+ SET\b|(/usr|/root|/tmp|/work|/home|/var|/opt)/")


def _body(entry: dict) -> str:
    content = entry["response"].get("content", {})
    text = content.get("text") or ""
    if content.get("encoding") == "base64":
        text = base64.b64decode(text).decode("utf-8", errors="replace")
    return text


@pytest.fixture(scope="module")
def target(tmp_path_factory, tf_runtime):
    """A platform of its own: what the fuzzer creates, changes or revokes touches no other test."""
    with secure_platform(tmp_path_factory.mktemp("fuzz"), 28500) as running:
        yield running


def _config(tmp_path: Path, values: dict[str, str]) -> Path:
    """A schemathesis.toml that fills each path parameter with a real resource 70% of the time (a random
    value otherwise), so that generated requests reach the views behind the 404s as well."""
    lines = [f'[dictionaries.{name}]\nvalues = ["{value}"]\n' for name, value in values.items()]
    lines.append("[parameters]")
    lines += [f'"path.{name}" = {{ dictionary = "{name}", probability = 0.7 }}' for name in values]
    path = tmp_path / "schemathesis.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _seed(secure, tf_package: Path) -> dict[str, str]:
    """A project with a package, a job (real, and short), a model and an operation for the fuzzer to find."""
    owner = secure.client("fuzz", "member")
    package = owner.upload(tf_package)
    owner.submit("fuzz_job", package, args=["--epochs", "1"])
    assert owner.request("POST", "/models", json={"name": "census"}).status_code == 200
    assert owner.request("POST", "/models", json={"name": "gone"}).status_code == 200
    deleted = owner.request("DELETE", "/models/gone")
    assert deleted.status_code == 200, deleted.text
    return {"project": "fuzz", "job": "fuzz_job", "model": "census", "version": "v1",
            "operation": deleted.json()["name"].rsplit("/", 1)[1]}


def test_schemathesis_finds_no_server_error_and_no_leak(target, tf_package, tmp_path):
    secure = target
    admin = secure.platform_admin()
    config = _config(tmp_path, _seed(secure, tf_package))
    har = tmp_path / "fuzz.har"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
         f"{secure.platform.base_url}/v1/openapi.json",
         "--header", f"Authorization: Bearer {admin.token}", "--checks", "not_a_server_error",
         "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "40", "--seed", "20261202",
         "--workers", "1", "--request-timeout", "60", "--report", "har", "--report-har-path", str(har),
         "--output-sanitize", "false", "--generation-allow-x00", "true", "--continue-on-failure"],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path)  # its crash cache stays out of the tree
    entries = json.loads(har.read_text())["log"]["entries"]
    print(f"schemathesis sent {len(entries)} requests; exit code {run.returncode}\n{run.stdout[-3000:]}")
    server_errors = [(e["request"]["method"], e["request"]["url"], e["response"]["status"], _body(e)[:300])
                     for e in entries if e["response"]["status"] >= 500]
    assert not server_errors, server_errors
    # Error answers are the platform's own words; a 2xx body holds users' data (a trainer's log may well
    # print a path or an exception), which only the secrets check below applies to.
    leaks = [(e["request"]["method"], e["request"]["url"], match.group(0), _body(e)[:300])
             for e in entries if e["response"]["status"] >= 400 and (match := INTERNALS.search(_body(e)))]
    assert not leaks, leaks[:20]
    for entry in entries:
        body = _body(entry)
        assert not any(secret in body for secret in secure.secrets), entry["request"]["url"]
    assert len(entries) >= MIN_REQUESTS
    assert run.returncode == 0, run.stdout[-4000:]

"""The set-up the serving benchmarks share: a real platform (API + router, monitor, worker) with model ``m``
trained from the TensorFlow example, and versions of it deployed on local nodes."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloudml_os.config import load_settings
from cloudml_os.runtimes import ensure_runtime
from tests.harness import build_sdist, start_platform

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def platform_with_model(project: str = "bench") -> Iterator[tuple[Any, Any, dict]]:
    """A running platform, its client for ``project`` with model ``m`` created, and the finished training
    job whose export the versions serve: ``(platform, client, job)``."""
    runtime = ensure_runtime("tensorflow-2.21", load_settings(environ={}).runtimes_dir)
    with tempfile.TemporaryDirectory() as tmp, start_platform(Path(tmp), local_address_prefix="127.4",
                                                              local_port_base=22000) as platform:
        client = platform.client(project)
        package = client.upload(build_sdist(ROOT / "examples" / "tensorflow", Path(tmp), runtime / "bin" / "python"))
        client.submit("train", package, args=["--epochs", "1"])
        job = client.wait("train")
        assert job["state"] == "SUCCEEDED", job
        assert client.request("POST", "/models", json={"name": "m"}).status_code == 200
        yield platform, client, job


def deploy(client, job: dict, version: str, ready: int = 2, **fields: Any) -> None:
    """Create ``version`` of model ``m`` from ``job``'s export (2 replicas unless ``fields`` say otherwise) and
    wait until ``ready`` replicas are READY and healthy."""
    body = {"name": version, "deploymentUri": job["trainingOutput"]["exportedModelUri"], "framework": "TENSORFLOW",
            "runtimeVersion": "2.21", "machineType": "standard", "manualScaling": {"nodes": 2}, **fields}
    response = client.request("POST", "/models/m/versions", json=body)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 300
    while len(ready_replicas(client, version)) < ready:
        assert time.monotonic() < deadline, f"{version} has not {ready} ready replicas after 300 s"
        time.sleep(0.2)


def ready_replicas(client, version: str) -> list[dict]:
    replicas = client.request("GET", f"/models/m/versions/{version}").json().get("replicas", [])
    return [r for r in replicas if r["state"] == "READY" and r["healthy"]]

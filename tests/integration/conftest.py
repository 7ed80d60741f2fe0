"""Fixtures the serving and batch prediction tests share: one project's models from real training jobs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

PACKAGES = {"TENSORFLOW": "tf_package", "MXNET": "mxnet_package", "PYTORCH": "pytorch_package"}


@pytest.fixture(scope="session")
def serving_client(platform):
    return platform.client("team-serving")


@pytest.fixture(scope="session")
def trained_job(serving_client, request) -> Callable[[str], dict]:
    """``trained_job(framework)``: the example trainer's succeeded job in project team-serving, trained once
    per session (serving and batch prediction both predict with its exported model)."""
    jobs: dict[str, dict] = {}

    def trained(framework: str) -> dict:
        if framework not in jobs:
            uri = serving_client.upload(request.getfixturevalue(PACKAGES[framework]))
            job_id = "serve_tf_training" if framework == "TENSORFLOW" else f"serve_{framework.lower()}_training"
            serving_client.submit(job_id, uri, framework=framework, args=["--epochs", "2"])
            job = serving_client.wait(job_id)
            assert job["state"] == "SUCCEEDED", job.get("errorMessage")
            jobs[framework] = job
        return jobs[framework]

    return trained

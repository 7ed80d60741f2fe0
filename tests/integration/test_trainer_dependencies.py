"""A trainer's own requirements, as on Cloud ML Engine: what its package requires beyond the runtime is
installed from the site's index (here this host's pip configuration: a local mirror and PyPI), fetched by one
node into the worker's wheel cache and installed on every node; the runtime's numpy stays the one used.

Real parts throughout: the session's platform (API, Celery worker, sshd nodes), the runtime's pip, the index.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cloudml_os.runtimes import runtime_dirname
from tests.conftest import ROOT
from tests.harness import build_sdist

pytestmark = pytest.mark.integration

PROJECT = "dependencies"
TWO_NODES = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard", "workerCount": "1"}


@pytest.fixture(scope="module")
def client(platform):
    return platform.client(PROJECT, "member")


def _built(tmp_path: Path, trainer: str) -> Path:
    """A copy of ``tests/trainers/TRAINER`` (building in place would leave files in the source tree)."""
    return Path(shutil.copytree(ROOT / "tests" / "trainers" / trainer, tmp_path / trainer))


@pytest.fixture(scope="module")
def packages(client, tmp_path_factory, tf_runtime) -> list[str]:
    """The trainer (an sdist requiring pandas, cloudml-hypertune and cmlos-helper) and cmlos-helper's wheel."""
    work = tmp_path_factory.mktemp("dependencies")
    python = tf_runtime / "bin" / "python"
    trainer = build_sdist(_built(work, "dependencies"), work / "sdist", python)
    subprocess.run([str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(work / "wheel"), str(_built(work, "helper"))], check=True, capture_output=True)
    helper = next((work / "wheel").glob("cmlos_helper-1.0-*.whl"))
    return [client.upload(trainer), client.upload(helper)]


def _cached_wheels(platform) -> dict[str, tuple[int, int]]:
    """The project's wheel cache on the worker for the TensorFlow runtime: name → (inode, mtime)."""
    folder = platform.data_dir / "wheelhouse" / runtime_dirname("tensorflow-2.21") / PROJECT
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in folder.glob("*.whl")}


def _requirement_events(client, job_id: str) -> list[str]:
    return [e["message"] for e in client.events(job_id) if e["message"].startswith("Requirements ")]


def test_requirements_the_runtime_lacks_are_fetched_once_and_every_node_imports_them(platform, client, packages,
                                                                                     tf_runtime):
    client.submit("deps_first", packages[0], packageUris=packages, **TWO_NODES)
    job = client.wait("deps_first", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    logs = client.logs("deps_first")
    assert set(logs) == {"chief-0", "worker-0"}
    for text in logs.values():
        lines = {line.split(" ", 1)[0]: line for line in text.splitlines()}
        assert "/job/site-packages/pandas/" in lines["pandas"]  # installed for the job…
        assert f" from {tf_runtime}/lib/" in lines["numpy"]  # …beside the runtime's numpy, which it uses
        assert "/job/site-packages/hypertune/" in lines["hypertune"]
        assert lines["helper"] == "helper from the uploaded wheel, sum 6"
    # One node resolved and fetched (downloaded pandas, tzdata…, built cloudml-hypertune's sdist); the other got
    # the wheels from the worker. The uploaded cmlos-helper wheel is the job's own: neither fetched nor cached.
    [event] = _requirement_events(client, "deps_first")
    assert "pandas " in event and "cloudml-hypertune 0.1.0.dev6" in event and "cmlos-helper" not in event
    assert ": resolved on node chief-0; 0 from the wheel cache, " in event
    assert event.endswith(" fetched on node chief-0")
    cached = _cached_wheels(platform)
    assert any(name.startswith("pandas-") for name in cached)
    assert any(name.startswith("cloudml_hypertune-0.1.0.dev6-") for name in cached)
    assert len(cached) == int(event.rsplit(", ", 1)[1].split()[0])  # one file per fetched requirement

    # A later job of the same packages reaches no index: the resolution is remembered, the cache's files serve it.
    client.submit("deps_again", packages[0], packageUris=packages)
    job = client.wait("deps_again", timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert "helper from the uploaded wheel, sum 6" in client.logs("deps_again")["chief-0"]
    [event] = _requirement_events(client, "deps_again")
    assert event.endswith(f": resolved before for these packages; {len(cached)} from the wheel cache, none fetched")
    assert _cached_wheels(platform) == cached


def _trainer_requiring(tmp_path: Path, name: str, requirement: str) -> Path:
    source = tmp_path / name
    (source / "trainer").mkdir(parents=True)
    (source / "trainer" / "__init__.py").write_text("")
    (source / "trainer" / "task.py").write_text("print('never run')\n")
    (source / "setup.py").write_text("from setuptools import setup\n"
                                     f"setup(name={name!r}, version='0.1', packages=['trainer'], "
                                     f"install_requires=[{requirement!r}])\n")
    return source


@pytest.mark.parametrize("requirement, message", [
    ("cmlos-no-such-package-7f3b>=1", "installing the trainer's requirements failed: no distribution found for "
                                      "'cmlos-no-such-package-7f3b>=1' (required by missing-trainer)"),
    # The runtime has numpy 2.x and keeps it: a trainer wanting another fails instead of shadowing it.
    ("numpy<2", "installing the trainer's requirements failed: conflicting requirements: conflict-trainer 0.1 "
                "depends on numpy<2; the runtime has numpy {numpy}, which stays"),
])
def test_a_requirement_that_cannot_be_installed_fails_the_job_naming_it(platform, client, tmp_path, tf_runtime,
                                                                       requirement, message):
    name = "missing-trainer" if "no-such" in requirement else "conflict-trainer"
    sdist = build_sdist(_trainer_requiring(tmp_path, name, requirement), tmp_path / "sdist",
                        tf_runtime / "bin" / "python")
    job_id = name.replace("-", "_")
    client.submit(job_id, client.upload(sdist))
    job = client.wait(job_id, timeout=300)
    assert job["state"] == "FAILED"
    numpy = subprocess.run([str(tf_runtime / "bin" / "python"), "-c", "import numpy; print(numpy.__version__)"],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert job["errorMessage"] == message.format(numpy=numpy)
    assert not any(e["kind"] == "PROCESS" for e in client.events(job_id))  # no trainer started

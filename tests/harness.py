"""Starts a real platform (API + Celery worker processes) and talks to it over HTTP.

Used by the test fixtures and by the benchmarks, so both measure and prove the same thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(env: dict[str, str], *args: str) -> str:
    """Run ``cloudml-os ARGS`` with the platform's environment; return its stdout."""
    out = subprocess.run([sys.executable, "-m", "cloudml_os.cli", *args], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout


@dataclasses.dataclass
class Client:
    """A thin HTTP client for one project's token."""

    base_url: str
    project: str
    token: str
    keystone: bool = False  # a Keystone token goes in X-Auth-Token

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        url = f"{self.base_url}/v1/projects/{self.project}{path}"
        credential = {"X-Auth-Token": self.token} if self.keystone else {"Authorization": f"Bearer {self.token}"}
        headers = {**credential, **kwargs.pop("headers", {})}
        return requests.request(method, url, headers=headers, timeout=60, **kwargs)

    def upload(self, path: Path) -> str:
        with path.open("rb") as handle:
            response = self.request("POST", "/packages", files={"file": (path.name, handle)})
        assert response.status_code == 200, response.text
        return response.json()["uri"]

    def submit(self, job_id: str, package_uri: str, *, args: list[str] = (), **training_input) -> dict:
        body = {"jobId": job_id, "trainingInput": {
            "scaleTier": "BASIC", "packageUris": [package_uri], "pythonModule": "trainer.task",
            "region": "local", "args": list(args), **training_input}}
        response = self.request("POST", "/jobs", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        response = self.request("GET", f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, states=FINAL_STATES, timeout: float = 600, interval: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while job["state"] not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']}/{job.get('step')} after {timeout}s")
            time.sleep(interval)
            job = self.job(job_id)
        return job

    def logs(self, job_id: str) -> dict[str, str]:
        response = self.request("GET", f"/jobs/{job_id}/logs")
        assert response.status_code == 200, response.text
        return {entry["node"]: entry["text"] for entry in response.json()["logs"]}

    def events(self, job_id: str) -> list[dict]:
        response = self.request("GET", f"/jobs/{job_id}/events")
        assert response.status_code == 200, response.text
        return response.json()["events"]


@dataclasses.dataclass
class Platform:
    base_url: str
    env: dict[str, str]
    data_dir: Path
    # The platform's processes by name (worker, beat, monitor, api), each the leader of its own process
    # group, so a test can kill one with everything it forked and start it again.
    processes: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    def start(self, name: str) -> subprocess.Popen:
        """Start (or start again) the platform's process ``name``; its output is appended to logs/NAME.log."""
        with (self.data_dir / "logs" / f"{name}.log").open("a") as log:
            self.processes[name] = subprocess.Popen([sys.executable, "-m", "cloudml_os.cli", name], env=self.env,
                                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.processes[name]

    def token(self, project: str, role: str = "admin") -> str:
        return cli(self.env, "token", "create", "--project", project, "--role", role).strip()

    def client(self, project: str, role: str = "admin") -> Client:
        return Client(self.base_url, project, self.token(project, role))


@contextlib.contextmanager
def start_platform(data_dir: Path, **settings: str) -> Iterator[Platform]:
    """Migrate, start the worker, beat, monitor and API processes with ``CLOUDML_OS_<SETTING>`` overrides,
    stop them after.

    Nodes a failed run left behind are deleted through the driver at the end.
    """
    port = free_port()
    env = {**os.environ, "CLOUDML_OS_DATA_DIR": str(data_dir), "CLOUDML_OS_API_PORT": str(port),
           **{f"CLOUDML_OS_{key.upper()}": str(value) for key, value in settings.items()}}
    cli(env, "db", "upgrade")
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}"
    platform = Platform(base_url, env, data_dir)
    try:
        for name in ("worker", "beat", "monitor", "api"):  # the API last: its health ends the wait
            platform.start(name)
        _wait_http(f"{base_url}/healthz", platform.processes["api"])
        yield platform
    finally:
        for process in platform.processes.values():
            process.terminate()
        for process in platform.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        _delete_leftover_nodes(env)


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API process exited with {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def _delete_leftover_nodes(env: dict[str, str]) -> None:
    from cloudml_os.cloud.base import load_driver
    from cloudml_os.config import load_settings

    driver = load_driver(load_settings(environ=env))
    for name in driver.list_clusters():
        driver.delete_cluster(name)


def build_sdist(source: Path, out: Path, python: Path) -> Path:
    """A source distribution of an example trainer, built with the runtime's setuptools (offline)."""
    subprocess.run([str(python), "setup.py", "-q", "sdist", "--dist-dir", str(out)], cwd=source, check=True,
                   capture_output=True)
    return next(out.glob("*.tar.gz"))


def cluster_processes(platform: Platform, cluster: str) -> list[int]:
    """PIDs of the processes of ``platform``'s local-driver cluster ``cluster`` (not of a namesake elsewhere:
    other platforms of the same test session number their clusters from 1 too)."""
    return node_processes(f"{platform.data_dir / 'nodes' / 'clusters' / cluster}/")


def node_processes(marker: str) -> list[int]:
    """PIDs of this host's processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


HYPERTUNE = "cloudml-hypertune==0.1.0.dev6"


def hypertune_sdist(cache: Path | None = None) -> Path:
    """The real cloudml-hypertune source distribution from PyPI, downloaded once into ``cache``
    (default ``~/.cache/cloudml-os/downloads``)."""
    cache = cache or Path.home() / ".cache" / "cloudml-os" / "downloads"
    name, version = HYPERTUNE.split("==")
    found = sorted(cache.glob(f"{name}-{version}.tar.gz"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", str(cache), HYPERTUNE], check=True, capture_output=True)
        found = sorted(cache.glob(f"{name}-{version}.tar.gz"))
    return found[0]

"""Shared fixtures. The expensive ones (node runtime, database, the running platform) are per session.

``platform`` is the real thing: a fresh PostgreSQL database, a RabbitMQ queue of its own, a Celery
worker process and a gunicorn API process started with ``cloudml-os``, local sshd nodes on loopback
addresses of their own. Tests talk to it over HTTP only.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("CLOUDML_OS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("CLOUDML_OS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tf_runtime() -> Path:
    """The TensorFlow node runtime, built once per machine (cached across runs)."""
    from cloudml_os.config import load_settings
    from cloudml_os.runtimes import ensure_runtime

    return ensure_runtime("tensorflow-2.21", load_settings(environ={}).runtimes_dir)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this session, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"cloudml_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@dataclasses.dataclass
class Platform:
    base_url: str
    env: dict[str, str]
    data_dir: Path
    database_url: str

    def token(self, project: str, role: str = "admin") -> str:
        out = subprocess.run(
            [sys.executable, "-m", "cloudml_os.cli", "token", "create", "--project", project, "--role", role],
            env=self.env, check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def client(self, project: str, role: str = "admin") -> Client:
        return Client(self.base_url, project, self.token(project, role))


@dataclasses.dataclass
class Client:
    """A thin HTTP client for one project's token."""

    base_url: str
    project: str
    token: str

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        url = f"{self.base_url}/v1/projects/{self.project}{path}"
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
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

    def wait(self, job_id: str, states=FINAL_STATES, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {job['state']}/{job.get('step')} after {timeout}s")

    def logs(self, job_id: str) -> dict[str, str]:
        response = self.request("GET", f"/jobs/{job_id}/logs")
        assert response.status_code == 200, response.text
        return {entry["node"]: entry["text"] for entry in response.json()["logs"]}


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


@pytest.fixture(scope="session")
def platform(tmp_path_factory, database_url, tf_runtime) -> Iterator[Platform]:
    data_dir = tmp_path_factory.mktemp("platform")
    port = free_port()
    queue = f"cloudml-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CLOUDML_OS_DATA_DIR": str(data_dir),
        "CLOUDML_OS_DATABASE_URL": database_url,
        "CLOUDML_OS_BROKER_URL": AMQP_URL,
        "CLOUDML_OS_TASK_QUEUE": queue,
        "CLOUDML_OS_API_PORT": str(port),
        "CLOUDML_OS_LOCAL_ADDRESS_PREFIX": "127.2",
        "CLOUDML_OS_LOCAL_PORT_BASE": "30000",
        "CLOUDML_OS_WATCH_INTERVAL": "0.5",
        "CLOUDML_OS_STOP_GRACE_SECONDS": "2",
    }
    subprocess.run([sys.executable, "-m", "cloudml_os.cli", "db", "upgrade"], env=env, check=True)
    logs = data_dir / "logs"
    logs.mkdir()
    processes = []
    with (logs / "worker.log").open("w") as worker_log, (logs / "api.log").open("w") as api_log:
        processes.append(subprocess.Popen([sys.executable, "-m", "cloudml_os.cli", "worker"], env=env,
                                          stdout=worker_log, stderr=subprocess.STDOUT))
        api = subprocess.Popen([sys.executable, "-m", "cloudml_os.cli", "api"], env=env,
                               stdout=api_log, stderr=subprocess.STDOUT)
        processes.append(api)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base_url}/healthz", api)
        yield Platform(base_url, env, data_dir, database_url)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        _delete_queue(queue)
        _kill_leftover_nodes(data_dir)


def _delete_queue(queue: str) -> None:
    import kombu

    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(queue)


def _kill_leftover_nodes(data_dir: Path) -> None:
    """Whatever a failed test left running is deleted through the driver, so the machine stays clean."""
    from cloudml_os.cloud.local import LocalDriver

    from cloudml_os.config import load_settings

    driver = LocalDriver(load_settings(environ={}, data_dir=data_dir))
    for name in driver.list_clusters():
        driver.delete_cluster(name)


@pytest.fixture(scope="session")
def tf_package(tmp_path_factory, tf_runtime) -> Path:
    """The example TensorFlow trainer as a source distribution, built once."""
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([str(tf_runtime / "bin" / "python"), "setup.py", "-q", "sdist", "--dist-dir", str(out)],
                   cwd=ROOT / "examples" / "tensorflow", check=True)
    return next(out.glob("*.tar.gz"))


def node_processes(marker: str) -> list[int]:
    """PIDs of this host's processes whose command line mentions ``marker`` (e.g. a node's folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids

"""Fixtures of the fault tests: a private PostgreSQL and a private RabbitMQ node these tests may restart, and
one platform (worker, beat, monitor, API) on them.

The machine's shared PostgreSQL and RabbitMQ serve other tests at the same time, so they are never
restarted: each fault test restarts only the private instances started here (own port, own data folder,
own Erlang node name), and stops them at the end whatever happened.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.harness import Platform, free_port, start_platform

RELIABILITY_SETTINGS = {
    # Short leases and a fast reconciler, so that recovering from a fault takes seconds.
    "reconcile_interval": 2,
    "step_lease_seconds": 9,
    "step_pickup_seconds": 12,
    "watch_window": 2,
    "stop_grace_seconds": 2,
    "local_address_prefix": "127.11",
    "local_port_base": 27000,
}


class PrivatePostgres:
    """A PostgreSQL server of its own (initdb + pg_ctl as the postgres user) on a free port."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.data = root / "data"
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not binaries:
            raise RuntimeError("PostgreSQL server binaries are missing (apt-get install postgresql)")
        self.bin = Path(binaries[-1])
        root.mkdir(parents=True, exist_ok=True)
        shutil.chown(root, "postgres")
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/cloudml"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, cwd="/tmp")

    def start(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                          "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "-w", "start")

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


class PrivateRabbitMQ:
    """A second RabbitMQ node (its own node name, AMQP and distribution ports, data and log folders)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.node = f"cmlrel{uuid.uuid4().hex[:6]}@localhost"
        for folder in ("mnesia", "log"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(root)], check=True)
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_DIST_PORT": str(free_port()),
                    "RABBITMQ_MNESIA_BASE": str(root / "mnesia"), "RABBITMQ_LOG_BASE": str(root / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
                    "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
                    "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf")}

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float = 180) -> None:
        import kombu

        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with kombu.Connection(self.url, connect_timeout=2) as connection:
                    connection.connect()
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"RabbitMQ node {self.node} did not accept AMQP within {timeout}s") from None
                time.sleep(0.5)

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.node, "stop"], env=self.env, check=False, capture_output=True,
                       timeout=120)


@pytest.fixture(scope="session")
def private_postgres(tmp_path_factory) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(Path(f"/tmp/cmlrel-pg-{uuid.uuid4().hex[:8]}"))
    try:
        server.start()
        subprocess.run(["runuser", "-u", "postgres", "--", str(server.bin / "createdb"), "-h", "127.0.0.1",
                        "-p", str(server.port), "cloudml"], check=True, capture_output=True, cwd="/tmp")
        yield server
    finally:
        if server.running():
            server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    broker = PrivateRabbitMQ(Path(f"/tmp/cmlrel-mq-{uuid.uuid4().hex[:8]}"))
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(broker.root, ignore_errors=True)


@pytest.fixture(scope="session")
def platform(tmp_path_factory, private_postgres, private_rabbitmq, tf_runtime, mxnet_runtime) -> Iterator[Platform]:
    with start_platform(tmp_path_factory.mktemp("reliability"), database_url=private_postgres.url,
                        broker_url=private_rabbitmq.url, task_queue="cloudml-reliability",
                        **RELIABILITY_SETTINGS) as running:
        yield running


@pytest.fixture(scope="session")
def store(platform):
    from cloudml_os.config import load_settings
    from cloudml_os.store import Store

    store = Store.from_settings(load_settings(environ=platform.env))
    yield store
    store.engine.dispose()


@pytest.fixture
def scratch_database(private_postgres) -> Iterator[str]:
    """A migrated database of its own in the private PostgreSQL, for tests that drive workflows directly."""
    from sqlalchemy import create_engine, text

    from cloudml_os.store import migrate

    name = f"scratch_{uuid.uuid4().hex[:8]}"
    admin = create_engine(private_postgres.url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = private_postgres.url.rsplit("/", 1)[0] + "/" + name
    try:
        migrate(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def client(platform, request):
    """A client of the test module's own project (its ``PROJECT``)."""
    return platform.client(request.module.PROJECT)


@pytest.fixture(scope="module")
def overhead_uri(client, tmp_path_factory):
    """The control-plane benchmark's trainer (no framework import, sleeps ``--run-seconds``) as a zip."""
    archive = tmp_path_factory.mktemp("overhead") / "overhead.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in (ROOT / "bench" / "trainers" / "overhead" / "overhead_trainer").glob("*.py"):
            bundle.write(path, f"overhead_trainer/{path.name}")
    return client.upload(archive)

"""A real platform (PostgreSQL, RabbitMQ, Celery worker, gunicorn API, local sshd nodes) started with
secrets the tests know, so that they can look for them everywhere afterwards.

The secrets: a database password in ``database_url`` (PostgreSQL here trusts local connections, so the
password is sent and ignored), the broker URL's credentials, a configured ``key_encryption_key``, the API
tokens the tests create, and the clusters' SSH private keys (recognised by their PEM header). Small body
and package limits let the limit tests send a few hundred KiB instead of the production sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from tests.conftest import AMQP_URL, PG_ADMIN_URL
from tests.harness import Client, Platform, start_platform

DB_PASSWORD = "db-Secret-" + uuid.uuid4().hex
KEY_ENCRYPTION_KEY = Fernet.generate_key().decode()
MAX_REQUEST_BYTES = 64 << 10
MAX_PACKAGE_BYTES = 256 << 10
PEM_MARKER = "PRIVATE KEY-----"


@dataclasses.dataclass
class SecurePlatform:
    """The running platform, its database URL (with the password) and every secret handed out so far."""

    platform: Platform
    database_url: str
    secrets: list[str]

    def client(self, project: str, role: str = "admin") -> Client:
        client = self.platform.client(project, role)
        self.secrets.append(client.token)
        return client

    def platform_admin(self) -> Client:
        return self.client("admin", "admin")


@contextlib.contextmanager
def secure_platform(data_dir: Path, port_base: int) -> Iterator[SecurePlatform]:
    """A platform on a new PostgreSQL database reached with a password in its URL, its own queue, and
    local nodes on 127.13 from ``port_base``; the database and the queue are removed afterwards."""
    import kombu
    from sqlalchemy import create_engine, text

    name = f"cloudml_secure_{uuid.uuid4().hex[:10]}"
    queue = f"cloudml-secure-{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
    assert DB_PASSWORD in base
    database_url = f"{base}/{name}"
    try:
        with start_platform(data_dir, database_url=database_url, broker_url=AMQP_URL, task_queue=queue,
                            local_address_prefix="127.13", local_port_base=port_base, stop_grace_seconds=2,
                            key_encryption_key=KEY_ENCRYPTION_KEY, max_request_bytes=MAX_REQUEST_BYTES,
                            max_package_bytes=MAX_PACKAGE_BYTES) as running:
            yield SecurePlatform(running, database_url, [DB_PASSWORD, KEY_ENCRYPTION_KEY, *_broker_credentials()])
    finally:
        with kombu.Connection(AMQP_URL) as connection:
            connection.default_channel.queue_delete(queue)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _broker_credentials() -> list[str]:
    """The broker URL's ``user:password@`` part, if it has one (Celery's banner masks the password)."""
    credentials = AMQP_URL.split("://", 1)[1].split("@", 1)[0] + "@" if "@" in AMQP_URL else ""
    return [credentials] if ":" in credentials else []


@pytest.fixture(scope="session")
def secure(tmp_path_factory, tf_runtime) -> Iterator[SecurePlatform]:
    """The platform the job, limit and secret tests share."""
    with secure_platform(tmp_path_factory.mktemp("secure"), 28000) as running:
        yield running


@pytest.fixture(scope="session")
def secure_package(secure, tf_package) -> str:
    """The TensorFlow example trainer, uploaded to project ``team-a``."""
    return secure.client("team-a", "member").upload(tf_package)


def response_texts(responses: list[requests.Response]) -> list[str]:
    return [f"{r.status_code} {dict(r.headers)} {r.text}" for r in responses]


def files_under(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` that a leak could be written to (logs, node folders, artifacts)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path

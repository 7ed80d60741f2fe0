"""Shared fixtures. The expensive ones (node runtime, database, the running platform) are per session.

``platform`` is the real thing: a fresh PostgreSQL database, a RabbitMQ queue of its own, a Celery
worker process and a gunicorn API process started with ``cloudml-os``, local sshd nodes on loopback
addresses of their own. Tests talk to it over HTTP only.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Platform, build_sdist, hypertune_sdist, start_platform

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("CLOUDML_OS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("CLOUDML_OS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def node_runtime(name: str) -> Path:
    """A framework's node runtime, built once per machine (cached across runs)."""
    from cloudml_os.config import load_settings
    from cloudml_os.runtimes import ensure_runtime

    return ensure_runtime(name, load_settings(environ={}).runtimes_dir)


@pytest.fixture(scope="session")
def tf_runtime() -> Path:
    return node_runtime("tensorflow-2.21")


@pytest.fixture(scope="session")
def mxnet_runtime() -> Path:
    return node_runtime("mxnet-1.9")


@pytest.fixture(scope="session")
def pytorch_runtime() -> Path:
    return node_runtime("pytorch-2.13")


@contextlib.contextmanager
def new_postgres_database(prefix: str = "cloudml_test") -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The session's PostgreSQL database, shared by the session's platform (never emptied by a test)."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture
def own_database_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own, for tests that need an empty one."""
    with new_postgres_database("cloudml_own") as url:
        yield url


@pytest.fixture(scope="session")
def platform(tmp_path_factory, database_url, tf_runtime) -> Iterator[Platform]:
    import kombu

    queue = f"cloudml-test-{uuid.uuid4().hex[:8]}"
    with start_platform(tmp_path_factory.mktemp("platform"), database_url=database_url, broker_url=AMQP_URL,
                        task_queue=queue, local_address_prefix="127.2", local_port_base=30000,
                        stop_grace_seconds=2) as running:
        yield running
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(queue)


@pytest.fixture(scope="session")
def tf_package(tmp_path_factory, tf_runtime) -> Path:
    """The example trainers as source distributions, built once."""
    return build_sdist(ROOT / "examples" / "tensorflow", tmp_path_factory.mktemp("sdist"),
                       tf_runtime / "bin" / "python")


@pytest.fixture(scope="session")
def mxnet_package(tmp_path_factory, mxnet_runtime) -> Path:
    return build_sdist(ROOT / "examples" / "mxnet", tmp_path_factory.mktemp("sdist"),
                       mxnet_runtime / "bin" / "python")


@pytest.fixture(scope="session")
def pytorch_package(tmp_path_factory, pytorch_runtime) -> Path:
    return build_sdist(ROOT / "examples" / "pytorch", tmp_path_factory.mktemp("sdist"),
                       pytorch_runtime / "bin" / "python")


@pytest.fixture(scope="session")
def tuning_packages(tmp_path_factory, tf_runtime) -> list[Path]:
    """The tuning tests' trainer (tests/trainers/tuning) and the real cloudml-hypertune it imports."""
    trainer = build_sdist(ROOT / "tests" / "trainers" / "tuning", tmp_path_factory.mktemp("sdist"),
                          tf_runtime / "bin" / "python")
    return [trainer, hypertune_sdist()]

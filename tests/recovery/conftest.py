"""Fixtures of the node-failure tests: one platform per module, its local nodes on loopback addresses of their
own (127.12.x.x, ports from 27500) or, to cut their links, in network namespaces on the bridge ``cmlos-nodes0``
(10.232.0.0/24); so these tests collide with no installation and no other test module. Restarts wait 1 s, so
failures are handled in test time; nothing here asserts how long anything takes.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.harness import Platform, start_platform

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
BRIDGE = "cmlos-nodes0"
SUBNET = "10.232.0.0/24"
SETTINGS = {
    "local_address_prefix": "127.12", "local_port_base": 27500, "node_unreachable_seconds": 8,
    "restart_backoff_seconds": 1, "stop_grace_seconds": 2,
}
# Nodes behind veths: on this shared 2-core machine their traffic was seen to stall for several seconds under
# heavy load, so a silence must last longer before it counts (a cut link is still found within this bound).
ISOLATED_SETTINGS = {
    **SETTINGS, "local_network_isolation": "true", "local_network_bridge": BRIDGE, "local_network_subnet": SUBNET,
    "node_unreachable_seconds": 30,
}


def node_namespaces() -> list[str]:
    """Network namespaces of this bridge's nodes that exist now."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"{BRIDGE}-s")]


@contextlib.contextmanager
def running_platform(tmp_path_factory, database_url: str, settings: dict) -> Iterator[Platform]:
    """A platform (real PostgreSQL, RabbitMQ, worker and API) with ``settings``; stopped and its queue deleted."""
    import kombu

    queue = f"cloudml-recovery-{uuid.uuid4().hex[:8]}"
    with start_platform(tmp_path_factory.mktemp("recovery"), database_url=database_url, broker_url=AMQP_URL,
                        task_queue=queue, **settings) as running:
        yield running
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(queue)


@pytest.fixture(scope="module")
def recovery_platform(tmp_path_factory, database_url, tf_runtime) -> Iterator[Platform]:
    """Nodes on loopback addresses (the local driver's default): killed by SIGKILL to their PID 1."""
    with running_platform(tmp_path_factory, database_url, SETTINGS) as running:
        yield running


@pytest.fixture(scope="module")
def isolated_platform(tmp_path_factory, database_url, tf_runtime) -> Iterator[Platform]:
    """Nodes in network namespaces of their own: their links can be cut."""
    with running_platform(tmp_path_factory, database_url, ISOLATED_SETTINGS) as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def remove_bridge() -> Iterator[None]:
    """The local driver makes the nodes' bridge on first use and keeps it; these tests remove it at the end."""
    yield
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)

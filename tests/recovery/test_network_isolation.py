"""Local nodes in network namespaces of their own: they reach each other over the bridge, a cut link makes
SSH fail within the configured bound instead of hanging, and replacing or deleting a node unplugs it.

Real sshd nodes, real paramiko, real veths on a real Linux bridge (root only, as the local driver is).
"""

from __future__ import annotations

import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloudml_os.cloud.base import ClusterSpec, NodeSpec
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import load_settings
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import RemoteError, connect_node
from tests.recovery.conftest import BRIDGE, ISOLATED_SETTINGS, node_namespaces

pytestmark = pytest.mark.integration

GIVE_UP = 120  # seconds: a call still waiting by then has hung, which is what these tests rule out
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()"


@pytest.fixture
def isolated(tmp_path):
    settings = load_settings(environ={}, data_dir=tmp_path, **{**ISOLATED_SETTINGS, "node_unreachable_seconds": 10})
    driver = LocalDriver(settings)
    private, public = generate_keypair("recovery-test")
    spec = ClusterSpec(f"cut-{uuid.uuid4().hex[:8]}", (NodeSpec("chief-0", "chief", 0, "m1.medium"),
                                                       NodeSpec("worker-0", "worker", 0, "m1.medium")), public)
    try:
        yield settings, driver, spec, private
    finally:
        driver.delete_cluster(spec.name)


def within_bound(call, *args):
    """Run ``call`` in a thread and give up (fail) if it has not returned or raised by GIVE_UP."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call, *args).result(timeout=GIVE_UP)


def link(name: str, state: str) -> None:
    subprocess.run(["ip", "link", "set", name, state], check=True)


def test_isolated_nodes_reach_each_other_over_the_bridge_and_not_on_loopback(isolated):
    settings, driver, spec, private = isolated
    chief, worker = driver.create_cluster(spec)
    assert chief.address.startswith("10.232.0.") and worker.address.startswith("10.232.0.")
    with connect_node(chief, private, settings) as session:
        reached = session.run(["python3", "-c", CONNECT, worker.address, str(worker.ssh_port)], check=False)
        assert reached.exit_code == 0, reached.stderr
        # The node has a network stack of its own: its loopback and its one NIC on the bridge.
        interfaces = session.run(["ip", "-o", "-4", "addr", "show"]).stdout
    assert {line.split()[1] for line in interfaces.splitlines()} == {"lo", "eth0"}
    assert f"{chief.address}/24" in interfaces


def test_a_cut_link_fails_commands_and_connections_within_the_bound_instead_of_hanging(isolated):
    settings, driver, spec, private = isolated
    chief, worker = driver.create_cluster(spec)
    session = connect_node(worker, private, settings)
    try:
        session.run(["true"])
        host_link = driver.host_link(spec.name, "worker-0")
        link(host_link, "down")
        with pytest.raises(RemoteError, match="worker-0"):
            within_bound(session.run, ["sleep", "1"])
        with pytest.raises(RemoteError, match="worker-0"):
            within_bound(connect_node, worker, private, settings)
        link(host_link, "up")  # back again: the same node answers (nothing was killed)
        with connect_node(worker, private, settings) as again:
            assert again.run(["echo", "back"]).stdout.strip() == "back"
    finally:
        session.close()


def test_replacing_an_unreachable_node_makes_a_reachable_one_and_delete_unplugs_every_node(isolated):
    settings, driver, spec, private = isolated
    driver.create_cluster(spec)
    before = set(node_namespaces())
    host_links = [driver.host_link(spec.name, node.name) for node in spec.nodes]
    link(host_links[1], "down")
    replaced = driver.replace_node(spec, "worker-0")
    with connect_node(replaced, private, settings) as session:
        assert session.run(["echo", "new"]).stdout.strip() == "new"
    assert set(node_namespaces()) == before  # the same slot, plugged in anew
    driver.delete_cluster(spec.name)
    assert not before & set(node_namespaces())
    links = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    assert not [name for name in host_links if f" {name}@" in links]

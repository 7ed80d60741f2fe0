"""The openstack driver against the real test cloud: Heat stacks whose servers are real sshd nodes.

Everything goes through the real openstacksdk over HTTP to real Keystone, Heat, Neutron and Glance, and
the emulated Nova; the driver reads each node's host key from its console and SSH pins it.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from cloudml_os.cloud.base import ClusterSpec, DriverError, NodeSpec
from cloudml_os.cloud.openstack import OpenStackDriver
from cloudml_os.config import Settings
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import HostKeyMismatch, connect_node
from tests.openstack.settings import openstack_settings


@pytest.fixture(scope="module")
def settings(test_cloud, tmp_path_factory, tf_runtime) -> Settings:
    return openstack_settings(test_cloud, tmp_path_factory.mktemp("driver"))


@pytest.fixture(scope="module")
def driver(settings: Settings) -> OpenStackDriver:
    return OpenStackDriver(settings)


LISTEN = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])), reuse_port=True)
connection, _ = server.accept()
connection.sendall(b"hello")
"""
CONNECT = """
import socket, sys, time
for _ in range(50):
    try:
        print(socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).recv(5).decode())
        break
    except OSError:
        time.sleep(0.1)
"""


def two_nodes(public_key: str) -> ClusterSpec:
    return ClusterSpec(f"cml-t-{uuid.uuid4().hex[:8]}", (
        NodeSpec("chief-0", "chief", 0, "m1.small"),
        NodeSpec("worker-0", "worker", 0, "m1.small"),
    ), public_key, labels={"project": "p", "job": "1"})


def servers_of(test_cloud, cluster: str) -> list:
    return [s for s in test_cloud.connect("cloudml-os").compute.servers() if s.name.startswith(cluster + "-")]


def test_a_cluster_is_one_stack_of_nodes_reached_over_pinned_ssh(test_cloud, driver, settings):
    private_key, public_key = generate_keypair()
    spec = two_nodes(public_key)
    try:
        nodes = driver.create_cluster(spec)
        assert [(n.name, n.task_type, n.task_index) for n in nodes] == [("chief-0", "chief", 0),
                                                                     ("worker-0", "worker", 0)]
        # A redelivered create finds the same stack instead of making another.
        assert driver.create_cluster(spec) == nodes
        stacks = [s for s in test_cloud.connect("cloudml-os").orchestration.stacks() if s.name == spec.name]
        assert len(stacks) == 1
        assert spec.name in driver.list_clusters()
        assert len(servers_of(test_cloud, spec.name)) == 2
        # SSH and the serving port only from the control plane; framework ports only between members.
        network = test_cloud.connect("cloudml-os").network
        group = network.find_security_group(spec.name)
        ingress = {(r.port_range_min, r.port_range_max, r.remote_ip_prefix, r.remote_group_id)
                   for r in network.security_group_rules(security_group_id=group.id) if r.direction == "ingress"}
        first, last = settings.openstack_node_port_first, settings.openstack_node_port_last
        assert ingress == {(22, 22, settings.openstack_control_plane_cidr, None),
                           (first, first, settings.openstack_control_plane_cidr, None),
                           (first, last, None, group.id)}
        chief, worker = nodes
        assert chief.address.startswith(test_cloud.ctx.tenant_cidr.rsplit(".", 1)[0] + ".")
        assert chief.host_keys and all(key.startswith("ssh-ed25519 ") for key in chief.host_keys)
        with connect_node(chief, private_key, settings) as session:
            assert session.run(["cat", "/etc/cloudml-os/node.json"]).stdout
            # Nodes reach each other on the tenant network on a framework port.
            with connect_node(worker, private_key, settings) as other:
                port = settings.openstack_node_port_first
                other.start_process("/var/lib/cloudml-os/listen", ["python3", "-c", LISTEN, str(port)],
                                    env={}, cwd="/")
                got = session.run(["python3", "-c", CONNECT, worker.address, str(port)]).stdout
                assert got.strip() == "hello"
    finally:
        driver.delete_cluster(spec.name)
    assert spec.name not in driver.list_clusters()
    assert servers_of(test_cloud, spec.name) == []
    assert test_cloud.connect("cloudml-os").compute.find_keypair(spec.name) is None
    driver.delete_cluster(spec.name)  # deleting what is gone is not an error


def test_a_changed_host_key_is_refused(test_cloud, driver, settings):
    private_key, public_key = generate_keypair()
    spec = ClusterSpec(f"cml-t-{uuid.uuid4().hex[:8]}", (NodeSpec("server-0", "server", 0, "m1.small"),),
                       public_key)
    try:
        node = driver.create_cluster(spec)[0]
        _, other_public = generate_keypair()
        forged = dataclasses.replace(node, host_keys=(" ".join(other_public.split()[:2]),))
        with pytest.raises(HostKeyMismatch, match="host key"):
            connect_node(forged, private_key, settings)
    finally:
        driver.delete_cluster(spec.name)


def test_a_cluster_over_quota_is_refused_before_any_stack_exists(test_cloud, driver):
    admin = test_cloud.connect("admin")
    project = admin.identity.find_project("cloudml")
    _, public_key = generate_keypair()
    spec = two_nodes(public_key)
    original = admin.compute.get_quota_set(project.id)
    admin.compute.update_quota_set(project.id, instances=1)
    try:
        with pytest.raises(DriverError, match="does not fit .* 2 instances needed, 1 of 1 free"):
            driver.create_cluster(spec)
    finally:
        admin.compute.update_quota_set(project.id, instances=original.instances)
    assert spec.name not in driver.list_clusters()


def test_an_unknown_flavor_is_a_clear_error(driver):
    _, public_key = generate_keypair()
    spec = ClusterSpec(f"cml-t-{uuid.uuid4().hex[:8]}", (NodeSpec("server-0", "server", 0, "no.such"),),
                       public_key)
    with pytest.raises(DriverError, match="flavor 'no.such' does not exist"):
        driver.create_cluster(spec)
    assert spec.name not in driver.list_clusters()


def test_a_group_grows_shrinks_and_has_one_member_replaced_in_place(test_cloud, driver, settings):
    private_key, public_key = generate_keypair()

    def spec(*indices: int) -> ClusterSpec:
        return ClusterSpec(name, tuple(NodeSpec(f"replica-{i}", "replica", i, "m1.small") for i in indices),
                           public_key)

    name = f"cml-t-{uuid.uuid4().hex[:8]}"
    try:
        first = driver.resize_cluster(spec(0))  # a missing cluster is created
        with connect_node(first[0], private_key, settings) as session:
            session.start_process("/var/lib/cloudml-os/sleeper", ["sleep", "600"], env={}, cwd="/")
        grown = driver.resize_cluster(spec(0, 1, 2))
        assert [n.name for n in grown] == ["replica-0", "replica-1", "replica-2"]
        assert grown[0] == first[0]  # the survivor is untouched: same address, same host key
        assert len(servers_of(test_cloud, name)) == 3
        shrunk = driver.resize_cluster(spec(0, 2))
        assert shrunk == [grown[0], grown[2]]
        assert sorted(s.name for s in servers_of(test_cloud, name)) == [f"{name}-replica-0", f"{name}-replica-2"]
        with connect_node(shrunk[0], private_key, settings) as session:
            assert session.process_status("/var/lib/cloudml-os/sleeper").running
        assert driver.resize_cluster(spec(0, 2)) == shrunk  # the same spec again changes nothing

        old = shrunk[1]
        new = driver.replace_node(spec(0, 2), "replica-2")
        assert (new.name, new.task_index) == ("replica-2", 2)
        assert new.host_keys != old.host_keys
        with pytest.raises(HostKeyMismatch):
            connect_node(dataclasses.replace(new, host_keys=old.host_keys), private_key, settings)
        with connect_node(new, private_key, settings) as session:
            assert session.run(["true"]).exit_code == 0
        assert len(servers_of(test_cloud, name)) == 2
        with pytest.raises(DriverError, match="has no node replica-1"):
            driver.replace_node(spec(0, 1, 2), "replica-1")
    finally:
        driver.delete_cluster(name)
    assert servers_of(test_cloud, name) == []


def test_a_stack_that_fails_is_rolled_back_and_deleted(test_cloud, driver):
    # Too few security group rules left: Heat fails half way through the stack, after creating some of it.
    admin = test_cloud.connect("admin")
    project = admin.identity.find_project("cloudml")
    quota = admin.network.get_quota(project.id, details=True)
    rules = quota.security_group_rules
    admin.network.update_quota(project.id, security_group_rules=rules["used"] + rules["reserved"] + 3)
    _, public_key = generate_keypair()
    spec = two_nodes(public_key)
    try:
        with pytest.raises(DriverError, match=r"could not create its nodes .*[Qq]uota"):
            driver.create_cluster(spec)
    finally:
        admin.network.update_quota(project.id, security_group_rules=rules["limit"])
    assert spec.name not in driver.list_clusters()
    assert [s.name for s in test_cloud.connect("cloudml-os").orchestration.stacks()
            if s.name == spec.name and s.status != "DELETE_COMPLETE"] == []
    assert servers_of(test_cloud, spec.name) == []
    assert test_cloud.connect("cloudml-os").compute.find_keypair(spec.name) is None
    cloud = test_cloud.connect("cloudml-os")  # nor the nodes' credential for the store, made before the stack
    assert [c.name for c in cloud.identity.application_credentials(cloud.current_user_id)
            if c.name.endswith(spec.name)] == []

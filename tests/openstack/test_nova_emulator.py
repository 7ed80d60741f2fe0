"""The emulated Nova of the test cloud, through the real clients: openstacksdk's compute proxy and Heat.

Its servers are real sshd "VMs" in network namespaces on the tenant bridge, so these tests log in to them
over SSH with the host key read from the console (never trusted on first use), make two of them talk,
and check that deleting one leaves no process, namespace or veth behind.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
import requests
from openstack import exceptions

from cloudml_os.cloud.openstack import parse_console_host_keys
from cloudml_os.keys import generate_keypair
from tests.testcloud import vm
from tests.testcloud.cloud import IMAGE_NAME, TestCloud
from tests.testcloud.neutron import TENANT_NETWORK
from tests.testcloud.nova import DEFAULT_HOSTS, MAX_VERSION, server_folder, server_link_prefix, server_netns

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 60

NODE_TEMPLATE = """
heat_template_version: 2021-04-16
parameters:
  index: {type: string}
  key_name: {type: string}
  group: {type: string}
  image: {type: string}
  flavor: {type: string}
  network: {type: string}
resources:
  port:
    type: OS::Neutron::Port
    properties: {network: {get_param: network}}
  server:
    type: OS::Nova::Server
    properties:
      name: {list_join: ['-', [{get_param: 'OS::stack_name'}, node, {get_param: index}]]}
      image: {get_param: image}
      flavor: {get_param: flavor}
      key_name: {get_param: key_name}
      networks: [{port: {get_resource: port}}]
      scheduler_hints: {group: {get_param: group}}
      user_data_format: RAW
      user_data:
        str_replace:
          template: |
            #cloud-config
            write_files:
              - path: /etc/cloudml-os/node.json
                content: '{"index": INDEX}'
            runcmd:
              - echo node INDEX booted
          params: {INDEX: {get_param: index}}
outputs:
  address: {value: {get_attr: [port, fixed_ips, 0, ip_address]}}
  server_id: {value: {get_resource: server}}
"""

CLUSTER_TEMPLATE = """
heat_template_version: 2021-04-16
parameters:
  public_key: {type: string}
  image: {type: string}
  flavor: {type: string, default: m1.small}
  network: {type: string}
resources:
  keypair:
    type: OS::Nova::KeyPair
    properties:
      name: {list_join: ['-', [{get_param: 'OS::stack_name'}, key]]}
      public_key: {get_param: public_key}
  group:
    type: OS::Nova::ServerGroup
    properties: {policies: [soft-anti-affinity]}
  nodes:
    type: OS::Heat::ResourceGroup
    properties:
      count: 2
      resource_def:
        type: node.yaml
        properties:
          index: "%index%"
          key_name: {get_resource: keypair}
          group: {get_resource: group}
          image: {get_param: image}
          flavor: {get_param: flavor}
          network: {get_param: network}
outputs:
  addresses: {value: {get_attr: [nodes, address]}}
  servers: {value: {get_attr: [nodes, server_id]}}
  group: {value: {get_resource: group}}
"""


@pytest.fixture(scope="module")
def member(test_cloud: TestCloud) -> Iterator:
    conn = test_cloud.connect("cloudml-os")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def admin(test_cloud: TestCloud) -> Iterator:
    conn = test_cloud.connect("admin")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def client_key() -> tuple[str, str]:
    return generate_keypair("nova-emulator-test")


@pytest.fixture
def keypair(member, client_key) -> Iterator:
    keypair = member.compute.create_keypair(name=f"test-{uuid.uuid4().hex[:8]}", public_key=client_key[1])
    yield keypair
    member.compute.delete_keypair(keypair, ignore_missing=True)


# -- helpers -------------------------------------------------------------------------------------


def console_host_keys(console: str) -> list[str]:
    """The host keys cloud-init printed, read by the platform's own parser (the openstack driver's)."""
    keys = list(parse_console_host_keys(console))
    assert keys, f"no host key block on the console:\n{console}"
    return keys


def wait_console_keys(conn, server, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        console = conn.compute.get_server_console_output(server)["output"]
        if "-----END SSH HOST KEY KEYS-----" in console:
            return console_host_keys(console)
        assert time.monotonic() < deadline, f"no host keys on the console after {timeout}s:\n{console}"
        time.sleep(0.2)


def ssh(address: str, host_keys: list[str], private_key: str) -> paramiko.SSHClient:
    """Log in as root with the host key pinned (RejectPolicy: an unknown key fails the connection)."""
    client = paramiko.SSHClient()
    for line in host_keys:
        key_type, data = line.split()[:2]
        client.get_host_keys().add(address, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(data)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(address, 22, username="root", pkey=paramiko.Ed25519Key.from_private_key(io.StringIO(private_key)),
                   look_for_keys=False, allow_agent=False, timeout=10)
    return client


def run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, stderr = client.exec_command(command, timeout=30)
    output = stdout.read().decode()
    assert stdout.channel.recv_exit_status() == 0, f"{command!r} failed: {stderr.read().decode()}"
    return output


def fixed_address(server) -> str:
    return next(address["addr"] for addresses in server.addresses.values() for address in addresses
                if address["version"] == 4)


def boot(conn, keypair, networks: list[dict], name: str | None = None, **attributes):
    """Create a server, wait until ACTIVE; returns (server, seconds from the create call to ACTIVE)."""
    image = conn.image.find_image(IMAGE_NAME, ignore_missing=False)
    flavor = conn.compute.find_flavor("m1.small", ignore_missing=False)
    started = time.monotonic()
    server = conn.compute.create_server(name=name or f"test-{uuid.uuid4().hex[:8]}", image_id=image.id,
                                        flavor_id=flavor.id, key_name=keypair.name, networks=networks,
                                        **attributes)
    server = conn.compute.wait_for_server(server, status="ACTIVE", failures=["ERROR"], interval=0.2,
                                          wait=BOOT_TIMEOUT)
    return server, time.monotonic() - started


def wait_status(conn, server, status: str):
    """Wait for ``status`` reading the server afresh (the object in hand still shows its old status)."""
    return conn.compute.wait_for_server(conn.compute.get_server(server.id), status=status, failures=["ERROR"],
                                        interval=0.2, wait=BOOT_TIMEOUT)


def delete_and_wait(conn, server) -> None:
    conn.compute.delete_server(server)
    conn.compute.wait_for_delete(server, interval=0.2, wait=60)


def node_pids(test_cloud: TestCloud, server_id: str) -> list[int]:
    """Every process of a server (all live in its network namespace)."""
    listed = subprocess.run(["ip", "netns", "pids", server_netns(test_cloud.ctx, server_id)], capture_output=True,
                            text=True, check=True)
    return [int(pid) for pid in listed.stdout.split()]


def assert_nothing_left(test_cloud: TestCloud, server_id: str, pids: list[int]) -> None:
    """No namespace, veth, folder or process (of ``pids``, the server's before its deletion) is left."""
    ctx = test_cloud.ctx
    assert server_netns(ctx, server_id) not in vm.list_netns()
    assert not [link for link in os.listdir("/sys/class/net") if link.startswith(server_link_prefix(ctx, server_id))]
    assert not server_folder(ctx, server_id).exists()
    assert pids, "the server had no process before its deletion"
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


# -- version discovery, errors, policy -------------------------------------------------------------


def test_version_documents_and_microversion_headers(test_cloud: TestCloud, member):
    root = requests.get(test_cloud.ctx.url("nova", "/"), timeout=10).json()
    assert [(v["id"], v["min_version"], v["version"]) for v in root["versions"]] == [
        ("v2.1", "2.1", f"{MAX_VERSION[0]}.{MAX_VERSION[1]}")]
    assert requests.get(test_cloud.ctx.url("nova", "/v2.1"), timeout=10).json()["version"]["status"] == "CURRENT"
    headers = {"X-Auth-Token": member.auth_token}
    url = test_cloud.ctx.url("nova", "/v2.1/flavors")
    latest = requests.get(url, headers={**headers, "OpenStack-API-Version": "compute latest"}, timeout=10)
    assert latest.headers["OpenStack-API-Version"] == "compute 2.96"
    legacy = requests.get(url, headers={**headers, "X-OpenStack-Nova-API-Version": "2.50"}, timeout=10)
    assert legacy.headers["X-OpenStack-Nova-API-Version"] == "2.50"
    assert "description" not in legacy.json()["flavors"][0]
    assert [zone.name for zone in member.compute.availability_zones()] == ["nova"]
    too_new = requests.get(url, headers={**headers, "OpenStack-API-Version": "compute 2.200"}, timeout=10)
    assert too_new.status_code == 406
    assert requests.get(url, timeout=10).status_code == 401
    missing = requests.get(test_cloud.ctx.url("nova", f"/v2.1/servers/{uuid.uuid4()}"), headers=headers, timeout=10)
    assert missing.status_code == 404
    assert set(missing.json()) == {"itemNotFound"} and missing.json()["itemNotFound"]["code"] == 404


def test_keypairs_belong_to_their_user(test_cloud: TestCloud, client_key):
    alice, bob = test_cloud.connect("alice"), test_cloud.connect("bob")
    name = f"alice-{uuid.uuid4().hex[:8]}"
    try:
        created = alice.compute.create_keypair(name=name, public_key=client_key[1])
        assert created.fingerprint.count(":") == 15
        assert name in [k.name for k in alice.compute.keypairs()]
        assert name not in [k.name for k in bob.compute.keypairs()]
        with pytest.raises(exceptions.NotFoundException):
            bob.compute.get_keypair(name)
        with pytest.raises(exceptions.ConflictException):
            alice.compute.create_keypair(name=name, public_key=client_key[1])
    finally:
        alice.compute.delete_keypair(name, ignore_missing=True)
        alice.close()
        bob.close()


def test_readers_cannot_create_servers_and_projects_see_only_their_own(test_cloud: TestCloud, member, keypair):
    carol, bob = test_cloud.connect("carol"), test_cloud.connect("bob")
    try:
        assert list(carol.compute.servers()) == []
        network = carol.network.find_network(TENANT_NETWORK, ignore_missing=False)
        with pytest.raises(exceptions.ForbiddenException, match="servers:create"):
            carol.compute.create_server(name="nope", image_id=carol.image.find_image(IMAGE_NAME).id,
                                        flavor_id=carol.compute.find_flavor("m1.small").id,
                                        networks=[{"uuid": network.id}])
        server, _ = boot(member, keypair, [{"uuid": network.id}])
        try:
            with pytest.raises(exceptions.NotFoundException):
                bob.compute.get_server(server.id)
            assert server.id not in [s.id for s in bob.compute.servers()]
        finally:
            delete_and_wait(member, server)
    finally:
        carol.close()
        bob.close()


def test_quota_refuses_a_server_that_does_not_fit(test_cloud: TestCloud, admin):
    alice = test_cloud.connect("alice")
    project = admin.identity.find_project("team-a", domain_id="default", ignore_missing=False)
    try:
        admin.compute.update_quota_set(project.id, cores=1)
        limits = alice.compute.get_limits().absolute
        assert (limits.total_cores, limits.total_cores_used) == (1, 0)
        network = alice.network.find_network(TENANT_NETWORK, ignore_missing=False)
        with pytest.raises(exceptions.ForbiddenException, match="Quota exceeded for cores"):
            alice.compute.create_server(name="too-big", image_id=alice.image.find_image(IMAGE_NAME).id,
                                        flavor_id=alice.compute.find_flavor("m1.medium").id,
                                        networks=[{"uuid": network.id}])
    finally:
        admin.compute.revert_quota_set(project.id)
    assert alice.compute.get_limits().absolute.total_cores == 20
    alice.close()


# -- servers -----------------------------------------------------------------------------------------


def test_server_on_a_neutron_port_is_logged_into_with_the_console_host_key(test_cloud: TestCloud, member, admin,
                                                                           keypair, client_key):
    network = member.network.find_network(TENANT_NETWORK, ignore_missing=False)
    port = member.network.create_port(network_id=network.id, name=f"test-{uuid.uuid4().hex[:8]}")
    try:
        server, seconds = boot(member, keypair, [{"port": port.id}])
        print(f"\nserver on a given port: ACTIVE {seconds:.2f}s after the create call")
        bound = member.network.get_port(port.id)
        assert (bound.device_id, bound.device_owner) == (server.id, "compute:nova")
        address = port.fixed_ips[0]["ip_address"]
        assert server.addresses[TENANT_NETWORK] == [{"version": 4, "addr": address, "OS-EXT-IPS:type": "fixed",
                                                     "OS-EXT-IPS-MAC:mac_addr": port.mac_address}]
        host_keys = wait_console_keys(member, server)
        with ssh(address, host_keys, client_key[0]) as client:
            assert run(client, "id -un").strip() == "root"
            assert address in run(client, "ip -4 -o addr show eth0")
            assert run(client, "cat /sys/class/net/eth0/address").strip() == port.mac_address
            run(client, "echo mine > /var/lib/cloudml-os/disk-check")
        assert (server_folder(test_cloud.ctx, server.id) / "disk" / "disk-check").read_text() == "mine\n"
        assert not Path("/var/lib/cloudml-os/disk-check").exists()
        wrong_key = generate_keypair()[1]
        with pytest.raises(paramiko.SSHException):
            ssh(address, [wrong_key], client_key[0])
        pids = node_pids(test_cloud, server.id)
        delete_and_wait(member, server)
        unbound = member.network.get_port(port.id)
        assert (unbound.device_id, unbound.device_owner) == ("", "")
        assert_nothing_left(test_cloud, server.id, pids)
    finally:
        member.network.delete_port(port, ignore_missing=True)


def test_two_servers_reach_each_other_on_any_port_and_leave_nothing_behind(test_cloud: TestCloud, member, keypair,
                                                                          client_key):
    network = member.network.find_network(TENANT_NETWORK, ignore_missing=False)
    group = member.network.create_security_group(name=f"test-{uuid.uuid4().hex[:8]}")
    servers = []
    try:
        for _ in range(2):
            server, seconds = boot(member, keypair, [{"uuid": network.id}], security_groups=[{"name": group.name}])
            print(f"\nserver on a network (Nova makes the port): ACTIVE {seconds:.2f}s after the create call")
            servers.append(server)
        (first, second) = servers
        listener_address, caller_address = fixed_address(second), fixed_address(first)
        with ssh(listener_address, wait_console_keys(member, second), client_key[0]) as listener, \
                ssh(caller_address, wait_console_keys(member, first), client_key[0]) as caller:
            port = 20000 + uuid.uuid4().int % 20000
            listen = ("python3 -c 'import socket,sys; s=socket.socket(); s.bind((\"0.0.0.0\", int(sys.argv[1]))); "
                      "s.listen(); c,a=s.accept(); print(a[0]); c.sendall(b\"hello\")' " f"{port}")
            _, listener_out, _ = listener.exec_command(listen, timeout=30)
            connect = ("python3 -c 'import socket,sys,time\nfor _ in range(50):\n    try:\n"
                       "        c=socket.create_connection((sys.argv[1], int(sys.argv[2])), 2); break\n"
                       "    except OSError: time.sleep(0.1)\nprint(c.recv(5).decode())' " f"{listener_address} {port}")
            assert run(caller, connect).strip() == "hello"
            assert listener_out.read().decode().strip() == caller_address
            run(caller, "setsid sleep 600 > /dev/null 2>&1 < /dev/null &")
        made_ports = list(member.network.ports(device_id=first.id))
        port_ids = [p.id for p in made_ports]
        assert len(port_ids) == 1
        assert made_ports[0].security_group_ids == [group.id]
        for server in servers:
            pids = node_pids(test_cloud, server.id)
            delete_and_wait(member, server)
            assert_nothing_left(test_cloud, server.id, pids)
        servers = []
        assert member.network.find_port(port_ids[0]) is None
    finally:
        for server in servers:
            delete_and_wait(member, server)
        member.network.delete_security_group(group)


def test_stop_kills_every_process_and_start_or_reboot_boot_the_same_disk_and_key(test_cloud: TestCloud, member, keypair,
                                                                        client_key):
    network = member.network.find_network(TENANT_NETWORK, ignore_missing=False)
    user_data = ("#cloud-config\nbootcmd:\n  - [sh, -c, 'cat /var/lib/cloudml-os/first >> /var/lib/cloudml-os/boots']\n"
                 "write_files:\n  - path: /var/lib/cloudml-os/first\n    content: boot\n"
                 "  - path: /root/outside\n    content: refused\nruncmd:\n  - [sh, -c, 'echo runcmd says hi']\n")
    server, _ = boot(member, keypair, [{"uuid": network.id}], user_data=base64.b64encode(user_data.encode()).decode())
    try:
        address, host_keys = fixed_address(server), wait_console_keys(member, server)
        console = member.compute.get_server_console_output(server)["output"]
        assert "runcmd says hi" in console
        assert "refusing to write '/root/outside'" in console
        with ssh(address, host_keys, client_key[0]) as client:
            assert run(client, "cat /var/lib/cloudml-os/first") == "boot"
            run(client, "setsid sleep 600 > /dev/null 2>&1 < /dev/null &")
            assert "sleep" in run(client, "ps -e -o comm")
        member.compute.stop_server(server)
        wait_status(member, server, "SHUTOFF")
        with pytest.raises((OSError, paramiko.SSHException)):
            ssh(address, host_keys, client_key[0])
        member.compute.start_server(server)
        wait_status(member, server, "ACTIVE")
        with ssh(address, host_keys, client_key[0]) as client:
            assert run(client, "cat /var/lib/cloudml-os/first") == "boot"
            assert "sleep" not in run(client, "ps -e -o comm")
            # bootcmd runs at every boot, before write_files at the first boot.
            assert run(client, "cat /var/lib/cloudml-os/boots") == "boot"
        member.compute.reboot_server(server, "HARD")
        assert member.compute.get_server(server.id).status == "HARD_REBOOT"
        wait_status(member, server, "ACTIVE")
        with ssh(address, host_keys, client_key[0]) as client:
            assert run(client, "cat /var/lib/cloudml-os/boots") == "bootboot"
        console = member.compute.get_server_console_output(server)["output"]
        assert console.count("-----BEGIN SSH HOST KEY KEYS-----") == 1
        assert console.count("runcmd says hi") == 1
        member.compute.set_server_metadata(server, role="chief", cluster="c1")
        member.compute.delete_server_metadata(server, ["cluster"])
        assert member.compute.get_server_metadata(server).metadata == {"role": "chief"}
        pids = node_pids(test_cloud, server.id)
    finally:
        delete_and_wait(member, server)
    assert_nothing_left(test_cloud, server.id, pids)


def test_anti_affinity_beyond_the_hosts_ends_in_error_with_a_fault(member, admin, keypair):
    network = member.network.find_network(TENANT_NETWORK, ignore_missing=False)
    image = member.image.find_image(IMAGE_NAME, ignore_missing=False)
    flavor = member.compute.find_flavor("m1.small", ignore_missing=False)
    group = member.compute.create_server_group(name=f"spread-{uuid.uuid4().hex[:8]}", policy="anti-affinity")
    servers = []
    try:
        for index in range(DEFAULT_HOSTS + 1):
            servers.append(member.compute.create_server(
                name=f"spread-{index}", image_id=image.id, flavor_id=flavor.id, key_name=keypair.name,
                networks=[{"uuid": network.id}], scheduler_hints={"group": group.id}))
        deadline = time.monotonic() + BOOT_TIMEOUT
        while any(s.status in (None, "BUILD") for s in servers) and time.monotonic() < deadline:
            time.sleep(0.2)
            servers = [member.compute.get_server(server.id) for server in servers]
        failed = [s for s in servers if s.status == "ERROR"]
        assert sorted(s.status for s in servers) == ["ACTIVE"] * DEFAULT_HOSTS + ["ERROR"]
        hosts = {admin.compute.get_server(s.id).compute_host for s in servers if s.status == "ACTIVE"}
        assert len(hosts) == DEFAULT_HOSTS
        assert failed[0].fault["code"] == 500
        assert failed[0].fault["message"].startswith("No valid host was found")
        assert failed[0].addresses == {}
    finally:
        for server in servers:
            member.compute.delete_server(server)
        for server in servers:
            member.compute.wait_for_delete(server, interval=0.2, wait=60)
        member.compute.delete_server_group(group)


# -- Heat ----------------------------------------------------------------------------------------------


def test_heat_stack_of_a_keypair_a_server_group_and_two_servers_on_ports(test_cloud: TestCloud, member, admin,
                                                                        client_key):
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    stack = member.orchestration.create_stack(
        name=name, template=CLUSTER_TEMPLATE, files={"node.yaml": NODE_TEMPLATE},
        parameters={"public_key": client_key[1], "image": IMAGE_NAME, "network": TENANT_NETWORK})
    try:
        stack = member.orchestration.wait_for_status(stack, "CREATE_COMPLETE", failures=["CREATE_FAILED"],
                                                     interval=1, wait=300)
        print(f"\nHeat stack of 2 servers: CREATE_COMPLETE {time.monotonic() - started:.1f}s after the create call")
        outputs = {o["output_key"]: o["output_value"] for o in member.orchestration.get_stack(stack.id).outputs}
        servers = [member.compute.get_server(server_id) for server_id in outputs["servers"]]
        assert [s.status for s in servers] == ["ACTIVE", "ACTIVE"]
        group = member.compute.get_server_group(outputs["group"])
        assert (group.policy, sorted(group.member_ids)) == ("soft-anti-affinity", sorted(outputs["servers"]))
        hosts = {admin.compute.get_server(s.id).compute_host for s in servers}
        assert len(hosts) == 2
        for index, (server, address) in enumerate(zip(servers, outputs["addresses"], strict=True)):
            with ssh(address, wait_console_keys(member, server), client_key[0]) as client:
                assert run(client, "cat /etc/cloudml-os/node.json") == f'{{"index": {index}}}'
            assert f"node {index} booted" in member.compute.get_server_console_output(server)["output"]
        pids = {server.id: node_pids(test_cloud, server.id) for server in servers}
    finally:
        started = time.monotonic()
        member.orchestration.delete_stack(stack)
        while (current := member.orchestration.find_stack(stack.id, ignore_missing=True)) is not None \
                and current.status != "DELETE_COMPLETE":
            assert current.status != "DELETE_FAILED", current.status_reason
            assert time.monotonic() - started < 300, f"stack still {current.status} after 300s"
            time.sleep(1)
        print(f"Heat stack of 2 servers: deleted {time.monotonic() - started:.1f}s after the delete call")
    for server_id in outputs["servers"]:
        assert_nothing_left(test_cloud, server_id, pids[server_id])
        with pytest.raises(exceptions.NotFoundException):
            member.compute.get_server(server_id)
    assert list(member.network.ports(device_id=outputs["servers"][0])) == []


# -- the node machinery alone ----------------------------------------------------------------------


def test_user_data_is_read_as_cloud_init_reads_it():
    mime = ("Content-Type: multipart/mixed; boundary=\"XX\"\nMIME-Version: 1.0\n\n--XX\n"
            "Content-Type: text/cloud-config\n\n#cloud-config\nruncmd:\n  - [echo, 'a b']\n"
            "ssh_authorized_keys: [ssh-ed25519 AAAA extra]\npackages: [x]\n--XX\n"
            "Content-Type: text/x-shellscript\n\n#!/bin/sh\necho part\n--XX--\n")
    parsed = vm.parse_user_data(mime.encode())
    assert parsed.runcmd == ["echo 'a b'"]
    assert parsed.authorized_keys == ["ssh-ed25519 AAAA extra"]
    assert parsed.scripts == ["#!/bin/sh\necho part"]
    assert parsed.warnings == ["the emulated Nova ignores cloud-config keys: packages"]
    assert vm.parse_user_data(b"plain text").warnings[0].startswith("Unhandled non-multipart")


def test_node_alone_boots_in_its_namespaces_and_dies_whole(test_cloud: TestCloud, member, client_key, tmp_path):
    network = member.network.find_network(TENANT_NETWORK, ignore_missing=False)
    port = member.network.create_port(network_id=network.id, name="node-machinery")
    address = port.fixed_ips[0]["ip_address"]
    short = uuid.uuid4().hex[:6]
    node = vm.Node(tmp_path / "node", netns=f"cmlos{test_cloud.ctx.instance}-t{short}",
                   link_prefix=f"cmv{test_cloud.ctx.instance}-t{short}", bridge=test_cloud.ctx.tenant_bridge,
                   hostname="machinery")
    user_data = vm.parse_user_data(b"#cloud-config\nruncmd:\n  - [sh, -c, 'sleep 600 &']\n  - echo done\n")
    interfaces = [vm.Interface(mac=port.mac_address, addresses=(f"{address}/24",),
                               gateway=test_cloud.ctx.tenant_gateway)]
    try:
        started = time.monotonic()
        node.plug(interfaces)
        node.prepare([client_key[1]], user_data)
        node.power_on(user_data, interfaces)
        node.wait_ready(address, 30)
        print(f"\nnode alone: sshd accepts TCP {time.monotonic() - started:.2f}s after plug")
        node.cloud_init_final(user_data, lambda: True)
        with ssh(address, console_host_keys(node.console_output()), client_key[0]) as client:
            assert run(client, "hostname").strip() == "machinery"
            assert run(client, "ps -e -o pid,comm").split()[2:4] == ["1", "sshd"]
            assert run(client, "ip route show default").startswith(f"default via {test_cloud.ctx.tenant_gateway}")
        init_pid = node.init_pid()
        assert init_pid is not None
        assert subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout.split()
    finally:
        node.destroy()
        member.network.delete_port(port)
    assert node.netns not in vm.list_netns()
    assert not Path(f"/proc/{init_pid}").exists()

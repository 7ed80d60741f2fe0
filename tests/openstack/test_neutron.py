"""Real Neutron in the test cloud serves what the OpenStack driver, Heat and the emulated Nova ask of it.

Everything goes through openstacksdk as the platform's service account (``cloudml-os`` on ``cloudml``),
except what only an operator or Nova does (external network, port binding fields).
"""

from __future__ import annotations

import ipaddress
import uuid

import pytest
from openstack.exceptions import ForbiddenException

from tests.testcloud.neutron import TENANT_NETWORK, TENANT_SUBNET
from tests.testcloud.services import connect

pytestmark = pytest.mark.integration


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def tenant_network(service_account):
    network = service_account.network.find_network(TENANT_NETWORK, ignore_missing=False)
    subnet = service_account.network.find_subnet(TENANT_SUBNET, network_id=network.id, ignore_missing=False)
    return network, subnet


def test_platform_account_sees_the_shared_tenant_network(test_cloud, service_account, tenant_network):
    network, subnet = tenant_network
    assert network.is_shared
    assert network.name in [listed.name for listed in service_account.network.networks()]
    assert subnet.cidr == test_cloud.tenant_cidr
    assert subnet.gateway_ip == test_cloud.tenant_gateway


def test_member_creates_a_private_network_of_the_project_type(service_account):
    network = service_account.network.create_network(name=_name("net"))
    try:
        subnet = service_account.network.create_subnet(network_id=network.id, ip_version=4, cidr="192.168.77.0/24")
        assert service_account.network.get_network(network.id).subnet_ids == [subnet.id]
    finally:
        service_account.network.delete_network(network)


def test_port_gets_a_fixed_ip_from_the_tenant_subnet(test_cloud, service_account, tenant_network):
    network, subnet = tenant_network
    port = service_account.network.create_port(network_id=network.id, name=_name("port"))
    try:
        [fixed_ip] = port.fixed_ips
        assert fixed_ip["subnet_id"] == subnet.id
        address = ipaddress.ip_address(fixed_ip["ip_address"])
        assert address in ipaddress.ip_network(test_cloud.tenant_cidr)
        assert str(address) != test_cloud.tenant_gateway
        assert service_account.network.get_port(port.id).status == "DOWN"
    finally:
        service_account.network.delete_port(port)
    assert service_account.network.find_port(port.id) is None


def test_nova_service_user_plugs_and_unplugs_a_platform_port(test_cloud, service_account, tenant_network):
    """The emulated Nova (user nova, admin on project service) records which server owns a port.

    While a server owns it, the port's own project may not delete it (Neutron's default policy): deleting
    the server must unplug pre-made ports, as real Nova does, before Heat deletes them.
    """
    network, _ = tenant_network
    port = service_account.network.create_port(network_id=network.id, name=_name("port"))
    nova = connect(test_cloud, "nova", test_cloud.service_password, "service")
    try:
        server_id = str(uuid.uuid4())
        nova.network.update_port(port, device_id=server_id, device_owner="compute:nova")
        seen = service_account.network.get_port(port.id)
        assert (seen.device_id, seen.device_owner) == (server_id, "compute:nova")
        assert [found.id for found in nova.network.ports(device_id=server_id)] == [port.id]
        with pytest.raises(ForbiddenException):
            service_account.network.delete_port(port)
        nova.network.update_port(port, device_id="", device_owner="")
    finally:
        nova.close()
        service_account.network.delete_port(port)
    assert service_account.network.find_port(port.id) is None


def test_security_group_admits_ssh_from_a_cidr_and_a_port_range_from_its_members(service_account):
    group = service_account.network.create_security_group(name=_name("sg"), description="cluster nodes")
    try:
        ssh = service_account.network.create_security_group_rule(
            security_group_id=group.id, direction="ingress", ethertype="IPv4", protocol="tcp",
            port_range_min=22, port_range_max=22, remote_ip_prefix="192.0.2.0/24")
        peers = service_account.network.create_security_group_rule(
            security_group_id=group.id, direction="ingress", ethertype="IPv4", protocol="tcp",
            port_range_min=2222, port_range_max=2300, remote_group_id=group.id)
        rules = {rule.id: rule for rule in service_account.network.security_group_rules(security_group_id=group.id)}
        assert rules[ssh.id].remote_ip_prefix == "192.0.2.0/24"
        assert (rules[peers.id].port_range_min, rules[peers.id].port_range_max) == (2222, 2300)
        assert rules[peers.id].remote_group_id == group.id
    finally:
        service_account.network.delete_security_group(group)
    assert service_account.network.find_security_group(group.id) is None


def test_network_quota_details_show_limit_and_usage(test_cloud, service_account, tenant_network):
    network, _ = tenant_network
    project_id = service_account.current_project_id
    before = service_account.network.get_quota(project_id, details=True)
    port = service_account.network.create_port(network_id=network.id, name=_name("port"))
    try:
        after = service_account.network.get_quota(project_id, details=True)
        assert after.ports["used"] == before.ports["used"] + 1
        assert after.ports["limit"] == before.ports["limit"] > 0
        assert {"limit", "used", "reserved"} <= set(after.security_groups)
    finally:
        service_account.network.delete_port(port)


def test_admin_sets_a_per_project_network_quota(test_cloud, service_account):
    admin = test_cloud.connect("admin")
    project_id = service_account.current_project_id
    try:
        admin.network.update_quota(project_id, security_groups=17)
        assert service_account.network.get_quota(project_id, details=True).security_groups["limit"] == 17
    finally:
        admin.network.delete_quota(project_id)
        admin.close()


STACK_TEMPLATE = {
    "heat_template_version": "2018-08-31",
    "parameters": {"network": {"type": "string"}},
    "resources": {
        "group": {
            "type": "OS::Neutron::SecurityGroup",
            "properties": {"rules": [
                {"protocol": "tcp", "port_range_min": 22, "port_range_max": 22, "remote_ip_prefix": "192.0.2.0/24"},
                {"protocol": "tcp", "port_range_min": 2222, "port_range_max": 2300, "remote_mode": "remote_group_id"},
            ]},
        },
        "port": {
            "type": "OS::Neutron::Port",
            "properties": {"network": {"get_param": "network"}, "security_groups": [{"get_resource": "group"}]},
        },
    },
    "outputs": {
        "address": {"value": {"get_attr": ["port", "fixed_ips", 0, "ip_address"]}},
        "port": {"value": {"get_resource": "port"}},
        "group": {"value": {"get_resource": "group"}},
    },
}


def test_heat_stack_makes_and_deletes_a_security_group_and_a_port(test_cloud, service_account, tenant_network):
    network, _ = tenant_network
    stack = service_account.orchestration.create_stack(name=_name("stack"), template=STACK_TEMPLATE,
                                                parameters={"network": network.id}, timeout_mins=5)
    try:
        stack = service_account.orchestration.wait_for_status(stack, "CREATE_COMPLETE", failures=["CREATE_FAILED"],
                                                       interval=1, wait=180)
        outputs = {output["output_key"]: output["output_value"] for output in stack.outputs}
        assert ipaddress.ip_address(outputs["address"]) in ipaddress.ip_network(test_cloud.tenant_cidr)
        assert service_account.network.get_port(outputs["port"]).security_group_ids == [outputs["group"]]
        remotes = {(rule.port_range_min, rule.remote_ip_prefix, rule.remote_group_id)
                   for rule in service_account.network.security_group_rules(security_group_id=outputs["group"],
                                                                      direction="ingress")}
        assert remotes == {(22, "192.0.2.0/24", None), (2222, None, outputs["group"])}
    finally:
        service_account.orchestration.delete_stack(stack)
        service_account.orchestration.wait_for_delete(stack, interval=1, wait=180)
    assert service_account.network.find_port(outputs["port"]) is None
    assert service_account.network.find_security_group(outputs["group"]) is None

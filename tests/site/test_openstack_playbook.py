"""openstack.yml for real against a test cloud (tests/testcloud: Keystone, Glance, Neutron, Swift, the
emulated Nova): everything it makes is there afterwards, read back with openstacksdk, and a second run
changes nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.site.ansible_runner import Ansible
from tests.testcloud.cloud import TestCloud, start_test_cloud

PROJECT = "cml-site"
SERVICE_USER = "cml-site-svc"
ENDPOINT = "https://cml-site.test/"
EXTERNAL_NETWORK = "cml-site-public"


@pytest.fixture(scope="module")
def site_cloud(tmp_path_factory: pytest.TempPathFactory, site_instance: int) -> Iterator[TestCloud]:
    cloud = start_test_cloud(tmp_path_factory.mktemp("site-cloud"), instance=site_instance)
    try:
        yield cloud
    finally:
        cloud.stop()


def _make_external_network(cloud: TestCloud) -> None:
    """The provider network a site already has before cloudml-os: the router's gateway goes there."""
    conn = cloud.connect("admin")
    try:
        network = conn.network.create_network(name=EXTERNAL_NETWORK, is_router_external=True,
                                              provider_network_type="flat", provider_physical_network="public")
        conn.network.create_subnet(network_id=network.id, ip_version=4, cidr="192.0.2.0/24", enable_dhcp=False)
    finally:
        conn.close()


def test_openstack_playbook_makes_every_resource_and_a_second_run_changes_nothing(
        site_cloud: TestCloud, ansible: Ansible, tmp_path: Path):
    _make_external_network(site_cloud)
    image_file = tmp_path / "cloudml-os-node.raw"
    image_file.write_bytes(os.urandom(256 * 1024))
    service_password = "svc/p@ss%" + os.urandom(6).hex()
    site_vars = tmp_path / "site.json"
    site_vars.write_text(json.dumps({
        "cloudml_os_openstack_admin_cloud": "admin",
        "cloudml_os_openstack_project": PROJECT,
        "cloudml_os_openstack_service_user": SERVICE_USER,
        "cloudml_os_openstack_service_password": service_password,
        "cloudml_os_openstack_endpoint_url": ENDPOINT,
        "cloudml_os_openstack_gpu_alias": "a100",
        "cloudml_os_openstack_flavors": [
            {"name": "site.m1", "vcpus": 2, "ram": 4096, "disk": 20},
            {"name": "site.g1", "vcpus": 8, "ram": 32768, "disk": 80,
             "extra_specs": {"pci_passthrough:alias": "{{ cloudml_os_openstack_gpu_alias }}:2"}}],
        "cloudml_os_openstack_images": [{"name": "cml-site-node", "file": str(image_file), "disk_format": "raw"}],
        "cloudml_os_openstack_network": "cml-site-net",
        "cloudml_os_openstack_subnet": "cml-site-subnet",
        "cloudml_os_openstack_subnet_cidr": "10.77.0.0/16",
        "cloudml_os_openstack_router": "cml-site-router",
        "cloudml_os_openstack_external_network": EXTERNAL_NETWORK,
        "cloudml_os_openstack_container_projects": ["team-a"],
    }))
    arguments = ("-e", f"@{site_vars}")
    environment = {"OS_CLIENT_CONFIG_FILE": str(site_cloud.clouds_yaml)}

    first = ansible.playbook("openstack.yml", *arguments, env=environment)
    assert first.returncode == 0, first.tail()
    assert first.recap["localhost"]["changed"] > 0, first.recap
    assert service_password not in first.output

    second = ansible.playbook("openstack.yml", *arguments, env=environment)
    assert second.returncode == 0, second.tail()
    assert second.recap["localhost"]["changed"] == 0, second.tail(150)
    assert service_password not in second.output

    _assert_resources(site_cloud, service_password, image_file)


def _assert_resources(cloud: TestCloud, service_password: str, image_file: Path) -> None:
    conn = cloud.connect("admin")
    try:
        project = conn.identity.find_project(PROJECT, domain_id="default", ignore_missing=False)
        flavors = {flavor.name: flavor for flavor in conn.compute.flavors(details=True)}
        assert (flavors["site.m1"].vcpus, flavors["site.m1"].ram, flavors["site.m1"].disk) == (2, 4096, 20)
        assert conn.compute.fetch_flavor_extra_specs(flavors["site.g1"]).extra_specs == {
            "pci_passthrough:alias": "a100:2"}

        image = conn.image.find_image("cml-site-node", ignore_missing=False)
        assert image.status == "active" and image.visibility == "public" and image.size == image_file.stat().st_size

        network = conn.network.find_network("cml-site-net", project_id=project.id, ignore_missing=False)
        subnet = conn.network.find_subnet("cml-site-subnet", network_id=network.id, ignore_missing=False)
        assert subnet.cidr == "10.77.0.0/16"
        router = conn.network.find_router("cml-site-router", project_id=project.id, ignore_missing=False)
        external = conn.network.find_network(EXTERNAL_NETWORK, ignore_missing=False)
        assert router.external_gateway_info["network_id"] == external.id
        interfaces = list(conn.network.ports(device_id=router.id, network_id=network.id))
        assert [ip["subnet_id"] for port in interfaces for ip in port.fixed_ips] == [subnet.id]

        group = conn.network.find_security_group("cloudml-os-control", project_id=project.id, ignore_missing=False)
        rules = {(rule.protocol, rule.port_range_min, rule.remote_ip_prefix)
                 for rule in conn.network.security_group_rules(security_group_id=group.id, direction="ingress")}
        assert rules == {("tcp", 443, "0.0.0.0/0"), ("tcp", 22, "10.0.0.0/8")}

        user = conn.identity.find_user(SERVICE_USER, domain_id="default", ignore_missing=False)
        service_project = conn.identity.find_project("service", domain_id="default", ignore_missing=False)
        granted = {(conn.identity.get_role(a.role["id"]).name, a.scope["project"]["id"])
                   for a in conn.identity.role_assignments(user_id=user.id)}
        assert granted == {("member", project.id), ("service", service_project.id)}

        service = conn.identity.find_service("cloudml-os", ignore_missing=False)
        assert service.type == "ml"
        endpoints = [(e.interface, e.url, e.region_id) for e in conn.identity.endpoints(service_id=service.id)]
        assert endpoints == [("public", ENDPOINT, "RegionOne")]
    finally:
        conn.close()

    # The service account itself can log in and sees its container.
    from openstack.connection import Connection

    auth = {**cloud.credentials("admin")["auth"], "username": SERVICE_USER, "password": service_password,
            "project_name": PROJECT}
    service_conn = Connection(auth=auth, region_name="RegionOne", interface="public", identity_api_version="3")
    try:
        assert "cloudml-os-team-a" in [container.name for container in service_conn.object_store.containers()]
    finally:
        service_conn.close()

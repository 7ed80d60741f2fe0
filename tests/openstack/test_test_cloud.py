"""The test cloud itself: its catalog, its users, a real Heat stack and a real Glance upload.

These prove the parts the OpenStack driver depends on before any driver test runs: when one fails,
the cloud is broken, not the platform.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import yaml
from openstack import exceptions

from tests.testcloud.base import CloudContext, free_instance
from tests.testcloud.cloud import FLAVORS, IMAGE_NAME, USERS, TestCloud, start_test_cloud
from tests.testcloud.services import upload_image

pytestmark = pytest.mark.integration

RANDOM_STRINGS = """
heat_template_version: 2021-04-16
parameters:
  length: {type: number, default: 12}
resources:
  group:
    type: OS::Heat::ResourceGroup
    properties:
      count: 3
      resource_def:
        type: OS::Heat::RandomString
        properties: {length: {get_param: length}}
outputs:
  values:
    value: {get_attr: [group, value]}
"""
# A handle makes a user in Heat's stack-user domain, as servers with software deployments do.
WAIT_HANDLE = """
heat_template_version: 2021-04-16
resources:
  handle: {type: OS::Heat::WaitConditionHandle}
outputs:
  endpoint:
    value: {get_attr: [handle, endpoint]}
"""


def test_catalog_lists_every_service_at_its_public_endpoint(test_cloud: TestCloud):
    conn = test_cloud.connect("cloudml-os")
    catalog = {entry["type"]: entry["endpoints"] for entry in conn.service_catalog}
    project_id = conn.current_project_id
    expected = {
        "identity": test_cloud.ctx.url("keystone", "/v3"),
        "orchestration": test_cloud.ctx.url("heat", f"/v1/{project_id}"),
        "image": test_cloud.ctx.url("glance"),
        "network": test_cloud.ctx.url("neutron"),
        "object-store": test_cloud.ctx.url("swift", f"/v1/AUTH_{project_id}"),
        "compute": test_cloud.ctx.url("nova", "/v2.1"),
    }
    for service_type, url in expected.items():
        assert [(e["interface"], e["region"], e["url"]) for e in catalog[service_type]] == [
            ("public", "RegionOne", url)], service_type


def test_clouds_yaml_names_every_user_with_its_project(test_cloud: TestCloud):
    clouds = yaml.safe_load(test_cloud.clouds_yaml.read_text())["clouds"]
    assert set(clouds) == set(USERS)
    for name, (username, project) in USERS.items():
        conn = test_cloud.connect(name)
        assert conn.current_project["name"] == project
        assert clouds[name]["auth"]["username"] == username
        conn.close()


def test_roles_of_the_api_auth_users(test_cloud: TestCloud):
    admin = test_cloud.connect("admin")
    expected = {("cloudml-os", "cloudml"): {"member"}, ("cloudml-os", "service"): {"service"},
                ("alice", "team-a"): {"member"},
                ("carol", "team-a"): {"reader"}, ("bob", "team-b"): {"member"}}
    for (username, project_name), roles in expected.items():
        user = admin.identity.find_user(username, domain_id="default", ignore_missing=False)
        project = admin.identity.find_project(project_name, domain_id="default", ignore_missing=False)
        direct = {admin.identity.get_role(a.role["id"]).name for a in
                  admin.identity.role_assignments(user_id=user.id, scope_project_id=project.id)}
        assert direct == roles, username


def test_resource_group_stack_is_created_read_and_deleted(test_cloud: TestCloud):
    conn = test_cloud.connect("cloudml-os")
    stack = conn.orchestration.create_stack(name=f"random-{uuid.uuid4().hex[:8]}", template=RANDOM_STRINGS,
                                            parameters={"length": 16})
    try:
        stack = conn.orchestration.wait_for_status(stack, "CREATE_COMPLETE", failures=["CREATE_FAILED"],
                                                   interval=0.5, wait=120)
        outputs = {output["output_key"]: output["output_value"]
                   for output in conn.orchestration.get_stack(stack.id).outputs}
        assert len(outputs["values"]) == 3
        assert all(isinstance(value, str) and len(value) == 16 for value in outputs["values"])
        assert len(set(outputs["values"])) == 3
    finally:
        conn.orchestration.delete_stack(stack)
        conn.orchestration.wait_for_delete(stack, interval=0.5, wait=120)
    assert conn.orchestration.find_stack(stack.name, ignore_missing=True) is None


def test_wait_condition_handle_gets_a_user_in_the_heat_domain_until_the_stack_goes(test_cloud: TestCloud):
    conn, admin = test_cloud.connect("cloudml-os"), test_cloud.connect("admin")
    heat_domain = admin.identity.find_domain("heat", ignore_missing=False)
    stack = conn.orchestration.create_stack(name=f"handle-{uuid.uuid4().hex[:8]}", template=WAIT_HANDLE)
    try:
        stack = conn.orchestration.wait_for_status(stack, "CREATE_COMPLETE", failures=["CREATE_FAILED"],
                                                   interval=0.5, wait=120)
        endpoint = conn.orchestration.get_stack(stack.id).outputs[0]["output_value"]
        # Scoped to the handle user's project in the heat domain, not to the stack owner's.
        assert endpoint.startswith(test_cloud.ctx.url("heat", "/v1/"))
        assert endpoint.endswith(f"/stacks/{stack.name}/{stack.id}/resources/handle/signal")
        assert any(user.name.startswith(stack.name) for user in admin.identity.users(domain_id=heat_domain.id))
    finally:
        conn.orchestration.delete_stack(stack)
        conn.orchestration.wait_for_delete(stack, interval=0.5, wait=120)
    assert not any(user.name.startswith(stack.name) for user in admin.identity.users(domain_id=heat_domain.id))


def test_member_uploads_downloads_and_deletes_a_private_image(test_cloud: TestCloud):
    conn = test_cloud.connect("cloudml-os")
    data = uuid.uuid4().bytes * 4096
    image_id = upload_image(conn, f"scratch-{uuid.uuid4().hex[:8]}", data, visibility="private")
    try:
        image = conn.image.get_image(image_id)
        assert (image.status, image.size, image.visibility) == ("active", len(data), "private")
        assert conn.image.download_image(image).content == data
        other_project = test_cloud.connect("alice")
        with pytest.raises(exceptions.NotFoundException):
            other_project.image.get_image(image_id)
    finally:
        conn.image.delete_image(image_id)


def test_shared_resources_exist_for_the_platform(test_cloud: TestCloud):
    conn = test_cloud.connect("cloudml-os")
    image = conn.image.find_image(IMAGE_NAME, ignore_missing=False)
    assert (image.status, image.visibility, image.disk_format) == ("active", "public", "raw")
    flavors = {flavor.name: flavor for flavor in conn.compute.flavors(details=True)}
    for name, (vcpus, ram, disk, extra_specs) in FLAVORS.items():
        assert (flavors[name].vcpus, flavors[name].ram, flavors[name].disk) == (vcpus, ram, disk), name
        assert conn.compute.fetch_flavor_extra_specs(flavors[name]).extra_specs == extra_specs, name
    network = conn.network.find_network("cloudml-net", ignore_missing=False)
    subnet = conn.network.find_subnet("cloudml-subnet", network_id=network.id, ignore_missing=False)
    assert (subnet.cidr, subnet.gateway_ip) == (test_cloud.ctx.tenant_cidr, test_cloud.ctx.tenant_gateway)


def test_a_start_that_fails_half_way_leaves_no_process(test_cloud: TestCloud, tmp_path, monkeypatch):
    # Its own instance, beside the session's cloud; every process it starts inherits the marker.
    instance = free_instance(test_cloud.ctx.instance + 10)
    marker = f"failed-start-{uuid.uuid4().hex}"
    monkeypatch.setenv("CLOUDML_OS_TESTCLOUD_RUN", marker)
    heat_port = CloudContext(root=tmp_path, venv=test_cloud.ctx.venv, instance=instance).port("heat")
    with socket.create_server(("127.0.0.1", heat_port)):  # heat-api cannot bind: the start fails after Keystone
        with pytest.raises(RuntimeError, match=f":{heat_port}/"):
            start_test_cloud(tmp_path / "cloud", instance=instance)
    assert _processes_with(marker) == []


def _processes_with(marker: str) -> list[str]:
    """Command lines of this machine's processes whose environment holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return found

"""The openstack driver's parts that need no cloud: reading pinned host keys from a cloud-init console log,
and the installation's tag on stacks (with a fake of openstacksdk's connection that records the calls)."""

from types import SimpleNamespace

import pytest

from cloudml_os.cloud.base import ClusterSpec, DriverError, NodeSpec
from cloudml_os.cloud.openstack import OpenStackDriver, parse_console_host_keys
from cloudml_os.config import load_settings

CONSOLE = """\
[    2.1] cloud-init[412]: Cloud-init v. 24.1 running 'modules:final'
-----BEGIN SSH HOST KEY FINGERPRINTS-----
256 SHA256:7l3iCBZbH0zYF6g0v6kq7o4u0mJ7lHqL3o6l2s1kA0s root@node (ED25519)
-----END SSH HOST KEY FINGERPRINTS-----
-----BEGIN SSH HOST KEY KEYS-----
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0W9F8r6QpY0lq3l5gkqS7b4m0Z0jJcYyP1d7d8x9o root@node
ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBB= root@node
-----END SSH HOST KEY KEYS-----
"""


def test_host_keys_come_from_the_keys_block_only():
    assert parse_console_host_keys(CONSOLE) == (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0W9F8r6QpY0lq3l5gkqS7b4m0Z0jJcYyP1d7d8x9o",
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBB=",
    )


def test_a_console_without_the_block_gives_no_keys():
    assert parse_console_host_keys("login: \nssh-ed25519 AAAAforged root@x\n") == ()


def test_a_block_printed_twice_gives_each_key_once():
    assert len(parse_console_host_keys(CONSOLE + CONSOLE)) == 2


def test_lines_that_are_not_keys_are_ignored():
    console = "-----BEGIN SSH HOST KEY KEYS-----\n#comment\nssh-dss AAAA root\n-----END SSH HOST KEY KEYS-----\n"
    assert parse_console_host_keys(console) == ()


def test_keys_behind_newer_cloud_inits_log_prefix_are_found():
    console = ("<14>Nov 27 20:01:02 ec2: -----BEGIN SSH HOST KEY KEYS-----\n"
               "<14>Nov 27 20:01:02 ec2: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKEY root@node\n"
               "<14>Nov 27 20:01:02 ec2: -----END SSH HOST KEY KEYS-----\n")
    assert parse_console_host_keys(console) == ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKEY",)


# ---- the installation's tag: every stack carries it, and the driver sees and touches only its own ----------

class FakeOrchestration:
    """Heat as openstacksdk's orchestration proxy shows it: ``stacks`` by name, every call recorded."""

    def __init__(self, stacks=()):
        self.stacks_by_name = {stack.name: stack for stack in stacks}
        self.calls: list[tuple[str, object]] = []

    def stacks(self, **query):
        self.calls.append(("stacks", query))
        return list(self.stacks_by_name.values())  # as a Heat that ignored the filter: the driver checks too

    def find_stack(self, name, ignore_missing=True):
        self.calls.append(("find_stack", name))
        return self.stacks_by_name.get(name)

    def get_stack(self, stack):
        return stack

    def post(self, path, json, raise_exc):
        self.calls.append(("post", json))
        return SimpleNamespace(status_code=201)

    def delete_stack(self, stack, ignore_missing=True):
        self.calls.append(("delete_stack", stack.name))
        self.stacks_by_name.pop(stack.name, None)


def stack(name: str, *tags: str, status: str = "CREATE_COMPLETE"):
    return SimpleNamespace(name=name, id=f"id-{name}", status=status, tags=["cloudml-os", *tags], outputs=[])


def openstack_driver(tmp_path, orchestration: FakeOrchestration, installation_id: str = "ours") -> OpenStackDriver:
    settings = load_settings(environ={}, data_dir=tmp_path, driver="openstack", installation_id=installation_id)
    connection = SimpleNamespace(
        orchestration=orchestration,
        compute=SimpleNamespace(find_flavor=lambda name, ignore_missing=True: SimpleNamespace(vcpus=1, ram=512),
                                get_limits=lambda: SimpleNamespace(absolute=SimpleNamespace(
                                    instances=None, instances_used=None, total_cores=None, total_cores_used=None,
                                    total_ram=None, total_ram_used=None))),
        network=SimpleNamespace(get_quota=lambda project, details=True: SimpleNamespace()),
        current_project_id="service",
    )
    return OpenStackDriver(settings, connection=connection, sleep=lambda seconds: None)


SPEC = ClusterSpec("cml-train-5-p-job", (NodeSpec("chief-0", "chief", 0, "m1.small"),), "ssh-ed25519 AAAA test",
                   labels={"project": "p", "job": "5"})


def test_a_new_stack_carries_the_installations_tag(tmp_path):
    orchestration = FakeOrchestration()
    with pytest.raises(DriverError, match="does not show it"):  # the fake Heat keeps nothing
        openstack_driver(tmp_path, orchestration).create_cluster(SPEC)
    [body] = [payload for call, payload in orchestration.calls if call == "post"]
    assert body["tags"].split(",") == ["cloudml-os", "cloudml-os-installation-ours", "job=5", "project=p"]


def test_listing_asks_heat_for_the_installations_stacks_and_keeps_only_those(tmp_path):
    orchestration = FakeOrchestration([
        stack("cml-train-1-p-a", "cloudml-os-installation-ours"),
        stack("cml-train-1-q-b", "cloudml-os-installation-theirs"),
        stack("cml-train-2-p-c"),  # made before installations had ids
        stack("cml-train-3-p-d", "cloudml-os-installation-ours", status="DELETE_COMPLETE"),
    ])
    assert openstack_driver(tmp_path, orchestration).list_clusters() == ["cml-train-1-p-a"]
    assert orchestration.calls == [("stacks", {"tags": ["cloudml-os", "cloudml-os-installation-ours"]})]


def test_another_installations_stack_of_the_same_name_is_neither_taken_over_nor_deleted(tmp_path):
    orchestration = FakeOrchestration([stack(SPEC.name, "cloudml-os-installation-theirs")])
    driver = openstack_driver(tmp_path, orchestration)
    with pytest.raises(DriverError, match="another cloudml-os installation"):
        driver.create_cluster(SPEC)
    with pytest.raises(DriverError, match="another cloudml-os installation"):
        driver.resize_cluster(SPEC)
    driver.delete_cluster(SPEC.name)
    assert [call for call, _ in orchestration.calls if call in ("post", "delete_stack")] == []
    assert SPEC.name in orchestration.stacks_by_name


def test_a_stack_from_before_installation_ids_is_still_deleted_by_name(tmp_path):
    orchestration = FakeOrchestration([stack(SPEC.name)])
    openstack_driver(tmp_path, orchestration).delete_cluster(SPEC.name)
    assert ("delete_stack", SPEC.name) in orchestration.calls

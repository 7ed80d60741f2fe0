"""The VM nodes' view of the store (cloud/swift_mount.py, and the openstack driver's credential per cluster):
the access rules, the first-boot script, and when the driver makes and deletes the credential (a fake
connection records the calls; tests/openstack/test_store_on_vms.py does it for real)."""

import base64
import subprocess
from types import SimpleNamespace

import pytest
from openstack import exceptions

from cloudml_os.cloud import swift_mount
from cloudml_os.cloud.base import ClusterSpec, DriverError, NodeSpec
from cloudml_os.cloud.openstack import OpenStackDriver
from cloudml_os.config import load_settings
from tests.unit.test_openstack_driver import FakeOrchestration, stack

SECRET = "s3cr3t-'$(touch /tmp/pwned)'"
ENDPOINT = "https://swift.example.org:8080/v1/AUTH_0123"


def test_the_rules_admit_reads_of_the_projects_container_and_its_objects_only():
    rules = swift_mount.access_rules(swift_mount.account_path(ENDPOINT + "/"), "cloudml-os-team-a")
    assert rules == [
        {"service": "object-store", "method": "GET", "path": "/v1/AUTH_0123/cloudml-os-team-a"},
        {"service": "object-store", "method": "GET", "path": "/v1/AUTH_0123/cloudml-os-team-a/**"},
        {"service": "object-store", "method": "HEAD", "path": "/v1/AUTH_0123/cloudml-os-team-a"},
        {"service": "object-store", "method": "HEAD", "path": "/v1/AUTH_0123/cloudml-os-team-a/**"},
    ]


def test_nodes_reach_swift_at_the_catalogs_endpoint_unless_told_otherwise():
    assert swift_mount.storage_url(ENDPOINT, "", "0123") == ENDPOINT
    assert swift_mount.storage_url(ENDPOINT, "http://10.0.0.1:8080/v1/AUTH_{project_id}", "0123") == \
        "http://10.0.0.1:8080/v1/AUTH_0123"


def test_the_script_writes_the_config_privately_and_mounts_read_only(tmp_path):
    config = swift_mount.rclone_config("http://k/v3", ENDPOINT, "cred-id", SECRET)
    script = swift_mount.mount_script("team-a", "cloudml-os-team-a", config)
    assert SECRET not in script  # base64 in the script: no quoting of the secret to get wrong
    subprocess.run(["sh", "-n", "-c", script], check=True)
    assert "umask 077" in script and "rclone mount store:cloudml-os-team-a /store/team-a" in script
    assert "--read-only" in script and "--allow-other" in script
    encoded = script.split("printf %s ", 1)[1].split()[0].strip("'")
    assert base64.b64decode(encoded).decode() == config
    assert f"application_credential_secret = {SECRET}\n" in config
    assert base64.b64decode(swift_mount.user_data_parameter(script)).decode() == script


class FakeIdentity:
    def __init__(self, conflicts=0):
        self.credentials: dict[str, SimpleNamespace] = {}
        self.calls: list[tuple] = []
        self.conflicts = conflicts

    def application_credentials(self, user):
        return list(self.credentials.values())

    def create_application_credential(self, user, name, **attrs):
        self.calls.append(("create", name, attrs["access_rules"]))
        if self.conflicts:
            self.conflicts -= 1
            raise exceptions.ConflictException("409: Duplicate entry")
        credential = SimpleNamespace(id=f"id-{len(self.calls)}", name=name, secret=SECRET)
        self.credentials[credential.id] = credential
        return credential

    def delete_application_credential(self, user, credential, ignore_missing=True):
        self.calls.append(("delete", self.credentials.pop(credential).name))


def driver(tmp_path, orchestration, identity, **settings):
    settings = load_settings(environ={}, data_dir=tmp_path, driver="openstack", artifacts="swift",
                             installation_id="ours", **settings)
    connection = SimpleNamespace(
        orchestration=orchestration, identity=identity, current_user_id="u", current_project_id="0123",
        object_store=SimpleNamespace(get_endpoint=lambda: ENDPOINT),
        session=SimpleNamespace(get_endpoint=lambda **kw: "https://keystone.example.org/v3"),
        compute=SimpleNamespace(find_flavor=lambda name, ignore_missing=True: SimpleNamespace(vcpus=1, ram=512),
                                get_limits=lambda: SimpleNamespace(absolute=SimpleNamespace(
                                    instances=None, instances_used=None, total_cores=None, total_cores_used=None,
                                    total_ram=None, total_ram_used=None))),
        network=SimpleNamespace(get_quota=lambda project, details=True: SimpleNamespace()),
    )
    return OpenStackDriver(settings, connection=connection, sleep=lambda seconds: None)


SPEC = ClusterSpec("cml-train-5-p-job", (NodeSpec("chief-0", "chief", 0, "m1.small"),), "ssh-ed25519 AAAA test",
                   labels={"project": "p", "job": "5"})
NAME = "cloudml-os-ours-cml-train-5-p-job"


def test_a_new_stack_gets_a_fresh_credential_of_its_own_in_its_hidden_parameter(tmp_path):
    orchestration, identity = FakeOrchestration(), FakeIdentity()
    identity.credentials["old"] = SimpleNamespace(id="old", name=NAME, secret="lost")  # a dead delivery's
    with pytest.raises(DriverError, match="does not show it"):  # the fake Heat keeps nothing
        driver(tmp_path, orchestration, identity).create_cluster(SPEC)
    # The dead delivery's credential deleted, a new one made, and deleted with the stack that failed.
    assert [call[:2] for call in identity.calls] == [("delete", NAME), ("create", NAME), ("delete", NAME)]
    assert identity.credentials == {}
    assert identity.calls[1][2][0]["path"] == "/v1/AUTH_0123/cloudml-os-p"
    [body] = [payload for call, payload in orchestration.calls if call == "post"]
    script = base64.b64decode(body["parameters"]["store_mount"]).decode()
    assert "rclone mount store:cloudml-os-p /store/p" in script
    assert SECRET not in str(body["tags"]) and SECRET not in str(body["template"])


def test_a_conflict_from_keystones_shared_access_rules_is_tried_again(tmp_path):
    orchestration, identity = FakeOrchestration(), FakeIdentity(conflicts=2)
    with pytest.raises(DriverError, match="does not show it"):
        driver(tmp_path, orchestration, identity).create_cluster(SPEC)
    assert [call[0] for call in identity.calls].count("create") == 3
    assert identity.credentials == {}  # the one made goes with the stack that failed


def test_an_existing_stack_makes_no_second_credential(tmp_path):
    orchestration, identity = FakeOrchestration([stack(SPEC.name, "cloudml-os-installation-ours")]), FakeIdentity()
    with pytest.raises(DriverError, match="no node"):  # the fake stack has no outputs
        driver(tmp_path, orchestration, identity).create_cluster(SPEC)
    assert not [call for call in identity.calls if call[0] == "create"]


def test_deleting_a_cluster_deletes_its_credential_also_without_a_stack(tmp_path):
    identity = FakeIdentity()
    identity.credentials["a"] = SimpleNamespace(id="a", name=NAME, secret="x")
    identity.credentials["b"] = SimpleNamespace(id="b", name="cloudml-os-ours-cml-train-6-p-other", secret="y")
    driver(tmp_path, FakeOrchestration(), identity).delete_cluster(SPEC.name)
    assert identity.calls == [("delete", NAME)]


def test_without_the_setting_or_swift_nodes_get_no_store(tmp_path):
    assert OpenStackDriver.store_mount(load_settings(environ={}, data_dir=tmp_path, artifacts="swift")) == "/store"
    assert OpenStackDriver.store_mount(load_settings(environ={}, data_dir=tmp_path, artifacts="swift",
                                                     openstack_store_mount=False)) is None
    assert OpenStackDriver.store_mount(load_settings(environ={}, data_dir=tmp_path)) is None

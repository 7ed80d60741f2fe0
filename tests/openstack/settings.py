"""The platform's settings for OpenStack mode against the test cloud (driver, Swift, Keystone)."""

from __future__ import annotations

import os
from pathlib import Path

from cloudml_os.config import Settings, load_settings
from tests.testcloud.cloud import TestCloud


def openstack_environment(test_cloud: TestCloud) -> dict[str, str]:
    """Setting overrides (``start_platform`` keywords) that point a platform at the test cloud.

    Also names the cloud's clouds.yaml in ``OS_CLIENT_CONFIG_FILE`` for this process and its children,
    as an operator's environment would, and gives the service account Keystone's ``service`` role so
    keystonemiddleware may validate callers' tokens with it.
    """
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(test_cloud.clouds_yaml)
    _grant_service_role(test_cloud)
    ctx = test_cloud.ctx
    runtimes = load_settings(environ={}).runtimes_dir
    return {
        "driver": "openstack", "artifacts": "swift", "auth": "keystone",
        "openstack_cloud": "cloudml-os", "openstack_network": "cloudml-net", "openstack_image": "cloudml-os-node",
        "openstack_ssh_user": "root", "openstack_control_plane_cidr": f"{ctx.tenant_gateway}/32",
        "openstack_runtime_root": str(runtimes), "openstack_workdir": "/var/lib/cloudml-os",
        "openstack_stack_timeout": "300", "openstack_console_timeout": "60",
        "swift_segment_size": str(1024 * 1024),
    }


def openstack_settings(test_cloud: TestCloud, data_dir: Path) -> Settings:
    return load_settings(environ={}, data_dir=data_dir, **openstack_environment(test_cloud))


def _grant_service_role(test_cloud: TestCloud) -> None:
    admin = test_cloud.connect("admin")
    role = admin.identity.find_role("service") or admin.identity.create_role(name="service")
    project = admin.identity.find_project("cloudml")
    user = admin.identity.find_user("cloudml-os")
    admin.identity.assign_project_role_to_user(project, user, role)

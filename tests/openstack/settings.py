"""The platform's settings for OpenStack mode against the test cloud (driver, Swift, Keystone)."""

from __future__ import annotations

import os
from pathlib import Path

from cloudml_os.config import Settings, load_settings
from tests.testcloud.cloud import TestCloud, node_url


def openstack_environment(test_cloud: TestCloud) -> dict[str, str]:
    """Setting overrides (``start_platform`` keywords) that point a platform at the test cloud.

    Also names the cloud's clouds.yaml in ``OS_CLIENT_CONFIG_FILE`` for this process and its children,
    as an operator's environment would.
    """
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(test_cloud.clouds_yaml)
    ctx = test_cloud.ctx
    runtimes = load_settings(environ={}).runtimes_dir
    return {
        "driver": "openstack", "artifacts": "swift", "auth": "keystone",
        "openstack_cloud": "cloudml-os", "openstack_auth_cloud": "cloudml-os-auth",
        "openstack_network": "cloudml-net", "openstack_image": "cloudml-os-node",
        "openstack_ssh_user": "root", "openstack_control_plane_cidr": f"{ctx.tenant_gateway}/32",
        "openstack_runtime_root": str(runtimes), "openstack_workdir": "/var/lib/cloudml-os",
        "openstack_stack_timeout": "300", "openstack_console_timeout": "60",
        "swift_segment_size": str(1024 * 1024),
        # Nodes reach Keystone and Swift through the tenant network's gateway (tests/testcloud/cloud.py).
        "openstack_node_identity_url": node_url(ctx, "keystone", "/v3"),
        "openstack_node_object_store_url": node_url(ctx, "swift", "/v1/AUTH_{project_id}"),
    }


def openstack_settings(test_cloud: TestCloud, data_dir: Path) -> Settings:
    return load_settings(environ={}, data_dir=data_dir, **openstack_environment(test_cloud))


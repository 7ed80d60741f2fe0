"""Real Neutron (ML2, no agents) for the test cloud: networks, subnets, ports, security groups, routers, quotas.

Only the API runs: there is no L2/L3/DHCP agent here, so ports stay unbound and DOWN (the emulated Nova
plugs its servers into the tenant bridge itself) and routers and floating IPs exist only in the database.
Neutron's migrations need ALTER of constraints, which SQLite lacks, so its database lives in MariaDB.
This module must not register Keystone users or endpoints (``services.register_cloud`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.testcloud.base import REGION, CloudContext
from tests.testcloud.services import ServiceStartError, authtoken_options, run_setup, serve_wsgi, write_config

if TYPE_CHECKING:
    from openstack.connection import Connection

TENANT_NETWORK = "cloudml-net"
TENANT_SUBNET = "cloudml-subnet"

# Run by the services venv's python: an empty Neutron database, made over the same URL Neutron uses.
_RECREATE_DATABASE = """
import sys
import pymysql
host, port, user, database = sys.argv[1:]
connection = pymysql.connect(host=host, port=int(port), user=user)
with connection.cursor() as cursor:
    cursor.execute(f"DROP DATABASE IF EXISTS `{database}`")
    cursor.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
"""


def write_neutron_config(ctx: CloudContext) -> list[Path]:
    """Write neutron.conf and ml2_conf.ini under ``ctx.root/neutron``; return them in load order."""
    home = ctx.root / "neutron"
    neutron_conf = write_config(home / "neutron.conf", {
        "DEFAULT": {
            "core_plugin": "ml2",
            # The L3 plugin without an L3 agent: routers, gateways and floating IPs live in the database only.
            "service_plugins": "router",
            "auth_strategy": "keystone",
            "allow_overlapping_ips": "true",
            "transport_url": ctx.rabbit_url(),
            "api_paste_config": ctx.venv / "etc" / "neutron" / "api-paste.ini",
            "state_path": home / "state",
            "use_stderr": "true",
            # No real Nova to tell about port events and no DHCP agent to tell about networks.
            "notify_nova_on_port_status_changes": "false",
            "notify_nova_on_port_data_changes": "false",
            "dhcp_agent_notification": "false",
        },
        "database": {"connection": ctx.mariadb_url("neutron")},
        "keystone_authtoken": authtoken_options(ctx, "neutron"),
        "nova": {"auth_type": "password", "auth_url": ctx.auth_url, "username": "nova",
                 "password": ctx.service_password, "project_name": "service", "user_domain_id": "default",
                 "project_domain_id": "default", "region_name": REGION, "endpoint_type": "public"},
        "oslo_concurrency": {"lock_path": home / "locks"},
        "oslo_messaging_notifications": {"driver": "noop"},
    })
    ml2_conf = write_config(home / "ml2_conf.ini", {
        "ml2": {
            "type_drivers": "flat,vxlan",
            # vxlan needs no physical network, so a plain member can create a network of its own.
            "project_network_types": "vxlan",
            # No mechanism driver: ports are made and stay unbound, as nothing here could wire them.
            "mechanism_drivers": "",
            "extension_drivers": "port_security",
        },
        "ml2_type_flat": {"flat_networks": "*"},
        "ml2_type_vxlan": {"vni_ranges": "1:1000"},
        # The security-group API exists only while enabled; noop because no agent enforces rules here.
        "securitygroup": {"enable_security_group": "true", "firewall_driver": "noop"},
    })
    return [neutron_conf, ml2_conf]


def recreate_neutron_database(ctx: CloudContext) -> None:
    """Drop and create this cloud's Neutron database in MariaDB, so that every start migrates an empty one."""
    url = urlsplit(ctx.mariadb_url("neutron"))
    run_setup(ctx, "neutron-db-manage", [ctx.bin("python"), "-c", _RECREATE_DATABASE, url.hostname or "127.0.0.1",
                                         str(url.port or 3306), url.username or "root", url.path.lstrip("/")])


def start_neutron(ctx: CloudContext) -> None:
    """Configure Neutron, migrate a fresh MariaDB database and serve the API at ``ctx.url("neutron")``.

    Keystone must answer with user ``neutron`` registered (``services.register_cloud``); MariaDB must run.
    """
    config_files = write_neutron_config(ctx)
    config_args = [arg for path in config_files for arg in ("--config-file", str(path))]
    recreate_neutron_database(ctx)
    run_setup(ctx, "neutron-db-manage", [ctx.bin("neutron-db-manage"), *config_args, "upgrade", "heads"])
    # Neutron 29 has no ``neutron-server``: the API is this WSGI app; the RPC server and periodic workers
    # are separate programs that only agents and OVN need, so neither runs here.
    process = serve_wsgi(ctx, "neutron", "neutron.wsgi.api:application", argv=config_args)
    # The worker loads the ML2 plugin before it answers anything, which takes a while on two busy cores.
    ctx.wait_http(ctx.url("neutron", "/"), process, timeout=180)
    if process.poll() is not None:
        raise ServiceStartError(f"neutron-api exited with {process.returncode}; see {ctx.root / 'logs'}")


def create_tenant_network(ctx: CloudContext, admin: Connection) -> str:
    """As the operator would: make the shared network ``cloudml-net`` and its subnet in project ``cloudml``.

    A flat provider network (physical network ``tenant``, the bridge ``ctx.tenant_bridge``) without DHCP:
    no agent serves it, the emulated Nova configures each server's address from its port. Returns the
    network's id; an existing ``cloudml-net`` is kept.

    :param admin: a connection with role admin (creating a provider network needs it).
    """
    project = admin.identity.find_project("cloudml", domain_id="default", ignore_missing=False)
    network = admin.network.find_network(TENANT_NETWORK, project_id=project.id)
    if network is None:
        network = admin.network.create_network(name=TENANT_NETWORK, project_id=project.id, shared=True,
                                               provider_network_type="flat", provider_physical_network="tenant")
    if admin.network.find_subnet(TENANT_SUBNET, network_id=network.id) is None:
        admin.network.create_subnet(name=TENANT_SUBNET, network_id=network.id, project_id=project.id,
                                    ip_version=4, cidr=ctx.tenant_cidr, gateway_ip=ctx.tenant_gateway,
                                    enable_dhcp=False)
    return network.id

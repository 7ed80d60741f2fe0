"""A whole OpenStack test cloud on this machine: start it, hand out credentials, stop it.

:func:`start_test_cloud` brings up Keystone, Glance, Heat, Neutron, Swift and the emulated Nova (each
from its own module), then makes what the platform expects an operator to have made: the tenant
network, the node image and the flavors. It writes a ``clouds.yaml`` so that anything using
openstacksdk (the platform, a shell) can reach the cloud by name. Nothing outlives
:meth:`TestCloud.stop`, which also runs when the start fails half way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.testcloud import services
from tests.testcloud.base import REGION, CloudContext

if TYPE_CHECKING:
    from openstack.connection import Connection

# Cloud names in clouds.yaml -> (user, project). Every user but admin has ctx.service_password.
USERS = {
    "admin": ("admin", "admin"),
    "cloudml-os": ("cloudml-os", "cloudml"),
    "cloudml-os-auth": ("cloudml-os", "service"),  # validates callers' Keystone tokens (role "service")
    "alice": ("alice", "team-a"),
    "bob": ("bob", "team-b"),
    "carol": ("carol", "team-a"),
}
IMAGE_NAME = "cloudml-os-node"
# A raw disk image only needs to exist: the emulated Nova boots sshd nodes, not the image.
IMAGE_DATA = bytes(64 * 1024)
# name -> (vCPUs, RAM MiB, disk GB, extra specs)
FLAVORS: dict[str, tuple[int, int, int, dict[str, str]]] = {
    "m1.small": (1, 2048, 10, {}),
    "m1.medium": (2, 4096, 20, {}),
    "m1.large": (4, 8192, 40, {}),
    "m1.xlarge": (8, 16384, 80, {}),
    "g1.medium": (8, 32768, 80, {"pci_passthrough:alias": "gpu:1"}),
    "g1.large": (32, 131072, 160, {"pci_passthrough:alias": "gpu:4"}),
}


@dataclasses.dataclass
class TestCloud:
    """A running test cloud.

    :param ctx: its context (folder, ports, processes).
    :param clouds_yaml: openstacksdk's clouds.yaml naming every cloud in :data:`USERS`.
    :param timings: seconds each start-up step took (``keystone``, ``register``, ``heat``, … ``total``).
    """

    __test__ = False  # not a pytest test class, despite the name

    ctx: CloudContext
    clouds_yaml: Path
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def credentials(self, name: str) -> dict[str, Any]:
        """The clouds.yaml entry of ``name`` (``auth``, ``region_name``, ``interface``, ``identity_api_version``)."""
        return cloud_entry(self.ctx, name)

    def connect(self, name: str) -> Connection:
        """An openstacksdk connection as cloud ``name`` (see :data:`USERS`)."""
        from openstack.connection import Connection

        return Connection(**self.credentials(name))

    def stop(self) -> None:
        """Stop every process of the cloud and drop its MariaDB databases (its folder and logs stay)."""
        self.ctx.stop()
        services.drop_databases(self.ctx)

    def __getattr__(self, name: str) -> Any:
        """The context's addresses and passwords too (``url``, ``auth_url``, ``tenant_cidr``…), so code written
        for a :class:`CloudContext` takes a TestCloud."""
        if name.startswith("__") or name == "ctx":
            raise AttributeError(name)
        return getattr(self.ctx, name)


def cloud_entry(ctx: CloudContext, name: str) -> dict[str, Any]:
    """One clouds.yaml entry; ``name`` is a key of :data:`USERS`."""
    username, project = USERS[name]
    password = ctx.admin_password if name == "admin" else ctx.service_password
    return {
        "auth": {"auth_url": ctx.auth_url, "username": username, "password": password, "project_name": project,
                 "user_domain_name": "Default", "project_domain_name": "Default"},
        "region_name": REGION,
        "interface": "public",
        "identity_api_version": "3",
    }


def start_test_cloud(root: Path, instance: int = 0) -> TestCloud:
    """Start a complete test cloud under ``root`` with the ports, subnet and vhost of ``instance``.

    :raises Exception: whatever failed; every process started so far is stopped first.
    """
    from tests.testcloud.neutron import start_neutron
    from tests.testcloud.nova import start_nova
    from tests.testcloud.swift import start_swift

    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    ctx = CloudContext(root=root, venv=services.ensure_services_venv(), instance=instance)
    cloud = TestCloud(ctx=ctx, clouds_yaml=root / "clouds.yaml")
    timings = cloud.timings
    ctx.reserve_ports()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            # Databases of Heat and Glance need no Keystone: created while Keystone starts.
            databases = [pool.submit(_timed, timings, name, step, ctx) for name, step in
                         (("heat-db", services.configure_heat), ("glance-db", services.configure_glance))]
            _timed(timings, "keystone", services.start_keystone, ctx)
            _timed(timings, "register", services.register_cloud, ctx)
            for future in databases:
                future.result()
            steps = {"heat": services.start_heat, "glance": services.start_glance, "neutron": start_neutron,
                     "swift": start_swift, "nova": start_nova}
            for future in [pool.submit(_timed, timings, name, step, ctx) for name, step in steps.items()]:
                future.result()
        _timed(timings, "node-access", start_node_access, ctx)
        _timed(timings, "resources", create_shared_resources, cloud)
        cloud.clouds_yaml.write_text(yaml.safe_dump({"clouds": {name: cloud_entry(ctx, name) for name in USERS}}))
    except BaseException:
        cloud.stop()
        raise
    timings["total"] = round(time.monotonic() - started, 1)
    return cloud


# Services the emulated servers reach, as VMs reach a cloud's public endpoints (their nodes mount Swift).
NODE_SERVICES = ("keystone", "swift")


def node_url(ctx: CloudContext, service: str, path: str = "") -> str:
    """``service``'s URL as the emulated servers reach it: on the tenant network's gateway (this host)."""
    return f"http://{ctx.tenant_gateway}:{ctx.port(service)}{path}"


def start_node_access(ctx: CloudContext) -> None:
    """Forward the gateway's ports of :data:`NODE_SERVICES` to the services, which listen on ``ctx.host`` only.

    A server's 127.0.0.1 is its own (its network namespace), so the catalog's endpoints are out of its reach;
    socat (one process per service, a child per connection) carries its connections to them. Needs the bridge
    that Nova's start makes.
    """
    for service in NODE_SERVICES:
        port = ctx.port(service)
        ctx.spawn(f"node-access-{service}", ["socat", f"TCP-LISTEN:{port},bind={ctx.tenant_gateway},reuseaddr,fork",
                                             f"TCP:{ctx.host}:{port}"])
    for service in NODE_SERVICES:
        deadline = time.monotonic() + 10
        while not _accepts(ctx.tenant_gateway, ctx.port(service)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"socat did not listen on {ctx.tenant_gateway}:{ctx.port(service)}")
            time.sleep(0.05)


def _accepts(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def create_shared_resources(cloud: TestCloud) -> None:
    """What the site's operator makes once: the node image, the flavors, the tenant network of project cloudml."""
    from tests.testcloud.neutron import create_tenant_network

    conn = cloud.connect("admin")
    try:
        services.upload_image(conn, IMAGE_NAME, IMAGE_DATA)
        for name, (vcpus, ram, disk, extra_specs) in FLAVORS.items():
            flavor = conn.compute.create_flavor(name=name, vcpus=vcpus, ram=ram, disk=disk, is_public=True)
            if extra_specs:
                conn.compute.create_flavor_extra_specs(flavor, extra_specs)
        create_tenant_network(cloud.ctx, conn)
    finally:
        conn.close()


def _timed(timings: dict[str, float], name: str, step: Callable[..., object], *args: object) -> None:
    started = time.monotonic()
    step(*args)
    timings[name] = round(time.monotonic() - started, 1)

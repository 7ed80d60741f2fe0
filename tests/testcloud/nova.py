"""An emulated Nova: the compute API v2.1 (microversions 2.1-2.96), whose servers are real sshd "VMs" (vm.py).

Nova is the one service of the test cloud that cannot run here (no hypervisor), so this module speaks its
API faithfully enough for Heat's own resource plugins (through python-novaclient) and openstacksdk's
compute proxy, unmodified: version documents, flavors and extra specs, per-user keypairs, server groups
with their policies (scheduled over a few emulated compute hosts), servers with ports from the real
Neutron, metadata, tags, console output, reboot/stop/start, limits and quota sets, availability zones.
Tokens are checked by keystonemiddleware's auth_token as in real Nova; Neutron and Glance are called with
openstacksdk as user ``nova``. Errors have Nova's bodies (``{"itemNotFound": {"code": 404, ...}}``).

State lives in memory (and each server's folder under ``ROOT/nova/servers``): a restarted emulator starts
empty, after killing what a crashed run of the same instance left behind. Run it as root, through
:func:`start_nova`; it is the platform virtualenv's python running ``-m tests.testcloud.nova``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import datetime
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from tests.testcloud import vm
from tests.testcloud.base import REGION, CloudContext

LOG = logging.getLogger("cloudml-os.nova")
REPO_ROOT = Path(__file__).resolve().parents[2]
PASSWORD_ENVIRONMENT = "CMLOS_TESTCLOUD_SERVICE_PASSWORD"
MIN_VERSION = (2, 1)
MAX_VERSION = (2, 96)
AVAILABILITY_ZONE = "nova"
DEFAULT_HOSTS = 8
DEFAULT_QUOTA = {"instances": 10, "cores": 20, "ram": 51200, "key_pairs": 100, "metadata_items": 128,
                 "server_groups": 10, "server_group_members": 10}
# Quota fields shown before 2.57 and 2.36 (and still accepted by PUT there), with Nova's defaults.
_QUOTA_BEFORE_2_57 = {"injected_file_content_bytes": 10240, "injected_file_path_bytes": 255, "injected_files": 5}
_QUOTA_BEFORE_2_36 = {"fixed_ips": -1, "floating_ips": 10, "security_group_rules": 20, "security_groups": 10}
_FAULT_NAMES = {400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound", 405: "badMethod",
                409: "conflictingRequest", 413: "overLimit", 415: "badMediaType", 429: "overLimit",
                501: "notImplemented", 503: "serviceUnavailable"}
_SERVER_KEYS = {"name", "imageRef", "flavorRef", "adminPass", "metadata", "networks", "OS-DCF:diskConfig",
                "accessIPv4", "accessIPv6", "availability_zone", "block_device_mapping", "block_device_mapping_v2",
                "config_drive", "key_name", "min_count", "max_count", "return_reservation_id", "security_groups",
                "user_data"}
# Server create keys and the microversion that added them, or removed them.
_SERVER_KEYS_ADDED = {"description": (2, 19), "tags": (2, 52), "trusted_image_certificates": (2, 63),
                      "host": (2, 74), "hypervisor_hostname": (2, 74), "hostname": (2, 90)}
_SERVER_KEYS_REMOVED = {"personality": (2, 57)}
_KEY_TYPES = ("ssh-rsa", "ssh-dss", "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
              "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
_REBOOT_TASKS = {"SOFT": "reboot_started", "HARD": "reboot_started_hard"}
_PROGRESS_STATUSES = {"ACTIVE", "BUILD", "REBUILD", "RESIZE", "VERIFY_RESIZE", "MIGRATING"}


class Fault(Exception):
    """An API error, answered with Nova's body ``{"<faultName>": {"code": N, "message": ...}}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- state -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Flavor:
    id: str
    name: str
    vcpus: int
    ram: int
    disk: int
    ephemeral: int = 0
    swap: int = 0
    rxtx_factor: float = 1.0
    is_public: bool = True
    description: str | None = None
    extra_specs: dict[str, str] = dataclasses.field(default_factory=dict)
    projects: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Keypair:
    id: int
    name: str
    user_id: str
    public_key: str
    fingerprint: str
    type: str
    created_at: str


@dataclasses.dataclass
class ServerGroup:
    id: str
    name: str
    policy: str
    rules: dict[str, Any]
    project_id: str
    user_id: str
    members: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class AttachedPort:
    """A Neutron port plugged into a server, as Nova caches its network info."""

    id: str
    network_id: str
    network_name: str
    mac: str
    fixed_ips: list[dict[str, str]]
    addresses: list[str]  # CIDR form, for the server's NIC
    gateway: str | None
    created_by_nova: bool
    state: str = "DOWN"

    def interface(self) -> vm.Interface:
        return vm.Interface(mac=self.mac, addresses=tuple(self.addresses), gateway=self.gateway)


@dataclasses.dataclass
class Server:
    id: str
    name: str
    project_id: str
    user_id: str
    flavor: Flavor
    image_id: str
    key_name: str | None
    key_data: str | None
    metadata: dict[str, str]
    security_groups: list[str]
    requested_networks: list[dict[str, str]]
    user_data: str | None
    group_id: str | None
    reservation_id: str
    launch_index: int
    hostname: str
    created: datetime.datetime
    description: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    config_drive: str = ""
    vm_state: str = "building"
    task_state: str | None = "scheduling"
    power_state: int = 0
    host: str | None = None
    updated: datetime.datetime | None = None
    launched_at: datetime.datetime | None = None
    fault: dict[str, Any] | None = None
    ports: list[AttachedPort] = dataclasses.field(default_factory=list)
    node: vm.Node | None = None
    deleted: bool = False
    # Held by whatever changes the server's node (boot, reboot, stop, start, delete), one at a time.
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def status(self) -> str:
        if self.vm_state == "building":
            return "BUILD"
        if self.vm_state == "active":
            if self.task_state == "reboot_started":
                return "REBOOT"
            if self.task_state == "reboot_started_hard":
                return "HARD_REBOOT"
            return "ACTIVE"
        return {"stopped": "SHUTOFF", "error": "ERROR", "deleted": "DELETED"}.get(self.vm_state, "UNKNOWN")

    def touch(self) -> None:
        self.updated = _now()


@dataclasses.dataclass
class Caller:
    """Who is calling, from the headers keystonemiddleware set."""

    user_id: str
    project_id: str
    roles: set[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


class Neighbours:
    """Neutron and Glance, seen by Nova's own service user (openstacksdk, public endpoints)."""

    def __init__(self, ctx: CloudContext) -> None:
        self._ctx = ctx
        self._connection = None
        self._lock = threading.Lock()

    def _conn(self):
        from openstack.connection import Connection

        if self._connection is None:
            self._connection = Connection(
                auth={"auth_url": self._ctx.auth_url, "username": "nova", "password": self._ctx.service_password,
                      "project_name": "service", "user_domain_id": "default", "project_domain_id": "default"},
                region_name=REGION, interface="public", identity_api_version="3")
        return self._connection

    def call(self, action: Callable[[Any], Any]) -> Any:
        """Run ``action(connection)`` with the one shared connection (one call at a time)."""
        with self._lock:
            return action(self._conn())

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


class Compute:
    """The emulated cloud's compute state and the work of its "nova-compute" (booting, powering, deleting).

    :param ctx: the test cloud this Nova belongs to (bridge, gateway, folders).
    :param neighbours: Neutron and Glance.
    :param hosts: how many compute hosts to emulate (server group policies are scheduled over them).
    :param boot_timeout: seconds a server's sshd may take to accept connections before the server is ERROR.
    """

    def __init__(self, ctx: CloudContext, neighbours: Neighbours, *, hosts: int = DEFAULT_HOSTS,
                 boot_timeout: float = 60.0) -> None:
        self.ctx = ctx
        self.neighbours = neighbours
        self.hosts = [f"cmlos{ctx.instance}-compute-{index}" for index in range(hosts)]
        self.boot_timeout = boot_timeout
        self.lock = threading.RLock()
        self.flavors: dict[str, Flavor] = {}
        self.keypairs: dict[tuple[str, str], Keypair] = {}
        self.groups: dict[str, ServerGroup] = {}
        self.servers: dict[str, Server] = {}
        self.quotas: dict[str, dict[str, int]] = {}
        self._keypair_ids = itertools.count(1)
        self.folder = server_folder(ctx, "")
        self.netns_prefix = server_netns(ctx, "")
        self.link_prefix = server_link_prefix(ctx, "")

    # -- host setup ---------------------------------------------------------------------------

    def setup_host(self) -> None:
        """Clean what a crashed run left; make the bridge and the mount points (no flavors: an operator makes them)."""
        removed = vm.remove_leftovers(self.netns_prefix, self.link_prefix)
        if removed:
            LOG.warning("removed leftovers of an earlier run: %s", ", ".join(removed))
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        vm.ensure_mount_points()
        network = ipaddress.ip_network(self.ctx.tenant_cidr)
        vm.ensure_bridge(self.ctx.tenant_bridge, f"{self.ctx.tenant_gateway}/{network.prefixlen}")

    def shutdown(self) -> None:
        """Power every server off and remove its network namespace, the bridge and the servers' folders."""
        with self.lock:
            servers = list(self.servers.values())
        for server in servers:
            server.deleted = True
            if server.node is not None:
                try:
                    server.node.destroy()
                except Exception:
                    LOG.exception("could not destroy server %s", server.id)
        vm.remove_leftovers(self.netns_prefix, self.link_prefix)
        vm.remove_bridge(self.ctx.tenant_bridge)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.neighbours.close()

    def next_keypair_id(self) -> int:
        """Nova's keypairs have integer ids (shown at GET /os-keypairs/NAME)."""
        return next(self._keypair_ids)

    # -- quotas -------------------------------------------------------------------------------

    def quota(self, project_id: str) -> dict[str, int]:
        return {**DEFAULT_QUOTA, **self.quotas.get(project_id, {})}

    def usage(self, project_id: str) -> dict[str, int]:
        with self.lock:
            servers = [s for s in self.servers.values() if s.project_id == project_id]
            return {"instances": len(servers), "cores": sum(s.flavor.vcpus for s in servers),
                    "ram": sum(s.flavor.ram for s in servers),
                    "server_groups": sum(1 for grp in self.groups.values() if grp.project_id == project_id),
                    "key_pairs": 0, "metadata_items": 0, "server_group_members": 0}

    # -- background work ----------------------------------------------------------------------

    def run(self, name: str, work: Callable[[], None]) -> None:
        """Run ``work`` in a thread of its own, as nova-compute runs each instance's operation."""
        threading.Thread(target=work, name=name, daemon=True).start()

    def boot(self, server: Server) -> None:
        """Schedule, plug ports, boot the node; ACTIVE once sshd accepts TCP; then cloud-init's final stage."""
        with server.lock:
            if server.deleted:
                return
            try:
                server.host = self._schedule(server)
                server.task_state = "networking"
                server.touch()
                server.ports = self._allocate_ports(server)
                server.task_state = "spawning"
                server.touch()
                node = self._node(server)
                server.node = node
                user_data = vm.parse_user_data(_decode_user_data(server.user_data))
                interfaces = [port.interface() for port in server.ports]
                node.plug(interfaces)
                node.prepare([server.key_data] if server.key_data else [], user_data)
                self._power_on(server, user_data, interfaces)
                server.launched_at = _now()
            except Exception as exc:
                self._fail(server, exc, "Build of instance {id} aborted: {error}")
                self._release(server)
                return
        self._final_stage(server, user_data)

    def _power_on(self, server: Server, user_data: vm.UserData, interfaces: list[vm.Interface]) -> None:
        node = server.node
        assert node is not None
        node.power_on(user_data, interfaces)
        node.wait_ready(self._ssh_address(server), self.boot_timeout)
        server.vm_state, server.task_state, server.power_state, server.fault = "active", None, 1, None
        server.touch()

    def _final_stage(self, server: Server, user_data: vm.UserData) -> None:
        node = server.node
        if node is None:
            return
        try:
            node.cloud_init_final(user_data, lambda: not server.deleted and node.init_pid() is not None)
        except Exception:
            LOG.exception("cloud-init's final stage failed on server %s", server.id)

    def power_cycle(self, server: Server, action: str) -> None:
        """reboot (SOFT/HARD), stop or start a server; the API has already set its task state."""
        with server.lock:
            if server.deleted or server.node is None:
                return
            node = server.node
            user_data = vm.parse_user_data(_decode_user_data(server.user_data))
            try:
                if action in ("stop", "SOFT", "HARD"):
                    node.console_note(f"{'reboot' if action != 'stop' else 'power off'} requested by the API")
                    node.power_off()
                    server.power_state = 4
                if action == "stop":
                    server.vm_state, server.task_state = "stopped", None
                    server.touch()
                    return
                self._power_on(server, user_data, [port.interface() for port in server.ports])
            except Exception as exc:
                self._fail(server, exc, "Could not {action} instance {id}: {error}", action=action)
                return
        self._final_stage(server, user_data)

    def delete(self, server: Server) -> None:
        """Power off, unplug, release the ports (unbind, or delete those Nova made), then forget the server."""
        with server.lock:
            server.deleted = True
            try:
                if server.node is not None:
                    server.node.destroy()
                self._release(server)
            except Exception as exc:
                self._fail(server, exc, "Could not delete instance {id}: {error}")
                server.deleted = False
                return
            with self.lock:
                self.servers.pop(server.id, None)
                group = self.groups.get(server.group_id or "")
                if group is not None and server.id in group.members:
                    group.members.remove(server.id)

    def _fail(self, server: Server, exc: Exception, template: str, **fields: str) -> None:
        LOG.error("server %s: %s", server.id, exc, exc_info=not isinstance(exc, vm.BootError | NoValidHost))
        if server.node is not None:
            try:
                server.node.console_note(f"the hypervisor stops this server: {exc}")
                server.node.power_off()
            except Exception:
                LOG.exception("could not power off server %s", server.id)
        server.vm_state, server.task_state, server.power_state = "error", None, 0
        message = str(exc) if isinstance(exc, NoValidHost) else template.format(id=server.id, error=exc, **fields)
        server.fault = {"code": 500, "created": _iso(_now()), "message": message[:255],
                        "details": "".join(traceback.format_exception(exc))[-4000:]}
        server.touch()

    # -- scheduling and networking ------------------------------------------------------------

    def _schedule(self, server: Server) -> str:
        """Pick an emulated host as Nova's filters and weighers would for the server's group policy."""
        with self.lock:
            load = {host: 0 for host in self.hosts}
            for other in self.servers.values():
                if other.host in load and other.id != server.id:
                    load[other.host] += 1
            group = self.groups.get(server.group_id or "")
            if group is None:
                return min(self.hosts, key=lambda host: (load[host], host))
            member_hosts = [self.servers[m].host for m in group.members
                            if m != server.id and m in self.servers and self.servers[m].host]
            per_host = {host: member_hosts.count(host) for host in self.hosts}
            candidates = list(self.hosts)
            if group.policy == "affinity" and member_hosts:
                candidates = [member_hosts[0]]
            elif group.policy == "anti-affinity":
                limit = int(group.rules.get("max_server_per_host", 1))
                candidates = [host for host in self.hosts if per_host[host] < limit]
            if not candidates:
                raise NoValidHost("No valid host was found. There are not enough hosts available.")
            if group.policy == "soft-affinity":
                return min(candidates, key=lambda host: (-per_host[host], load[host], host))
            return min(candidates, key=lambda host: (per_host[host], load[host], host))

    def _allocate_ports(self, server: Server) -> list[AttachedPort]:
        ports: list[AttachedPort] = []
        try:
            for requested in server.requested_networks:
                ports.append(self._attach_port(server, requested))
        except Exception:
            server.ports = ports
            raise
        return ports

    def _attach_port(self, server: Server, requested: dict[str, str]) -> AttachedPort:
        binding = {"device_id": server.id, "device_owner": f"compute:{AVAILABILITY_ZONE}"}

        def attach(conn):
            if "port" in requested:
                port = conn.network.update_port(requested["port"], **binding)
                created = False
            else:
                attributes: dict[str, Any] = {"network_id": requested["network"], "project_id": server.project_id,
                                              **binding}
                if requested.get("fixed_ip"):
                    attributes["fixed_ips"] = [{"ip_address": requested["fixed_ip"]}]
                if requested.get("security_group_ids"):
                    attributes["security_group_ids"] = requested["security_group_ids"].split(",")
                port = conn.network.create_port(**attributes)
                created = True
            network = conn.network.get_network(port.network_id)
            addresses, gateway = [], None
            for fixed_ip in port.fixed_ips or []:
                subnet = conn.network.get_subnet(fixed_ip["subnet_id"])
                prefix = ipaddress.ip_network(subnet.cidr).prefixlen
                addresses.append(f"{fixed_ip['ip_address']}/{prefix}")
                if gateway is None and subnet.ip_version == 4 and subnet.gateway_ip:
                    gateway = subnet.gateway_ip
            return AttachedPort(id=port.id, network_id=port.network_id, network_name=network.name,
                                mac=port.mac_address, fixed_ips=list(port.fixed_ips or []), addresses=addresses,
                                gateway=gateway, created_by_nova=created, state=port.status or "DOWN")

        return self.neighbours.call(attach)

    def _release(self, server: Server) -> None:
        """Delete the ports Nova created, unbind the others (both gone already is fine)."""
        from openstack import exceptions

        def release(conn):
            for port in server.ports:
                try:
                    if port.created_by_nova:
                        conn.network.delete_port(port.id, ignore_missing=True)
                    else:
                        conn.network.update_port(port.id, device_id="", device_owner="")
                except exceptions.NotFoundException:
                    pass

        if server.ports:
            self.neighbours.call(release)
        server.ports = []

    def _node(self, server: Server) -> vm.Node:
        return vm.Node(server_folder(self.ctx, server.id), netns=server_netns(self.ctx, server.id),
                       link_prefix=server_link_prefix(self.ctx, server.id), bridge=self.ctx.tenant_bridge,
                       hostname=server.hostname)

    def _ssh_address(self, server: Server) -> str | None:
        """The first IPv4 address this host can reach (the tenant subnet's); None: wait for sshd's log instead."""
        tenant = ipaddress.ip_network(self.ctx.tenant_cidr)
        for port in server.ports:
            for address in port.addresses:
                ip = ipaddress.ip_interface(address).ip
                if ip.version == 4 and ip in tenant:
                    return str(ip)
        return None


def server_netns(ctx: CloudContext, server_id: str) -> str:
    """The network namespace of a server (named by the first 8 hex digits of its id, unique per cloud)."""
    return f"cmlos{ctx.instance}-{server_id.replace('-', '')[:8]}"


def server_link_prefix(ctx: CloudContext, server_id: str) -> str:
    """Host-side veths of a server are this plus the NIC's index."""
    return f"cmv{ctx.instance}-{server_id.replace('-', '')[:8]}"


def server_folder(ctx: CloudContext, server_id: str) -> Path:
    """A server's own folder: its disk (``disk/``, ``etc/``), keys, console.log, sshd.log."""
    return ctx.root / "nova" / "servers" / server_id


class NoValidHost(Exception):
    """The scheduler found no host for a server (its group's policy cannot be met)."""


# -- the API ---------------------------------------------------------------------------------------


def create_app(compute: Compute) -> Flask:
    """The compute API as a Flask app (unauthenticated: wrap it with :func:`wsgi_application`)."""
    app = Flask("cloudml-os-nova")
    app.url_map.strict_slashes = False

    @app.errorhandler(Fault)
    def fault(exc: Fault) -> Response:
        return _fault_response(exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        messages = {404: "The resource could not be found.",
                    405: "The method specified is not allowed for this resource."}
        return _fault_response(exc.code or 500, messages.get(exc.code or 500, exc.description or ""))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        LOG.exception("unexpected API error")
        return _fault_response(500, "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ "
                                    f"and attach the Nova API log if possible.\n{type(exc)}")

    @app.before_request
    def before() -> None:
        if request.path.startswith("/v2.1/"):
            g.version = _requested_version()
            g.caller = Caller(user_id=request.headers.get("X-User-Id", ""),
                              project_id=request.headers.get("X-Project-Id", ""),
                              roles={role.strip() for role in request.headers.get("X-Roles", "").split(",")
                                     if role.strip()})

    @app.after_request
    def after(response: Response) -> Response:
        if "version" in g:
            text = _version_text(g.version)
            response.headers["OpenStack-API-Version"] = f"compute {text}"
            response.headers["X-OpenStack-Nova-API-Version"] = text
            response.headers["Vary"] = "OpenStack-API-Version, X-OpenStack-Nova-API-Version"
        response.headers["x-compute-request-id"] = f"req-{uuid.uuid4()}"
        return response

    _version_routes(app)
    _flavor_routes(app, compute)
    _keypair_routes(app, compute)
    _server_group_routes(app, compute)
    _server_routes(app, compute)
    _server_action_routes(app, compute)
    _limit_and_quota_routes(app, compute)
    _misc_routes(app, compute)
    return app


def wsgi_application(app: Flask, authtoken_conf: dict[str, str]) -> Callable:
    """Version documents unauthenticated (as Nova's paste pipeline has them); everything else behind auth_token."""
    from keystonemiddleware import auth_token

    authenticated = auth_token.AuthProtocol(_ProjectInPath(app.wsgi_app), dict(authtoken_conf))

    def dispatch(environ, start_response):
        if environ.get("PATH_INFO", "").rstrip("/") in ("", "/v2.1"):
            return app.wsgi_app(environ, start_response)
        return authenticated(environ, start_response)

    return dispatch


class _ProjectInPath:
    """Accept ``/v2.1/{project_id}/...`` as well as ``/v2.1/...``, as Nova's router does."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        parts = environ.get("PATH_INFO", "").split("/")
        if len(parts) > 3 and parts[1] == "v2.1" and re.fullmatch(r"[0-9a-f]{32}", parts[2]):
            roles = {role.strip() for role in environ.get("HTTP_X_ROLES", "").split(",")}
            if parts[2] != environ.get("HTTP_X_PROJECT_ID") and "admin" not in roles:
                message = (f"Malformed request URL: URL's project_id '{parts[2]}' doesn't match Context's "
                           f"project_id '{environ.get('HTTP_X_PROJECT_ID')}'")
                return _fault_response(400, message)(environ, start_response)
            environ["PATH_INFO"] = "/".join(parts[:2] + parts[3:])
        return self.app(environ, start_response)


# -- versions --------------------------------------------------------------------------------------


def _version_document() -> dict[str, Any]:
    base = request.host_url.rstrip("/")
    return {"id": "v2.1", "status": "CURRENT", "version": _version_text(MAX_VERSION),
            "min_version": _version_text(MIN_VERSION), "updated": "2013-07-23T11:33:21Z",
            "links": [{"rel": "self", "href": f"{base}/v2.1/"},
                      {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.compute+json;version=2.1"}]}


def _version_routes(app: Flask) -> None:
    @app.get("/")
    def versions():
        document = _version_document()
        document.pop("media-types")
        document["links"] = document["links"][:1]
        return _json({"versions": [document]})

    @app.get("/v2.1")
    def version():
        return _json({"version": _version_document()})


def _requested_version() -> tuple[int, int]:
    text = None
    for header in request.headers.getlist("OpenStack-API-Version"):
        for item in header.split(","):
            words = item.split()
            if len(words) == 2 and words[0].lower() == "compute":
                text = words[1]
    if text is None:
        text = request.headers.get("X-OpenStack-Nova-API-Version")
    if text is None:
        return MIN_VERSION
    if text.strip().lower() == "latest":
        return MAX_VERSION
    match = re.fullmatch(r"([1-9]\d*)\.([1-9]\d*|0)", text.strip())
    if not match:
        raise Fault(400, f"API Version String {text} is of invalid format. Must be of format MajorNum.MinorNum.")
    version = (int(match.group(1)), int(match.group(2)))
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise Fault(406, f"Version {text} is not supported by the API. Minimum is {_version_text(MIN_VERSION)} "
                         f"and maximum is {_version_text(MAX_VERSION)}.")
    return version


def _version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _at_least(major: int, minor: int) -> bool:
    return g.version >= (major, minor)


# -- policy --------------------------------------------------------------------------------------


def _caller() -> Caller:
    return g.caller


def _authorize(rule: str, *, admin: bool = False, write: bool = False, project_id: str | None = None) -> None:
    """Nova's default policies: readers read, members write, admins do admin things and see every project."""
    caller = _caller()
    if caller.is_admin:
        return
    allowed = not admin and (project_id is None or project_id == caller.project_id)
    if allowed and write:
        allowed = "member" in caller.roles
    elif allowed:
        allowed = bool({"reader", "member"} & caller.roles)
    if not allowed:
        raise Fault(403, f"Policy doesn't allow os_compute_api:{rule} to be performed.")


# -- flavors -------------------------------------------------------------------------------------


def _flavor_routes(app: Flask, compute: Compute) -> None:
    prefix = "/v2.1/flavors"

    @app.get(prefix)
    def list_flavors():
        return _json({"flavors": [_flavor_body(f, detail=False) for f in _visible_flavors(compute)]})

    @app.get(f"{prefix}/detail")
    def list_flavors_detail():
        return _json({"flavors": [_flavor_body(f, detail=True) for f in _visible_flavors(compute)]})

    @app.get(f"{prefix}/<flavor_id>")
    def show_flavor(flavor_id: str):
        return _json({"flavor": _flavor_body(_flavor(compute, flavor_id), detail=True)})

    @app.post(prefix)
    def create_flavor():
        _authorize("os-flavor-manage:create", admin=True)
        body = _body("flavor")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise Fault(400, "Invalid input for field/attribute name.")
        flavor_id = body.get("id")
        if flavor_id in (None, "auto"):
            flavor_id = str(uuid.uuid4())
        flavor_id = str(flavor_id)
        flavor = Flavor(id=flavor_id, name=name, vcpus=_int_field(body, "vcpus", 1), ram=_int_field(body, "ram", 1),
                        disk=_int_field(body, "disk", 0),
                        ephemeral=_int_field(body, "OS-FLV-EXT-DATA:ephemeral", 0, default=0),
                        swap=_int_field(body, "swap", 0, default=0),
                        rxtx_factor=float(body.get("rxtx_factor", 1.0)),
                        is_public=bool(body.get("os-flavor-access:is_public", True)),
                        description=body.get("description") if _at_least(2, 55) else None)
        with compute.lock:
            for other in compute.flavors.values():
                if other.name == name:
                    raise Fault(409, f"Flavor with name {name} already exists.")
                if other.id == flavor_id:
                    raise Fault(409, f"Flavor with ID {flavor_id} already exists.")
            compute.flavors[flavor_id] = flavor
        return _json({"flavor": _flavor_body(flavor, detail=True)})

    @app.put(f"{prefix}/<flavor_id>")
    def update_flavor(flavor_id: str):
        _authorize("os-flavor-manage:update", admin=True)
        if not _at_least(2, 55):
            raise Fault(405, "The method specified is not allowed for this resource.")
        flavor = _flavor(compute, flavor_id)
        flavor.description = _body("flavor").get("description")
        return _json({"flavor": _flavor_body(flavor, detail=True)})

    @app.delete(f"{prefix}/<flavor_id>")
    def delete_flavor(flavor_id: str):
        _authorize("os-flavor-manage:delete", admin=True)
        with compute.lock:
            if compute.flavors.pop(flavor_id, None) is None:
                raise Fault(404, f"Flavor {flavor_id} could not be found.")
        return Response(status=202)

    @app.get(f"{prefix}/<flavor_id>/os-extra_specs")
    def list_extra_specs(flavor_id: str):
        return _json({"extra_specs": dict(_flavor(compute, flavor_id).extra_specs)})

    @app.post(f"{prefix}/<flavor_id>/os-extra_specs")
    def create_extra_specs(flavor_id: str):
        _authorize("os-flavor-extra-specs:create", admin=True)
        flavor = _flavor(compute, flavor_id)
        specs = _body("extra_specs")
        flavor.extra_specs.update({str(key): str(value) for key, value in specs.items()})
        return _json({"extra_specs": specs})

    @app.get(f"{prefix}/<flavor_id>/os-extra_specs/<key>")
    def show_extra_spec(flavor_id: str, key: str):
        flavor = _flavor(compute, flavor_id)
        if key not in flavor.extra_specs:
            raise Fault(404, f"Flavor {flavor_id} has no extra specs with key {key}.")
        return _json({key: flavor.extra_specs[key]})

    @app.put(f"{prefix}/<flavor_id>/os-extra_specs/<key>")
    def update_extra_spec(flavor_id: str, key: str):
        _authorize("os-flavor-extra-specs:update", admin=True)
        flavor = _flavor(compute, flavor_id)
        body = _json_body()
        if list(body) != [key]:
            raise Fault(400, "Request body and URI mismatch")
        flavor.extra_specs[key] = str(body[key])
        return _json({key: flavor.extra_specs[key]})

    @app.delete(f"{prefix}/<flavor_id>/os-extra_specs/<key>")
    def delete_extra_spec(flavor_id: str, key: str):
        _authorize("os-flavor-extra-specs:delete", admin=True)
        flavor = _flavor(compute, flavor_id)
        if flavor.extra_specs.pop(key, None) is None:
            raise Fault(404, f"Flavor {flavor_id} has no extra specs with key {key}.")
        return Response(status=200)

    @app.get(f"{prefix}/<flavor_id>/os-flavor-access")
    def list_flavor_access(flavor_id: str):
        flavor = _flavor(compute, flavor_id)
        if flavor.is_public:
            raise Fault(404, "Access list not available for public flavors.")
        return _json({"flavor_access": _flavor_access(flavor)})

    @app.post(f"{prefix}/<flavor_id>/action")
    def flavor_action(flavor_id: str):
        _authorize("os-flavor-access", admin=True)
        flavor = _flavor(compute, flavor_id)
        body = _json_body()
        if "addTenantAccess" in body:
            tenant = str(body["addTenantAccess"].get("tenant"))
            if tenant in flavor.projects:
                raise Fault(409, f"Flavor access already exists for flavor {flavor_id} and project {tenant} "
                                 "combination.")
            flavor.projects.append(tenant)
        elif "removeTenantAccess" in body:
            tenant = str(body["removeTenantAccess"].get("tenant"))
            if tenant not in flavor.projects:
                raise Fault(404, f"Flavor access not found for {flavor_id} / {tenant} combination.")
            flavor.projects.remove(tenant)
        else:
            raise Fault(400, "Invalid request body")
        return _json({"flavor_access": _flavor_access(flavor)})


def _visible_flavors(compute: Compute) -> list[Flavor]:
    caller = _caller()
    args = request.args
    is_public = args.get("is_public", "true" if not caller.is_admin else "none").lower()
    with compute.lock:
        flavors = list(compute.flavors.values())
    if is_public not in ("none", "all"):
        public = is_public in ("1", "true", "t", "yes", "y", "on")
        flavors = [f for f in flavors if f.is_public == public or (not caller.is_admin and caller.project_id in
                                                                   f.projects)]
    if not caller.is_admin:
        flavors = [f for f in flavors if f.is_public or caller.project_id in f.projects]
    if "minRam" in args:
        flavors = [f for f in flavors if f.ram >= _query_int("minRam")]
    if "minDisk" in args:
        flavors = [f for f in flavors if f.disk >= _query_int("minDisk")]
    key = {"flavorid": "id", "memory_mb": "ram", "root_gb": "disk", "ephemeral_gb": "ephemeral"}.get(
        args.get("sort_key", "flavorid"), args.get("sort_key", "flavorid"))
    if key not in ("id", "name", "ram", "vcpus", "disk", "ephemeral", "swap", "rxtx_factor", "description"):
        raise Fault(400, f"Invalid sort_key {args.get('sort_key')}")
    flavors.sort(key=lambda f: (getattr(f, key) is None, getattr(f, key) or 0, f.id),
                 reverse=args.get("sort_dir", "asc") == "desc")
    return _paginate(flavors, lambda f: f.id)


def _flavor(compute: Compute, flavor_id: str) -> Flavor:
    caller = _caller()
    with compute.lock:
        flavor = compute.flavors.get(flavor_id)
    if flavor is None or not (flavor.is_public or caller.is_admin or caller.project_id in flavor.projects):
        raise Fault(404, f"Flavor {flavor_id} could not be found.")
    return flavor


def _flavor_body(flavor: Flavor, *, detail: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"id": flavor.id, "name": flavor.name, "links": _links("flavors", flavor.id)}
    if _at_least(2, 55):
        body["description"] = flavor.description
    if detail:
        body.update({"ram": flavor.ram, "disk": flavor.disk, "vcpus": flavor.vcpus,
                     "swap": flavor.swap if _at_least(2, 75) else (flavor.swap or ""),
                     "OS-FLV-EXT-DATA:ephemeral": flavor.ephemeral, "OS-FLV-DISABLED:disabled": False,
                     "os-flavor-access:is_public": flavor.is_public, "rxtx_factor": flavor.rxtx_factor})
        if _at_least(2, 61):
            body["extra_specs"] = dict(flavor.extra_specs)
    return body


def _flavor_access(flavor: Flavor) -> list[dict[str, str]]:
    return [{"flavor_id": flavor.id, "tenant_id": project} for project in flavor.projects]


# -- keypairs ------------------------------------------------------------------------------------


def _keypair_routes(app: Flask, compute: Compute) -> None:
    prefix = "/v2.1/os-keypairs"

    @app.get(prefix)
    def list_keypairs():
        user_id = _keypair_user("os-keypairs:index", write=False)
        with compute.lock:
            keypairs = sorted((k for (owner, _), k in compute.keypairs.items() if owner == user_id),
                              key=lambda k: k.name)
        if _at_least(2, 35):
            keypairs = _paginate(keypairs, lambda k: k.name)
        return _json({"keypairs": [{"keypair": _keypair_body(k, listing=True)} for k in keypairs]})

    @app.get(f"{prefix}/<name>")
    def show_keypair(name: str):
        user_id = _keypair_user("os-keypairs:show", write=False)
        return _json({"keypair": _keypair_body(_keypair(compute, user_id, name), listing=False)})

    @app.post(prefix)
    def create_keypair():
        body = _body("keypair")
        user_id = _caller().user_id
        if body.get("user_id") and _at_least(2, 10) and body["user_id"] != user_id:
            _authorize("os-keypairs:create", admin=True)
            user_id = str(body["user_id"])
        _authorize("os-keypairs:create", write=True)
        name = body.get("name")
        allowed = r"[A-Za-z0-9 _.@-]+" if _at_least(2, 92) else r"[A-Za-z0-9 _-]+"
        if not isinstance(name, str) or not 1 <= len(name) <= 255 or not re.fullmatch(allowed, name) \
                or name != name.strip():
            raise Fault(400, "Keypair data is invalid: Keypair name contains unsafe characters")
        key_type = str(body.get("type", "ssh")) if _at_least(2, 2) else "ssh"
        if key_type not in ("ssh", "x509"):
            raise Fault(400, f"Invalid input for field/attribute type. Value: {key_type}.")
        public_key, private_key = body.get("public_key"), None
        if public_key is None:
            if _at_least(2, 92):
                raise Fault(400, "Invalid input for field/attribute keypair. Value: {}. 'public_key' is a "
                                 "required property")
            public_key, private_key = _generate_rsa_keypair(name)
        fingerprint = _fingerprint(str(public_key), key_type)
        with compute.lock:
            if (user_id, name) in compute.keypairs:
                raise Fault(409, f"Key pair '{name}' already exists.")
            count = sum(1 for owner, _ in compute.keypairs if owner == user_id)
            if count >= compute.quota(_caller().project_id)["key_pairs"]:
                raise Fault(403, "Quota exceeded, too many key pairs.")
            keypair = Keypair(id=compute.next_keypair_id(), name=name, user_id=user_id,
                              public_key=str(public_key).strip(), fingerprint=fingerprint, type=key_type,
                              created_at=_iso(_now(), micro=True))
            compute.keypairs[(user_id, name)] = keypair
        created = {"name": name, "public_key": keypair.public_key, "fingerprint": fingerprint,
                   "user_id": user_id}
        if _at_least(2, 2):
            created["type"] = key_type
        if private_key is not None:
            created["private_key"] = private_key
        return _json({"keypair": created}, 201 if _at_least(2, 2) else 200)

    @app.delete(f"{prefix}/<name>")
    def delete_keypair(name: str):
        user_id = _keypair_user("os-keypairs:delete", write=True)
        with compute.lock:
            if compute.keypairs.pop((user_id, name), None) is None:
                raise Fault(404, f"Keypair {name} not found for user {user_id}")
        return Response(status=204 if _at_least(2, 2) else 202)


def _keypair_user(rule: str, *, write: bool) -> str:
    """The user whose keypairs are meant: the caller, or (admin, 2.10+) ``?user_id=``."""
    caller = _caller()
    wanted = request.args.get("user_id") if _at_least(2, 10) else None
    if wanted and wanted != caller.user_id:
        _authorize(rule, admin=True)
        return wanted
    _authorize(rule, write=write)
    return caller.user_id


def _keypair(compute: Compute, user_id: str, name: str) -> Keypair:
    with compute.lock:
        keypair = compute.keypairs.get((user_id, name))
    if keypair is None:
        raise Fault(404, f"Keypair {name} not found for user {user_id}")
    return keypair


def _keypair_body(keypair: Keypair, *, listing: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"name": keypair.name, "public_key": keypair.public_key,
                            "fingerprint": keypair.fingerprint}
    if _at_least(2, 2):
        body["type"] = keypair.type
    if not listing:
        body.update({"user_id": keypair.user_id, "created_at": keypair.created_at, "deleted": False,
                     "deleted_at": None, "updated_at": None, "id": keypair.id})
    return body


def _fingerprint(public_key: str, key_type: str) -> str:
    """Nova's fingerprint: MD5 of the key blob (SHA-1 of the certificate for x509), colon separated."""
    try:
        if key_type == "x509":
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes

            digest = x509.load_pem_x509_certificate(public_key.encode()).fingerprint(hashes.SHA1())
        else:
            words = public_key.split()
            blob = base64.b64decode(words[1], validate=True)
            length = int.from_bytes(blob[:4], "big")
            if words[0] not in _KEY_TYPES or blob[4:4 + length].decode() != words[0]:
                raise ValueError(words[0])
            digest = hashlib.md5(blob).digest()
    except (ValueError, IndexError, binascii.Error, UnicodeDecodeError) as exc:
        raise Fault(400, "Keypair data is invalid: failed to generate fingerprint") from exc
    return ":".join(f"{byte:02x}" for byte in digest)


def _generate_rsa_keypair(name: str) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{public.decode()} Generated-by-Nova", private


# -- server groups -------------------------------------------------------------------------------


def _server_group_routes(app: Flask, compute: Compute) -> None:
    prefix = "/v2.1/os-server-groups"

    @app.get(prefix)
    def list_server_groups():
        caller = _caller()
        _authorize("os-server-groups:index")
        all_projects = _truthy(request.args.get("all_projects")) and caller.is_admin
        with compute.lock:
            groups = [grp for grp in compute.groups.values() if all_projects or grp.project_id == caller.project_id]
        offset = _query_int("offset", 0)
        limit = _query_int("limit", len(groups))
        return _json({"server_groups": [_group_body(grp) for grp in groups[offset:offset + limit]]})

    @app.get(f"{prefix}/<group_id>")
    def show_server_group(group_id: str):
        return _json({"server_group": _group_body(_group(compute, group_id))})

    @app.post(prefix)
    def create_server_group():
        caller = _caller()
        _authorize("os-server-groups:create", write=True)
        body = _body("server_group")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise Fault(400, "Invalid input for field/attribute name.")
        policies = ["affinity", "anti-affinity"] + (["soft-affinity", "soft-anti-affinity"]
                                                    if _at_least(2, 15) else [])
        rules: dict[str, Any] = {}
        if _at_least(2, 64):
            if "policies" in body:
                raise Fault(400, "Invalid input for field/attribute server_group. Additional properties are not "
                                 "allowed ('policies' was unexpected)")
            policy = body.get("policy")
            rules = body.get("rules") or {}
            if rules and (policy != "anti-affinity" or set(rules) - {"max_server_per_host"}):
                raise Fault(400, "Invalid input for field/attribute rules.")
        else:
            given = body.get("policies")
            if not isinstance(given, list) or len(given) != 1:
                raise Fault(400, "Invalid input for field/attribute policies.")
            policy = given[0]
        if policy not in policies:
            raise Fault(400, f"Invalid input for field/attribute policy. Value: {policy}.")
        with compute.lock:
            if compute.usage(caller.project_id)["server_groups"] >= compute.quota(caller.project_id)["server_groups"]:
                raise Fault(403, "Quota exceeded, too many server groups.")
            group = ServerGroup(id=str(uuid.uuid4()), name=name, policy=policy, rules=dict(rules),
                                project_id=caller.project_id, user_id=caller.user_id)
            compute.groups[group.id] = group
        return _json({"server_group": _group_body(group)})

    @app.delete(f"{prefix}/<group_id>")
    def delete_server_group(group_id: str):
        _authorize("os-server-groups:delete", write=True)
        group = _group(compute, group_id)
        with compute.lock:
            compute.groups.pop(group.id, None)
        return Response(status=204)


def _group(compute: Compute, group_id: str) -> ServerGroup:
    caller = _caller()
    with compute.lock:
        group = compute.groups.get(group_id)
    if group is None or not (caller.is_admin or group.project_id == caller.project_id):
        raise Fault(404, f"Instance group {group_id} could not be found.")
    _authorize("os-server-groups:show", project_id=group.project_id)
    return group


def _group_body(group: ServerGroup) -> dict[str, Any]:
    body: dict[str, Any] = {"id": group.id, "name": group.name, "members": list(group.members)}
    if _at_least(2, 64):
        body.update({"policy": group.policy, "rules": dict(group.rules)})
    else:
        body.update({"policies": [group.policy], "metadata": {}})
    if _at_least(2, 13):
        body.update({"project_id": group.project_id, "user_id": group.user_id})
    return body


# -- servers -------------------------------------------------------------------------------------


def _server_routes(app: Flask, compute: Compute) -> None:
    prefix = "/v2.1/servers"

    @app.get(prefix)
    def list_servers():
        return _server_list(compute, detail=False)

    @app.get(f"{prefix}/detail")
    def list_servers_detail():
        return _server_list(compute, detail=True)

    @app.get(f"{prefix}/<server_id>")
    def show_server(server_id: str):
        server = _server(compute, server_id, "servers:show")
        return _json({"server": _server_body(compute, server, show=True)})

    @app.post(prefix)
    def create_server():
        return _create_server(compute)

    @app.put(f"{prefix}/<server_id>")
    def update_server(server_id: str):
        server = _server(compute, server_id, "servers:update", write=True)
        body = _body("server")
        if "name" in body:
            if not isinstance(body["name"], str) or not body["name"].strip():
                raise Fault(400, "Invalid input for field/attribute name.")
            server.name = body["name"]
        if "description" in body and _at_least(2, 19):
            server.description = body["description"]
        if "hostname" in body and _at_least(2, 90):
            server.hostname = _sanitize_hostname(str(body["hostname"]), server.id)
        server.touch()
        return _json({"server": _server_body(compute, server, show=True)})

    @app.delete(f"{prefix}/<server_id>")
    def delete_server(server_id: str):
        server = _server(compute, server_id, "servers:delete", write=True)
        if server.task_state != "deleting":
            server.task_state = "deleting"
            server.touch()
            compute.run(f"delete-{server.id}", lambda: compute.delete(server))
        return Response(status=204)

    @app.get(f"{prefix}/<server_id>/metadata")
    def list_metadata(server_id: str):
        return _json({"metadata": dict(_server(compute, server_id, "server-metadata:index").metadata)})

    @app.post(f"{prefix}/<server_id>/metadata")
    def update_metadata(server_id: str):
        server = _metadata_server(compute, server_id)
        server.metadata = _checked_metadata(compute, server.project_id, {**server.metadata, **_body("metadata")})
        return _json({"metadata": dict(server.metadata)})

    @app.put(f"{prefix}/<server_id>/metadata")
    def replace_metadata(server_id: str):
        server = _metadata_server(compute, server_id)
        server.metadata = _checked_metadata(compute, server.project_id, dict(_body("metadata")))
        return _json({"metadata": dict(server.metadata)})

    @app.get(f"{prefix}/<server_id>/metadata/<key>")
    def show_metadata_item(server_id: str, key: str):
        server = _server(compute, server_id, "server-metadata:show")
        if key not in server.metadata:
            raise Fault(404, "Metadata item was not found")
        return _json({"meta": {key: server.metadata[key]}})

    @app.put(f"{prefix}/<server_id>/metadata/<key>")
    def set_metadata_item(server_id: str, key: str):
        server = _metadata_server(compute, server_id)
        meta = _body("meta")
        if list(meta) != [key]:
            raise Fault(400, "Request body and URI mismatch")
        server.metadata = _checked_metadata(compute, server.project_id, {**server.metadata, **meta})
        return _json({"meta": {key: server.metadata[key]}})

    @app.delete(f"{prefix}/<server_id>/metadata/<key>")
    def delete_metadata_item(server_id: str, key: str):
        server = _metadata_server(compute, server_id)
        if server.metadata.pop(key, None) is None:
            raise Fault(404, "Metadata item was not found")
        return Response(status=204)

    @app.get(f"{prefix}/<server_id>/ips")
    def list_ips(server_id: str):
        server = _server(compute, server_id, "ips:index")
        return _json({"addresses": _addresses(server, brief=True)})

    @app.get(f"{prefix}/<server_id>/ips/<network>")
    def show_ips(server_id: str, network: str):
        addresses = _addresses(_server(compute, server_id, "ips:show"), brief=True)
        if network not in addresses:
            raise Fault(404, "Instance is not a member of specified network")
        return _json({network: addresses[network]})

    @app.get(f"{prefix}/<server_id>/os-interface")
    def list_interfaces(server_id: str):
        server = _server(compute, server_id, "os-attach-interfaces:list")
        return _json({"interfaceAttachments": [_interface_body(port) for port in server.ports]})

    @app.get(f"{prefix}/<server_id>/os-interface/<port_id>")
    def show_interface(server_id: str, port_id: str):
        server = _server(compute, server_id, "os-attach-interfaces:show")
        for port in server.ports:
            if port.id == port_id:
                return _json({"interfaceAttachment": _interface_body(port)})
        raise Fault(404, f"Port {port_id} is not attached")

    @app.get(f"{prefix}/<server_id>/os-volume_attachments")
    def list_volume_attachments(server_id: str):
        _server(compute, server_id, "os-volumes-attachments:index")
        return _json({"volumeAttachments": []})

    @app.get(f"{prefix}/<server_id>/tags")
    def list_tags(server_id: str):
        return _json({"tags": list(_tag_server(compute, server_id, write=False).tags)})

    @app.put(f"{prefix}/<server_id>/tags")
    def replace_tags(server_id: str):
        server = _tag_server(compute, server_id, write=True)
        tags = _json_body().get("tags")
        if not isinstance(tags, list) or len(tags) > 50 or not all(_valid_tag(tag) for tag in tags):
            raise Fault(400, "Invalid input for field/attribute tags.")
        server.tags = list(dict.fromkeys(tags))
        return _json({"tags": list(server.tags)})

    @app.delete(f"{prefix}/<server_id>/tags")
    def delete_tags(server_id: str):
        _tag_server(compute, server_id, write=True).tags = []
        return Response(status=204)

    @app.get(f"{prefix}/<server_id>/tags/<tag>")
    def check_tag(server_id: str, tag: str):
        if tag not in _tag_server(compute, server_id, write=False).tags:
            raise Fault(404, f"Tag '{tag}' could not be found for instance {server_id}.")
        return Response(status=204)

    @app.put(f"{prefix}/<server_id>/tags/<tag>")
    def add_tag(server_id: str, tag: str):
        server = _tag_server(compute, server_id, write=True)
        if not _valid_tag(tag):
            raise Fault(400, f"Tag '{tag}' is invalid.")
        if tag in server.tags:
            return Response(status=204)
        server.tags.append(tag)
        return Response(status=201, headers={"Location": f"{request.url}"})

    @app.delete(f"{prefix}/<server_id>/tags/<tag>")
    def delete_tag(server_id: str, tag: str):
        server = _tag_server(compute, server_id, write=True)
        if tag not in server.tags:
            raise Fault(404, f"Tag '{tag}' could not be found for instance {server_id}.")
        server.tags.remove(tag)
        return Response(status=204)


def _server(compute: Compute, server_id: str, rule: str, *, write: bool = False) -> Server:
    """The server, if the caller may see it (another project's server is 404, as in Nova)."""
    caller = _caller()
    with compute.lock:
        server = compute.servers.get(server_id)
    if server is None or not (caller.is_admin or server.project_id == caller.project_id):
        raise Fault(404, f"Instance {server_id} could not be found.")
    _authorize(rule, write=write, project_id=server.project_id)
    return server


def _metadata_server(compute: Compute, server_id: str) -> Server:
    server = _server(compute, server_id, "server-metadata:update", write=True)
    if server.vm_state not in ("active", "stopped") or server.task_state is not None:
        raise Fault(409, f"Cannot 'update_instance_metadata' instance {server.id} while it is in vm_state "
                         f"{server.vm_state}")
    return server


def _tag_server(compute: Compute, server_id: str, *, write: bool) -> Server:
    if not _at_least(2, 26):
        raise Fault(404, "The resource could not be found.")
    return _server(compute, server_id, "os-server-tags:update" if write else "os-server-tags:index", write=write)


def _valid_tag(tag: object) -> bool:
    return isinstance(tag, str) and 1 <= len(tag) <= 60 and "," not in tag and "/" not in tag


def _checked_metadata(compute: Compute, project_id: str, metadata: dict[str, Any]) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 255 or not isinstance(value, str) or len(value) > 255:
            raise Fault(400, "Invalid input for field/attribute metadata.")
    limit = compute.quota(project_id)["metadata_items"]
    if len(metadata) > limit:
        raise Fault(403, f"Quota exceeded for metadata_items: Requested {len(metadata)}, but already used 0 of "
                         f"{limit} metadata_items")
    return dict(metadata)


def _server_list(compute: Compute, *, detail: bool) -> Response:
    caller = _caller()
    _authorize("servers:detail" if detail else "servers:index")
    args = request.args
    all_projects = caller.is_admin and _truthy(args.get("all_tenants"))
    with compute.lock:
        servers = list(compute.servers.values())
    project_filter = args.get("project_id") or args.get("tenant_id")
    if not all_projects:
        servers = [s for s in servers if s.project_id == caller.project_id]
    elif project_filter:
        servers = [s for s in servers if s.project_id == project_filter]
    if "name" in args:
        try:
            pattern = re.compile(args["name"])
        except re.error as exc:
            raise Fault(400, f"Invalid filter name: {exc}") from exc
        servers = [s for s in servers if pattern.search(s.name)]
    if "status" in args:
        servers = [s for s in servers if s.status == args["status"].upper()]
    if "flavor" in args:
        servers = [s for s in servers if s.flavor.id == args["flavor"]]
    if "image" in args:
        servers = [s for s in servers if s.image_id == args["image"]]
    if "ip" in args:
        pattern = re.compile(args["ip"])
        servers = [s for s in servers if any(pattern.search(ip["ip_address"])
                                             for port in s.ports for ip in port.fixed_ips)]
    if "tags" in args:
        wanted = set(args["tags"].split(","))
        servers = [s for s in servers if wanted <= set(s.tags)]
    if "tags-any" in args:
        wanted = set(args["tags-any"].split(","))
        servers = [s for s in servers if wanted & set(s.tags)]
    if "reservation_id" in args:
        servers = [s for s in servers if s.reservation_id == args["reservation_id"]]
    servers.sort(key=lambda s: (s.created, s.id), reverse=args.get("sort_dir", "desc") != "asc")
    servers = _paginate(servers, lambda s: s.id)
    bodies = [_server_body(compute, s, show=False) if detail
              else {"id": s.id, "name": s.name, "links": _links("servers", s.id)} for s in servers]
    result: dict[str, Any] = {"servers": bodies}
    if "limit" in args and len(servers) == _query_int("limit"):
        base = request.base_url
        result["servers_links"] = [{"rel": "next", "href": f"{base}?limit={args['limit']}&marker={servers[-1].id}"}]
    return _json(result)


def _server_body(compute: Compute, server: Server, *, show: bool) -> dict[str, Any]:
    caller = _caller()
    flavor = server.flavor
    if _at_least(2, 47):
        flavor_body: dict[str, Any] = {"vcpus": flavor.vcpus, "ram": flavor.ram, "disk": flavor.disk,
                                       "ephemeral": flavor.ephemeral, "swap": flavor.swap,
                                       "original_name": flavor.name, "extra_specs": dict(flavor.extra_specs)}
    else:
        flavor_body = {"id": flavor.id, "links": _links("flavors", flavor.id, bookmark_only=True)}
    body: dict[str, Any] = {
        "id": server.id, "name": server.name, "status": server.status, "tenant_id": server.project_id,
        "user_id": server.user_id, "metadata": dict(server.metadata),
        "hostId": hashlib.sha224((server.project_id + server.host).encode()).hexdigest() if server.host else "",
        "image": {"id": server.image_id, "links": _links("images", server.image_id, bookmark_only=True)}
        if server.image_id else "",
        "flavor": flavor_body, "created": _iso(server.created), "updated": _iso(server.updated or server.created),
        "addresses": _addresses(server, brief=False), "accessIPv4": "", "accessIPv6": "",
        "links": _links("servers", server.id), "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": AVAILABILITY_ZONE if server.host else "",
        "config_drive": server.config_drive, "key_name": server.key_name,
        "OS-SRV-USG:launched_at": _iso(server.launched_at, micro=True) if server.launched_at else None,
        "OS-SRV-USG:terminated_at": None,
        "security_groups": [{"name": name} for name in server.security_groups] if server.ports else [],
        "OS-EXT-STS:task_state": server.task_state, "OS-EXT-STS:vm_state": server.vm_state,
        "OS-EXT-STS:power_state": server.power_state, "os-extended-volumes:volumes_attached": [],
    }
    if server.status in _PROGRESS_STATUSES:
        body["progress"] = 0
    if server.fault is not None:
        fault = {key: value for key, value in server.fault.items() if key != "details" or caller.is_admin}
        body["fault"] = fault
    if caller.is_admin:
        body.update({"OS-EXT-SRV-ATTR:host": server.host, "OS-EXT-SRV-ATTR:hypervisor_hostname": server.host,
                     "OS-EXT-SRV-ATTR:instance_name": f"instance-{server.launch_index + 1:08x}"})
        if _at_least(2, 3):
            body.update({"OS-EXT-SRV-ATTR:reservation_id": server.reservation_id,
                         "OS-EXT-SRV-ATTR:launch_index": server.launch_index,
                         "OS-EXT-SRV-ATTR:hostname": server.hostname, "OS-EXT-SRV-ATTR:kernel_id": "",
                         "OS-EXT-SRV-ATTR:ramdisk_id": "", "OS-EXT-SRV-ATTR:root_device_name": "/dev/vda",
                         "OS-EXT-SRV-ATTR:user_data": server.user_data})
        if _at_least(2, 16):
            body["host_status"] = "UP" if server.host else ""
    if _at_least(2, 9):
        body["locked"] = False
    if _at_least(2, 73):
        body["locked_reason"] = None
    if _at_least(2, 19):
        body["description"] = server.description
    if _at_least(2, 26):
        body["tags"] = list(server.tags)
    if _at_least(2, 63):
        body["trusted_image_certificates"] = None
    if _at_least(2, 71) and show:
        body["server_groups"] = [server.group_id] if server.group_id in compute.groups else []
    if _at_least(2, 90):
        body["OS-EXT-SRV-ATTR:hostname"] = server.hostname
    if _at_least(2, 96):
        body["pinned_availability_zone"] = None
    return body


def _addresses(server: Server, *, brief: bool) -> dict[str, list[dict[str, Any]]]:
    addresses: dict[str, list[dict[str, Any]]] = {}
    for port in server.ports:
        for fixed_ip in port.fixed_ips:
            address: dict[str, Any] = {"version": ipaddress.ip_address(fixed_ip["ip_address"]).version,
                                       "addr": fixed_ip["ip_address"]}
            if not brief:
                address.update({"OS-EXT-IPS:type": "fixed", "OS-EXT-IPS-MAC:mac_addr": port.mac})
            addresses.setdefault(port.network_name, []).append(address)
    return addresses


def _interface_body(port: AttachedPort) -> dict[str, Any]:
    return {"port_state": port.state, "port_id": port.id, "net_id": port.network_id, "mac_addr": port.mac,
            "fixed_ips": [{"subnet_id": ip["subnet_id"], "ip_address": ip["ip_address"]} for ip in port.fixed_ips]}


def _create_server(compute: Compute) -> Response:
    caller = _caller()
    _authorize("servers:create", write=True)
    document = _json_body()
    body = document.get("server")
    if not isinstance(body, dict):
        raise Fault(400, "Invalid input for field/attribute server. Value: None. None is not of type 'object'")
    allowed = set(_SERVER_KEYS) | {key for key, version in _SERVER_KEYS_ADDED.items() if _at_least(*version)}
    allowed |= {key for key, version in _SERVER_KEYS_REMOVED.items() if not _at_least(*version)}
    unexpected = sorted(set(body) - allowed)
    if unexpected:
        raise Fault(400, "Invalid input for field/attribute server. Additional properties are not allowed "
                         f"({', '.join(repr(key) for key in unexpected)} {'was' if len(unexpected) == 1 else 'were'} "
                         "unexpected)")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 255 or name != name.strip():
        raise Fault(400, "Invalid input for field/attribute name.")
    flavor = _requested_flavor(compute, body.get("flavorRef"))
    image_id = _requested_image(compute, body)
    key_name, key_data = body.get("key_name"), None
    if key_name is not None:
        with compute.lock:
            keypair = compute.keypairs.get((caller.user_id, str(key_name)))
        if keypair is None:
            raise Fault(400, "Invalid key_name provided.")
        key_data = keypair.public_key
    security_groups = _requested_security_groups(body)
    networks = _requested_networks(compute, body, security_groups)
    user_data = body.get("user_data")
    if user_data is not None:
        if not isinstance(user_data, str) or len(user_data) > 65535:
            raise Fault(400, "User data too large. User data must be no larger than 65535 bytes once base64 "
                             "encoded.")
        try:
            base64.b64decode(user_data, validate=True)
        except binascii.Error as exc:
            raise Fault(400, "User data needs to be valid base 64.") from exc
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise Fault(400, "Invalid input for field/attribute metadata.")
    zone = body.get("availability_zone")
    if zone not in (None, "", AVAILABILITY_ZONE):
        raise Fault(400, f"The requested availability zone is not available: {zone}")
    hints = document.get("os:scheduler_hints") or document.get("OS-SCH-HNT:scheduler_hints") or {}
    group_id = hints.get("group") if isinstance(hints, dict) else None
    min_count = _int_value(body.get("min_count", 1), "min_count", 1)
    max_count = _int_value(body.get("max_count", min_count), "max_count", 1)
    if max_count < min_count:
        raise Fault(400, "min_count must be <= max_count")
    reservation_id = f"r-{secrets.token_hex(4)}"
    created: list[Server] = []
    with compute.lock:
        group = None
        if group_id is not None:
            group = compute.groups.get(str(group_id))
            if group is None or not (caller.is_admin or group.project_id == caller.project_id):
                raise Fault(400, f"Invalid input for field/attribute group. Value: {group_id}.")
            members_limit = compute.quota(caller.project_id)["server_group_members"]
            if len(group.members) + max_count > members_limit:
                raise Fault(403, "Quota exceeded, too many servers in group")
        count = _fit_quota(compute, caller.project_id, flavor, min_count, max_count)
        for index in range(count):
            server_id = _new_server_id(compute)
            display = name if count == 1 else f"{name}-{index + 1}"
            server = Server(
                id=server_id, name=display, project_id=caller.project_id, user_id=caller.user_id,
                flavor=dataclasses.replace(flavor, extra_specs=dict(flavor.extra_specs), projects=[]),
                image_id=image_id, key_name=key_name, key_data=key_data,
                metadata=_checked_metadata(compute, caller.project_id, metadata),
                security_groups=[group_name for group_name, _ in security_groups],
                requested_networks=[dict(n) for n in networks], user_data=user_data, group_id=group and group.id,
                reservation_id=reservation_id, launch_index=index,
                hostname=_sanitize_hostname(str(body.get("hostname") or display), server_id), created=_now(),
                description=body.get("description"), tags=list(body.get("tags") or []),
                config_drive="True" if body.get("config_drive") else "")
            compute.servers[server_id] = server
            if group is not None:
                group.members.append(server_id)
            created.append(server)
    for server in created:
        compute.run(f"boot-{server.id}", lambda server=server: compute.boot(server))
    if _truthy(body.get("return_reservation_id")):
        return _json({"reservation_id": reservation_id}, 202)
    first = created[0]
    response: dict[str, Any] = {"id": first.id, "links": _links("servers", first.id), "OS-DCF:diskConfig": "MANUAL",
                                "security_groups": [{"name": group_name} for group_name, _ in security_groups],
                                "adminPass": body.get("adminPass") or secrets.token_urlsafe(9)}
    return _json({"server": response}, 202, headers={"Location": _links("servers", first.id)[0]["href"]})


def _fit_quota(compute: Compute, project_id: str, flavor: Flavor, min_count: int, max_count: int) -> int:
    """How many of ``max_count`` servers fit the project's quota (403 if not even ``min_count``)."""
    quota, used = compute.quota(project_id), compute.usage(project_id)
    need = {"instances": 1, "cores": flavor.vcpus, "ram": flavor.ram}
    fits = max_count
    for resource, each in need.items():
        if quota[resource] >= 0 and each:
            fits = min(fits, (quota[resource] - used[resource]) // each)
    if fits < min_count:
        for resource, each in need.items():
            if quota[resource] >= 0 and used[resource] + each * min_count > quota[resource]:
                raise Fault(403, f"Quota exceeded for {resource}: Requested {each * min_count}, but already used "
                                 f"{used[resource]} of {quota[resource]} {resource}")
    return max(min_count, fits)


def _new_server_id(compute: Compute) -> str:
    """A UUID whose first 8 hex digits (which name its netns and veths) no other server has."""
    taken = {server_id[:8] for server_id in compute.servers}
    while True:
        server_id = str(uuid.uuid4())
        if server_id[:8] not in taken:
            return server_id


def _requested_flavor(compute: Compute, reference: object) -> Flavor:
    if not isinstance(reference, str | int) or not str(reference):
        raise Fault(400, "Invalid flavorRef provided.")
    flavor_id = str(reference).rstrip("/").rsplit("/", 1)[-1]
    try:
        return _flavor(compute, flavor_id)
    except Fault as exc:
        raise Fault(400, f"Flavor {flavor_id} could not be found.") from exc


def _requested_image(compute: Compute, body: dict[str, Any]) -> str:
    """The image to boot (imageRef, or the image of a boot-from-volume mapping); checked in Glance."""
    reference = body.get("imageRef") or ""
    for mapping in body.get("block_device_mapping_v2") or []:
        if not reference and isinstance(mapping, dict) and mapping.get("source_type") == "image":
            reference = mapping.get("uuid") or ""
    image_id = str(reference).rstrip("/").rsplit("/", 1)[-1]
    if not image_id:
        if body.get("block_device_mapping_v2") or body.get("block_device_mapping"):
            return ""
        raise Fault(400, "Missing imageRef attribute")
    from openstack import exceptions

    try:
        image = compute.neighbours.call(lambda conn: conn.image.get_image(image_id))
    except exceptions.NotFoundException as exc:
        raise Fault(400, f"Image {image_id} could not be found.") from exc
    if image.status != "active":
        raise Fault(400, f"Image {image_id} is not active.")
    return image.id


def _requested_security_groups(body: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Security group names (and, once looked up for ports Nova makes, their ids)."""
    groups = body.get("security_groups")
    if groups is None:
        return [("default", None)]
    if not isinstance(groups, list) or not all(isinstance(item, dict) and item.get("name") for item in groups):
        raise Fault(400, "Invalid input for field/attribute security_groups.")
    return [(str(item["name"]), None) for item in groups]


def _requested_networks(compute: Compute, body: dict[str, Any],
                        security_groups: list[tuple[str, str | None]]) -> list[dict[str, str]]:
    """Normalise ``networks`` to [{"port": id} | {"network": id, "fixed_ip"?}], checking them in Neutron."""
    from openstack import exceptions

    caller = _caller()
    networks = body.get("networks")
    if networks is None:
        if _at_least(2, 37):
            raise Fault(400, "Invalid input for field/attribute server. 'networks' is a required property")
        networks = "auto"
    if networks == "none":
        return []
    if networks == "auto":
        def usable(conn):
            found = [n for n in conn.network.networks() if (n.project_id == caller.project_id or n.is_shared)
                     and not n.is_router_external]
            return [n.id for n in found]

        candidates = compute.neighbours.call(usable)
        if len(candidates) != 1:
            raise Fault(400, f"Unable to automatically allocate a network for project {caller.project_id}")
        networks = [{"uuid": candidates[0]}]
    if not isinstance(networks, list):
        raise Fault(400, "Invalid input for field/attribute networks.")
    named = [name for name, _ in security_groups if name != "default"]
    group_ids: list[str] = []
    if named:
        def find_groups(conn):
            ids = []
            for name in named:
                found = conn.network.find_security_group(name, project_id=caller.project_id)
                if found is None:
                    raise Fault(400, f"Security group {name} not found for project {caller.project_id}.")
                ids.append(found.id)
            return ids

        group_ids = compute.neighbours.call(find_groups)
    requested: list[dict[str, str]] = []
    for entry in networks:
        if not isinstance(entry, dict):
            raise Fault(400, "Invalid input for field/attribute networks.")
        if entry.get("port"):
            port_id = str(entry["port"])
            try:
                port = compute.neighbours.call(lambda conn, port_id=port_id: conn.network.get_port(port_id))
            except exceptions.NotFoundException as exc:
                raise Fault(400, f"Port id {port_id} could not be found.") from exc
            if port.device_id:
                raise Fault(409, f"Port {port_id} is still in use.")
            if not caller.is_admin and port.project_id != caller.project_id:
                raise Fault(400, f"Port id {port_id} could not be found.")
            requested.append({"port": port_id})
        elif entry.get("uuid"):
            network_id = str(entry["uuid"])
            try:
                compute.neighbours.call(lambda conn, network_id=network_id: conn.network.get_network(network_id))
            except exceptions.NotFoundException as exc:
                raise Fault(400, f"Network {network_id} could not be found.") from exc
            item = {"network": network_id}
            if entry.get("fixed_ip"):
                item["fixed_ip"] = str(entry["fixed_ip"])
            if group_ids:
                item["security_group_ids"] = ",".join(group_ids)
            requested.append(item)
        else:
            raise Fault(400, "Bad networks format: network uuid is not in proper format")
    return requested


# -- server actions ------------------------------------------------------------------------------


def _server_action_routes(app: Flask, compute: Compute) -> None:
    @app.post("/v2.1/servers/<server_id>/action")
    def server_action(server_id: str):
        body = _json_body()
        if len(body) != 1:
            raise Fault(400, "Malformed request body")
        action, argument = next(iter(body.items()))
        if action == "os-getConsoleOutput":
            server = _server(compute, server_id, "console-output")
            return _console_output(server, argument)
        server = _server(compute, server_id, f"servers:{action}", write=True)
        with compute.lock:
            if action == "reboot":
                kind = str((argument or {}).get("type", "")).upper()
                if kind not in _REBOOT_TASKS:
                    raise Fault(400, "Invalid input for field/attribute type.")
                allowed = ("active",) if kind == "SOFT" else ("active", "stopped", "error")
                _check_state(server, action, allowed)
                server.task_state, work = _REBOOT_TASKS[kind], kind
            elif action == "os-stop":
                _check_state(server, "stop", ("active", "error"))
                server.task_state, work = "powering-off", "stop"
            elif action == "os-start":
                _check_state(server, "start", ("stopped",))
                server.task_state, work = "powering-on", "start"
            else:
                raise Fault(404, f"There is no such action: {action}")
            server.touch()
        compute.run(f"{work}-{server.id}", lambda: compute.power_cycle(server, work))
        return Response(status=202)


def _check_state(server: Server, action: str, vm_states: Iterable[str]) -> None:
    if server.task_state is not None:
        raise Fault(409, f"Cannot '{action}' instance {server.id} while it is in task_state {server.task_state}")
    if server.vm_state not in vm_states or server.node is None:
        raise Fault(409, f"Cannot '{action}' instance {server.id} while it is in vm_state {server.vm_state}")


def _console_output(server: Server, argument: Any) -> Response:
    length = (argument or {}).get("length") if isinstance(argument, dict) else None
    if length is not None:
        try:
            length = int(length)
        except (TypeError, ValueError) as exc:
            raise Fault(400, "Invalid input for field/attribute length.") from exc
        if length < -1:
            raise Fault(400, "Invalid input for field/attribute length.")
    if server.host is None or server.node is None:
        raise Fault(409, f"Instance {server.id} is not ready")
    output = server.node.console_output(None if length in (None, -1) else length)
    return _json({"output": output})


# -- limits and quotas -----------------------------------------------------------------------------


def _limit_and_quota_routes(app: Flask, compute: Compute) -> None:
    @app.get("/v2.1/limits")
    def limits():
        caller = _caller()
        project_id = request.args.get("tenant_id") or caller.project_id
        _authorize("limits", project_id=project_id)
        quota, used = compute.quota(project_id), compute.usage(project_id)
        absolute: dict[str, int] = {
            "maxServerMeta": quota["metadata_items"], "maxTotalInstances": quota["instances"],
            "maxTotalCores": quota["cores"], "maxTotalRAMSize": quota["ram"], "maxTotalKeypairs": quota["key_pairs"],
            "maxServerGroups": quota["server_groups"], "maxServerGroupMembers": quota["server_group_members"],
            "totalInstancesUsed": used["instances"], "totalCoresUsed": used["cores"], "totalRAMUsed": used["ram"],
            "totalServerGroupsUsed": used["server_groups"]}
        if not _at_least(2, 57):
            absolute.update({"maxPersonality": 5, "maxPersonalitySize": 10240})
        if not _at_least(2, 39):
            absolute["maxImageMeta"] = 128
        if not _at_least(2, 36):
            absolute.update({"maxSecurityGroups": 10, "maxSecurityGroupRules": 20, "maxTotalFloatingIps": 10,
                             "totalFloatingIpsUsed": 0, "totalSecurityGroupsUsed": 0})
        return _json({"limits": {"rate": [], "absolute": absolute}})

    prefix = "/v2.1/os-quota-sets/<project_id>"

    @app.get(prefix)
    def show_quota(project_id: str):
        _authorize("os-quota-sets:show", project_id=project_id)
        return _json({"quota_set": {"id": project_id, **_quota_fields(compute.quota(project_id))}})

    @app.get(f"{prefix}/defaults")
    def default_quota(project_id: str):
        _authorize("os-quota-sets:defaults")
        return _json({"quota_set": {"id": project_id, **_quota_fields(dict(DEFAULT_QUOTA))}})

    @app.get(f"{prefix}/detail")
    def quota_detail(project_id: str):
        _authorize("os-quota-sets:detail", project_id=project_id)
        quota, used = _quota_fields(compute.quota(project_id)), compute.usage(project_id)
        detail = {key: {"limit": value, "in_use": used.get(key, 0), "reserved": 0} for key, value in quota.items()}
        return _json({"quota_set": {"id": project_id, **detail}})

    @app.put(prefix)
    def update_quota(project_id: str):
        _authorize("os-quota-sets:update", admin=True)
        body = dict(_body("quota_set"))
        force = _truthy(body.pop("force", False))
        known = set(_quota_fields(dict(DEFAULT_QUOTA)))
        unexpected = sorted(set(body) - known)
        if unexpected:
            raise Fault(400, "Invalid input for field/attribute quota_set. Additional properties are not allowed "
                             f"({', '.join(repr(key) for key in unexpected)} were unexpected)")
        used = compute.usage(project_id)
        with compute.lock:
            overrides = compute.quotas.setdefault(project_id, {})
            for key, value in body.items():
                limit = _int_value(value, key, -1)
                if not force and limit != -1 and limit < used.get(key, 0):
                    raise Fault(400, f"Quota limit {limit} for {key} must be greater than or equal to already used "
                                     f"and reserved {used.get(key, 0)}.")
                if key in DEFAULT_QUOTA:
                    overrides[key] = limit
        return _json({"quota_set": _quota_fields(compute.quota(project_id))})

    @app.delete(prefix)
    def revert_quota(project_id: str):
        _authorize("os-quota-sets:delete", admin=True)
        with compute.lock:
            compute.quotas.pop(project_id, None)
        return Response(status=202)


def _quota_fields(quota: dict[str, int]) -> dict[str, int]:
    fields = dict(quota)
    if not _at_least(2, 57):
        fields.update(_QUOTA_BEFORE_2_57)
    if not _at_least(2, 36):
        fields.update(_QUOTA_BEFORE_2_36)
    return fields


# -- availability zones and extensions -------------------------------------------------------------


def _misc_routes(app: Flask, compute: Compute) -> None:
    @app.get("/v2.1/os-availability-zone")
    def availability_zones():
        _authorize("os-availability-zone:list")
        return _json({"availabilityZoneInfo": [{"zoneName": AVAILABILITY_ZONE, "zoneState": {"available": True},
                                                "hosts": None}]})

    @app.get("/v2.1/os-availability-zone/detail")
    def availability_zones_detail():
        _authorize("os-availability-zone:detail", admin=True)
        stamp = _iso(_now(), micro=True)
        service = {"available": True, "active": True, "updated_at": stamp}
        return _json({"availabilityZoneInfo": [
            {"zoneName": "internal", "zoneState": {"available": True},
             "hosts": {f"cmlos{compute.ctx.instance}-controller": {"nova-conductor": service,
                                                                   "nova-scheduler": service}}},
            {"zoneName": AVAILABILITY_ZONE, "zoneState": {"available": True},
             "hosts": {host: {"nova-compute": service} for host in compute.hosts}}]})

    extensions = [("Keypairs", "os-keypairs"), ("ServerGroups", "os-server-groups"),
                  ("AvailabilityZone", "os-availability-zone"), ("Quotas", "os-quota-sets"),
                  ("FlavorExtraSpecs", "os-flavor-extra-specs"), ("FlavorAccess", "os-flavor-access"),
                  ("ConsoleOutput", "os-console-output"), ("ServerStartStop", "os-server-start-stop"),
                  ("ExtendedIps", "OS-EXT-IPS"), ("ExtendedIpsMac", "OS-EXT-IPS-MAC"),
                  ("ExtendedStatus", "OS-EXT-STS"), ("ExtendedServerAttributes", "OS-EXT-SRV-ATTR"),
                  ("SchedulerHints", "OS-SCH-HNT"), ("UserData", "os-user-data"), ("Multinic", "NMN")]
    documents = {alias: {"name": name, "alias": alias, "namespace": "http://docs.openstack.org/compute/ext/fake_xml",
                         "updated": "2014-12-03T00:00:00Z", "description": name, "links": []}
                 for name, alias in extensions}

    @app.get("/v2.1/extensions")
    def list_extensions():
        return _json({"extensions": list(documents.values())})

    @app.get("/v2.1/extensions/<alias>")
    def show_extension(alias: str):
        if alias not in documents:
            raise Fault(404, "The resource could not be found.")
        return _json({"extension": documents[alias]})


# -- helpers ---------------------------------------------------------------------------------------


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json", headers=headers)


def _fault_response(code: int, message: str) -> Response:
    return _json({_FAULT_NAMES.get(code, "computeFault"): {"code": code, "message": message}}, code)


def _json_body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise Fault(400, "Malformed request body")
    return body


def _body(key: str) -> dict[str, Any]:
    value = _json_body().get(key)
    if not isinstance(value, dict):
        raise Fault(400, f"Invalid input for field/attribute {key}. Value: {value}. {value} is not of type 'object'")
    return value


def _links(kind: str, item_id: str, *, bookmark_only: bool = False) -> list[dict[str, str]]:
    base = request.host_url.rstrip("/")
    bookmark = {"rel": "bookmark", "href": f"{base}/{kind}/{item_id}"}
    return [bookmark] if bookmark_only else [{"rel": "self", "href": f"{base}/v2.1/{kind}/{item_id}"}, bookmark]


def _paginate(items: list, key: Callable[[Any], str]) -> list:
    marker = request.args.get("marker")
    if marker is not None:
        keys = [key(item) for item in items]
        if marker not in keys:
            raise Fault(400, f"marker [{marker}] not found")
        items = items[keys.index(marker) + 1:]
    if "limit" in request.args:
        items = items[:_query_int("limit")]
    return items


def _query_int(name: str, default: int | None = None) -> int:
    value = request.args.get(name)
    if value is None and default is not None:
        return default
    return _int_value(value, name, 0)


def _int_value(value: Any, name: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise Fault(400, f"Invalid input for field/attribute {name}. Value: {value}.") from exc
    if number < minimum:
        raise Fault(400, f"Invalid input for field/attribute {name}. Value: {value}. {value} is less than the "
                         f"minimum of {minimum}")
    return number


def _int_field(body: dict[str, Any], name: str, minimum: int, default: int | None = None) -> int:
    if name not in body or body[name] in (None, ""):
        if default is None:
            raise Fault(400, f"Invalid input for field/attribute flavor. '{name}' is a required property")
        return default
    return _int_value(body[name], name, minimum)


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "t", "yes", "y", "on")


def _sanitize_hostname(name: str, server_id: str) -> str:
    """Nova's hostname from a display name: lower case, '-' for spaces and '_', other odd characters gone."""
    hostname = re.sub(r"[ _]", "-", name.lower())
    hostname = re.sub(r"[^\w.-]+", "", hostname, flags=re.ASCII)
    hostname = hostname[:63].strip(".-")
    return hostname or f"server-{server_id}"


def _decode_user_data(user_data: str | None) -> bytes | None:
    return base64.b64decode(user_data) if user_data else None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _iso(moment: datetime.datetime, *, micro: bool = False) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") if micro else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- process -------------------------------------------------------------------------------------


def start_nova(ctx: CloudContext, *, hosts: int = DEFAULT_HOSTS, boot_timeout: float = 60.0) -> None:
    """Spawn the emulated Nova of ``ctx`` (``ctx.spawn``, as root) and wait until it answers on its port.

    Keystone must answer with user ``nova`` registered; servers also need Neutron and Glance.
    """
    argv = [sys.executable, "-m", "tests.testcloud.nova", "--root", str(ctx.root), "--instance", str(ctx.instance),
            "--host", ctx.host, "--hosts", str(hosts), "--boot-timeout", f"{boot_timeout:g}"]
    process = ctx.spawn("nova", argv, env={PASSWORD_ENVIRONMENT: ctx.service_password}, cwd=REPO_ROOT)
    ctx.wait_http(ctx.url("nova", "/"), process)


def main(argv: list[str] | None = None) -> None:
    from werkzeug.serving import make_server

    from tests.testcloud.services import authtoken_options

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the test cloud's folder")
    parser.add_argument("--instance", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--hosts", type=int, default=DEFAULT_HOSTS, help="emulated compute hosts")
    parser.add_argument("--boot-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(threadName)s %(message)s")
    if os.geteuid() != 0:
        sys.exit("the emulated Nova needs root: its servers are network, PID and mount namespaces")
    ctx = CloudContext(root=args.root.absolute(), venv=Path(), instance=args.instance, host=args.host)
    ctx.service_password = os.environ.get(PASSWORD_ENVIRONMENT, ctx.service_password)
    compute = Compute(ctx, Neighbours(ctx), hosts=args.hosts, boot_timeout=args.boot_timeout)
    compute.setup_host()
    conf = {**authtoken_options(ctx, "nova"), "delay_auth_decision": "false"}
    server = make_server(ctx.host, ctx.port("nova"), wsgi_application(create_app(compute), conf), threaded=True)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    LOG.info("emulated Nova of test cloud %d on %s (bridge %s, %s)", ctx.instance, ctx.url("nova"),
             ctx.tenant_bridge, ctx.tenant_cidr)
    try:
        server.serve_forever()
    finally:
        compute.shutdown()
        LOG.info("stopped; every server powered off and unplugged")


if __name__ == "__main__":
    main()

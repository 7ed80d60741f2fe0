"""The ``openstack`` compute driver: one Heat stack of VMs per cluster, through openstacksdk.

A cluster is a stack named after it, built by :mod:`cloudml_os.cloud.heat_template` from
``heat_templates/`` in this package (one ResourceGroup per node group, the cluster's public key as a Nova keypair, a
security group, a soft anti-affinity server group). Creating is idempotent by name: a redelivered task finds
the stack and waits for it instead of creating a second one. Before creating, the project's compute and
network limits are checked so that a job that cannot fit fails with a clear message instead of leaving a
half-built stack; a stack that fails anyway is deleted again, and the job's error names the failed resource.

Every stack carries the tags ``cloudml-os`` and ``cloudml-os-installation-ID`` (the installation's id): the
driver lists only stacks with both, and never updates or deletes a stack that carries another installation's
id, so installations may share a project. A stack from before installations had ids carries none of them; it
is still deleted by name (its job's teardown) but no longer listed, so garbage collection leaves it alone.

Host keys are never trusted on first use: cloud-init prints every node's host keys to its console log
(the "SSH HOST KEY KEYS" block), which the driver reads through Nova's authenticated API and pins.

A job's cluster (labelled with its project) gets a Keystone application credential of its own, named after
the cluster, that reads only the project's Swift container; the nodes mount that container read-only at
``/store/PROJECT`` with it (:mod:`cloudml_os.cloud.swift_mount`, setting ``openstack_store_mount``). It is
made just before the stack and reaches the nodes only in the stack's hidden ``store_mount`` parameter (their
user data); :meth:`OpenStackDriver.delete_cluster` deletes it by name, also when the stack is already gone.

Only this module and ``artifacts/swift.py`` import openstacksdk.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from cloudml_os.cloud import swift_mount
from cloudml_os.cloud.base import ClusterSpec, Driver, DriverError, NodeInfo
from cloudml_os.cloud.heat_template import (
    NODES_OUTPUT,
    STACK_TAG,
    StackOptions,
    build_stack,
    group_resource_name,
    installation_of,
    installation_tag,
)
from cloudml_os.config import Settings

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
UPDATE_START_GRACE = 10.0  # seconds an update may take to show on the stack
CREDENTIAL_ATTEMPTS = 4  # tries at making a cluster's store credential (see _new_store_credential)
_HOST_KEYS = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----\r?\n(.*?)-----END SSH HOST KEY KEYS-----", re.S)
# Newer cloud-init prefixes console lines with "<14>DATE ec2: "; the key is the rest of the line.
_KEY_LINE = re.compile(r"(?:^|\s)((?:ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa) [A-Za-z0-9+/]+=*)(?:\s|$)")


@dataclasses.dataclass(frozen=True)
class _Need:
    instances: int = 0
    cores: int = 0
    ram_mb: int = 0


class OpenStackDriver(Driver):
    """Clusters as Heat stacks in the platform's service project.

    :param settings: installation settings (``openstack_*``).
    :param connection: an openstacksdk Connection; None connects to ``settings.openstack_cloud``.
    :param sleep: how to wait between polls (tests pass a faster one).
    """

    name = "openstack"

    def __init__(self, settings: Settings, *, connection: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._settings = settings
        self._connection = connection
        self._sleep = sleep

    @property
    def _cloud(self) -> Any:
        if self._connection is None:
            import openstack

            self._connection = openstack.connect(cloud=self._settings.openstack_cloud)
        return self._connection

    # -- the Driver interface -------------------------------------------------------------------

    @classmethod
    def store_mount(cls, settings: Settings) -> str | None:
        """``/store`` when nodes mount their project's Swift container (``openstack_store_mount``)."""
        return swift_mount.STORE_ROOT if settings.openstack_store_mount and settings.artifacts == "swift" else None

    def create_cluster(self, spec: ClusterSpec) -> list[NodeInfo]:
        stack = self._find_own_stack(spec.name)
        if stack is not None and (stack.status.endswith("_FAILED")
                                  or stack.status in ("DELETE_IN_PROGRESS", "ROLLBACK_COMPLETE")):
            # A create that failed, or a delete that a crash interrupted: start over.
            self._delete_stack(stack)
            stack = None
        try:
            if stack is None:
                self._check_limits(spec)
                stack = self._post_stack(spec)
            stack = self._wait_created(spec.name, stack)
            try:
                return self._nodes(spec, stack)
            except DriverError:
                self._delete_stack(stack)
                raise
        except DriverError:
            # No stack was made, or the failed one is deleted: its nodes' credential goes with it (a caller
            # that gives up on the cluster need not delete what it never got).
            self._delete_store_credential(spec.name)
            raise

    def _post_stack(self, spec: ClusterSpec) -> Any:
        """Ask Heat for the cluster's stack, with a new credential for its nodes' view of the store."""
        request = build_stack(spec, self._options(), store_mount=self._new_store_credential(spec))
        body = {"stack_name": spec.name, "template": request.template, "files": request.files,
                "parameters": request.parameters, "tags": ",".join(request.tags),
                "timeout_mins": max(1, int(self._settings.openstack_stack_timeout // 60)),
                # The driver deletes a failed stack itself: Heat's own rollback would replace the failure's
                # reason on the stack by "Stack ROLLBACK completed successfully".
                "disable_rollback": True}
        response = self._cloud.orchestration.post("/stacks", json=body, raise_exc=False)
        # 409: a redelivered task created it a moment ago; wait for that one.
        if response.status_code >= 400 and response.status_code != 409:
            raise DriverError(f"cluster {spec.name}: Heat refused the stack: {_error_text(response)}")
        stack = self._find_own_stack(spec.name)
        if stack is None:
            raise DriverError(f"cluster {spec.name}: Heat accepted the stack but does not show it")
        return stack

    def resize_cluster(self, spec: ClusterSpec) -> list[NodeInfo]:
        stack = self._find_own_stack(spec.name)
        if stack is None or stack.status != "CREATE_COMPLETE" and not stack.status.startswith("UPDATE_"):
            return self.create_cluster(spec)
        if self._stack_nodes(stack) != {(n.task_type, n.task_index) for n in spec.nodes}:
            self._check_limits(spec, already=self._stack_nodes(stack))
            request = build_stack(spec, self._options())
            # PATCH keeps the parameters it is not given: the hidden store_mount, whose credential the
            # cluster's nodes hold (its secret is known only when it is made), goes to new nodes as well.
            self._update(stack, {"template": request.template, "files": request.files,
                                 "parameters": request.parameters, "tags": ",".join(request.tags)},
                         method="patch" if self.store_mount(self._settings) else "put")
            stack = self._wait_updated(spec.name, stack)
        return self._nodes(spec, stack)

    def replace_node(self, spec: ClusterSpec, node: str) -> NodeInfo:
        wanted = next((n for n in spec.nodes if n.name == node), None)
        stack = self._find_own_stack(spec.name)
        if wanted is None or stack is None or (wanted.task_type, wanted.task_index) not in self._stack_nodes(stack):
            raise DriverError(f"cluster {spec.name} has no node {node} to replace")
        # Mark the group member (node.yaml's nested stack) unhealthy; the next stack update replaces it.
        orchestration = self._cloud.orchestration
        response = orchestration.get(f"/stacks/{stack.name}/{stack.id}/resources/"
                                     f"{group_resource_name(wanted.task_type)}", raise_exc=False)
        if response.status_code >= 400:
            raise DriverError(f"cluster {spec.name}: Heat does not show the {wanted.task_type} group: "
                              f"{_error_text(response)}")
        nested = orchestration.get_stack(response.json()["resource"]["physical_resource_id"])
        response = orchestration.patch(
            f"/stacks/{nested.name}/{nested.id}/resources/{wanted.task_index}", raise_exc=False,
            json={"mark_unhealthy": True, "resource_status_reason": f"replaced by cloudml-os ({node})"})
        if response.status_code >= 400:
            raise DriverError(f"cluster {spec.name}: Heat would not mark {node} unhealthy: {_error_text(response)}")
        self._update(stack, {}, method="patch")
        stack = self._wait_updated(spec.name, stack)
        return next(info for info in self._nodes(spec, stack) if info.name == node)

    def delete_cluster(self, name: str) -> None:
        stack = self._find_stack(name)
        owner = self._another_installation(stack) if stack is not None else ""
        if owner:
            log.warning("cluster %s belongs to the installation %s, not this one: left as it is", name, owner)
            return
        # The credential first: the nodes' mounts stop working before the nodes go (and a credential whose
        # stack was never made, or is gone already, is not left behind).
        self._delete_store_credential(name)
        if stack is not None:
            self._delete_stack(stack)

    def list_clusters(self) -> list[str]:
        installation = self._settings.installation_id
        tags = [STACK_TAG, installation_tag(installation)] if installation else [STACK_TAG]
        # Heat filters by the tags (all of them); they are checked here as well, so that whatever Heat answers,
        # no other installation's stack is listed. Heat lists a deleted stack for a moment after DELETE_COMPLETE.
        return sorted(stack.name for stack in self._cloud.orchestration.stacks(tags=tags)
                      if stack.status != "DELETE_COMPLETE" and installation_of(stack.tags or []) == installation)

    # -- the nodes' view of the store -------------------------------------------------------------

    def _new_store_credential(self, spec: ClusterSpec) -> str:
        """Make the cluster's application credential; return the ``store_mount`` stack parameter ("" for none).

        Called only before the stack is created; one of the same name (from a delivery that died before its
        stack was made, whose secret is lost) is deleted first, so a cluster never has two.
        """
        project = spec.labels.get("project")
        if not project or not self.store_mount(self._settings):
            return ""
        settings = self._settings
        self._delete_store_credential(spec.name)
        endpoint = self._cloud.object_store.get_endpoint()
        container = settings.swift_container_prefix + project
        identity = self._cloud.identity
        from openstack import exceptions

        for attempt in range(CREDENTIAL_ATTEMPTS):
            try:
                credential = identity.create_application_credential(
                    self._cloud.current_user_id,
                    name=swift_mount.credential_name(spec.name, settings.installation_id),
                    description=f"cloudml-os: read-only {container} for the nodes of {spec.name}",
                    access_rules=swift_mount.access_rules(swift_mount.account_path(endpoint), container))
                break
            except exceptions.ConflictException as exc:
                # Keystone keeps access rules per user and shares equal ones between credentials: two jobs of
                # a project made at the same moment race to store the same rule, and the loser gets 409.
                if attempt == CREDENTIAL_ATTEMPTS - 1:
                    raise DriverError(f"cluster {spec.name}: Keystone would not make the nodes' credential for "
                                      f"the store: {exc}") from None
                self._delete_store_credential(spec.name)
                self._sleep(POLL_INTERVAL)
            except exceptions.SDKException as exc:  # the message names no secret
                raise DriverError(f"cluster {spec.name}: Keystone would not make the nodes' credential for the "
                                  f"store: {exc}") from None
        identity_url = settings.openstack_node_identity_url or self._cloud.session.get_endpoint(
            service_type="identity", interface="public")
        config = swift_mount.rclone_config(
            identity_url, swift_mount.storage_url(endpoint, settings.openstack_node_object_store_url,
                                                  self._cloud.current_project_id),
            credential.id, credential.secret)
        return swift_mount.user_data_parameter(swift_mount.mount_script(project, container, config))

    def _delete_store_credential(self, cluster: str) -> None:
        """Delete the cluster's application credential(s), if any: its nodes' tokens stop working."""
        if not self.store_mount(self._settings):
            return
        identity = self._cloud.identity
        user = self._cloud.current_user_id
        name = swift_mount.credential_name(cluster, self._settings.installation_id)
        for credential in list(identity.application_credentials(user)):
            if credential.name == name:
                identity.delete_application_credential(user, credential.id, ignore_missing=True)

    # -- creating ------------------------------------------------------------------------------

    def _options(self) -> StackOptions:
        settings = self._settings
        return StackOptions(
            network=settings.openstack_network,
            image=settings.openstack_image,
            gpu_image=settings.openstack_gpu_image or settings.openstack_image,
            control_plane_cidr=settings.openstack_control_plane_cidr,
            framework_port_min=settings.openstack_node_port_first,
            framework_port_max=settings.openstack_node_port_last,
            control_plane_port=settings.openstack_node_port_first,
            floating_network=settings.openstack_floating_network,
            volume_size=settings.openstack_volume_size,
            installation_id=settings.installation_id,
        )

    def _check_limits(self, spec: ClusterSpec, already: frozenset[tuple[str, int]] = frozenset()) -> None:
        """Refuse nodes the project's quotas cannot hold, before Heat creates any part of them.

        :param already: (task type, index) of the cluster's nodes that exist and are not counted again.
        """
        compute = self._cloud.compute
        need = _Need()
        for node in spec.nodes:
            if (node.task_type, node.task_index) in already:
                continue
            flavor = compute.find_flavor(node.flavor, ignore_missing=True)
            if flavor is None:
                raise DriverError(f"cluster {spec.name}: flavor {node.flavor!r} does not exist in the cloud "
                                  "(check machine_types in the configuration)")
            need = _Need(need.instances + 1, need.cores + flavor.vcpus, need.ram_mb + flavor.ram)
        absolute = compute.get_limits().absolute
        short = []
        for what, wanted, limit, used in (
                ("instances", need.instances, absolute.instances, absolute.instances_used),
                ("vCPUs", need.cores, absolute.total_cores, absolute.total_cores_used),
                ("MB of RAM", need.ram_mb, absolute.total_ram, absolute.total_ram_used)):
            if limit is not None and limit >= 0 and used is not None and wanted > limit - used:
                short.append(f"{wanted} {what} needed, {max(0, limit - used)} of {limit} free")
        network = self._cloud.network
        project_id = self._cloud.current_project_id
        quota = network.get_quota(project_id, details=True)
        floating = 1 if self._settings.openstack_floating_network else 0
        for what, wanted in (("ports", need.instances), ("security_groups", 0 if already else 1),
                             ("floatingips", need.instances * floating)):
            entry = getattr(quota, what, None)
            if not wanted or not isinstance(entry, dict):
                continue
            limit = entry.get("limit", -1)
            used = entry.get("used", 0) + entry.get("reserved", 0)
            if limit >= 0 and wanted > limit - used:
                short.append(f"{wanted} {what.replace('_', ' ')} needed, {max(0, limit - used)} of {limit} free")
        if short:
            raise DriverError(f"cluster {spec.name} does not fit in the cloud project's quota: "
                              + "; ".join(short))

    def _stack_nodes(self, stack: Any) -> frozenset[tuple[str, int]]:
        outputs = {entry["output_key"]: entry.get("output_value") for entry in stack.outputs or []}
        return frozenset((entry["group"], int(entry["index"])) for entry in outputs.get(NODES_OUTPUT) or [])

    def _update(self, stack: Any, body: dict[str, Any], *, method: str) -> None:
        """Start a stack update (PUT: a new template; PATCH: the same one, replacing unhealthy members).

        Heat refuses an update while another runs (409); callers serialize their own changes, so a 409
        here is an update of ours still finishing: wait for it and try again.
        """
        orchestration = self._cloud.orchestration
        deadline = time.monotonic() + self._settings.openstack_stack_timeout
        body = {"timeout_mins": max(1, int(self._settings.openstack_stack_timeout // 60)),
                "disable_rollback": True, **body}
        while True:
            response = getattr(orchestration, method)(f"/stacks/{stack.name}/{stack.id}", json=body,
                                                      raise_exc=False)
            if response.status_code < 400:
                return
            if response.status_code != 409 or time.monotonic() > deadline:
                raise DriverError(f"cluster {stack.name}: Heat refused the update: {_error_text(response)}")
            self._sleep(POLL_INTERVAL)

    def _wait_updated(self, name: str, before: Any) -> Any:
        """Wait for the update started after ``before`` (the stack as it was) to end; return the stack."""
        started = time.monotonic()
        deadline = started + self._settings.openstack_stack_timeout
        stack = self._cloud.orchestration.get_stack(before)
        # Heat marks the stack IN_PROGRESS before it answers the update; the timestamp is a second check.
        while stack.status.endswith("_IN_PROGRESS") or (
                stack.updated_at == before.updated_at and time.monotonic() < started + UPDATE_START_GRACE):
            if time.monotonic() > deadline:
                raise DriverError(f"cluster {name}: the stack update did not finish within "
                                  f"{self._settings.openstack_stack_timeout:g}s")
            self._sleep(POLL_INTERVAL)
            stack = self._cloud.orchestration.get_stack(stack)
        if stack.status not in ("UPDATE_COMPLETE", "CREATE_COMPLETE"):
            raise DriverError(f"cluster {name}: the cloud could not change its nodes ({stack.status}): "
                              f"{stack.status_reason or stack.status}")
        return stack

    def _wait_created(self, name: str, stack: Any) -> Any:
        deadline = time.monotonic() + self._settings.openstack_stack_timeout
        while stack.status in ("CREATE_IN_PROGRESS", "ROLLBACK_IN_PROGRESS", "INIT_COMPLETE"):
            if time.monotonic() > deadline:
                self._delete_stack(stack)
                raise DriverError(f"cluster {name}: the stack was not complete within "
                                  f"{self._settings.openstack_stack_timeout:g}s; deleted it")
            self._sleep(POLL_INTERVAL)
            stack = self._cloud.orchestration.get_stack(stack)
        if stack.status != "CREATE_COMPLETE":
            reason = stack.status_reason or stack.status
            self._delete_stack(stack)
            raise DriverError(f"cluster {name}: the cloud could not create its nodes ({stack.status}): {reason}")
        return stack

    def _nodes(self, spec: ClusterSpec, stack: Any) -> list[NodeInfo]:
        outputs = {entry["output_key"]: entry.get("output_value") for entry in stack.outputs or []}
        by_role = {(entry["group"], int(entry["index"])): entry for entry in outputs.get(NODES_OUTPUT) or []}
        settings = self._settings
        nodes = []
        for node in spec.nodes:
            entry = by_role.get((node.task_type, node.task_index))
            if entry is None:
                raise DriverError(f"cluster {spec.name}: the stack's outputs name no node for "
                                  f"{node.task_type} {node.task_index}")
            address = entry.get("floating_address") or entry.get("address")
            if not address:
                raise DriverError(f"cluster {spec.name}: node {node.name} has no address")
            nodes.append(NodeInfo(
                name=node.name, task_type=node.task_type, task_index=node.task_index, address=address,
                ssh_port=22, username=settings.openstack_ssh_user,
                host_keys=self._host_keys(spec.name, node.name, entry["server_id"]),
                port_first=settings.openstack_node_port_first, port_last=settings.openstack_node_port_last,
                workdir=settings.openstack_workdir, runtime_root=settings.openstack_runtime_root,
            ))
        return nodes

    def _host_keys(self, cluster: str, node: str, server_id: str) -> tuple[str, ...]:
        """The host keys cloud-init printed to the server's console, read through Nova's API."""
        deadline = time.monotonic() + self._settings.openstack_console_timeout
        while True:
            output = self._cloud.compute.get_server_console_output(server_id).get("output") or ""
            keys = parse_console_host_keys(output)
            if keys:
                return keys
            if time.monotonic() > deadline:
                raise DriverError(f"cluster {cluster}: node {node} printed no SSH host keys to its console "
                                  f"within {self._settings.openstack_console_timeout:g}s (is cloud-init's "
                                  "keys-to-console enabled in the image?)")
            self._sleep(POLL_INTERVAL)

    # -- deleting ------------------------------------------------------------------------------

    def _find_own_stack(self, name: str) -> Any:
        """:meth:`_find_stack`, refusing a stack that another installation made.

        :raises DriverError: the stack of that name carries another installation's id.
        """
        stack = self._find_stack(name)
        if stack is not None and (owner := self._another_installation(stack)):
            raise DriverError(f"cluster {name}: a stack of that name belongs to another cloudml-os installation "
                              f"({owner}) in this cloud project; this one leaves it alone")
        return stack

    def _another_installation(self, stack: Any) -> str:
        """The id of the installation that made the stack if it is another one, else ""."""
        owner = installation_of(stack.tags or [])
        return owner if owner and owner != self._settings.installation_id else ""

    def _find_stack(self, name: str) -> Any:
        stack = self._cloud.orchestration.find_stack(name, ignore_missing=True)
        if stack is None:
            return None
        # find_stack returns the summary; the full stack carries outputs and the status reason.
        return self._cloud.orchestration.get_stack(stack)

    def _delete_stack(self, stack: Any) -> None:
        """Delete the stack and wait until it is gone; a failed delete is tried again once."""
        orchestration = self._cloud.orchestration
        for attempt in range(2):
            orchestration.delete_stack(stack, ignore_missing=True)
            deadline = time.monotonic() + self._settings.openstack_stack_timeout
            while True:
                current = orchestration.find_stack(stack.id, ignore_missing=True)
                if current is None or current.status == "DELETE_COMPLETE":
                    return
                if current.status == "DELETE_FAILED":
                    break
                if time.monotonic() > deadline:
                    raise DriverError(f"cluster {stack.name}: the stack was not deleted within "
                                      f"{self._settings.openstack_stack_timeout:g}s")
                self._sleep(POLL_INTERVAL)
            if attempt == 1:
                reason = orchestration.get_stack(stack.id).status_reason
                raise DriverError(f"cluster {stack.name}: the cloud could not delete the stack: {reason}")


def service_account(cloud: str) -> dict[str, Any]:
    """A clouds.yaml entry's ``auth`` options, ``auth_type``, ``interface`` and ``region_name``."""
    import openstack.config

    config = openstack.config.OpenStackConfig().get_one(cloud=cloud).config
    return {"auth": {key: value for key, value in (config.get("auth") or {}).items() if value is not None},
            "auth_type": config.get("auth_type") or "password",
            "interface": config.get("interface") or "public",
            "region_name": config.get("region_name")}


def parse_console_host_keys(output: str) -> tuple[str, ...]:
    """Host public keys ("TYPE BASE64") from cloud-init's keys-to-console block of a console log."""
    keys = []
    for block in _HOST_KEYS.findall(output):
        for line in block.splitlines():
            match = _KEY_LINE.search(line.strip())
            if match:
                keys.append(match.group(1))
    return tuple(dict.fromkeys(keys))


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("explanation") or body.get("explanation"))
    return str(body.get("explanation") or body.get("title") or f"HTTP {response.status_code}")

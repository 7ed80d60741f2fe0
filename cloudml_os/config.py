"""Settings of one cloudml-os installation: a TOML file plus ``CLOUDML_OS_*`` environment overrides.

Everything a process needs to find its database, broker, driver and data lives here, validated once at
start so that a typo fails with a message naming the setting instead of a stack trace later. Nothing
in this module opens a connection or touches the disk beyond reading the file.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

ENV_PREFIX = "CLOUDML_OS_"
# What an installation id may be: "cloudml-os-installation-" and it fit in one Heat tag (80 characters, no commas).
INSTALLATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,55}")
# What the setting pip_extra_args may hold: where pip finds packages and how it reaches the index, nothing
# that changes what is installed where.
PIP_INDEX_OPTIONS = frozenset({
    "--extra-index-url", "--find-links", "-f", "--no-index", "--trusted-host", "--cert", "--client-cert",
    "--proxy", "--timeout", "--retries", "--pre", "--prefer-binary", "--only-binary", "--no-binary",
})


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class MachineType:
    """A Cloud ML Engine machine type and the flavor (and GPUs) it maps to."""

    name: str
    flavor: str
    gpus: int = 0


DEFAULT_MACHINE_TYPE = "standard"  # what a version (or a batch prediction job over a model URI) runs on
DEFAULT_MACHINE_TYPES = {
    "standard": MachineType("standard", "m1.medium"),
    "large_model": MachineType("large_model", "m1.xlarge"),
    "complex_model_s": MachineType("complex_model_s", "c1.small"),
    "complex_model_m": MachineType("complex_model_m", "c1.medium"),
    "complex_model_l": MachineType("complex_model_l", "c1.large"),
    "standard_gpu": MachineType("standard_gpu", "g1.medium", gpus=1),
    "complex_model_m_gpu": MachineType("complex_model_m_gpu", "g1.large", gpus=4),
    "n1-standard-4": MachineType("n1-standard-4", "m1.large"),
    "n1-standard-8": MachineType("n1-standard-8", "m1.xlarge"),
    "n1-highmem-8": MachineType("n1-highmem-8", "r1.xlarge"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated settings. Build with :func:`load_settings`; tests pass overrides explicitly."""

    data_dir: Path
    database_url: str = dataclasses.field(repr=False)  # may hold a password
    broker_url: str = dataclasses.field(repr=False)
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    driver: str = "local"
    artifacts_dir: Path | None = None
    runtimes_dir: Path = Path.home() / ".cache" / "cloudml-os" / "runtimes"
    # Trainers' own requirements (what their packages require beyond the runtime) are resolved and fetched by
    # one node of each job from this package index (pip's --index-url), with pip_extra_args added: index
    # options only (PIP_INDEX_OPTIONS), e.g. "--extra-index-url URL --trusted-host HOST". Empty: the nodes' own
    # pip configuration (the embedded default's nodes use this host's).
    pip_index_url: str = ""
    pip_extra_args: str = ""
    task_queue: str = "cloudml-os"
    watch_interval: float = 0.25
    watch_window: float = 30.0
    # Seconds between copies of running trainers' outputs (--job-dir) to the job's directory in the artifact
    # store (cloudml_os.workflows.outputs); 0: copied only when training ends and before a restart.
    output_sync_seconds: float = 2.0
    ssh_connect_timeout: float = 10.0
    ssh_boot_retries: int = 30
    ssh_parallelism: int = 16
    stop_grace_seconds: float = 5.0
    # The reconciler (Celery beat, `cloudml-os beat`) runs every reconcile_interval seconds. A delivery
    # running a job's step holds a lease of step_lease_seconds, renewed every third of it; a handed-over
    # step must be picked up within step_pickup_seconds. An expired lease means the step's worker died or
    # its message was lost: the reconciler sends the step again.
    reconcile_interval: float = 15.0
    step_lease_seconds: float = 60.0
    step_pickup_seconds: float = 120.0
    # A node that answers nothing (no TCP, no SSH reply) for this long is taken as dead: the watch step fails
    # it (restartPolicy NEVER) or replaces it (ON_FAILURE) instead of waiting on it.
    node_unreachable_seconds: float = 60.0
    # First pause before a job's trainers are restarted (scheduling.restartPolicy ON_FAILURE); it doubles
    # with each further restart up to 6 minutes, as Kubernetes' Job backoff does.
    restart_backoff_seconds: float = 10.0
    local_address_prefix: str = "127.1"
    local_ssh_port: int = 2222
    local_port_base: int = 20000
    local_ports_per_node: int = 10
    # Local nodes in network namespaces of their own (root only), one veth each onto a host bridge, so a
    # node's link can be cut like a VM's; off by default (nodes on loopback addresses).
    local_network_isolation: bool = False
    local_network_bridge: str = "cmlos-nodes0"
    local_network_subnet: str = "10.232.0.0/24"
    # Where artifacts live: "local" (a folder, the embedded default) or "swift" (OpenStack mode).
    artifacts: str = "local"
    # How API callers authenticate: "local" (cloudml-os tokens) or "keystone" (keystonemiddleware).
    auth: str = "local"
    # OpenStack mode: the clouds.yaml entry of the platform's service account, used by the openstack driver,
    # the Swift store and keystonemiddleware (OS_CLIENT_CONFIG_FILE names the file, as for every client).
    openstack_cloud: str = "cloudml-os"
    # The clouds.yaml entry keystonemiddleware validates callers' tokens with: an account holding Keystone's
    # "service" role (kept apart from openstack_cloud so the platform's project needs no extra privilege).
    # Empty: openstack_cloud.
    openstack_auth_cloud: str = ""
    openstack_network: str = "cloudml-net"
    openstack_image: str = "cloudml-os-node"
    openstack_gpu_image: str = ""  # empty: GPU nodes boot openstack_image too
    openstack_ssh_user: str = "cloudml"
    openstack_control_plane_cidr: str = "10.0.0.0/8"
    openstack_node_port_first: int = 20000
    openstack_node_port_last: int = 20099
    openstack_runtime_root: str = "/opt/cloudml-os/runtimes"
    openstack_workdir: str = "/var/lib/cloudml-os"
    openstack_floating_network: str = ""  # empty: nodes are reached on their fixed addresses
    openstack_volume_size: int = 0  # GB; 0 boots from the image, more boots from a volume of that size
    openstack_stack_timeout: float = 900.0
    openstack_console_timeout: float = 300.0
    # Nodes of a job mount their project's Swift container read-only at /store/PROJECT (rclone, FUSE) with an
    # application credential made for the job alone and deleted at its end (docs/operator-guide.md).
    openstack_store_mount: bool = True
    # Where nodes reach Keystone (v3) and Swift when not at the catalog's public endpoints; in the Swift URL,
    # {project_id} stands for the platform's project. Empty: the catalog's.
    openstack_node_identity_url: str = ""
    openstack_node_object_store_url: str = ""
    swift_container_prefix: str = "cloudml-os-"
    swift_segment_size: int = 100 * 1024 * 1024
    # Tenancy: callers with the admin role in this project are platform admins (every project, quotas).
    admin_project: str = "admin"
    # Per-project quotas when the project has no override; -1 is unlimited (as in OpenStack).
    default_quota_gpus: int = -1
    default_quota_nodes: int = -1
    default_quota_jobs: int = -1
    default_quota_replicas: int = -1
    # This installation's id, carried by every cluster it creates (a Heat stack tag, a local cluster's folder)
    # so that it lists, and garbage-collects, only its own in a cloud project shared with other installations.
    # Empty: the one kept in the database (made once by the first process that asks: all processes sharing
    # the database agree, whatever host they run on). Set, it must equal the database's once made.
    installation_id: str = ""
    # Fernet key (urlsafe base64 of 32 bytes) encrypting clusters' SSH private keys in the database.
    # Empty: one is generated once and kept in data_dir/key-encryption.key (the embedded default).
    key_encryption_key: str = dataclasses.field(default="", repr=False)  # a secret: never in a repr
    # Largest request body the API reads (JSON bodies), and largest trainer package it accepts.
    max_request_bytes: int = 16 << 20
    max_package_bytes: int = 512 << 20
    # Objects API: the largest object (a PUT or a resumable upload), the unit in which a resumable upload to
    # Swift keeps bytes (its segments; the local store keeps every byte), and how long an unused resumable
    # upload session lives before the reconciler removes it with its bytes.
    max_object_bytes: int = 50 << 30
    upload_chunk_bytes: int = 8 << 20
    upload_session_ttl: float = 7 * 24 * 3600.0
    # The dashboard's session cookies are signed with this key. Empty: one is made once and kept in
    # data_dir/dashboard-session.key (the embedded default; every API process of the installation shares it).
    dashboard_secret_key: str = dataclasses.field(default="", repr=False)  # a secret: never in a repr
    # Send the dashboard's session cookie over HTTPS only (set it when a TLS proxy is in front).
    dashboard_secure_cookie: bool = False
    # The monitor records each replica's probes (count, failures, median and maximum latency) once per
    # replica_sample_seconds, and deletes samples older than replica_sample_retention_hours.
    replica_sample_seconds: float = 10.0
    replica_sample_retention_hours: float = 24.0
    # Request logging (a version's requestLoggingConfig): each API host spools sampled predictions on its own
    # disk (empty: data_dir/request-log-spool) and ships them to the store every request_log_segment_seconds;
    # past request_log_max_bytes of spool, records are dropped and counted (a version event says how many).
    request_log_spool_dir: Path | None = None
    request_log_max_bytes: int = 1 << 30
    request_log_segment_seconds: float = 2.0
    # A prediction for an autoscaled version at zero replicas starts one and waits at most this long for
    # it, then answers 503 with Retry-After.
    scale_from_zero_wait: float = 120.0
    machine_types: dict[str, MachineType] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_MACHINE_TYPES)
    )

    @property
    def artifacts_root(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def request_log_spool(self) -> Path:
        return self.request_log_spool_dir or self.data_dir / "request-log-spool"


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELD_TYPES[name]
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return str(value).strip().lower() in ("1", "true", "yes", "on")
            raise TypeError
        if kind in ("Path", "Path | None"):
            return Path(value).expanduser().absolute()
        if kind == "str":
            if not isinstance(value, str | int | float):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: expected {kind}, got {value!r}") from None
    return value


def _machine_types(table: dict[str, Any]) -> dict[str, MachineType]:
    types = dict(DEFAULT_MACHINE_TYPES)
    for name, entry in table.items():
        if not isinstance(entry, dict) or "flavor" not in entry:
            raise ConfigError(f"machine_types.{name}: needs a table with 'flavor' (and optional 'gpus')")
        gpus = entry.get("gpus", 0)
        if not isinstance(gpus, int) or gpus < 0:
            raise ConfigError(f"machine_types.{name}.gpus: expected a non-negative integer")
        types[name] = MachineType(name, str(entry["flavor"]), gpus)
    return types


def load_settings(
    path: str | os.PathLike | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read the TOML file (``CLOUDML_OS_CONFIG`` if no path), then environment, then ``overrides``.

    :raises ConfigError: on an unknown setting or a value of the wrong type.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    machine_types = _machine_types(raw.pop("machine_types", {}))
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG":
            name = key[len(ENV_PREFIX):].lower()
            if name in _FIELD_TYPES and name != "machine_types":
                raw[name] = value
    raw.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(raw) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values = {name: _coerce(name, value) for name, value in raw.items() if name != "machine_types"}
    data_dir = values.setdefault("data_dir", Path("var").absolute())
    values.setdefault("database_url", f"sqlite:///{data_dir}/cloudml-os.db")
    values.setdefault("broker_url", f"sqla+sqlite:///{data_dir}/broker.sqlite")
    settings = Settings(machine_types=machine_types, **values)
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    if not 0 < settings.api_port < 65536:
        raise ConfigError(f"setting 'api_port': {settings.api_port} is not a TCP port")
    if settings.watch_interval <= 0:
        raise ConfigError("setting 'watch_interval' must be positive")
    if settings.watch_window < 0:
        raise ConfigError("setting 'watch_window' must not be negative")
    if not 0 <= settings.output_sync_seconds <= 3600:
        raise ConfigError("setting 'output_sync_seconds' must be between 0 (off) and 3600")
    if settings.local_ports_per_node < 2:
        raise ConfigError("setting 'local_ports_per_node' must be at least 2")
    if settings.artifacts not in ("local", "swift"):
        raise ConfigError("setting 'artifacts' must be 'local' or 'swift'")
    if settings.auth not in ("local", "keystone"):
        raise ConfigError("setting 'auth' must be 'local' or 'keystone'")
    if not 0 < settings.openstack_node_port_first < settings.openstack_node_port_last < 65536:
        raise ConfigError("settings 'openstack_node_port_first' < 'openstack_node_port_last' must be TCP ports")
    if settings.swift_segment_size < 1024 * 1024:
        raise ConfigError("setting 'swift_segment_size' must be at least 1 MiB (Swift's SLO minimum)")
    if not settings.admin_project:
        raise ConfigError("setting 'admin_project' must name a project")
    for name in ("gpus", "nodes", "jobs", "replicas"):
        if getattr(settings, f"default_quota_{name}") < -1:
            raise ConfigError(f"setting 'default_quota_{name}' must be -1 (unlimited) or a non-negative count")
    if settings.key_encryption_key and not _is_fernet_key(settings.key_encryption_key):
        raise ConfigError("setting 'key_encryption_key' must be a Fernet key: urlsafe base64 of 32 bytes "
                          "(make one with: python -c 'from cryptography.fernet import Fernet; "
                          "print(Fernet.generate_key().decode())')")
    if settings.installation_id and not INSTALLATION_ID.fullmatch(settings.installation_id):
        raise ConfigError("setting 'installation_id' must be 1-56 letters, digits, '_', '.' or '-', starting with "
                          "a letter or digit (it becomes part of a Heat stack tag)")
    if settings.max_request_bytes < 1024 or settings.max_package_bytes < 1024:
        raise ConfigError("settings 'max_request_bytes' and 'max_package_bytes' must be at least 1024")
    if settings.max_object_bytes < 1 or settings.upload_session_ttl <= 0:
        raise ConfigError("settings 'max_object_bytes' and 'upload_session_ttl' must be positive")
    if settings.upload_chunk_bytes < 1 << 20 or settings.upload_chunk_bytes % (256 << 10):
        raise ConfigError("setting 'upload_chunk_bytes' must be at least 1 MiB and a multiple of 256 KiB")
    if min(settings.reconcile_interval, settings.step_lease_seconds, settings.step_pickup_seconds) <= 0:
        raise ConfigError("settings 'reconcile_interval', 'step_lease_seconds' and 'step_pickup_seconds' must be "
                          "positive")
    if settings.node_unreachable_seconds <= 0 or settings.restart_backoff_seconds < 0:
        raise ConfigError("setting 'node_unreachable_seconds' must be positive, 'restart_backoff_seconds' "
                          "not negative")
    try:
        subnet = ipaddress.ip_network(settings.local_network_subnet)
    except ValueError:
        raise ConfigError("setting 'local_network_subnet' must be an IPv4 network like '10.232.0.0/24'") from None
    if subnet.version != 4 or subnet.num_addresses < 4:
        raise ConfigError("setting 'local_network_subnet' must be an IPv4 network of at least 4 addresses")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", settings.local_network_bridge):
        raise ConfigError("setting 'local_network_bridge' must be a network interface name of 1-15 letters, "
                          "digits, '_', '.' or '-'")
    parts = settings.local_address_prefix.split(".")
    if len(parts) != 2 or parts[0] != "127" or not parts[1].isdigit() or not 0 <= int(parts[1]) < 256:
        raise ConfigError("setting 'local_address_prefix' must look like '127.N' (a loopback /16)")
    _validate_pip_options(settings.pip_index_url, settings.pip_extra_args)


def _validate_pip_options(index_url: str, extra_args: str) -> None:
    if index_url and not re.fullmatch(r"(https?|file)://\S+", index_url):
        raise ConfigError("setting 'pip_index_url' must be an http://, https:// or file:// URL (or empty: the "
                          "nodes' pip configuration)")
    try:
        words = shlex.split(extra_args)
    except ValueError as exc:
        raise ConfigError(f"setting 'pip_extra_args': {exc}") from None
    for word in words:
        option = word.split("=", 1)[0]
        if word.startswith("-") and option not in PIP_INDEX_OPTIONS:
            raise ConfigError(f"setting 'pip_extra_args': {option!r} is not one of pip's index options "
                              f"({', '.join(sorted(PIP_INDEX_OPTIONS))})")


def _is_fernet_key(key: str) -> bool:
    """Whether ``key`` is what ``Fernet(key)`` accepts: 32 bytes in urlsafe base64."""
    try:
        return len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError):
        return False

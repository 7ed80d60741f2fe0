"""The ``local`` compute driver: each node is an sshd on its own loopback address, like a small VM.

This is the embedded default's compute. A node's sshd runs as PID 1 of its own PID namespace
(``unshare --pid --fork --kill-child --mount-proc``), so killing that PID 1 ends every process started
through SSH at once, like powering a VM off. Nodes run in their own session and outlive the worker that
created them, as VMs outlive the API call that booted them.

All state lives in files under ``settings.data_dir / "nodes"`` (no database), so any worker process can
continue or delete what another one started::

    slots/N -> "CLUSTER/NODE"      symlink; its atomic creation allocates slot N (address and ports)
    gpus/I  -> "CLUSTER/NODE"      symlink; allocates host GPU index I
    locks/CLUSTER.lock             flock held while a cluster is created, resized or deleted, or has a node replaced
    clusters/CLUSTER/installation  the id of the installation that made it (``installation_id``), written
                                   first; a cluster whose id is another's is never listed, changed or deleted
                                   here, one without (made before ids) is listed only by a driver without one
    clusters/CLUSTER/cluster.json  written last by a create: the cluster is complete; afterwards it names
                                   every node that is (or is being) there, so a change cut short is
                                   finished or cleaned up by the next one
    clusters/CLUSTER/nodes/NODE/   node.json, hostkey(.pub), sshd_config, authorized_keys, sshd.log,
                                   unshare.pid, init.pid, work/

Slot N gives the address ``PREFIX.(N // 256).(N % 256)`` and the framework ports
``local_port_base + N * local_ports_per_node`` onwards.

Each node sees this host's files through its own mount namespace (:mod:`cloudml_os.cloud.node_view`, set up
before its sshd starts, at every boot): the platform's data folder is hidden but for the node's own folder, and
with the local artifact store ``/store/PROJECT`` holds the objects of the project the cluster's spec labels it
with (``labels["project"]``), read-only.

With ``local_network_isolation`` (root only), each node also gets a network namespace of its own, named
after the bridge and its slot, whose ``eth0`` is one end of a veth; the other end is plugged into the
bridge ``local_network_bridge`` on this host, which holds the first address of ``local_network_subnet``.
Slot N then has the subnet's address N + 1. Cutting the host end (``ip link set LINK down``) cuts the
node off like a VM whose network failed; :meth:`LocalDriver.host_link` names that link.

This module must not import paramiko (only ``cloudml_os.remote`` speaks SSH); it only checks that a node's
sshd accepts TCP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from cloudml_os.artifacts import PROJECT_ID_PATTERN
from cloudml_os.cloud import node_view
from cloudml_os.cloud.base import ClusterSpec, Driver, DriverError, NodeInfo, NodeSpec
from cloudml_os.config import Settings
from cloudml_os.keys import generate_keypair

SSHD = "/usr/sbin/sshd"
UNSHARE = "unshare"
IP = "ip"
RUN_SSHD = Path("/run/sshd")  # sshd's privilege separation directory; must exist
EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Cluster and node names become path components and symlink targets.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# sshd_config has no quoting we want to rely on: node paths must be plain.
_UNSAFE_PATH = re.compile(r"[\s\"'%\\#]")
INSTALLATION_FILE = "installation"
# The nodes' sshd get a clean environment, not the worker's (which may hold database passwords).
NODE_ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "LANG": "C.UTF-8"}

log = logging.getLogger(__name__)


class LocalDriver(Driver):
    """Clusters of sshd "VMs" on this host; see the module docstring for the layout on disk.

    :param settings: installation settings (``data_dir``, ``local_*``, ``runtimes_dir``).
    :param boot_timeout: seconds a node's sshd may take to accept TCP before creation fails.
    :param gpu_indices: the host's GPU indices to share out; None detects them with ``nvidia-smi``.
    """

    name = "local"

    @classmethod
    def store_mount(cls, settings: Settings) -> str | None:
        """``/store`` with the local artifact store, whose project folders are bound into nodes; None with Swift."""
        return node_view.STORE_ROOT if settings.artifacts == "local" else None

    def __init__(self, settings: Settings, *, boot_timeout: float = 15.0,
                 gpu_indices: Sequence[str] | None = None) -> None:
        self._settings = settings
        self._installation = settings.installation_id
        self._root = settings.data_dir / "nodes"
        self._boot_timeout = boot_timeout
        self._host_gpus: list[str] | None = None if gpu_indices is None else [str(i) for i in gpu_indices]
        # unshare processes this driver instance started; reaped so they do not linger as zombies.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- the Driver interface -------------------------------------------------------------------

    def create_cluster(self, spec: ClusterSpec) -> list[NodeInfo]:
        username = self._begin(spec)
        with self._cluster_lock(spec.name) as lock_path:
            cluster_dir = self._cluster_dir(spec.name)
            self._check_ours(spec.name, cluster_dir)
            if (cluster_dir / "cluster.json").exists():
                return self._checked_resume(spec, cluster_dir)
            return self._create(spec, cluster_dir, lock_path, username)

    def resize_cluster(self, spec: ClusterSpec) -> list[NodeInfo]:
        username = self._begin(spec)
        with self._cluster_lock(spec.name) as lock_path:
            cluster_dir = self._cluster_dir(spec.name)
            self._check_ours(spec.name, cluster_dir)
            if not (cluster_dir / "cluster.json").exists():
                return self._create(spec, cluster_dir, lock_path, username)
            try:
                self._resize(spec, cluster_dir, username)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DriverError(f"cluster {spec.name}: could not resize it: {exc}") from exc
            return self._checked_resume(spec, cluster_dir)

    def replace_node(self, spec: ClusterSpec, node: str) -> NodeInfo:
        username = self._begin(spec)
        wanted = next((candidate for candidate in spec.nodes if candidate.name == node), None)
        if wanted is None:
            raise DriverError(f"cluster {spec.name}: node {node!r} to replace is not one of the spec's nodes "
                              f"{[candidate.name for candidate in spec.nodes]}")
        with self._cluster_lock(spec.name) as lock_path:
            cluster_dir = self._cluster_dir(spec.name)
            self._check_ours(spec.name, cluster_dir)
            recorded = _recorded_nodes(cluster_dir)
            if recorded is None:
                if not cluster_dir.exists():
                    lock_path.unlink(missing_ok=True)
                raise DriverError(f"cluster {spec.name} does not exist: it has no node {node} to replace")
            if node not in recorded:
                raise DriverError(f"cluster {spec.name} has no node {node} to replace; its nodes are {recorded}")
            try:
                return self._replace(spec, cluster_dir, wanted, username)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DriverError(f"cluster {spec.name}: could not replace node {node}: {exc}") from exc

    def delete_cluster(self, name: str) -> None:
        _check_name(name, "cluster")
        self._reap_children()
        if not self._root.exists():
            return
        self._make_dirs()
        with self._cluster_lock(name) as lock_path:
            owner = self._another_installation(self._cluster_dir(name))
            if owner:
                log.warning("cluster %s belongs to the installation %s, not this one: left as it is", name, owner)
                return
            self._destroy(name)
            lock_path.unlink(missing_ok=True)

    def list_clusters(self) -> list[str]:
        clusters = self._root / "clusters"
        if not clusters.is_dir():
            return []
        return sorted(entry.name for entry in clusters.iterdir()
                      if entry.is_dir() and _installation_of(entry) == self._installation)

    def recorded_nodes(self) -> list[tuple[str, NodeInfo, bool]]:
        """(cluster, node, whether its sshd runs) of every node of this installation's clusters, from the
        driver's own records; for an operator's listing of what outlives the control plane."""
        processes = _unshare_processes()
        found = []
        for cluster in self.list_clusters():
            for name in _recorded_nodes(self._cluster_dir(cluster)) or []:
                node_dir = self._cluster_dir(cluster) / "nodes" / name
                try:
                    info = _load_node(node_dir)
                except FileNotFoundError:  # the remains of a change cut short: no node to speak of
                    continue
                found.append((cluster, info, str(node_dir / "sshd_config") in processes))
        return found

    def host_link(self, cluster: str, node: str) -> str | None:
        """The host end of the node's veth (``local_network_isolation``), or None when nodes share the host's
        network. Setting it down cuts the node off; setting it up again reconnects it."""
        if not self._settings.local_network_isolation:
            return None
        state = json.loads((self._cluster_dir(cluster) / "nodes" / node / "node.json").read_text())
        return self._network_names(state["slot"])[1]

    # -- creating ------------------------------------------------------------------------------

    def _begin(self, spec: ClusterSpec) -> str:
        """Checks and preparations every change of a cluster starts with; returns the nodes' username."""
        _check_spec(spec)
        username = _root_username()
        self._reap_children()
        self._make_dirs()
        return username

    def _create(self, spec: ClusterSpec, cluster_dir: Path, lock_path: Path, username: str) -> list[NodeInfo]:
        """Create a cluster that has no cluster.json (lock held); on failure leave nothing behind."""
        if cluster_dir.exists() or self._owned(self._slots_dir, spec.name):
            # A create that crashed half way: start over rather than guess what it finished.
            self._destroy(spec.name)
        try:
            return self._build(spec, cluster_dir, username)
        except BaseException as exc:
            self._destroy(spec.name)
            lock_path.unlink(missing_ok=True)
            if isinstance(exc, DriverError) or not isinstance(exc, Exception):
                raise
            raise DriverError(f"cluster {spec.name}: could not create its nodes: {exc}") from exc

    def _build(self, spec: ClusterSpec, cluster_dir: Path, username: str) -> list[NodeInfo]:
        cluster_dir.mkdir(parents=True)
        if self._installation:
            _write_atomically(cluster_dir / INSTALLATION_FILE, self._installation + "\n")
        infos = self._add_nodes(spec, cluster_dir, spec.nodes, username)
        _record_nodes(cluster_dir, spec.name, [node.name for node in spec.nodes])
        return infos

    def _add_nodes(self, spec: ClusterSpec, cluster_dir: Path, nodes: Iterable[NodeSpec],
                   username: str) -> list[NodeInfo]:
        """Claim a slot and GPUs for each new node, write its files and boot it; the caller cleans up on failure."""
        prepared: list[tuple[Path, NodeInfo]] = []
        for node in nodes:
            node_dir = cluster_dir / "nodes" / node.name
            node_dir.mkdir(parents=True)
            owner = f"{spec.name}/{node.name}"
            slot = self._allocate_slot(owner)
            gpus = self._allocate_gpus(owner, node)
            prepared.append((node_dir, self._prepare_node(node_dir, spec, node, slot, gpus, username)))
        # Boot every node first and wait afterwards, so a cluster boots in the time of one node.
        started = [(node_dir, info, self._start_node(node_dir, info, spec)) for node_dir, info in prepared]
        for node_dir, info, pid in started:
            self._wait_booted(node_dir, info, pid)
        return [info for _, info in prepared]

    def _checked_resume(self, spec: ClusterSpec, cluster_dir: Path) -> list[NodeInfo]:
        try:
            return self._resume(spec, cluster_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DriverError(f"cluster {spec.name}: cannot resume it from {cluster_dir}: {exc}") from exc

    def _resume(self, spec: ClusterSpec, cluster_dir: Path) -> list[NodeInfo]:
        """Return an existing cluster's nodes, rebooting (same slot, same keys) any whose sshd died."""
        recorded = _recorded_nodes(cluster_dir)
        if recorded is None:
            raise FileNotFoundError(cluster_dir / "cluster.json")
        wanted = [node.name for node in spec.nodes]
        if recorded != wanted:
            raise DriverError(f"cluster {spec.name} already exists with nodes {recorded}, not {wanted}")
        processes = _unshare_processes()
        nodes = [(cluster_dir / "nodes" / name) for name in recorded]
        infos = [_load_node(node_dir) for node_dir in nodes]
        rebooting = []
        for node_dir, info in zip(nodes, infos, strict=True):
            unshare_pid = processes.get(str(node_dir / "sshd_config"))
            if unshare_pid is None or namespace_init(unshare_pid) is None:
                self._kill_node(node_dir, processes)
                rebooting.append((node_dir, info, self._start_node(node_dir, info, spec)))
            else:
                rebooting.append((node_dir, info, unshare_pid))
        for node_dir, info, pid in rebooting:
            try:
                self._wait_booted(node_dir, info, pid)
            except DriverError:
                if alive(pid):
                    raise
                # It died while being looked at (a node killed a moment ago): boot it once more.
                self._kill_node(node_dir, _unshare_processes())
                self._wait_booted(node_dir, info, self._start_node(node_dir, info, spec))
        return infos

    # -- changing ------------------------------------------------------------------------------

    def _resize(self, spec: ClusterSpec, cluster_dir: Path, username: str) -> None:
        """Add the nodes ``spec`` names that the cluster lacks, then remove the ones it does not name.

        Nodes are added first so that a failed addition keeps the cluster as it was. cluster.json names the
        nodes being added before anything of them exists and drops the removed ones only after everything
        of them is gone; a node without node.json is the remains of a change cut short and is made anew.
        """
        recorded = _recorded_nodes(cluster_dir) or []
        present: dict[str, NodeInfo] = {}
        for name in recorded:
            with contextlib.suppress(FileNotFoundError):
                present[name] = _load_node(cluster_dir / "nodes" / name)
        wanted = [node.name for node in spec.nodes]
        for node in spec.nodes:
            if node.name in present:
                _check_same_node(spec.name, present[node.name], node)
        adding = [node for node in spec.nodes if node.name not in present]
        if adding:
            added = {node.name for node in adding}
            _record_nodes(cluster_dir, spec.name, recorded + [name for name in wanted
                                                              if name in added and name not in recorded])
            processes = _unshare_processes()
            for node in adding:
                self._remove_node(spec.name, node.name, processes)
            try:
                self._add_nodes(spec, cluster_dir, adding, username)
            except BaseException:
                processes = _unshare_processes()
                for node in adding:
                    self._remove_node(spec.name, node.name, processes)
                _record_nodes(cluster_dir, spec.name, [name for name in recorded if name not in added])
                raise
        removing = [name for name in recorded if name not in wanted]
        processes = _unshare_processes()
        for name in removing:
            self._remove_node(spec.name, name, processes)
        if recorded != wanted:
            _record_nodes(cluster_dir, spec.name, wanted)

    def _replace(self, spec: ClusterSpec, cluster_dir: Path, node: NodeSpec, username: str) -> NodeInfo:
        """Power the node off, wipe its disk and boot it again with a new host key in the same slot."""
        node_dir = cluster_dir / "nodes" / node.name
        try:
            state = json.loads((node_dir / "node.json").read_text())
        except FileNotFoundError:
            state = None
        else:
            _check_same_node(spec.name, _load_node(node_dir), node)
        processes = _unshare_processes()
        try:
            if state is None:
                # The remains of a change cut short: make the node anew, as a resize would.
                self._remove_node(spec.name, node.name, processes)
                [info] = self._add_nodes(spec, cluster_dir, [node], username)
                return info
            # The slot and GPU claims stay with the node; only its processes and files go.
            self._kill_node(node_dir, processes)
            _remove_folder(node_dir)
            node_dir.mkdir()
            gpus = [index for index in state["environment"]["CUDA_VISIBLE_DEVICES"].split(",") if index]
            info = self._prepare_node(node_dir, spec, node, state["slot"], gpus, username)
            self._wait_booted(node_dir, info, self._start_node(node_dir, info, spec))
            return info
        except BaseException:
            # Left powered off; cluster.json still names it, so a later change or delete finds it.
            self._kill_node(node_dir, _unshare_processes())
            raise

    def _prepare_node(self, node_dir: Path, spec: ClusterSpec, node: NodeSpec, slot: int,
                      gpus: list[str], username: str) -> NodeInfo:
        """Write the node's keys, sshd_config and node.json; start nothing."""
        if _UNSAFE_PATH.search(str(node_dir)):
            raise DriverError(f"data_dir {self._settings.data_dir} contains characters (whitespace, quotes, "
                              "%, #, backslash) that cannot be written into an sshd_config")
        settings = self._settings
        port_first = settings.local_port_base + slot * settings.local_ports_per_node
        if not settings.local_network_isolation:
            _warn_if_ephemeral(port_first, port_first + settings.local_ports_per_node - 1)
        info = NodeInfo(
            name=node.name,
            task_type=node.task_type,
            task_index=node.task_index,
            address=self._node_address(slot),
            ssh_port=settings.local_ssh_port,
            username=username,
            host_keys=(write_host_key(node_dir),),
            port_first=port_first,
            port_last=port_first + settings.local_ports_per_node - 1,
            workdir=str(node_dir / "work"),
            runtime_root=str(settings.runtimes_dir),
            environment={"CUDA_VISIBLE_DEVICES": ",".join(gpus)},
        )
        (node_dir / "work").mkdir()
        (node_dir / "authorized_keys").write_text(spec.public_key.strip() + "\n")
        (node_dir / "sshd_config").write_text(_sshd_config(node_dir, info))
        _write_atomically(node_dir / "node.json", json.dumps({"slot": slot, **dataclasses.asdict(info)}))
        return info

    def _start_node(self, node_dir: Path, info: NodeInfo, spec: ClusterSpec) -> int:
        """Start the node's sshd as PID 1 of a new PID namespace, in its own session; return unshare's pid.

        With network isolation the node's network namespace is made anew first and sshd starts inside it. In the
        new mount namespace, a script shapes the node's view of the files before it execs sshd; the project whose
        objects it shows comes from the spec, never from the node's folder (which the node can write).
        """
        state = json.loads((node_dir / "node.json").read_text())
        view = self._view(node_dir, spec.labels.get("project"))
        prefix: list[str] = []
        if self._settings.local_network_isolation:
            prefix = [IP, "netns", "exec", self._plug(state["slot"])]
        elif accepts_tcp(info.address, info.ssh_port):
            raise DriverError(f"node {info.name}: {info.address}:{info.ssh_port} is already in use by a "
                              "process this driver does not manage")
        RUN_SSHD.mkdir(mode=0o755, parents=True, exist_ok=True)
        log_path = node_dir / "sshd.log"
        # sshd's "-f CONFIG" stays in unshare's own argv: _unshare_processes finds nodes by it.
        sshd = [SSHD, "-D", "-f", str(node_dir / "sshd_config"), "-E", str(log_path)]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [*prefix, UNSHARE, "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
                 *node_view.wrap(view, sshd)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=NODE_ENVIRONMENT,
            )
        self._children[process.pid] = process
        _write_atomically(node_dir / "unshare.pid", f"{process.pid}\n")
        return process.pid

    def _view(self, node_dir: Path, project: str | None) -> node_view.NodeView:
        """The node's view of the files; makes the folders it mounts (the store's ``/store``, the project's)."""
        settings = self._settings
        artifacts = settings.artifacts_root if self.store_mount(settings) else None
        try:
            view = node_view.view_for(settings.data_dir, node_dir, settings.runtimes_dir, project, artifacts)
        except ValueError as exc:
            raise DriverError(f"node {node_dir.name}: cannot set up its view of the files: {exc}") from None
        Path(node_view.STORE_ROOT).mkdir(mode=0o755, exist_ok=True)  # the mount point; stays empty on this host
        for folder in (*view.kept, *([view.project_source] if view.project_source else [])):
            folder.mkdir(parents=True, exist_ok=True)
        return view

    def _wait_booted(self, node_dir: Path, info: NodeInfo, unshare_pid: int) -> None:
        """Wait until the node's sshd accepts TCP; fail early if its namespace died."""
        deadline = time.monotonic() + self._boot_timeout
        while True:
            init_pid = namespace_init(unshare_pid)
            if init_pid is not None and accepts_tcp(info.address, info.ssh_port):
                _write_atomically(node_dir / "init.pid", f"{init_pid}\n")
                return
            if not alive(unshare_pid):
                raise DriverError(f"node {info.name}: sshd exited while booting; sshd.log ends with:\n"
                                  f"{tail(node_dir / 'sshd.log')}")
            if time.monotonic() > deadline:
                raise DriverError(f"node {info.name}: sshd did not accept connections on {info.address}:"
                                  f"{info.ssh_port} within {self._boot_timeout:g}s; sshd.log ends with:\n"
                                  f"{tail(node_dir / 'sshd.log')}")
            time.sleep(0.02)

    # -- slots and GPUs ------------------------------------------------------------------------

    def _allocate_slot(self, owner: str) -> int:
        settings = self._settings
        last_by_port = (65536 - settings.local_port_base) // settings.local_ports_per_node - 1
        last = min(65535, last_by_port)
        if settings.local_network_isolation:
            # Network, bridge and broadcast addresses are no node's.
            last = min(last, ipaddress.ip_network(settings.local_network_subnet).num_addresses - 3)
        for slot in range(1, last + 1):
            if slot % 256 in (0, 255) or not _claim(self._slots_dir / str(slot), owner):
                continue
            if settings.local_network_isolation:
                if Path("/run/netns", self._network_names(slot)[0]).exists():
                    # Another installation on the same bridge holds this slot's namespace (a slot just
                    # claimed here has none of ours): leave it alone.
                    (self._slots_dir / str(slot)).unlink()
                    continue
                return slot
            if accepts_tcp(_slot_address(settings.local_address_prefix, slot), settings.local_ssh_port):
                # Someone outside this data_dir (another installation, a test run) listens there.
                (self._slots_dir / str(slot)).unlink()
                continue
            return slot
        where = (settings.local_network_subnet if settings.local_network_isolation
                 else f"{settings.local_address_prefix}.0.0/16")
        raise DriverError(f"no free node slot left on this host: every address and port range of {where} is "
                          "taken; delete some clusters")

    def _allocate_gpus(self, owner: str, node: NodeSpec) -> list[str]:
        if node.gpus <= 0:
            return []
        host_gpus = self._detect_gpus()
        taken: list[str] = []
        for index in host_gpus:
            if len(taken) == node.gpus:
                break
            if _claim(self._gpus_dir / index, owner):
                taken.append(index)
        if len(taken) < node.gpus:
            for index in taken:
                (self._gpus_dir / index).unlink(missing_ok=True)
            if not host_gpus:
                raise DriverError(f"node {node.name} needs {node.gpus} GPU(s) but this host has no "
                                  "NVIDIA GPU (nvidia-smi not found or it lists none)")
            raise DriverError(f"node {node.name} needs {node.gpus} GPU(s) but only {len(taken)} of this "
                              f"host's {len(host_gpus)} are free")
        return taken

    def _detect_gpus(self) -> list[str]:
        if self._host_gpus is None:
            nvidia_smi = shutil.which("nvidia-smi")
            self._host_gpus = []
            if nvidia_smi:
                result = subprocess.run([nvidia_smi, "--query-gpu=index", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=60, check=False)
                if result.returncode == 0:
                    self._host_gpus = [line.strip() for line in result.stdout.splitlines()
                                       if line.strip().isdigit()]
        return self._host_gpus

    @staticmethod
    def _owned(folder: Path, owner: str) -> list[Path]:
        """Claims (slots or GPUs) held by any node of the cluster ``owner``, or by the node ``owner`` ("C/N")."""
        if not folder.is_dir():
            return []
        owned = []
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(entry)
                if target == owner or target.startswith(owner + "/"):
                    owned.append(entry)
        return owned

    # -- deleting ------------------------------------------------------------------------------

    def _destroy(self, name: str) -> None:
        """Kill every node of the cluster, remove its folder, release its slots and GPUs (lock held)."""
        cluster_dir = self._cluster_dir(name)
        nodes_dir = cluster_dir / "nodes"
        processes = _unshare_processes()
        for config in list(processes):
            node_dir = Path(config).parent
            if node_dir.parent == nodes_dir:
                self._kill_node(node_dir, processes)
        _remove_folder(cluster_dir)
        self._release_claims(name)

    def _remove_node(self, cluster: str, node: str, processes: dict[str, int]) -> None:
        """Kill one node, remove its folder, release its slot and GPUs (lock held)."""
        node_dir = self._cluster_dir(cluster) / "nodes" / node
        self._kill_node(node_dir, processes)
        _remove_folder(node_dir)
        self._release_claims(f"{cluster}/{node}")

    def _release_claims(self, owner: str) -> None:
        """Release the slots and GPUs of a cluster or one node, only once its processes are gone.

        Released last, so a slot's address is never reused while an old sshd could still hold it.
        """
        for claim in self._owned(self._slots_dir, owner) + self._owned(self._gpus_dir, owner):
            if claim.parent == self._slots_dir and self._settings.local_network_isolation:
                self._unplug(int(claim.name))
            claim.unlink(missing_ok=True)

    # -- network isolation ---------------------------------------------------------------------

    def _node_address(self, slot: int) -> str:
        if not self._settings.local_network_isolation:
            return _slot_address(self._settings.local_address_prefix, slot)
        return str(ipaddress.ip_network(self._settings.local_network_subnet).network_address + 1 + slot)

    def _network_names(self, slot: int) -> tuple[str, str]:
        """(network namespace, host end of the veth) of a slot; the link name fits in 15 characters."""
        bridge = self._settings.local_network_bridge
        return f"{bridge}-s{slot}", f"cv{zlib.crc32(bridge.encode()) % 100000:05d}s{slot}"

    def _plug(self, slot: int) -> str:
        """Make the slot's network namespace anew, its veth on the bridge; return the namespace's name."""
        settings = self._settings
        subnet = ipaddress.ip_network(settings.local_network_subnet)
        self._ensure_bridge(f"{subnet.network_address + 1}/{subnet.prefixlen}")
        self._unplug(slot)
        netns, link = self._network_names(slot)
        _ip("netns", "add", netns)
        try:
            _ip("-n", netns, "link", "set", "lo", "up")
            # A MAC of the slot's own: a node booted again in the slot has the same address and MAC, so this
            # host's ARP entry for it stays right (a new random MAC would be unreachable until it expired).
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "address", self._mac(slot),
                "netns", netns)
            _ip("link", "set", link, "master", settings.local_network_bridge, "up")
            _ip("-n", netns, "addr", "add", f"{self._node_address(slot)}/{subnet.prefixlen}", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
        except BaseException:
            self._unplug(slot)
            raise
        return netns

    def _mac(self, slot: int) -> str:
        """A locally administered unicast MAC made of the bridge's name and the slot."""
        bridge = zlib.crc32(self._settings.local_network_bridge.encode())
        octets = [0x02, (bridge >> 16) & 0xFF, (bridge >> 8) & 0xFF, bridge & 0xFF, (slot >> 8) & 0xFF, slot & 0xFF]
        return ":".join(f"{octet:02x}" for octet in octets)

    def _unplug(self, slot: int) -> None:
        """Delete the slot's network namespace and veth, if any (the node's processes are gone already)."""
        netns, link = self._network_names(slot)
        if Path("/run/netns", netns).exists():
            _ip("netns", "del", netns, check=False)
        if Path("/sys/class/net", link).exists():
            _ip("link", "del", link, check=False)

    def _ensure_bridge(self, address: str) -> None:
        bridge = self._settings.local_network_bridge
        if not Path("/sys/class/net", bridge).exists():
            _ip("link", "add", bridge, "type", "bridge", check=False)  # another worker may race us to it
        # A bridge takes the lowest MAC of its ports unless given one: plugging a node in would change it under
        # the other nodes' ARP entries, and their replies would go nowhere.
        _ip("link", "set", bridge, "address", self._mac(0))
        if address not in _ip("-o", "addr", "show", "dev", bridge).split():
            _ip("addr", "add", address, "dev", bridge, check=False)
        _ip("link", "set", bridge, "up")

    def _kill_node(self, node_dir: Path, processes: dict[str, int]) -> None:
        """SIGKILL the node's namespace PID 1, which ends every process of the node; wait until it is gone.

        The unshare parent reaps PID 1 and exits by itself; it is killed only if it has no child or lingers.
        """
        unshare_pid = processes.pop(str(node_dir / "sshd_config"), None)
        if unshare_pid is None:
            return
        init_pid = namespace_init(unshare_pid)
        sigkill(init_pid if init_pid is not None else unshare_pid)
        started = time.monotonic()
        while alive(unshare_pid) or (init_pid is not None and alive(init_pid)):
            self._reap_children()
            waited = time.monotonic() - started
            if waited > 2.0:
                sigkill(unshare_pid)
            if waited > 10.0:
                raise DriverError(f"node {node_dir.name}: its processes did not exit after SIGKILL")
            time.sleep(0.01)
        self._reap_children()

    # -- helpers -------------------------------------------------------------------------------

    def _another_installation(self, cluster_dir: Path) -> str:
        """The id of the installation that made the cluster if it is another one, else ""."""
        owner = _installation_of(cluster_dir)
        return owner if owner and owner != self._installation else ""

    def _check_ours(self, name: str, cluster_dir: Path) -> None:
        """Refuse to touch a cluster another installation made (lock held)."""
        if owner := self._another_installation(cluster_dir):
            raise DriverError(f"cluster {name} belongs to another cloudml-os installation ({owner}) that shares "
                              f"this host's {self._root}; this one leaves it alone")

    @property
    def _slots_dir(self) -> Path:
        return self._root / "slots"

    @property
    def _gpus_dir(self) -> Path:
        return self._root / "gpus"

    def _cluster_dir(self, name: str) -> Path:
        return self._root / "clusters" / name

    def _make_dirs(self) -> None:
        for folder in ("slots", "gpus", "locks", "clusters"):
            (self._root / folder).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _cluster_lock(self, name: str) -> Iterator[Path]:
        """Hold an exclusive flock for one cluster across processes; yields the lock file's path.

        Deleting the lock file while holding it is allowed: a waiter that then gets the lock of the
        unlinked file notices the path now names another file (or none) and locks again.
        """
        path = self._root / "locks" / f"{name}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield path
        finally:
            os.close(fd)

    def _reap_children(self) -> None:
        for pid, process in list(self._children.items()):
            if process.poll() is not None:
                self._children.pop(pid, None)


# -- pure helpers --------------------------------------------------------------------------------


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise DriverError(f"{what} name {name!r} must be 1-128 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")


def _check_spec(spec: ClusterSpec) -> None:
    _check_name(spec.name, "cluster")
    names = [node.name for node in spec.nodes]
    for name in names:
        _check_name(name, "node")
    if len(set(names)) != len(names):
        raise DriverError(f"cluster {spec.name}: node names must be unique, got {names}")
    if not spec.nodes:
        raise DriverError(f"cluster {spec.name}: needs at least one node")
    project = spec.labels.get("project")
    if project is not None and not re.fullmatch(PROJECT_ID_PATTERN, project):
        raise DriverError(f"cluster {spec.name}: label project {project!r} is not a project id")
    key = spec.public_key.strip()
    if not key or "\n" in key or "\r" in key:
        raise DriverError(f"cluster {spec.name}: public_key must be one OpenSSH public key line")


def _root_username() -> str:
    if os.geteuid() != 0:
        raise DriverError("the local driver needs root: each node's sshd runs as PID 1 of its own PID "
                          "namespace (unshare --pid) and accepts root logins; run the worker as root or "
                          "use the openstack driver")
    return pwd.getpwuid(0).pw_name


def _ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its output. :raises DriverError: when it fails and ``check``."""
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise DriverError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def ephemeral_port_range() -> tuple[int, int] | None:
    """The ports this host's kernel hands to outgoing connections (``net.ipv4.ip_local_port_range``)."""
    try:
        low, high = map(int, EPHEMERAL_PORTS.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def _warn_if_ephemeral(first: int, last: int) -> None:
    """Trainers listen on all interfaces (TensorFlow's gRPC server binds ``*:PORT``), so a node port that
    an outgoing connection anywhere on the host holds cannot be bound: the job fails now and then."""
    ephemeral = ephemeral_port_range()
    if ephemeral and first <= ephemeral[1] and last >= ephemeral[0]:
        log.warning("local node ports %d-%d lie in this host's ephemeral port range %d-%d "
                    "(net.ipv4.ip_local_port_range): a trainer may now and then fail to listen on them; "
                    "set local_port_base below it", first, last, *ephemeral)


def _slot_address(prefix: str, slot: int) -> str:
    return f"{prefix}.{slot // 256}.{slot % 256}"


def _claim(path: Path, owner: str) -> bool:
    """Atomically create the symlink ``path -> owner``; False if someone holds it already."""
    try:
        os.symlink(owner, path)
    except FileExistsError:
        return False
    return True


def write_host_key(node_dir: Path, name: str = "hostkey", comment: str = "") -> str:
    """Generate a node's ed25519 host key in OpenSSH format as ``NAME`` and ``NAME.pub``; return the public line."""
    private, public = generate_keypair(comment)
    fd = os.open(node_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(private)
    (node_dir / f"{name}.pub").write_text(public + "\n")
    return public


def _sshd_config(node_dir: Path, info: NodeInfo) -> str:
    # The node's own home, as a VM has: the shell sshd starts reads that .bashrc, not this host's.
    # Every session sees the node's GPUs only, as on a VM given just those devices.
    return sshd_config(listen_address=info.address, port=info.ssh_port, host_key=node_dir / "hostkey",
                       authorized_keys=node_dir / "authorized_keys", pid_file=node_dir / "sshd.pid",
                       environment={"HOME": info.workdir, **info.environment})


def sshd_config(*, listen_address: str, port: int, host_key: Path, authorized_keys: Path, pid_file: Path,
                environment: Mapping[str, str]) -> str:
    """An sshd_config for one node: key logins of root only, SFTP, ``environment`` set in every session.

    Shared with the test cloud's emulated Nova, whose servers run the same sshd as this driver's nodes.
    """
    lines = [
        f"ListenAddress {listen_address}",
        f"Port {port}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"PidFile {pid_file}",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PrintMotd no",
        "X11Forwarding no",
        "Subsystem sftp internal-sftp",
    ]
    if environment:
        lines.append("SetEnv " + " ".join(f"{key}={value}" for key, value in environment.items()))
    return "\n".join(lines) + "\n"


def _check_same_node(cluster: str, info: NodeInfo, node: NodeSpec) -> None:
    """A node is kept or replaced by name; refuse a spec that gives that name another role or GPU count."""
    gpus = len([index for index in info.environment.get("CUDA_VISIBLE_DEVICES", "").split(",") if index])
    if (info.task_type, info.task_index, gpus) != (node.task_type, node.task_index, node.gpus):
        raise DriverError(f"cluster {cluster}: node {node.name} exists as {info.task_type} {info.task_index} "
                          f"with {gpus} GPU(s), not {node.task_type} {node.task_index} with {node.gpus}; "
                          "a node keeps its role and GPUs for as long as it keeps its name")


def _recorded_nodes(cluster_dir: Path) -> list[str] | None:
    """The node names cluster.json lists, or None when the cluster has none (missing or half created)."""
    try:
        return list(json.loads((cluster_dir / "cluster.json").read_text())["nodes"])
    except FileNotFoundError:
        return None


def _installation_of(cluster_dir: Path) -> str:
    """The id of the installation that made the cluster; "" when none is recorded (made before ids)."""
    try:
        return (cluster_dir / INSTALLATION_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


def _record_nodes(cluster_dir: Path, cluster: str, names: Sequence[str]) -> None:
    _write_atomically(cluster_dir / "cluster.json", json.dumps({"name": cluster, "nodes": list(names)}))


def _remove_folder(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise DriverError(f"could not remove {path}: {exc}") from exc


def _load_node(node_dir: Path) -> NodeInfo:
    state = json.loads((node_dir / "node.json").read_text())
    fields = {field.name for field in dataclasses.fields(NodeInfo)}
    values = {key: value for key, value in state.items() if key in fields}
    values["host_keys"] = tuple(values["host_keys"])
    return NodeInfo(**values)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def accepts_tcp(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _proc_state(pid: int) -> str | None:
    """The process's state letter from /proc, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Running and not a zombie (a zombie has already released everything it held)."""
    return _proc_state(pid) not in (None, "Z", "X")


def namespace_init(unshare_pid: int) -> int | None:
    """Host pid of the namespace's PID 1 (the only child of ``unshare --fork``), if alive."""
    try:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        if alive(int(child)):
            return int(child)
    return None


def _unshare_processes() -> dict[str, int]:
    """Live ``unshare … sshd -f CONFIG`` processes on this host, by CONFIG path.

    Found from /proc rather than pid files, so a node whose pid was never recorded (a crash right after
    it started) is still found and killed.
    """
    found: dict[str, int] = {}
    for entry in _proc_entries():
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != UNSHARE.encode() or b"-f" not in argv:
            continue
        index = argv.index(b"-f") + 1
        if index < len(argv) and alive(entry):
            found[os.fsdecode(argv[index])] = entry
    return found


def _proc_entries() -> Iterable[int]:
    return (int(name) for name in os.listdir("/proc") if name.isdigit())


def tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return "(no log)"
    return data.decode(errors="replace").strip() or "(empty log)"

"""The compute driver interface: create, describe and delete a cluster of SSH-reachable nodes.

A driver knows nothing of jobs or frameworks. It is given a :class:`ClusterSpec` (a deterministic
name, the nodes wanted, the cluster's public key) and returns :class:`NodeInfo` for each node: where to
reach it, which host keys to pin, which ports the framework may use. ``create_cluster`` and
``delete_cluster`` are idempotent by cluster name, so a redelivered task neither duplicates nor leaks.
Every cluster a driver creates carries the installation's id (``settings.installation_id``), and a driver
lists only clusters that carry it, and never changes or deletes one that carries another's: installations
may share a cloud project. Drivers are found through the ``cloudml_os.drivers`` entry point group.
"""

from __future__ import annotations

import abc
import dataclasses
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudml_os.config import Settings


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One node wanted: its name inside the cluster, its role, and the machine type's flavor and GPUs."""

    name: str
    task_type: str
    task_index: int
    flavor: str
    gpus: int = 0


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: tuple[NodeSpec, ...]
    public_key: str  # OpenSSH one-line public key of the cluster's own keypair
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """How to reach a created node and what it offers.

    ``host_keys`` are OpenSSH public key lines ("ssh-ed25519 AAAA…") known before the first connection;
    the SSH client pins them. ``environment`` holds variables every process on the node gets (e.g.
    ``CUDA_VISIBLE_DEVICES``). ``workdir`` is a writable directory on the node; ``runtime_root`` is the
    directory holding framework runtimes on the node.
    """

    name: str
    task_type: str
    task_index: int
    address: str
    ssh_port: int
    username: str
    host_keys: tuple[str, ...]
    port_first: int
    port_last: int
    workdir: str
    runtime_root: str
    environment: dict[str, str] = dataclasses.field(default_factory=dict)


class DriverError(RuntimeError):
    """The cloud could not do what was asked; the message is safe to show to the job's owner."""


class Driver(abc.ABC):
    name: str

    @classmethod
    def store_mount(cls, settings: Settings) -> str | None:
        """Where this driver's nodes see their project's objects as read-only files under ``settings``: a
        root such that ``store://PROJECT/NAME`` is ``ROOT/PROJECT/NAME`` on a node of a cluster labelled with
        that project (and no other project's objects are there), or None when nodes get no such view; then a
        ``store://`` word in a job's args is refused at submission. A class method, so that the API can ask
        without creating a driver."""
        return None

    @abc.abstractmethod
    def create_cluster(self, spec: ClusterSpec) -> list[NodeInfo]:
        """Create the cluster's nodes, or return the existing ones if it already exists, booted.

        :raises DriverError: when the nodes cannot be created (nothing created is left behind), or a
            cluster of that name carries another installation's id.
        """

    @abc.abstractmethod
    def resize_cluster(self, spec: ClusterSpec) -> list[NodeInfo]:
        """Make an existing cluster hold exactly ``spec.nodes``, and return them.

        Nodes named in ``spec`` that the cluster lacks are created; nodes the cluster has that ``spec`` does
        not name are deleted with everything they run; the others are left alone (same address, host keys,
        processes). A task type's indices need not be contiguous: removing ``worker-1`` of three workers
        leaves ``worker-0`` and ``worker-2``. A missing cluster is created. Callers serialize changes to one
        cluster; the call itself is idempotent.

        :raises DriverError: when the change cannot be made; nodes that were there before are kept.
        """

    @abc.abstractmethod
    def replace_node(self, spec: ClusterSpec, node: str) -> NodeInfo:
        """Replace one node of an existing cluster by a new one with the same name and role.

        The old node is deleted (every process of it ends, as at power-off) and a fresh one boots; its
        address and host keys may differ, and the returned :class:`NodeInfo` carries the new ones.

        :raises DriverError: when ``node`` is not in ``spec`` or the cluster, or the new node cannot boot.
        """

    @abc.abstractmethod
    def delete_cluster(self, name: str) -> None:
        """Delete every node of the cluster and everything they run; a missing cluster is not an error, and
        one that carries another installation's id is left as it is (it is not this installation's)."""

    @abc.abstractmethod
    def list_clusters(self) -> list[str]:
        """Names of the clusters this installation holds (for garbage collection): those carrying its id.

        A cluster made before installations had ids carries none; only a driver without an id lists it.
        """


def load_driver(settings: Settings, installation_id: str | None = None) -> Driver:
    """Instantiate the driver named in settings through the ``cloudml_os.drivers`` entry points.

    The driver's settings carry the installation's id: ``installation_id`` if given (the caller's
    :meth:`~cloudml_os.store.Store.installation_id`), else the one kept in the database.

    :raises ConfigError: the ``installation_id`` setting differs from the database's.
    """
    driver = driver_class(settings)
    if installation_id is None:
        from cloudml_os.store import kept_installation_id  # the database keeps it; drivers know no store

        installation_id = kept_installation_id(settings)
    return driver(dataclasses.replace(settings, installation_id=installation_id))


def driver_class(settings: Settings) -> type[Driver]:
    """The class of the driver named in settings (``cloudml_os.drivers`` entry points), not instantiated."""
    matches = entry_points(group="cloudml_os.drivers", name=settings.driver)
    if not matches:
        raise DriverError(f"no compute driver named {settings.driver!r} is installed")
    return next(iter(matches)).load()


def node_store_root(settings: Settings) -> str | None:
    """Where the configured driver's nodes see the store (:meth:`Driver.store_mount`); None: they do not."""
    return driver_class(settings).store_mount(settings)

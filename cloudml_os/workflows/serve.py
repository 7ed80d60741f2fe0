"""The serving workflow: a model version as N replica nodes running the model server, kept at N.

A version runs on one cluster of its own, ``cml-serve-{version id}`` (on OpenStack one Heat stack), and
replica ``replica-K`` is that cluster's node ``replica-K``. The cluster always holds exactly the replicas
whose state holds a node: every change computes that set from the database and resizes the cluster to it
under the cluster's lease (:meth:`Store.lease_cluster`), so concurrent changes cannot undo each other and
one replica comes and goes without touching the others. ``start_replica`` adds the node, uploads the
model and the model server, starts it and waits until it reports ready (model loaded, warm-up prediction
done); only then does the replica join the pool the router sends predictions to. A replica that fails —
the router's connection errors or the monitor's probes — is ejected at once (:func:`eject`) and a
replacement is started in the background (:func:`replace_replica`), which removes the broken node once
the new one serves. A rate limit per version stops a flapping replica from burning nodes. Every step is
idempotent: replica names are never reused, the cluster is found again by name, resizing to the same set
changes nothing, and state changes are compare-and-set.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path

import requests
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from cloudml_os.artifacts import ArtifactStore, files_of
from cloudml_os.cloud.base import ClusterSpec, Driver, DriverError, NodeInfo, NodeSpec
from cloudml_os.config import Settings
from cloudml_os.frameworks.base import Framework
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import NodeSession, RemoteError, fan_out
from cloudml_os.runtimes import runtime_python
from cloudml_os.serving.autoscaler import LOAD_HEADER, Load
from cloudml_os.store import Cluster, Node, Store
from cloudml_os.store.models import Model, Operation, Replica, Version, VersionEvent, utcnow

log = logging.getLogger(__name__)

MODEL_SERVER = Path(__file__).resolve().parents[1] / "serving" / "runtime" / "model_server.py"
READY_TIMEOUT = 600.0  # seconds a replica may take to load its model and warm up
FAILOVER_LIMIT, FAILOVER_WINDOW = 3, dt.timedelta(minutes=10)  # replacements per version per window
# Replica states in which the replica's node exists (or is being made); the version's cluster holds those.
HOLDING_NODE = ("PROVISIONING", "STARTING", "READY", "EJECTED", "DRAINING")
DRAIN_GRACE = 1.0  # seconds for the API's cached pools (ENDPOINTS_TTL) to forget a draining replica


class ServeError(RuntimeError):
    """A replica could not be brought up; the message is for the version's owner."""


@dataclasses.dataclass
class ServingContext:
    """What the serving steps need, passed in whole so tests can swap any piece."""

    settings: Settings
    store: Store
    driver: Driver
    artifacts: ArtifactStore
    frameworks: dict[str, Framework]
    connect: Callable[[Node, str], NodeSession]
    replace: Callable[[int], None]  # enqueue replace_replica(replica id)


# ---- events and small queries --------------------------------------------------------------------

def add_event(store: Store, version_id: int, kind: str, message: str, replica: str | None = None) -> None:
    with store.session() as session:
        session.add(VersionEvent(version_id=version_id, kind=kind, message=message, replica=replica))


def _version(store: Store, version_id: int) -> Version:
    with store.session() as session:
        return session.get(Version, version_id)


def _replicas(store: Store, version_id: int, states: tuple[str, ...]) -> list[Replica]:
    with store.session() as session:
        return list(session.scalars(select(Replica).where(Replica.version_id == version_id,
                                                          Replica.state.in_(states)).order_by(Replica.id)))


def _set_replica(store: Store, replica_id: int, expected: tuple[str, ...] | None = None, **fields) -> bool:
    query = update(Replica).where(Replica.id == replica_id)
    if expected:
        query = query.where(Replica.state.in_(expected))
    with store.session() as session:
        return bool(session.execute(query.values(**fields)).rowcount)


def _new_replica(store: Store, version_id: int, replaces: int | None = None) -> Replica:
    """A replica row with the next unused index; names are never reused, so events stay unambiguous.

    Two callers at once (a scale operation and a replacement) may pick the same index: the loser's insert
    fails on the (version, name) unique constraint, and it takes the next one.
    """
    for _ in range(100):
        with store.session() as session:
            count = session.scalar(select(func.count()).select_from(Replica).where(Replica.version_id == version_id))
        try:
            with store.session() as session:
                replica = Replica(version_id=version_id, name=f"replica-{count}", state="PROVISIONING",
                                  replaces=replaces)
                session.add(replica)
        except IntegrityError:
            continue
        return replica
    raise ServeError("no free replica name after 100 tries")


# ---- the version's cluster ---------------------------------------------------------------------------

def cluster_name(version_id: int) -> str:
    return f"cml-serve-{version_id}"


def _find_cluster(store: Store, version_id: int) -> Cluster | None:
    with store.session() as session:
        return session.scalar(select(Cluster).where(Cluster.name == cluster_name(version_id)))


def _ensure_cluster(ctx: ServingContext, version: Version) -> Cluster:
    """The version's cluster row, with its own keypair, recorded once (a concurrent create finds the winner's)."""
    cluster = _find_cluster(ctx.store, version.id)
    if cluster is None:
        name = cluster_name(version.id)
        private_key, public_key = generate_keypair(f"cloudml-os-{name}")
        cluster = ctx.store.create_cluster(Cluster(job_id=None, name=name, driver=ctx.driver.name, state="CREATING",
                                                   private_key=private_key, public_key=public_key))
    elif not cluster.private_key:  # deleted with its last node (Store.update_cluster); nodes come back now
        private_key, public_key = generate_keypair(f"cloudml-os-{cluster.name}")
        cluster = ctx.store.rekey_cluster(cluster.id, private_key, public_key)
    return cluster


def _resize(ctx: ServingContext, version: Version, cluster: Cluster, owner: str) -> dict[str, NodeInfo]:
    """Make the version's cluster hold exactly the replicas whose state holds a node, and record its nodes.

    The set is read from the database inside the cluster's lease, so the last change made wins whatever
    the order the callers came in. Returns the nodes by replica name.

    :raises ServeError: the lease could not be taken or the driver failed; the cluster is as it was.
    """
    machine_type = ctx.settings.machine_types[version.machine_type]
    ttl = ctx.settings.openstack_stack_timeout + 60  # long enough for one stack update
    try:
        with ctx.store.lease_cluster(cluster.name, owner, ttl, timeout=2 * ttl):
            holding = _replicas(ctx.store, version.id, HOLDING_NODE)
            if holding:
                infos = ctx.driver.resize_cluster(ClusterSpec(cluster.name, tuple(
                    NodeSpec(r.name, "replica", int(r.name.rsplit("-", 1)[1]), machine_type.flavor, machine_type.gpus)
                    for r in holding), cluster.public_key, labels={"version": str(version.id)}))
                ctx.store.record_nodes(cluster.id, [Node.from_info(info) for info in infos])
                ctx.store.update_cluster(cluster.id, deleted_at=None)
            else:
                ctx.driver.delete_cluster(cluster.name)
                infos = []
                ctx.store.update_cluster(cluster.id, state="DELETED", deleted_at=utcnow())
            ctx.store.forget_nodes(cluster.id, [info.name for info in infos])
    except (DriverError, TimeoutError) as exc:
        raise ServeError(str(exc)) from None
    return {info.name: info for info in infos}


# ---- one replica -----------------------------------------------------------------------------------

def start_replica(ctx: ServingContext, version: Version, replica: Replica) -> None:
    """Add the replica's node to the version's cluster, start the model server on it and wait until it is ready.

    :raises ServeError: the node, the upload or the model server failed; the node is removed again.
    """
    framework = ctx.frameworks[version.framework]
    owner = f"serve-replica-{replica.id}"
    cluster = _ensure_cluster(ctx, version)
    try:
        info = _resize(ctx, version, cluster, owner).get(replica.name)
        if info is None:  # deleted meanwhile (a scale-down or the version's deletion)
            raise ServeError("the replica was deleted while it started")
        node = Node.from_info(info)
        _set_replica(ctx.store, replica.id, expected=("PROVISIONING", "STARTING"), state="STARTING",
                     address=info.address, port=info.port_first)
        model_name = _model_name(ctx.store, version)
        python = runtime_python(info.runtime_root, framework.runtime(version.runtime_version))
        root = f"{info.workdir}/serving"
        with ctx.connect(node, cluster.private_key) as session:
            if session.run(["test", "-x", python], check=False).exit_code != 0:
                raise ServeError(f"{replica.name}: runtime {python} is missing on the node")
            with ctx.artifacts.local_tree(version.deployment_uri) as model:
                for relative, local in files_of(model):
                    session.put(local, f"{root}/model/{relative}")
            session.put(MODEL_SERVER, f"{root}/model_server.py")
            session.start_process(f"{root}/process", [
                python, f"{root}/model_server.py", "--framework", version.framework, "--model-dir", f"{root}/model",
                "--model-name", model_name, "--host", info.address, "--port", str(info.port_first),
            ], env={**info.environment, "PYTHONUNBUFFERED": "1"}, cwd=root)
            _wait_ready(ctx, replica, session, f"{root}/process", info.address, info.port_first)
    except (DriverError, RemoteError, ServeError, OSError) as exc:
        _set_replica(ctx.store, replica.id, expected=HOLDING_NODE, state="FAILED", healthy=False)
        try:
            _resize(ctx, version, cluster, owner)
        except ServeError as cleanup:  # the next change of the cluster removes the node
            log.warning("%s: could not remove the failed replica's node yet: %s", replica.name, cleanup)
        raise ServeError(f"{replica.name}: {exc}") from None
    _set_replica(ctx.store, replica.id, expected=("STARTING",), state="READY", healthy=True, ready_time=utcnow())
    add_event(ctx.store, version.id, "REPLICA", f"{replica.name} ready at {info.address}:{info.port_first}",
              replica.name)


def _wait_ready(ctx: ServingContext, replica: Replica, session: NodeSession, proc_dir: str,
                address: str, port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    url = f"http://{address}:{port}/v2/health/ready"
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        status = session.exit_status(proc_dir)
        if not status.running:
            tail = session.read_file(f"{proc_dir}/output.log", 0, 1 << 20).decode("utf-8", "replace")
            tail = "\n".join(tail.rstrip().splitlines()[-15:])
            raise ServeError(f"the model server exited with code {status.exit_code}:\n{tail}")
        time.sleep(0.2)
    raise ServeError(f"the model server was not ready within {READY_TIMEOUT:g}s")


def _model_name(store: Store, version: Version) -> str:
    with store.session() as session:
        return session.get(Model, version.model_id).name


def delete_replica(ctx: ServingContext, replica: Replica) -> None:
    """Take the replica out of the pool and remove its node from the version's cluster.

    :raises ServeError: the node could not be removed; the replica stays DELETING and a later change of
        the cluster removes it.
    """
    _set_replica(ctx.store, replica.id, state="DELETING", healthy=False)
    cluster = _find_cluster(ctx.store, replica.version_id)
    if cluster is not None:
        _resize(ctx, _version(ctx.store, replica.version_id), cluster, f"serve-replica-{replica.id}")
    _set_replica(ctx.store, replica.id, state="DELETED")


# ---- failover --------------------------------------------------------------------------------------

def eject(store: Store, replica_id: int, reason: str, replace: Callable[[int], None]) -> bool:
    """Take a failed replica out of the pool at once and have it replaced, unless the version's
    failover rate limit is reached (then it stays out and an event says why). Returns whether this
    call ejected it (the router and the monitor may both notice the same failure)."""
    if not _set_replica(store, replica_id, expected=("READY",), state="EJECTED", healthy=False,
                        ejected_time=utcnow()):
        return False
    with store.session() as session:
        replica = session.get(Replica, replica_id)
        recent = session.scalar(select(func.count()).select_from(Replica).where(
            Replica.version_id == replica.version_id, Replica.replaces.is_not(None),
            Replica.create_time > utcnow() - FAILOVER_WINDOW))
    add_event(store, replica.version_id, "EJECTED", f"{replica.name} ejected: {reason}", replica.name)
    if recent >= FAILOVER_LIMIT:
        add_event(store, replica.version_id, "FAILOVER_LIMIT",
                  f"{replica.name} not replaced: {recent} replacements in the last "
                  f"{FAILOVER_WINDOW.total_seconds() / 60:g} minutes (limit {FAILOVER_LIMIT})", replica.name)
        return True
    replace(replica_id)
    return True


def replace_replica(ctx: ServingContext, replica_id: int) -> None:
    """Bring up a new replica for an ejected one (a node added to the version's cluster), then remove the
    broken node: make before break. Idempotent."""
    with ctx.store.session() as session:
        old = session.get(Replica, replica_id)
        if old is None or old.state != "EJECTED":
            return
        new = session.scalar(select(Replica).where(Replica.replaces == replica_id).order_by(Replica.id.desc())
                             .limit(1))  # the latest attempt
        version = session.get(Version, old.version_id)
    if version.state in ("DELETING", "DELETED"):
        return
    if new is None or new.state not in ("PROVISIONING", "STARTING", "READY"):  # none yet, or the last one failed
        new = _new_replica(ctx.store, version.id, replaces=replica_id)
        add_event(ctx.store, version.id, "REPLACING", f"{new.name} replaces {old.name}", new.name)
    if new.state in ("PROVISIONING", "STARTING"):
        try:
            start_replica(ctx, version, new)
        except ServeError as exc:
            add_event(ctx.store, version.id, "ERROR", f"replacement failed: {exc}", new.name)
            raise
    delete_replica(ctx, old)
    add_event(ctx.store, version.id, "REPLACED", f"{old.name} replaced by {new.name} and deleted", old.name)


# ---- operations ------------------------------------------------------------------------------------

def run_operation(ctx: ServingContext, operation_id: int) -> None:
    """Carry out a version operation (create, delete, scale) to the end; safe to run again."""
    with ctx.store.session() as session:
        operation = session.get(Operation, operation_id)
    if operation is None or operation.done:
        return
    version = _version(ctx.store, operation.version_id)
    try:
        if operation.cancel_requested and operation.kind != "DELETE_VERSION":
            raise ServeError("the operation was cancelled")
        if operation.kind == "DELETE_VERSION":
            _delete_version(ctx, version)
        else:
            _scale_to(ctx, version)
    except Exception as exc:  # noqa: BLE001 - whatever it was, the operation ends and says so
        if not isinstance(exc, ServeError):
            log.exception("operation %s (%s of version %s) failed unexpectedly", operation.name, operation.kind,
                          version.id)
        error = str(exc) if isinstance(exc, ServeError) else f"internal error: {type(exc).__name__}: {exc}"
        if operation.kind == "CREATE_VERSION":  # a version that never served keeps no node
            try:
                _delete_version(ctx, version)
            except Exception:  # noqa: BLE001 - the reconciler's cluster collection removes them later
                log.exception("could not delete the nodes of version %s after its creation failed", version.id)
        _finish(ctx.store, operation, version, error=error)
        return
    _finish(ctx.store, operation, version)


def _scale_to(ctx: ServingContext, version: Version) -> None:
    """Start replicas until ``version.replicas`` serve (in parallel), or drain and delete the extra ones."""
    serving = _replicas(ctx.store, version.id, ("PROVISIONING", "STARTING", "READY"))
    for _ in range(version.replicas - len(serving)):
        serving.append(_new_replica(ctx.store, version.id))
    extra = [r for r in serving if r.state == "READY"][version.replicas:] if len(serving) > version.replicas else []
    _drain(ctx, version, extra)
    for replica in _replicas(ctx.store, version.id, ("DRAINING",)):  # also those a crashed run was draining
        delete_replica(ctx, replica)
        add_event(ctx.store, version.id, "SCALE", f"{replica.name} removed", replica.name)
    pending = [r for r in serving if r.state in ("PROVISIONING", "STARTING")]
    errors = []

    def start(replica: Replica) -> None:
        try:
            start_replica(ctx, version, replica)
        except ServeError as exc:
            errors.append(str(exc))

    fan_out(pending, start, ctx.settings.ssh_parallelism)
    if errors:
        raise ServeError("; ".join(errors))


def _drain(ctx: ServingContext, version: Version, replicas: list[Replica]) -> None:
    """Take the replicas out of the pool, then wait until the requests they hold have finished (at most two
    prediction deadlines): a scale-in fails no request."""
    if not replicas:
        return
    for replica in replicas:
        _set_replica(ctx.store, replica.id, expected=("READY",), state="DRAINING", healthy=False)
        add_event(ctx.store, version.id, "DRAINING", f"{replica.name} takes no new requests", replica.name)
    time.sleep(DRAIN_GRACE)
    ends = time.monotonic() + 2 * version.prediction_deadline
    for replica in replicas:
        while time.monotonic() < ends and _in_flight(replica):
            time.sleep(0.05)


def _in_flight(replica: Replica) -> int:
    """The requests the replica's model server is answering (0 when it does not say)."""
    try:
        answer = requests.get(f"http://{replica.address}:{replica.port}/v2/health/ready", timeout=1)
    except requests.RequestException:
        return 0
    load = Load.parse(answer.headers.get(LOAD_HEADER, ""))
    return load.in_flight if load else 0


def _delete_version(ctx: ServingContext, version: Version) -> None:
    """Delete every replica and the version's whole cluster."""
    live = ("PROVISIONING", "STARTING", "READY", "EJECTED", "DRAINING", "FAILED", "DELETING")
    with ctx.store.session() as session:
        session.execute(update(Replica).where(Replica.version_id == version.id, Replica.state.in_(live))
                        .values(state="DELETING", healthy=False))
    cluster = _find_cluster(ctx.store, version.id)
    if cluster is not None:
        _resize(ctx, version, cluster, f"serve-version-{version.id}")  # no replica holds a node: deletes it
    with ctx.store.session() as session:
        session.execute(update(Replica).where(Replica.version_id == version.id, Replica.state == "DELETING")
                        .values(state="DELETED"))
    add_event(ctx.store, version.id, "DELETED", "Version deleted; every replica node is gone")


def _finish(store: Store, operation: Operation, version: Version, error: str | None = None) -> None:
    with store.session() as session:
        if operation.kind == "DELETE_VERSION":
            state = "DELETED" if error is None else "FAILED"
        elif operation.kind == "CREATE_VERSION" and error is not None:
            state = "FAILED"
        else:
            state = "READY"  # a failed scale-up leaves the replicas that serve serving
        session.execute(update(Version).where(Version.id == version.id)
                        .values(state=state, error_message=error or "", etag=Version.etag + 1))
        session.execute(update(Operation).where(Operation.id == operation.id).values(
            done=True, end_time=utcnow(),
            error={"code": 13, "message": error} if error else None))
        session.add(VersionEvent(version_id=version.id, kind="OPERATION",
                                 message=f"{operation.kind} {'failed: ' + error if error else 'done'}; "
                                         f"version {state}"))

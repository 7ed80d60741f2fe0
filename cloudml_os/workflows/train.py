"""The training workflow: a job's life as a script of short, idempotent steps.

PROVISIONING → BOOTSTRAPPING → LAUNCHING → TRAINING (polls) → EXPORTING → TEARING_DOWN → DONE.
Each step reads what it needs from the store, acts, and returns the step to hand over to; the task
layer (``tasks/``) delivers them. A step may run twice (redelivery after a crash, a duplicate message):
every action checks what is already done (cluster by name, marker files, process directories), and
the hand-over is a compare-and-set so only one delivery moves the job on. Any error sends the job to
TEARING_DOWN, which always deletes the cluster before the job reaches its final state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.exc import OperationalError

from cloudml_os import dependencies, tuning
from cloudml_os.artifacts import ArtifactError, ArtifactStore, job_dir_uri, make_uri, parse_uri
from cloudml_os.artifacts.trainer_args import StoreArgError, node_args
from cloudml_os.cloud.base import ClusterSpec, Driver, DriverError, NodeSpec
from cloudml_os.config import Settings
from cloudml_os.frameworks.base import Framework, Member, ProcessStatus, Role, topology_from_training_input
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import FanOutError, NodeSession, RemoteError, fan_out, wait_for_streams
from cloudml_os.remote import ProcessStatus as RemoteStatus
from cloudml_os.runtimes import runtime_dirname, runtime_python
from cloudml_os.states import NODE_UNREACHABLE, JobState, Step
from cloudml_os.store import Cluster, Job, Node, Store
from cloudml_os.workflows import outputs

log = logging.getLogger(__name__)

ERROR_LOG_LINES = 20
LOG_FETCH_LIMIT = 1 << 20
LOG_FETCH_INTERVAL = 1.0  # seconds between log writes to the store for a running job (what following lags by)


class StepError(RuntimeError):
    """A step failed for a reason the job's owner should read (shown as the job's errorMessage)."""


@dataclasses.dataclass
class TrainingContext:
    """What the training steps need, passed in whole so tests can swap any piece."""

    settings: Settings
    store: Store
    driver: Driver
    artifacts: ArtifactStore
    frameworks: dict[str, Framework]
    connect: Callable[[Node, str], NodeSession]
    # Set when the worker begins to shut down: a polling window ends early and hands over to the next delivery.
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass(frozen=True)
class Handover:
    """What a step returns: the next step, or the same step again after ``delay`` seconds."""

    step: Step | None
    delay: float = 0.0


# ---- layout of a job on a node ---------------------------------------------------------------------

def job_root(node: Node) -> str:
    return str(PurePosixPath(node.workdir) / "job")


def process_dir(node: Node) -> str:
    """The trainer's process folder on the node; each restart of the trainers gets a new one."""
    return f"{job_root(node)}/process" + (f"-{node.attempt}" if node.attempt else "")


def packages_dir(node: Node) -> str:
    return f"{job_root(node)}/site-packages"


def node_job_dir(node: Node) -> str:
    return f"{job_root(node)}/output"


def node_python(node: Node, job: Job, framework: Framework) -> str:
    return runtime_python(node.runtime_root, framework.runtime(job.training_input.get("runtimeVersion")))


def cluster_name(job: Job) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{job.project}-{job.job_id}".lower()).strip("-")[:48]
    return f"cml-train-{job.id}-{slug}"


def cluster_spec(ctx: TrainingContext, job: Job, cluster: Cluster) -> ClusterSpec:
    """The nodes of the job's cluster: one per framework role; a hyperparameter tuning job has one group of
    them per parallel trial (slot), named ``slotK-ROLE`` (each trial sees only its own group's nodes)."""
    framework = ctx.frameworks[job.framework]
    roles = framework.roles(topology_from_training_input(job.training_input, ctx.settings.machine_types),
                            job.training_input)
    prefixes = [f"slot{k}-" for k in range(tuning.parallel_slots(job.training_input))] if is_tuning(job) else [""]
    return ClusterSpec(
        name=cluster.name,
        nodes=tuple(NodeSpec(prefix + r.node_name, r.task_type, r.task_index, r.machine_type.flavor,
                             r.machine_type.gpus) for prefix in prefixes for r in roles),
        public_key=cluster.public_key,
        labels={"project": job.project, "job": str(job.id)},
    )


def node_slot(node: Node) -> int | None:
    """The parallel-trial group a node of a tuning job's cluster belongs to (None for other jobs' nodes)."""
    match = SLOT_NAME.match(node.name)
    return int(match.group(1)) if match else None


def log_key(node: Node) -> str:
    """The name a node's log is stored under: the node's name, or ``trial-N/ROLE`` for a node running
    trial N of a tuning job (its ``attempt`` is the trial's id)."""
    return f"{tuning.trial_node(node.attempt)}/{role_name(node)}" if SLOT_NAME.match(node.name) else node.name


def role_name(node: Node) -> str:
    """The node's role (``chief-0``): its name without a tuning job's slot prefix."""
    match = SLOT_NAME.match(node.name)
    return node.name[match.end():] if match else node.name


SLOT_NAME = re.compile(r"slot(\d+)-")


def is_tuning(job: Job) -> bool:
    return tuning.is_tuning(job.training_input)


def _role(node: Node, job: Job, ctx: TrainingContext) -> Role:
    framework = ctx.frameworks[job.framework]
    roles = framework.roles(topology_from_training_input(job.training_input, ctx.settings.machine_types),
                            job.training_input)
    return next(r for r in roles if r.task_type == node.task_type and r.task_index == node.task_index)


class _Sessions:
    """One SSH connection per node for the length of a step, opened in parallel and always closed."""

    def __init__(self, ctx: TrainingContext, cluster: Cluster):
        self.ctx, self.cluster = ctx, cluster
        self.open: dict[str, NodeSession] = {}

    def __enter__(self) -> _Sessions:
        def connect(node: Node) -> None:
            self.open[node.name] = self.ctx.connect(node, self.cluster.private_key)

        try:
            fan_out(self.cluster.nodes, connect, self.ctx.settings.ssh_parallelism)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for session in self.open.values():
            session.close()

    def each(self, action: Callable[[Node, NodeSession], Any], nodes: list[Node] | None = None) -> list[Any]:
        """Run ``action`` on every node (or on ``nodes``) in parallel; results in node order."""
        return fan_out(self.cluster.nodes if nodes is None else nodes,
                       lambda node: action(node, self.open[node.name]), self.ctx.settings.ssh_parallelism)


# ---- the steps -------------------------------------------------------------------------------------

def provision(ctx: TrainingContext, job: Job) -> Handover:
    """Create the job's cluster (or find the one a previous delivery created) and record its nodes."""
    if job.state == JobState.QUEUED.value:
        if not ctx.store.transition(job.id, [JobState.QUEUED], JobState.PREPARING):
            return Handover(None)  # cancelled while queued: nothing was created
    private_key, public_key = generate_keypair(f"cloudml-os-job-{job.id}")
    name = cluster_name(job)
    cluster = ctx.store.create_cluster(Cluster(
        job_id=job.id, name=name, driver=ctx.driver.name, state="CREATING",
        private_key=private_key, public_key=public_key,
    ))
    infos = ctx.driver.create_cluster(cluster_spec(ctx, job, cluster))
    ctx.store.record_nodes(cluster.id, [Node.from_info(info) for info in infos])
    ctx.store.add_event(job.id, "CLUSTER", f"Cluster {name} ready with {len(infos)} node(s)")
    return Handover(Step.BOOTSTRAPPING)


def bootstrap(ctx: TrainingContext, job: Job) -> Handover:
    """Check the runtime on every node and install the job's packages and their requirements into a per-job
    site directory."""
    cluster = _cluster(ctx, job)
    framework = ctx.frameworks[job.framework]
    with contextlib.ExitStack() as downloads:
        packages = [(uri, downloads.enter_context(ctx.artifacts.local_file(uri)))
                    for uri in job.training_input["packageUris"]]
        with _Sessions(ctx, cluster) as sessions:
            _install_packages_on(ctx, job, framework, packages, cluster.nodes, sessions.open)
    ctx.store.add_event(job.id, "BOOTSTRAP", f"{len(cluster.nodes)} node(s) bootstrapped")
    return Handover(Step.TUNING if is_tuning(job) else Step.LAUNCHING)


def _install_packages(ctx: TrainingContext, job: Job, framework: Framework, packages: list[tuple[str, Path]],
                      node: Node, session: NodeSession) -> None:
    """Check the node's runtime and install the job's packages there, once (a marker says it is done)."""
    _install_packages_on(ctx, job, framework, packages, [node], {node.name: session})


def _install_packages_on(ctx: TrainingContext, job: Job, framework: Framework, packages: list[tuple[str, Path]],
                         nodes: list[Node], sessions: dict[str, NodeSession]) -> None:
    """Check the runtime of ``nodes`` and install the job's packages there with what they require beyond the
    runtime, once per node (a marker says it is done: a redelivered step skips the nodes that finished).

    The first node still to do resolves the requirements and fetches what the worker's wheel cache lacks
    (:mod:`cloudml_os.dependencies`); then every node gets exactly those wheels and installs them, the job's
    sdists and wheels with one offline pip command, and unpacks its plain archives after.
    """
    def each(action: Callable[[Node, NodeSession], Any], some: list[Node]) -> list[Any]:
        return fan_out(some, lambda node: action(node, sessions[node.name]), ctx.settings.ssh_parallelism)

    done = each(lambda node, session: session.run(["test", "-e", _done_marker(node)], check=False).exit_code == 0,
                nodes)
    pending = [node for node, finished in zip(nodes, done, strict=True) if not finished]
    if not pending:
        return
    each(lambda node, session: _upload_packages(job, framework, packages, node, session), pending)
    kinds = [_package_kind(ctx, uri) for uri, _ in packages]
    pip_packages = [path for (_, path), kind in zip(packages, kinds, strict=True) if kind != "archive"]
    pip_files = [path.name for path in pip_packages]
    archives = [path.name for (_, path), kind in zip(packages, kinds, strict=True) if kind == "archive"]
    wheels = _requirements(ctx, job, framework, pip_packages, pending[0], sessions[pending[0].name])
    each(lambda node, session: _install_on_node(job, framework, pip_files, archives, wheels, node, session), pending)


def _requirements(ctx: TrainingContext, job: Job, framework: Framework, pip_packages: list[Path], node: Node,
                  session: NodeSession) -> dependencies.Wheels:
    """What the job's sdists and wheels (``pip_packages``, uploaded to ``node``) require beyond the runtime,
    resolved on ``node`` (or as the same packages were before), which also fetches what the project's wheel
    cache for the runtime lacks."""
    if not pip_packages:
        return dependencies.Wheels()
    root = job_root(node)
    runtime = runtime_dirname(framework.runtime(job.training_input.get("runtimeVersion")))
    cache = dependencies.WheelCache(ctx.settings.data_dir / "wheelhouse" / runtime / job.project)
    options = dependencies.pip_options(ctx.settings.pip_index_url, ctx.settings.pip_extra_args)
    try:
        wheels = dependencies.prepare(node.name, session, node_python(node, job, framework),
                                      [f"{root}/packages/{path.name}" for path in pip_packages], root, cache,
                                      dependencies.resolution_key(pip_packages, options), options)
    except dependencies.DependencyError as exc:
        raise StepError(str(exc)) from None
    if wheels.requirements:
        ctx.store.add_event(job.id, "BOOTSTRAP", wheels.summary())
    return wheels


def _install_on_node(job: Job, framework: Framework, pip_files: list[str], archives: list[str],
                     wheels: dependencies.Wheels, node: Node, session: NodeSession) -> None:
    """Put the requirements' wheels on the node, install them with the job's sdists and wheels, unpack the
    plain archives, and mark the node done."""
    root, python, site = job_root(node), node_python(node, job, framework), packages_dir(node)
    for path in wheels.files:
        if node.name != wheels.fetched_on or path.name not in wheels.fetched:  # the fetching node has those
            session.put(path, f"{root}/wheels/{path.name}")
    if pip_files:
        argv = dependencies.install_argv(python, site, [f"{root}/packages/{name}" for name in pip_files],
                                         f"{root}/wheels", wheels.requirements)
        result = session.run(argv, check=False, timeout=dependencies.PIP_TIMEOUT)
        if result.exit_code != 0:
            raise StepError(f"node {node.name}: installing the job's packages failed: "
                            + dependencies.pip_failure(f"{result.stdout}\n{result.stderr}"))
    for name in archives:
        result = session.run([python, "-c", UNPACK_SCRIPT, f"{root}/packages/{name}", site], check=False,
                             timeout=dependencies.PIP_TIMEOUT)
        if result.exit_code != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-ERROR_LOG_LINES:])
            raise StepError(f"node {node.name}: unpacking {name} failed:\n{tail}")
    session.run(["touch", _done_marker(node)])


def _done_marker(node: Node) -> str:
    return f"{job_root(node)}/bootstrap.done"


def _package_kind(ctx: TrainingContext, uri: str) -> str:
    """How nodes install a package: ``sdist`` and ``wheel`` with pip, ``archive`` (also a package the store
    does not know) unpacked."""
    package = ctx.store.package_by_uri(uri)
    return package.kind if package is not None else "archive"


def _upload_packages(job: Job, framework: Framework, packages: list[tuple[str, Path]], node: Node,
                     session: NodeSession) -> None:
    python = node_python(node, job, framework)
    if session.run(["test", "-x", python], check=False).exit_code != 0:
        raise StepError(f"node {node.name}: runtime {python} is missing (build it with "
                        f"`cloudml-os runtime build`)")
    root = job_root(node)
    session.run(["mkdir", "-p", packages_dir(node), node_job_dir(node), f"{root}/packages", f"{root}/wheels"])
    for _, local_path in packages:
        session.put(local_path, f"{root}/packages/{local_path.name}")


# Unpacks a plain archive on the node; members were checked at upload, the 'data' filter checks again.
UNPACK_SCRIPT = (
    "import sys, tarfile, zipfile\n"
    "path, target = sys.argv[1], sys.argv[2]\n"
    "if zipfile.is_zipfile(path):\n"
    "    zipfile.ZipFile(path).extractall(target)\n"
    "else:\n"
    "    tarfile.open(path).extractall(target, filter='data')\n"
)


def trainer_args(ctx: TrainingContext, job: Job) -> list[str]:
    """The job's args as its trainers get them: ``store://`` URIs become paths where the nodes see the store.

    :raises StepError: a ``store://`` arg the nodes cannot open (checked at submission; the driver or store may
        have changed since).
    """
    args = job.training_input.get("args", [])
    try:
        return node_args(args, job.project, ctx.driver.store_mount(ctx.settings))
    except StoreArgError as exc:
        raise StepError(f"trainingInput.args[{exc.index}]: {exc}") from None


def launch(ctx: TrainingContext, job: Job) -> Handover:
    """Start the trainer on every node with the environment its framework role needs."""
    cluster = _cluster(ctx, job)
    framework = ctx.frameworks[job.framework]
    members = [Member(_role(n, job, ctx), n.address, n.port_first, n.port_last) for n in cluster.nodes]
    body = {"jobId": job.job_id, "trainingInput": job.training_input}
    training_input = {**job.training_input, "args": trainer_args(ctx, job)}
    ctx.store.transition(job.id, [JobState.PREPARING], JobState.RUNNING)

    def start(node: Node, session: NodeSession) -> None:
        member = next(m for m in members if m.role.node_name == node.name)
        env = {
            **node.environment,
            **framework.environment(member, members, body),
            "PYTHONPATH": packages_dir(node),
            "PYTHONUNBUFFERED": "1",
        }
        argv = framework.command(member.role, node_python(node, job, framework), training_input,
                                 node_job_dir(node))
        session.start_process(process_dir(node), argv, env=env, cwd=job_root(node))

    with _Sessions(ctx, cluster) as sessions:
        sessions.each(start)
    for node in cluster.nodes:
        ctx.store.update_node(node.id, process_state="RUNNING")
    ctx.store.add_event(job.id, "LAUNCH", f"Trainer started on {len(cluster.nodes)} node(s)")
    return Handover(Step.TRAINING)


def watch(ctx: TrainingContext, job: Job) -> Handover:
    """Follow every trainer's log and exit; judge the job by its framework's success policy.

    One delivery keeps its connections for ``watch_window`` seconds (less when the worker shuts down),
    then re-sends itself, so no message stays unacknowledged for a whole training run.
    """
    cluster = _cluster(ctx, job)
    framework = ctx.frameworks[job.framework]
    roles = [_role(node, job, ctx) for node in cluster.nodes]
    max_running = _seconds(job.training_input.get("scheduling", {}).get("maxRunningTime"))
    try:
        return _watch_window(ctx, job, cluster, framework, roles, max_running)
    except FanOutError as exc:
        # A node that cannot be reached (connections refused or unanswered for node_unreachable_seconds,
        # SSH broken) is dead to the job: the restart policy decides what follows.
        from cloudml_os.workflows import restart

        return restart.nodes_lost(ctx, job, [(node.name, str(error)) for node, error in exc.failures])


def _watch_window(ctx: TrainingContext, job: Job, cluster: Cluster, framework: Framework, roles: list[Role],
                  max_running: float | None) -> Handover:
    """One delivery of :func:`watch`; a node that fails to answer raises :class:`FanOutError`.

    Each node streams its trainer's log to us until the trainer's wrapper exits (``NodeSession.follow``):
    nothing is polled on the nodes, whose cores synchronous training shares with us. Only a node whose
    stream ended is asked, with one status command, how its trainer ended (or whether it vanished).
    """
    window_ends = time.monotonic() + ctx.settings.watch_window
    nodes = {node.name: node for node in cluster.nodes}
    ended: dict[str, RemoteStatus] = {}  # node name -> how its trainer ended
    unsent = {name: bytearray() for name in nodes}
    logs_due = time.monotonic() + LOG_FETCH_INTERVAL
    # The trainers' outputs are copied to the store by a thread of the window's own, beside log following.
    with _Sessions(ctx, cluster) as sessions, contextlib.ExitStack() as open_streams, \
            outputs.OutputSync(ctx, job, cluster, output_sources(ctx, job, cluster)) as copier:
        def follow(node: Node, session: NodeSession) -> Any:
            follower = session.follow(process_dir(node), _log_file_offset(node), ctx.settings.watch_interval)
            return open_streams.enter_context(contextlib.closing(follower))

        followers = dict(zip(nodes, sessions.each(follow), strict=True))
        refollow_at: dict[str, float] = {}  # a running trainer whose stream ended is followed again then
        received = False  # whether the last look found new bytes
        while True:
            for name, due in list(refollow_at.items()):
                if time.monotonic() >= due:
                    del refollow_at[name]
                    followers[name] = sessions.each(follow, [nodes[name]])[0]
            finished, received_before, received = [], received, False
            for name, follower in list(followers.items()):
                data, done = follower.poll()
                unsent[name] += data
                received |= bool(data)
                if done:
                    follower.close()
                    del followers[name]
                    finished.append(nodes[name])
            now = time.monotonic()
            last = now >= window_ends or ctx.stopping.is_set()
            if finished or last or now >= logs_due:
                _store_logs(ctx, job, [(nodes[name], bytes(data)) for name, data in unsent.items() if data])
                for data in unsent.values():
                    data.clear()
            if finished:
                # The stream ended: the trainer exited (or vanished), or the connection broke (then asking
                # fails, and watch hands the node to the restart policy). A trainer still running had its
                # tail die: it is followed again.
                statuses = sessions.each(functools.partial(_fetch, ctx, job), finished)
                for node, status in zip(finished, statuses, strict=True):
                    if status.running:
                        log.warning("job %s: the log stream of %s ended while its trainer runs", job.id, node.name)
                        refollow_at[node.name] = now + LOG_FETCH_INTERVAL
                    else:
                        ended[node.name] = status
                outcome = framework.outcome([_process_status(role, ended.get(role.node_name)) for role in roles])
                if outcome.state == "SUCCEEDED":
                    copier.finish()  # what the trainers wrote last, in the store before the export reads it
                    ctx.store.add_event(job.id, "OUTCOME", outcome.message or "Training succeeded")
                    return Handover(Step.EXPORTING)
                if outcome.state == "FAILED":
                    from cloudml_os.workflows import restart

                    return restart.trainers_failed(ctx, job, _with_log_tail(ctx, job, outcome.message,
                                                                            outcome.failed_role))
            if now >= logs_due or last:
                logs_due = now + LOG_FETCH_INTERVAL
                if max_running and job.start_time and \
                        (ctx.store.now() - job.start_time).total_seconds() > max_running:
                    raise StepError(f"Job ran longer than scheduling.maxRunningTime ({max_running:g}s)")
                if last or ctx.store.get_job(job.id).state != JobState.RUNNING.value:
                    return Handover(Step.TRAINING)
            # Sleep until a stream has bytes or ends or something falls due: a quiet trainer's nodes and
            # this worker wake about once a second, and a stream's end is seen at once. Lines that kept
            # coming two looks in a row are taken at most every watch_interval, in batches.
            pause = ctx.settings.watch_interval if received and received_before else 0.0
            if not ctx.stopping.wait(pause):
                wait_for_streams(followers.values(),
                                 min(logs_due, window_ends, *refollow_at.values()) - time.monotonic())


def _process_status(role: Role, status: RemoteStatus | None) -> ProcessStatus:
    """What the framework's success policy reads of a node's trainer (None: still running)."""
    if status is None:
        return ProcessStatus(role, None)
    return ProcessStatus(role, status.exit_code, status.lost, status.ended_at)


def _with_log_tail(ctx: TrainingContext, job: Job, message: str, role: Role | None) -> str:
    """The failure message followed by the last lines the failed process logged."""
    if role is None:
        return message
    text, _ = ctx.store.read_log(job.id, role.node_name, 0, 1 << 30)
    tail = "\n".join(text.decode("utf-8", "replace").rstrip().splitlines()[-ERROR_LOG_LINES:])
    return f"{message}\nLast log lines of {role.node_name}:\n{tail}"


def export(ctx: TrainingContext, job: Job) -> Handover:
    """Copy the exported model to the artifact store and name it on the job.

    The framework says which processes may have written it; the first whose job directory holds the
    framework's export marker wins (MXNet's rank 0, for one, is chosen at run time). A tuning job exports
    its best trial's model (:func:`cloudml_os.workflows.tune.export_sources`).
    """
    cluster = _cluster(ctx, job)
    if is_tuning(job):
        from cloudml_os.workflows import tune

        sources = tune.export_sources(ctx, job, cluster)
    else:
        sources = [(node, node_job_dir(node)) for node in _export_nodes(ctx, job, cluster.nodes)]
    return export_from(ctx, job, cluster, sources)


def _export_nodes(ctx: TrainingContext, job: Job, nodes: list[Node]) -> list[Node]:
    """The nodes that may hold the exported model, in the framework's order."""
    framework = ctx.frameworks[job.framework]
    by_role = {(n.task_type, n.task_index): n for n in nodes}
    roles = [_role(node, job, ctx) for node in nodes]
    return [by_role[(role.task_type, role.task_index)] for role in framework.export_roles(roles)]


def export_from(ctx: TrainingContext, job: Job, cluster: Cluster, sources: list[tuple[Node, str]]) -> Handover:
    """Copy the first exported model found under ``(node, folder)`` of ``sources`` to ``JOB_DIR/model``."""
    framework = ctx.frameworks[job.framework]
    destination = _job_dir(job)
    for node, root in sources:
        with ctx.connect(node, cluster.private_key) as session:
            candidates = session.find(root, framework.export_marker)
            if not candidates:
                continue
            # The shallowest export directory is the trainer's model, not a copy inside a checkpoint.
            source = min(candidates, key=lambda p: (p.count("/"), p))
            with tempfile.TemporaryDirectory() as tmp:
                session.get_tree(source, Path(tmp))
                project, key = parse_uri(destination)
                uri = ctx.artifacts.put_tree(project, f"{key}/model", Path(tmp))
        output = {**ctx.store.get_job(job.id).training_output, "exportedModelUri": uri}
        ctx.store.update_job(job.id, training_output=output, outcome=JobState.SUCCEEDED.value)
        ctx.store.add_event(job.id, "EXPORT", f"Exported model copied to {uri}", node=log_key(node))
        return Handover(Step.TEARING_DOWN)
    ctx.store.add_event(job.id, "EXPORT", "The trainer exported no model")
    ctx.store.update_job(job.id, outcome=JobState.SUCCEEDED.value)
    return Handover(Step.TEARING_DOWN)


def teardown(ctx: TrainingContext, job: Job) -> Handover:
    """Stop trainers, keep their last logs, delete the cluster, then give the job its final state
    (:meth:`~cloudml_os.store.Store.finish_job`: CANCELLED if a cancel is pending, else its outcome)."""
    cluster = ctx.store.cluster_of(job.id)
    if cluster is not None:
        ctx.store.update_cluster(cluster.id, state="DELETING")
        def stop(node: Node) -> bool:
            # Each node on its own: one that is gone already (or stopped answering) costs only its own last
            # log bytes, never the others'; deletion runs in any case.
            try:
                with ctx.connect(node, cluster.private_key) as session:
                    session.stop_process(process_dir(node), ctx.settings.stop_grace_seconds)
                    _fetch(ctx, job, node, session)
                return True
            except (RemoteError, OSError) as exc:
                log.warning("job %s: could not stop the trainer on %s before deletion: %s", job.id, node.name, exc)
                return False

        nodes = [n for n in cluster.nodes if n.process_state != NODE_UNREACHABLE]
        stopped = [node for node, ok in zip(nodes, fan_out(nodes, stop, ctx.settings.ssh_parallelism), strict=True)
                   if ok]
        if job.outcome != JobState.SUCCEEDED.value:  # a job that succeeded had them copied before its export
            outputs.final_sync(ctx, job, cluster, output_sources(ctx, job, cluster, stopped))
        ctx.driver.delete_cluster(cluster.name)
        ctx.store.update_cluster(cluster.id, state="DELETED", deleted_at=ctx.store.now())
        ctx.store.add_event(job.id, "CLUSTER", f"Cluster {cluster.name} deleted")
    _archive_logs(ctx, job)
    if is_tuning(job):
        from cloudml_os.workflows import tune

        tune.close_trials(ctx, job)
    # One compare-and-set decides CANCELLED or the outcome: a cancel landing now cannot slip between a read
    # and the write and leave the job CANCELLING with no step left to end it.
    ctx.store.finish_job(job.id)
    return Handover(Step.DONE)


def _job_dir(job: Job) -> str:
    return job_dir_uri(job.project, job.job_id, job.training_input)


def output_sources(ctx: TrainingContext, job: Job, cluster: Cluster,
                   reachable: list[Node] | None = None) -> list[outputs.Source]:
    """The node folders whose outputs are copied to the store (:mod:`cloudml_os.workflows.outputs`), on the
    cluster's nodes or on ``reachable`` of them: every node's job directory for its TensorBoard event files,
    and the first output-owning node's (the framework's export roles, in order) 1:1. A tuning job's are its
    running trials' (:func:`cloudml_os.workflows.tune.output_sources`)."""
    nodes = cluster.nodes if reachable is None else reachable
    if is_tuning(job):
        from cloudml_os.workflows import tune

        return tune.output_sources(ctx, job, cluster, nodes)
    names = {node.name for node in nodes}
    owner = next((node.name for node in _export_nodes(ctx, job, cluster.nodes) if node.name in names), None)
    return [outputs.Source(node, node_job_dir(node), f"{node.name}/", "" if node.name == owner else None)
            for node in nodes]


def _archive_logs(ctx: TrainingContext, job: Job) -> None:
    """Copy every node's log to ``JOB_DIR/logs/NODE.log`` in the artifact store (Swift in OpenStack mode),
    so the logs outlive the database rows. Never fails the teardown: a copy that fails is an event."""
    project, key = parse_uri(_job_dir(job))
    nodes = ctx.store.log_nodes(job.id)
    try:
        for node in nodes:
            with tempfile.TemporaryFile() as spool:
                offset = 0
                while True:
                    data, offset = ctx.store.read_log(job.id, node, offset)
                    if not data:
                        break
                    spool.write(data)
                spool.seek(0)
                ctx.artifacts.put_file(project, f"{key}/logs/{node}.log", spool)
    except (ArtifactError, OSError) as exc:
        ctx.store.add_event(job.id, "LOGS", f"Logs could not be copied to the artifact store: {exc}")
        return
    if nodes:
        ctx.store.add_event(job.id, "LOGS", f"Logs of {len(nodes)} node(s) copied to {make_uri(project, key)}/logs/")


def _tune_step(ctx: TrainingContext, job: Job) -> Handover:
    """The TUNING step (its own module: imported here on use, as it builds on this one)."""
    from cloudml_os.workflows import tune

    return tune.tune(ctx, job)


def _restart_step(ctx: TrainingContext, job: Job) -> Handover:
    """The RESTARTING step (its own module: imported here on use, as it builds on this one)."""
    from cloudml_os.workflows import restart

    return restart.restart(ctx, job)


STEPS: dict[Step, Callable[[TrainingContext, Job], Handover]] = {
    Step.PROVISIONING: provision,
    Step.BOOTSTRAPPING: bootstrap,
    Step.LAUNCHING: launch,
    Step.TRAINING: watch,
    Step.TUNING: _tune_step,
    Step.RESTARTING: _restart_step,
    Step.EXPORTING: export,
    Step.TEARING_DOWN: teardown,
}


def run_step(ctx: TrainingContext, job_pk: int, step: Step, seq: int) -> tuple[Step, int, float] | None:
    """Run one delivery of a step; returns (step, seq, delay) of the message to send next, or None.

    A delivery whose (step, seq) is no longer the job's is a duplicate and does nothing; so is one that
    finds the step's lease held by another delivery (a redelivered message while the first still runs, or
    before a dead holder's lease expired: the reconciler re-sends the step then). The lease is renewed
    while the step runs and released at the hand-over, giving the next message ``step_pickup_seconds``.
    A database that is down ends the delivery without touching the job: its lease expires and the step is
    sent again once the database is back.
    """
    job = ctx.store.get_job(job_pk)
    if job is None or job.step != step.value or job.step_seq != seq or JobState(job.state).is_final:
        return None  # a duplicate, or a job cancelled while queued (nothing was created for it)
    owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:16]}"
    if not ctx.store.claim_step(job_pk, step, seq, owner, ctx.settings.step_lease_seconds):
        log.info("job %s: step %s/%s is held by another delivery; this one does nothing", job_pk, step.value, seq)
        return None
    with _renewing_lease(ctx, job_pk, owner):
        following = _run_claimed_step(ctx, job, step, seq)
    ctx.store.release_step_lease(job_pk, owner, ctx.settings.step_pickup_seconds + (following or (0, 0, 0.0))[2])
    return following


def _steps(job: Job) -> dict[Step, Callable[[TrainingContext, Job], Handover]]:
    """The steps of the job's kind: a batch prediction job's are its own module's (imported here on use)."""
    if job.prediction_input is None:
        return STEPS
    from cloudml_os.workflows import batch_predict

    return batch_predict.STEPS


def _run_claimed_step(ctx: TrainingContext, job: Job, step: Step, seq: int) -> tuple[Step, int, float] | None:
    job_pk = job.id
    if job.state == JobState.CANCELLING.value and step != Step.TEARING_DOWN:
        handover = Handover(Step.TEARING_DOWN)
        ctx.store.add_event(job.id, "CANCEL", f"Cancel requested during {step.value}")
    elif job.outcome == JobState.FAILED.value and step != Step.TEARING_DOWN:
        handover = Handover(Step.TEARING_DOWN)  # failed from outside the step (the reconciler's time limits)
    else:
        try:
            handover = _steps(job)[step](ctx, job)
        except OperationalError:
            raise  # the database is down: leave the job as it is; the step is sent again after its lease
        except (StepError, DriverError, RemoteError, ArtifactError) as exc:
            handover = _fail(ctx, job, step, str(exc))
        except Exception:
            log.exception("job %s: step %s crashed", job_pk, step.value)
            handover = _fail(ctx, job, step, f"Internal error during {step.value.lower()}; see the events")
    if handover.step is None:
        return None
    # The hand-over releases the lease in the same update: the next message has step_pickup_seconds.
    pickup = dt.timedelta(seconds=ctx.settings.step_pickup_seconds + handover.delay)
    lease = {"lease_owner": None, "lease_until": ctx.store.now() + pickup}
    if handover.step == step:
        if ctx.store.reschedule(job_pk, step, seq, **lease):
            return step, seq + 1, handover.delay
        return None
    if ctx.store.advance(job_pk, step, seq, handover.step, **lease):
        return (handover.step, 0, 0.0) if handover.step != Step.DONE else None
    return None


@contextlib.contextmanager
def _renewing_lease(ctx: TrainingContext, job_pk: int, owner: str) -> Iterator[None]:
    """Renew the step's lease every third of its length while the block runs (a thread of its own)."""
    ttl = ctx.settings.step_lease_seconds
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                if not ctx.store.renew_step_lease(job_pk, owner, ttl):
                    log.warning("job %s: the step's lease was taken over; another delivery may run it", job_pk)
                    return
            except OperationalError as exc:  # the database is away; the lease lapses if it stays away
                log.warning("job %s: could not renew the step's lease: %s", job_pk, exc)

    renewer = threading.Thread(target=renew, name=f"lease-{job_pk}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def _fail(ctx: TrainingContext, job: Job, step: Step, message: str) -> Handover:
    if step == Step.TEARING_DOWN:
        # Teardown itself failed: keep the job here and retry deletion later rather than leak nodes.
        ctx.store.add_event(job.id, "ERROR", f"Teardown failed, retrying: {message}")
        return Handover(Step.TEARING_DOWN, max(ctx.settings.watch_interval, 5.0))
    ctx.store.update_job(job.id, outcome=JobState.FAILED.value, error_message=message[:4000])
    ctx.store.add_event(job.id, "ERROR", f"{step.value} failed: {message}")
    return Handover(Step.TEARING_DOWN)


# ---- helpers ---------------------------------------------------------------------------------------

def _cluster(ctx: TrainingContext, job: Job) -> Cluster:
    cluster = ctx.store.cluster_of(job.id)
    if cluster is None or not cluster.nodes:
        raise StepError("the job's cluster is missing")
    return cluster


def _fetch(ctx: TrainingContext, job: Job, node: Node, session: NodeSession) -> RemoteStatus:
    """Append the node's new log bytes to the store; return its trainer's process status."""
    status = session.process_status(process_dir(node))
    while True:
        data = session.read_file(f"{process_dir(node)}/output.log", _log_file_offset(node), LOG_FETCH_LIMIT)
        if not data:
            break
        _store_logs(ctx, job, [(node, data)])
        if len(data) < LOG_FETCH_LIMIT:
            break
    if status.exit_code is not None and node.process_state == "RUNNING":
        node.process_state = "EXITED"
        ctx.store.update_node(node.id, process_state="EXITED", exit_code=status.exit_code)
        ctx.store.add_event(job.id, "PROCESS", f"Trainer exited with code {status.exit_code}", node=node.name)
    return status


def _log_file_offset(node: Node) -> int:
    """Where the stored log ends in this start's output.log: the stored log runs on across restarts, and
    this start's file begins at ``log_base`` of it."""
    return node.log_offset - (node.log_base or 0)


def _store_logs(ctx: TrainingContext, job: Job, pieces: list[tuple[Node, bytes]]) -> None:
    """Append nodes' next log bytes to the store (one commit) and move their offsets past them."""
    ctx.store.append_logs(job.id, [(node.id, log_key(node), node.log_offset, data) for node, data in pieces])
    for node, data in pieces:
        node.log_offset += len(data)


def _seconds(duration: str | None) -> float | None:
    """A google.protobuf.Duration string ("3600s", "1.5s") in seconds."""
    if not duration:
        return None
    return float(duration.rstrip("s"))


"""A training job's restart policy: what a dead node or a failed trainer leads to, and the RESTARTING step.

``trainingInput.scheduling.restartPolicy`` reads as a Kubeflow training job's ``restartPolicy``:

- ``NEVER`` (the default): the job fails at once, its message naming the node or trainer that failed;
- ``ON_FAILURE``: every trainer is stopped and started again (distributed training restarts as a whole:
  a collective or parameter server cannot lose a member and go on), nodes that stopped answering are
  replaced by the driver first, and a pause comes before each restart that doubles each time
  (``restart_backoff_seconds``, at most 6 minutes), as Kubernetes' Job backoff does. After
  ``scheduling.backoffLimit`` restarts (default 3) the next failure fails the job, saying so.

The RESTARTING step runs in two deliveries: the first stops the trainers and saves the job directory, then
re-sends itself after the backoff; the second replaces the lost nodes, restores the job directory onto every
node and hands over to BOOTSTRAPPING (a new node has an empty disk; the others' markers make it quick),
LAUNCHING (a new process folder per start: ``process-N``) and TRAINING again. Each part is idempotent.

Checkpoints survive a node: ``--job-dir`` is a folder on each node, and a new node's disk is empty, but
what the node that owns the outputs (the chief; TensorFlow's worker 0 without one; an MXNet worker) writes
there is copied to the job's directory in the artifact store while it trains, seconds behind
(:mod:`cloudml_os.workflows.outputs`). Before a restart the stopped trainers' last writes are copied too,
if their node still answers; then that copy of the job directory is put onto every node's ``--job-dir``,
so every restarted trainer finds the latest synced checkpoint where it wrote it, also when the chief's
node is the one lost. One node's copy serves all because synchronous training keeps every replica's state
equal. With nothing copied (a trainer that wrote no file yet) the trainers start afresh.

This module builds on :mod:`cloudml_os.workflows.train` (its context, layout and step conventions).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cloudml_os.remote import FanOutError, fan_out
from cloudml_os.states import DEFAULT_BACKOFF_LIMIT, NODE_UNREACHABLE, RESTART_POLICIES, Step
from cloudml_os.store import Cluster, Job, Node
from cloudml_os.workflows import outputs
from cloudml_os.workflows import train as training

NEVER, ON_FAILURE = RESTART_POLICIES
MAX_BACKOFF_SECONDS = 360.0


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """``scheduling.restartPolicy`` and ``scheduling.backoffLimit`` of a job (validated by the API)."""

    policy: str = NEVER
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT

    @classmethod
    def of(cls, training_input: Mapping[str, Any]) -> RestartPolicy:
        scheduling = training_input.get("scheduling") or {}
        return cls(scheduling.get("restartPolicy") or NEVER,
                   int(scheduling.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)))

    def allows_restart(self, restarts_so_far: int) -> bool:
        return self.policy == ON_FAILURE and restarts_so_far < self.backoff_limit


def backoff_seconds(base: float, restart_number: int) -> float:
    """The pause before restart ``restart_number`` (1-based): base, 2 × base, 4 × base… at most 6 minutes."""
    return min(base * 2 ** max(0, restart_number - 1), MAX_BACKOFF_SECONDS)


# ---- what a failure leads to (called by the watch step) -------------------------------------------

def nodes_lost(ctx: training.TrainingContext, job: Job, lost: Sequence[tuple[str, str]]) -> training.Handover:
    """Nodes that stopped answering: record them (events, ``NODE_UNREACHABLE``), then apply the policy."""
    cluster = training._cluster(ctx, job)
    by_name = {node.name: node for node in cluster.nodes}
    for name, error in lost:
        ctx.store.update_node(by_name[name].id, process_state=NODE_UNREACHABLE)
        ctx.store.add_event(job.id, "NODE", f"Node {name} is unreachable: {error}", node=name)
    names = ", ".join(name for name, _ in lost)
    return _apply_policy(ctx, job, f"Node {names} stopped answering (its machine died or its network was cut): "
                                   f"{lost[0][1]}")


def trainers_failed(ctx: training.TrainingContext, job: Job, message: str) -> training.Handover:
    """The framework judged the trainers failed (an exit code, a lost process): apply the policy."""
    return _apply_policy(ctx, job, message)


def _apply_policy(ctx: training.TrainingContext, job: Job, reason: str) -> training.Handover:
    policy = RestartPolicy.of(job.training_input)
    if policy.policy == NEVER:
        raise training.StepError(reason)
    if not policy.allows_restart(job.restart_count):
        raise training.StepError(
            f"Job failed after {job.restart_count} restart(s): scheduling.backoffLimit ({policy.backoff_limit}) "
            f"is reached, so it is not restarted again. Last failure: {reason}")
    count = job.restart_count + 1
    ctx.store.update_job(job.id, restart_count=count)
    first_line = reason.splitlines()[0] if reason else "a failure"
    ctx.store.add_event(job.id, "RESTART", f"Restarting the trainers ({count} of at most {policy.backoff_limit}, "
                                           f"restartPolicy ON_FAILURE) after: {first_line}")
    return training.Handover(Step.RESTARTING)


# ---- the RESTARTING step ----------------------------------------------------------------------------

def restart(ctx: training.TrainingContext, job: Job) -> training.Handover:
    """First delivery: stop trainers, copy their last outputs, wait out the backoff. Then: replace, restore."""
    cluster = training._cluster(ctx, job)
    if job.step_seq == 0:
        _stop_trainers(ctx, job, cluster)
        _save_job_dir(ctx, job, training._cluster(ctx, job))
        delay = backoff_seconds(ctx.settings.restart_backoff_seconds, job.restart_count)
        ctx.store.add_event(job.id, "RESTART", f"Trainers stopped; restart {job.restart_count} begins in {delay:g}s")
        return training.Handover(Step.RESTARTING, delay)
    _replace_lost_nodes(ctx, job, cluster)
    cluster = training._cluster(ctx, job)
    _restore_job_dir(ctx, job, cluster)
    for node in cluster.nodes:
        # The next start writes a new process folder on the node; its log continues the stored one.
        ctx.store.update_node(node.id, attempt=job.restart_count, log_base=node.log_offset, process_state="NONE",
                              exit_code=None)
    return training.Handover(Step.BOOTSTRAPPING)


def _stop_trainers(ctx: training.TrainingContext, job: Job, cluster: Cluster) -> None:
    """Stop every reachable node's trainer and keep its last log; nodes that do not answer are marked lost."""
    def stop(node: Node) -> None:
        with ctx.connect(node, cluster.private_key) as session:
            session.stop_process(training.process_dir(node), ctx.settings.stop_grace_seconds)
            training._fetch(ctx, job, node, session)

    reachable = [node for node in cluster.nodes if node.process_state != NODE_UNREACHABLE]
    for node, error in _each(ctx, reachable, stop):
        ctx.store.update_node(node.id, process_state=NODE_UNREACHABLE)
        ctx.store.add_event(job.id, "NODE", f"Node {node.name} is unreachable: {error}", node=node.name)


def _save_job_dir(ctx: training.TrainingContext, job: Job, cluster: Cluster) -> None:
    """Copy what the stopped trainers wrote last to the store, from the nodes that still answer (a lost
    chief's job directory is in the store as last synced)."""
    reachable = [node for node in cluster.nodes if node.process_state != NODE_UNREACHABLE]
    outputs.final_sync(ctx, job, cluster, training.output_sources(ctx, job, cluster, reachable))


def _replace_lost_nodes(ctx: training.TrainingContext, job: Job, cluster: Cluster) -> None:
    lost = [node for node in cluster.nodes if node.process_state == NODE_UNREACHABLE]
    if not lost:
        return
    spec = training.cluster_spec(ctx, job, cluster)
    for node in lost:
        info = ctx.driver.replace_node(spec, node.name)
        ctx.store.record_nodes(cluster.id, [Node.from_info(info)])
        ctx.store.update_node(node.id, process_state="NONE")
        ctx.store.add_event(job.id, "NODE", f"Node {node.name} replaced by a new node at {info.address}",
                            node=node.name)


def _restore_job_dir(ctx: training.TrainingContext, job: Job, cluster: Cluster) -> None:
    """Put the job directory's copy in the store onto every node's ``--job-dir``."""
    sources = training.output_sources(ctx, job, cluster)
    with outputs.OutputSync(ctx, job, cluster, sources, interval=0) as copier, \
            tempfile.TemporaryDirectory() as tmp:
        count, synced_at = copier.download(Path(tmp))
        if not count:
            ctx.store.add_event(job.id, "CHECKPOINT", "No copy of the job directory in the store: the trainers "
                                                      "start afresh")
            return
        with training._Sessions(ctx, cluster) as sessions:
            sessions.each(lambda node, session: session.put_tree(Path(tmp), training.node_job_dir(node)))
        for source in sources:
            if source.mirror is not None:
                copier.adopt(source)
    ctx.store.add_event(job.id, "CHECKPOINT", f"Job directory restored from {copier.uri}/ ({count} file(s), as "
                                              f"copied at {synced_at}) onto {len(cluster.nodes)} node(s)")


def _each(ctx: training.TrainingContext, nodes: Sequence[Node],
          action: Callable[[Node], None]) -> list[tuple[Node, BaseException]]:
    """Run ``action`` on every node in parallel; the nodes it failed on, with their errors."""
    try:
        fan_out(nodes, action, ctx.settings.ssh_parallelism)
    except FanOutError as exc:
        return exc.failures
    return []

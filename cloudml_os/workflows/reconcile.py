"""The reconciler: one pass that puts right what crashes and lost messages leave behind.

Celery beat runs :func:`reconcile` every ``reconcile_interval`` seconds (``tasks/``). Each pass:

- ends a job whose step is DONE but whose state is not final: CANCELLED if it is CANCELLING, else its
  outcome (a cancel landing during teardown left such jobs, before teardown ended with one compare-and-set);
- re-sends a job's step whose lease expired: its worker died mid-step, or its message was lost (a worker
  died after recording the hand-over but before sending it, a broker restart dropped it);
- fails jobs past ``scheduling.maxWaitTime`` (still QUEUED or PREPARING) or ``scheduling.maxRunningTime``
  (RUNNING), also when no step of theirs is running, and sends them to teardown;
- deletes clusters that belong to no live job or version (garbage collection): clusters the driver holds
  whose job has ended (e.g. a crash between the driver's create and the database's record of the nodes,
  followed by a failure or cancel) or whose version was deleted. Only this installation's clusters are
  looked at (the driver lists those carrying its id); a cluster whose name is not one the platform makes, or
  that this database has no record of, is never touched;
- removes resumable object uploads unused for ``upload_session_ttl`` with the bytes they kept.

Everything is a compare-and-set or idempotent, so two passes at once (two beats) do no harm: only one of
them re-sends a step, and deleting a cluster twice deletes it once. Plain functions: the store, the
driver and the function that sends a step come in as arguments; this module must not import Celery.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Callable

from sqlalchemy import select

from cloudml_os.artifacts import ArtifactError, ArtifactStore
from cloudml_os.cloud.base import Driver, DriverError
from cloudml_os.config import Settings
from cloudml_os.states import JobState, Step
from cloudml_os.store import Cluster, Job, Store
from cloudml_os.store.models import Version

log = logging.getLogger(__name__)

# The names workflows give clusters: cml-train-{job id}-… (train.cluster_name), cml-serve-{version id}.
TRAINING_CLUSTER = re.compile(r"cml-train-(\d+)-")
SERVING_CLUSTER = re.compile(r"cml-serve-(\d+)")
QUEUED_STATES = (JobState.QUEUED.value, JobState.PREPARING.value)


@dataclasses.dataclass
class ReconcileContext:
    """What a pass needs; ``send_step(job_pk, step, seq)`` enqueues one delivery of a training step."""

    settings: Settings
    store: Store
    driver: Driver
    artifacts: ArtifactStore
    send_step: Callable[[int, Step, int], None]


@dataclasses.dataclass
class Report:
    """What one pass did (logged; tests and the bench read it)."""

    repaired: list[int] = dataclasses.field(default_factory=list)
    resent: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    timed_out: list[int] = dataclasses.field(default_factory=list)
    deleted_clusters: list[str] = dataclasses.field(default_factory=list)
    expired_uploads: list[str] = dataclasses.field(default_factory=list)


def reconcile(ctx: ReconcileContext) -> Report:
    """One pass: repairs, time limits (they may send a job to teardown), then expired leases, then garbage."""
    report = Report()
    finish_done_jobs(ctx, report)
    enforce_time_limits(ctx, report)
    resend_expired_steps(ctx, report)
    collect_garbage(ctx, report)
    expire_uploads(ctx, report)
    if report.repaired or report.resent or report.timed_out or report.deleted_clusters:
        log.info("reconciler: repaired %s, resent %s, timed out %s, deleted clusters %s", report.repaired,
                 report.resent, report.timed_out, report.deleted_clusters)
    if report.expired_uploads:
        log.info("reconciler: removed %d expired upload session(s)", len(report.expired_uploads))
    return report


# ---- repairs -------------------------------------------------------------------------------------------

def finish_done_jobs(ctx: ReconcileContext, report: Report) -> None:
    """End every live job whose step is DONE: CANCELLED if it is CANCELLING, else its outcome.

    Teardown gives the job its final state before it hands over to DONE, so a live job at DONE was left by a
    lost race: a cancel that landed between teardown's read of the job and its final transition, before that
    transition became :meth:`Store.finish_job`. No step would end it, and it held a place in the jobs quota.
    """
    for job in ctx.store.live_jobs():
        if job.step != Step.DONE.value:
            continue
        state = ctx.store.finish_job(job.id)  # compare-and-set: of two passes, one ends it
        if state is not None:
            ctx.store.add_event(job.id, "RECONCILE", f"Job was {job.state} with every step done; now {state}")
            report.repaired.append(job.id)


# ---- step leases ---------------------------------------------------------------------------------------

def resend_expired_steps(ctx: ReconcileContext, report: Report) -> None:
    """Send again every live job's current step whose lease expired (or that never got one)."""
    now = ctx.store.now()
    pickup = ctx.settings.step_pickup_seconds
    never_picked_up = now - dt.timedelta(seconds=pickup)
    for job in ctx.store.live_jobs():
        if job.step == Step.DONE.value:
            continue
        expired = job.lease_until < now if job.lease_until else job.create_time < never_picked_up
        if not expired:
            continue
        if ctx.store.take_expired_step(job.id, job.step, job.step_seq, pickup, never_picked_up):
            ctx.store.add_event(job.id, "RECONCILE", f"Step {job.step} had no live worker; sent again")
            ctx.send_step(job.id, Step(job.step), job.step_seq)
            report.resent.append((job.id, job.step))


# ---- time limits ---------------------------------------------------------------------------------------

def _limit(job: Job, name: str) -> float | None:
    """``scheduling.NAME`` of the job in seconds (a google.protobuf.Duration such as "3600s"), if set."""
    value = (job.training_input.get("scheduling") or {}).get(name)
    return float(str(value).rstrip("s")) if value else None


def overdue_reason(job: Job, now: dt.datetime) -> str | None:
    """Why the job must stop now, or None: it waited longer than ``maxWaitTime`` to run, or ran longer than
    ``maxRunningTime``."""
    max_wait, max_running = _limit(job, "maxWaitTime"), _limit(job, "maxRunningTime")
    if max_wait is not None and job.state in QUEUED_STATES and (now - job.create_time).total_seconds() > max_wait:
        return f"Job waited longer than scheduling.maxWaitTime ({max_wait:g}s) to start running"
    if (max_running is not None and job.state == JobState.RUNNING.value and job.start_time
            and (now - job.start_time).total_seconds() > max_running):
        return f"Job ran longer than scheduling.maxRunningTime ({max_running:g}s)"
    return None


def enforce_time_limits(ctx: ReconcileContext, report: Report) -> None:
    """Fail overdue jobs. A queued job ends at once (nothing was created for it); the others get their
    outcome set to FAILED, which sends them to teardown at their next step (run_step), and a job whose step
    is not running (lease expired) is handed to teardown here."""
    now = ctx.store.now()
    for job in ctx.store.live_jobs():
        reason = overdue_reason(job, now)
        if reason is None or job.outcome == JobState.FAILED.value:
            continue
        if ctx.store.transition(job.id, [JobState.QUEUED], JobState.FAILED, error_message=reason):
            ctx.store.add_event(job.id, "TIMEOUT", reason)
            report.timed_out.append(job.id)
            continue
        if not ctx.store.fail_outcome(job.id, reason):
            continue  # another pass (or the watch step) got there first
        ctx.store.add_event(job.id, "TIMEOUT", reason)
        report.timed_out.append(job.id)
        step = Step(job.step)
        if step not in (Step.TEARING_DOWN, Step.DONE) and (job.lease_until is None or job.lease_until < now):
            pickup = now + dt.timedelta(seconds=ctx.settings.step_pickup_seconds)
            if ctx.store.advance(job.id, step, job.step_seq, Step.TEARING_DOWN, lease_owner=None, lease_until=pickup):
                ctx.send_step(job.id, Step.TEARING_DOWN, 0)


# ---- garbage collection ------------------------------------------------------------------------------

def is_garbage(store: Store, name: str) -> bool:
    """Whether the driver's cluster ``name`` belongs to no live job or version of this installation.

    A training cluster is garbage once its job is final; a serving cluster once its version is DELETED.
    Workflows record the job or version (and the cluster row) before the driver creates anything, so a
    cluster a step in progress created moments ago is always live. ``name`` is one the driver listed, so it
    carries this installation's id (another installation's numbers mean nothing here); a cluster this
    database knows nothing of all the same (neither its row nor its job or version) is left alone. Names the
    platform does not make are never garbage.
    """
    if match := TRAINING_CLUSTER.match(name):
        job = store.get_job(int(match.group(1)))
        return JobState(job.state).is_final if job is not None else _recorded(store, name)
    if match := SERVING_CLUSTER.fullmatch(name):
        with store.session() as session:
            state = session.scalar(select(Version.state).where(Version.id == int(match.group(1))))
        return state == "DELETED" if state is not None else _recorded(store, name)
    return False


def _recorded(store: Store, name: str) -> bool:
    with store.session() as session:
        return session.scalar(select(Cluster.id).where(Cluster.name == name)) is not None


def collect_garbage(ctx: ReconcileContext, report: Report) -> None:
    """Delete the driver's clusters that are garbage (see :func:`is_garbage`) and mark their rows DELETED."""
    try:
        names = ctx.driver.list_clusters()
    except DriverError as exc:
        log.warning("reconciler: cannot list the driver's clusters: %s", exc)
        return
    for name in names:
        if not is_garbage(ctx.store, name):
            continue
        try:
            ctx.driver.delete_cluster(name)
        except DriverError as exc:
            log.warning("reconciler: cannot delete cluster %s: %s", name, exc)
            continue
        with ctx.store.session() as session:
            row = session.scalar(select(Cluster).where(Cluster.name == name))
        if row is not None and row.state != "DELETED":
            ctx.store.update_cluster(row.id, state="DELETED", deleted_at=ctx.store.now())
        if row is not None and row.job_id is not None:
            ctx.store.add_event(row.job_id, "RECONCILE", f"Cluster {name} belonged to no live job; deleted")
        report.deleted_clusters.append(name)


# ---- resumable uploads ---------------------------------------------------------------------------------

def expire_uploads(ctx: ReconcileContext, report: Report) -> None:
    """Remove upload sessions unused for ``upload_session_ttl``, then the bytes they kept (a session whose row
    another pass or the client removed first is left to them)."""
    unused_since = ctx.store.now() - dt.timedelta(seconds=ctx.settings.upload_session_ttl)
    for upload in ctx.store.stale_object_uploads(unused_since):
        if not ctx.store.delete_object_upload(upload.upload_id):
            continue
        try:
            ctx.artifacts.upload_abort(upload.project, upload.upload_id)
        except ArtifactError as exc:
            log.warning("reconciler: the bytes of expired upload %s could not be removed: %s", upload.upload_id, exc)
        report.expired_uploads.append(upload.upload_id)

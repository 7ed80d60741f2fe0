"""Durable state: a :class:`Store` wraps one SQLAlchemy engine and the repository operations on it.

Every state change of a job is a compare-and-set (``UPDATE … WHERE state IN (…)``) so that two
deliveries of one task, or a cancel racing a step, cannot both win. Callers get plain ORM objects
detached from their session; they never hold a session across remote work.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import case, create_engine, delete, event, func, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from cloudml_os.config import ConfigError, Settings
from cloudml_os.states import JobState, Step
from cloudml_os.store.encryption import attach_cipher, load_key_encryption_key
from cloudml_os.store.models import (
    Cluster,
    Installation,
    Job,
    JobEvent,
    JobTrial,
    LogChunk,
    Node,
    ObjectUpload,
    Package,
    Replica,
    ReplicaSample,
    RevokedSession,
    Token,
    utcnow,
)

__all__ = ["Store", "Cluster", "Job", "JobEvent", "JobTrial", "LogChunk", "Node", "Package", "Token", "migrate",
           "kept_installation_id"]

MIGRATIONS = Path(__file__).parent / "migrations"


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):  # several processes share the file
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(url: str) -> None:
    """Bring the database schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


def kept_installation_id(settings: Settings) -> str:
    """The installation's id (:meth:`Store.installation_id`) for a caller with no Store at hand (the driver's
    loader, :func:`cloudml_os.cloud.base.load_driver`), read through an engine of its own, closed again."""
    store = Store(settings.database_url)  # reads no encrypted column: a key of its own will do
    try:
        return store.installation_id(settings.installation_id)
    finally:
        store.engine.dispose()


class Store:
    def __init__(self, url: str, key_encryption_key: str | None = None):
        """Open the database at ``url``.

        :param key_encryption_key: the Fernet key that encrypts clusters' SSH private keys at rest
            (:mod:`cloudml_os.store.encryption`). None makes a key for this Store alone: fine for a test
            that reads back only what it wrote, never for processes that share a database.
        :raises ValueError: the key is not a Fernet key.
        """
        self.engine = _engine(url)
        attach_cipher(self.engine.dialect, key_encryption_key or Fernet.generate_key().decode())
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """The installation's store: its database and its key-encryption key (made once when unset)."""
        return cls(settings.database_url, load_key_encryption_key(settings.key_encryption_key, settings.data_dir))

    def installation_id(self, configured: str = "") -> str:
        """This installation's id (the ``installation_id`` setting), kept in the database's one
        ``installation`` row: the first call on a database makes it (``configured``, else a random one), and
        every later call, from any process on any host, reads the same.

        :raises ConfigError: ``configured`` differs from the id the database holds already.
        """
        with self.session() as session:
            kept = session.scalar(select(Installation.installation_id).where(Installation.id == 1))
        if kept is None:
            with contextlib.suppress(IntegrityError):  # another process made it first: theirs stands
                with self.session() as session:
                    session.add(Installation(id=1, installation_id=configured or uuid.uuid4().hex))
            with self.session() as session:
                kept = session.scalar(select(Installation.installation_id).where(Installation.id == 1))
        if configured and configured != kept:
            raise ConfigError(f"setting 'installation_id' is {configured!r}, but this database belongs to the "
                              f"installation {kept!r}: set it to that (or leave it empty)")
        return kept

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    # ---- tokens and packages -------------------------------------------------------------------

    def add(self, obj: Any) -> Any:
        with self.session() as session:
            session.add(obj)
        return obj

    def token_by_hash(self, token_hash: str) -> Token | None:
        with self.session() as session:
            return session.scalar(select(Token).where(Token.token_hash == token_hash))

    def package_by_uri(self, uri: str) -> Package | None:
        with self.session() as session:
            return session.scalar(select(Package).where(Package.uri == uri))

    # ---- jobs ----------------------------------------------------------------------------------

    def create_job(self, job: Job, check: Callable[[Session], None] | None = None) -> Job:
        """Insert a new job. :raises IntegrityError: when the project already has that jobId.

        :param check: called first in the same transaction (the project's quota check, which locks its
            quota row until the job is inserted); what it raises aborts the insert.
        """
        with self.session() as session:
            if check is not None:
                check(session)
            session.add(job)
            session.flush()
            session.add(JobEvent(job_id=job.id, kind="STATE", message="Job queued"))
        return job

    def get_job(self, job_pk: int) -> Job | None:
        with self.session() as session:
            return session.get(Job, job_pk)

    def find_job(self, project: str, job_id: str) -> Job | None:
        with self.session() as session:
            return session.scalar(select(Job).where(Job.project == project, Job.job_id == job_id))

    def transition(self, job_pk: int, expected: Iterable[JobState], new: JobState, **fields: Any) -> bool:
        """Move the job to ``new`` if it is in one of ``expected``; record an event. Returns whether it moved."""
        values: dict[str, Any] = {"state": new.value, "etag": Job.etag + 1, **fields}
        if new == JobState.RUNNING:
            values.setdefault("start_time", utcnow())
        if new.is_final:
            values.setdefault("end_time", utcnow())
        with self.session() as session:
            moved = session.execute(
                update(Job).where(Job.id == job_pk, Job.state.in_([s.value for s in expected])).values(**values)
            ).rowcount
            if moved:
                session.add(JobEvent(job_id=job_pk, kind="STATE", message=f"Job {new.value}"))
        return bool(moved)

    def finish_job(self, job_pk: int) -> str | None:
        """Give a torn-down job its final state in one compare-and-set: CANCELLED when a cancel is pending
        (the job is CANCELLING), else its outcome (FAILED when none was decided); record an event.

        The state is decided by the UPDATE itself, not by an earlier read, so a cancel landing at any moment
        before still ends the job CANCELLED, and one landing after finds it final. Returns the state the job
        ended in, or None when it was final already.
        """
        outcomes = [JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value]
        final = case((Job.state == JobState.CANCELLING.value, JobState.CANCELLED.value),
                     (Job.outcome.in_(outcomes), Job.outcome), else_=JobState.FAILED.value)
        live = [JobState.QUEUED.value, JobState.PREPARING.value, JobState.RUNNING.value, JobState.CANCELLING.value]
        with self.session() as session:
            moved = session.execute(
                update(Job).where(Job.id == job_pk, Job.state.in_(live))
                .values(state=final, end_time=utcnow(), etag=Job.etag + 1)
            ).rowcount
            if not moved:
                return None
            state = session.scalar(select(Job.state).where(Job.id == job_pk))  # our own write: the row is ours
            session.add(JobEvent(job_id=job_pk, kind="STATE", message=f"Job {state}"))
        return state

    def advance(self, job_pk: int, current: Step, seq: int, new: Step, **fields: Any) -> bool:
        """Hand the job from step ``current`` to ``new`` (compare-and-set); returns whether this call did."""
        with self.session() as session:
            moved = session.execute(
                update(Job).where(Job.id == job_pk, Job.step == current.value, Job.step_seq == seq)
                .values(step=new.value, step_seq=0, etag=Job.etag + 1, **fields)
            ).rowcount
            if moved:
                session.add(JobEvent(job_id=job_pk, kind="STEP", message=f"Step {new.value}"))
        return bool(moved)

    def reschedule(self, job_pk: int, step: Step, seq: int, **fields: Any) -> bool:
        """Claim the next run of a step that polls (compare-and-set on ``step_seq``)."""
        with self.session() as session:
            return bool(session.execute(
                update(Job).where(Job.id == job_pk, Job.step == step.value, Job.step_seq == seq)
                .values(step_seq=seq + 1, **fields)
            ).rowcount)

    # ---- step leases (who runs a job's step now; see workflows/reconcile.py) ----------------------

    def claim_step(self, job_pk: int, step: Step, seq: int, owner: str, ttl: float) -> bool:
        """Take the lease of the job's step ``(step, seq)`` for ``ttl`` seconds (compare-and-set).

        Fails while another delivery holds a live lease, so a step never runs twice at once; a lease whose
        holder died is free once it expires (the reconciler then re-sends the step).
        """
        now = utcnow()
        with self.session() as session:
            return bool(session.execute(
                update(Job).where(Job.id == job_pk, Job.step == step.value, Job.step_seq == seq,
                                  or_(Job.lease_owner.is_(None), Job.lease_until.is_(None), Job.lease_until < now,
                                      Job.lease_owner == owner))
                .values(lease_owner=owner, lease_until=now + dt.timedelta(seconds=ttl))
            ).rowcount)

    def renew_step_lease(self, job_pk: int, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s lease by ``ttl`` seconds from now; False when it is no longer ``owner``'s."""
        with self.session() as session:
            return bool(session.execute(
                update(Job).where(Job.id == job_pk, Job.lease_owner == owner)
                .values(lease_until=utcnow() + dt.timedelta(seconds=ttl))
            ).rowcount)

    def release_step_lease(self, job_pk: int, owner: str, pickup: float) -> None:
        """Give up ``owner``'s lease: whatever step the job is in now must be picked up within ``pickup``
        seconds, or the reconciler sends it again."""
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_pk, Job.lease_owner == owner)
                            .values(lease_owner=None, lease_until=utcnow() + dt.timedelta(seconds=pickup)))

    def live_jobs(self) -> list[Job]:
        """Jobs not in a final state (what the reconciler looks after)."""
        final = [state.value for state in JobState if state.is_final]
        with self.session() as session:
            return list(session.scalars(select(Job).where(Job.state.not_in(final)).order_by(Job.id)))

    def fail_outcome(self, job_pk: int, message: str) -> bool:
        """Decide that a preparing or running job ends FAILED with ``message`` (its teardown still runs);
        False when its outcome was already FAILED or it is in no such state."""
        with self.session() as session:
            return bool(session.execute(
                update(Job).where(Job.id == job_pk,
                                  Job.state.in_([JobState.PREPARING.value, JobState.RUNNING.value]),
                                  or_(Job.outcome.is_(None), Job.outcome != JobState.FAILED.value))
                .values(outcome=JobState.FAILED.value, error_message=message[:4000], etag=Job.etag + 1)
            ).rowcount)

    def take_expired_step(self, job_pk: int, step: str, seq: int, pickup: float, created_before: dt.datetime) -> bool:
        """Claim the right to re-send step ``(step, seq)`` whose lease expired (or that never had one and was
        created before ``created_before``); the message must then be picked up within ``pickup`` seconds.
        Compare-and-set, so of two reconcilers only one sends."""
        now = utcnow()
        with self.session() as session:
            return bool(session.execute(
                update(Job).where(Job.id == job_pk, Job.step == step, Job.step_seq == seq,
                                  or_(Job.lease_until < now,
                                      Job.lease_until.is_(None) & (Job.create_time < created_before)))
                .values(lease_owner=None, lease_until=now + dt.timedelta(seconds=pickup))
            ).rowcount)

    def update_job(self, job_pk: int, **fields: Any) -> None:
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_pk).values(etag=Job.etag + 1, **fields))

    def add_event(self, job_pk: int, kind: str, message: str, node: str | None = None) -> None:
        with self.session() as session:
            session.add(JobEvent(job_id=job_pk, kind=kind, message=message, node=node))

    def events(self, job_pk: int, *, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
        with self.session() as session:
            return list(session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_pk, JobEvent.id > after_id)
                .order_by(JobEvent.id).limit(limit)
            ))

    # ---- trials of hyperparameter tuning jobs ------------------------------------------------------

    def add_trial(self, trial: JobTrial) -> JobTrial:
        """Record a trial; when one with its Optuna number is recorded already (a repeated delivery), that one."""
        try:
            with self.session() as session:
                session.add(trial)
            return trial
        except IntegrityError:
            with self.session() as session:
                return session.scalar(select(JobTrial).where(JobTrial.job_id == trial.job_id,
                                                             JobTrial.optuna_number == trial.optuna_number))

    def trials(self, job_pk: int) -> list[JobTrial]:
        """The job's trials in trial order."""
        with self.session() as session:
            return list(session.scalars(select(JobTrial).where(JobTrial.job_id == job_pk).order_by(JobTrial.trial_id)))

    def update_trial(self, trial_pk: int, **fields: Any) -> None:
        with self.session() as session:
            session.execute(update(JobTrial).where(JobTrial.id == trial_pk).values(**fields))

    def finish_trial(self, trial_pk: int, state: str, **fields: Any) -> bool:
        """End a running trial (compare-and-set on RUNNING); returns whether this call did."""
        with self.session() as session:
            return bool(session.execute(
                update(JobTrial).where(JobTrial.id == trial_pk, JobTrial.state == "RUNNING")
                .values(state=state, end_time=utcnow(), **fields)
            ).rowcount)

    # ---- dashboard sessions signed out -------------------------------------------------------------

    def revoke_session(self, session_id: str, until: dt.datetime) -> None:
        """Refuse a dashboard session from now on (until ``until``, its expiry); forget those expired."""
        with self.session() as session:
            session.execute(delete(RevokedSession).where(RevokedSession.until < utcnow()))
        with contextlib.suppress(IntegrityError), self.session() as session:  # revoked already: nothing to do
            session.add(RevokedSession(session_id=session_id, until=until))

    def session_revoked(self, session_id: str) -> bool:
        with self.session() as session:
            return session.get(RevokedSession, session_id) is not None

    # ---- resumable object uploads ------------------------------------------------------------

    def object_upload(self, project: str, upload_id: str) -> ObjectUpload | None:
        with self.session() as session:
            upload = session.get(ObjectUpload, upload_id)
            return upload if upload is not None and upload.project == project else None

    def touch_object_upload(self, upload_id: str) -> None:
        with self.session() as session:
            session.execute(update(ObjectUpload).where(ObjectUpload.upload_id == upload_id)
                            .values(updated_at=utcnow()))

    def delete_object_upload(self, upload_id: str) -> bool:
        """Forget a session; False when another request (or the reconciler) did first."""
        with self.session() as session:
            return session.execute(delete(ObjectUpload).where(ObjectUpload.upload_id == upload_id)).rowcount == 1

    def stale_object_uploads(self, unused_since: dt.datetime) -> list[ObjectUpload]:
        with self.session() as session:
            return list(session.scalars(select(ObjectUpload).where(ObjectUpload.updated_at < unused_since)))

    # ---- clusters and nodes --------------------------------------------------------------------

    def cluster_of(self, job_pk: int) -> Cluster | None:
        """The job's live (not deleted) cluster with its nodes loaded."""
        with self.session() as session:
            return session.scalar(
                select(Cluster).where(Cluster.job_id == job_pk, Cluster.state != "DELETED")
                .options(selectinload(Cluster.nodes)).order_by(Cluster.id.desc())
            )

    def create_cluster(self, cluster: Cluster) -> Cluster:
        """Record a cluster before the driver creates it; an existing one with the same name is returned."""
        try:
            with self.session() as session:
                session.add(cluster)
            return cluster
        except IntegrityError:
            with self.session() as session:
                return session.scalar(select(Cluster).where(Cluster.name == cluster.name))

    def record_nodes(self, cluster_id: int, nodes: list[Node]) -> None:
        """Replace the cluster's node rows with what the driver returned and mark it READY."""
        with self.session() as session:
            existing = {n.name: n for n in session.scalars(select(Node).where(Node.cluster_id == cluster_id))}
            for node in nodes:
                if node.name in existing:
                    current = existing[node.name]
                    for column in ("address", "ssh_port", "username", "host_keys", "port_first", "port_last",
                                   "environment", "workdir", "runtime_root"):
                        setattr(current, column, getattr(node, column))
                else:
                    node.cluster_id = cluster_id
                    session.add(node)
            session.execute(update(Cluster).where(Cluster.id == cluster_id).values(state="READY"))

    def forget_nodes(self, cluster_id: int, keep: Iterable[str]) -> None:
        """Delete the cluster's node rows whose names are not in ``keep`` (nodes a resize removed)."""
        with self.session() as session:
            session.execute(delete(Node).where(Node.cluster_id == cluster_id, Node.name.not_in(list(keep))))

    @contextlib.contextmanager
    def lease_cluster(self, name: str, owner: str, ttl: float, timeout: float | None = None,
                      poll: float = 0.1) -> Iterator[None]:
        """Hold the recorded cluster ``name``'s lease while the block runs, so one change of it runs at a time.

        The lease is taken with one compare-and-set when it is free, expired (its holder died), or already
        ``owner``'s (a redelivered task takes back its own lease at once); otherwise it is polled every
        ``poll`` seconds. It lasts ``ttl`` seconds and is released at the end of the block if still ours.
        No transaction stays open while the block runs. A nested block of the same owner releases the
        lease when it ends, so don't nest.

        :param timeout: seconds to wait for the lease; None waits ``ttl`` plus a little, long enough for
            any holder's lease to expire.
        :raises TimeoutError: the lease was not free within ``timeout``.
        :raises LookupError: no cluster of that name is recorded.
        """
        deadline = time.monotonic() + (ttl + 1.0 if timeout is None else timeout)
        while True:
            now = utcnow()
            with self.session() as session:
                taken = session.execute(
                    update(Cluster).where(Cluster.name == name,
                                          or_(Cluster.lock_owner.is_(None), Cluster.lock_until < now,
                                              Cluster.lock_owner == owner))
                    .values(lock_owner=owner, lock_until=now + dt.timedelta(seconds=ttl))
                ).rowcount
                if not taken:
                    holder = session.execute(select(Cluster.lock_owner, Cluster.lock_until)
                                             .where(Cluster.name == name)).first()
            if taken:
                break
            if holder is None:
                raise LookupError(f"no cluster {name} is recorded")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"cluster {name} is being changed by {holder.lock_owner} "
                                   f"(lease until {holder.lock_until} UTC)")
            time.sleep(poll)
        try:
            yield
        finally:
            with self.session() as session:
                session.execute(update(Cluster).where(Cluster.name == name, Cluster.lock_owner == owner)
                                .values(lock_owner=None, lock_until=None))

    def update_cluster(self, cluster_id: int, **fields: Any) -> None:
        """Change a cluster row; marking it DELETED also empties its private key (its nodes are gone)."""
        if fields.get("state") == "DELETED":
            fields.setdefault("private_key", "")
        with self.session() as session:
            session.execute(update(Cluster).where(Cluster.id == cluster_id).values(**fields))

    def rekey_cluster(self, cluster_id: int, private_key: str, public_key: str) -> Cluster:
        """Give a cluster whose key was deleted (it was DELETED and is coming back) a new keypair.

        Compare-and-set on the empty key, so that of two concurrent callers one keypair wins; returns the
        row as it is after, with the winner's keys.
        """
        with self.session() as session:
            session.execute(update(Cluster).where(Cluster.id == cluster_id, Cluster.private_key == "")
                            .values(private_key=private_key, public_key=public_key))
        with self.session() as session:
            return session.get(Cluster, cluster_id)

    def update_node(self, node_id: int, **fields: Any) -> None:
        with self.session() as session:
            session.execute(update(Node).where(Node.id == node_id).values(**fields))

    # ---- logs ----------------------------------------------------------------------------------

    def append_logs(self, job_pk: int, chunks: Iterable[tuple[int, str, int, bytes]]) -> None:
        """Store bytes fetched from nodes' logs, ``(node_id, node, offset, data)`` each, and move each node's
        offset past them, in one transaction: a watch stores all its nodes' new lines with one commit."""
        chunks = [chunk for chunk in chunks if chunk[3]]
        if not chunks:
            return
        with self.session() as session:
            for node_id, node, offset, data in chunks:
                exists = session.scalar(select(LogChunk.id).where(
                    LogChunk.job_id == job_pk, LogChunk.node == node, LogChunk.offset == offset))
                if exists is None:
                    session.add(LogChunk(job_id=job_pk, node=node, offset=offset, data=data))
                session.execute(update(Node).where(Node.id == node_id, Node.log_offset == offset)
                                .values(log_offset=offset + len(data)))

    def read_log(self, job_pk: int, node: str, offset: int = 0, limit: int = 1 << 20) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of a node's log from ``offset``; returns them and the next offset."""
        with self.session() as session:
            chunks = session.execute(
                select(LogChunk.offset, LogChunk.data)
                .where(LogChunk.job_id == job_pk, LogChunk.node == node,
                       LogChunk.offset + func.length(LogChunk.data) > offset)
                .order_by(LogChunk.offset)
            ).all()
        out = bytearray()
        position = offset
        for chunk_offset, data in chunks:
            if chunk_offset > position:
                break
            out += data[position - chunk_offset:]
            position = chunk_offset + len(data)
            if len(out) >= limit:
                break
        return bytes(out[:limit]), offset + min(len(out), limit)

    def log_marks(self, job_pks: list[int]) -> dict[int, tuple[str, int | None]]:
        """For each existing job of ``job_pks``: (its state, its newest log chunk's id) — a value that changes
        whenever the job's state changes or any of its logs grows. One query for all of them."""
        with self.session() as session:
            rows = session.execute(select(Job.id, Job.state, func.max(LogChunk.id))
                                   .outerjoin(LogChunk, LogChunk.job_id == Job.id)
                                   .where(Job.id.in_(job_pks)).group_by(Job.id, Job.state)).all()
        return {job_pk: (state, newest) for job_pk, state, newest in rows}

    def log_nodes(self, job_pk: int) -> list[str]:
        with self.session() as session:
            return list(session.scalars(select(LogChunk.node).where(LogChunk.job_id == job_pk).distinct()))

    def now(self) -> dt.datetime:
        return utcnow()

    def add_replica_samples(self, rows: list[dict[str, Any]]) -> int:
        """Insert monitor samples (``replica_id`` plus :class:`ReplicaSample` columns but the replica's
        version and name, looked up here in one query) in one batch; samples of unknown replicas are dropped.
        Returns how many were written."""
        if not rows:
            return 0
        with self.session() as session:
            known = {r.id: r for r in session.execute(select(Replica.id, Replica.version_id, Replica.name).where(
                Replica.id.in_([row["replica_id"] for row in rows])))}
            batch = [{**row, "version_id": known[row["replica_id"]].version_id,
                      "replica": known[row["replica_id"]].name} for row in rows if row["replica_id"] in known]
            if batch:
                session.execute(insert(ReplicaSample), batch)
        return len(batch)

    def prune_replica_samples(self, before: dt.datetime, batch: int = 5000) -> int:
        """Delete samples older than ``before``, ``batch`` rows per transaction (short locks); how many."""
        deleted = 0
        while True:
            with self.session() as session:
                oldest = select(ReplicaSample.id).where(ReplicaSample.time < before).limit(batch)
                count = session.execute(delete(ReplicaSample).where(ReplicaSample.id.in_(oldest))).rowcount
            deleted += count
            if count < batch:
                return deleted

"""SQLAlchemy tables: the durable record of tokens, packages, jobs, their clusters, nodes, events and logs.

The database is the single source of truth for progress: a worker that dies mid-step leaves here
everything the next delivery of the task needs to continue. Schema changes go through Alembic
(``store/migrations``), never ``create_all`` outside tests of the migrations themselves.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from cloudml_os.store.encryption import EncryptedText


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Token(Base):
    """A local API token; only its SHA-256 is stored."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(String(63), index=True)
    role: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Package(Base):
    """A trainer package uploaded to the artifact store."""

    __tablename__ = "packages"
    id: Mapped[int] = mapped_column(primary_key=True)
    project: Mapped[str] = mapped_column(String(63), index=True)
    uri: Mapped[str] = mapped_column(String(1024), unique=True)
    filename: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # "sdist", "wheel" or "archive"
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    # jobs.list pages a project's jobs newest first (ORDER BY id DESC): (project, id) is that page's range scan.
    __table_args__ = (UniqueConstraint("project", "job_id"), Index("ix_jobs_project_id", "project", "id"))
    id: Mapped[int] = mapped_column(primary_key=True)
    project: Mapped[str] = mapped_column(String(63))
    job_id: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), index=True)
    step: Mapped[str] = mapped_column(String(16))
    # Bumped each time a step re-schedules itself; a task message carrying an older value is a duplicate.
    step_seq: Mapped[int] = mapped_column(default=0)
    framework: Mapped[str] = mapped_column(String(32))
    training_input: Mapped[dict[str, Any]]
    # A batch prediction job's v1 predictionInput (its training_input is then empty) and predictionOutput.
    prediction_input: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prediction_output: Mapped[dict[str, Any]] = mapped_column(default=dict)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    create_time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    start_time: Mapped[dt.datetime | None]
    end_time: Mapped[dt.datetime | None]
    error_message: Mapped[str] = mapped_column(Text, default="")
    training_output: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The state the job ends in once teardown has run (SUCCEEDED, FAILED or CANCELLED).
    outcome: Mapped[str | None] = mapped_column(String(16))
    # Times the trainers were restarted as a whole (scheduling.restartPolicy ON_FAILURE).
    restart_count: Mapped[int] = mapped_column(default=0)
    # The step's lease: a delivery running the step holds it (``lease_owner``) and renews it; a handed-over
    # step's message must be picked up before ``lease_until``. Once it has passed, the reconciler re-sends.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None] = mapped_column(index=True)
    etag: Mapped[int] = mapped_column(default=1)
    clusters: Mapped[list[Cluster]] = relationship(back_populates="job", order_by="Cluster.id")


class Cluster(Base):
    """The nodes one job (or one serving version) runs on; ``name`` is deterministic so that a repeated
    create finds them. ``lock_owner``/``lock_until`` are a lease (:meth:`Store.lease_cluster`) that
    serializes changes of a cluster whose nodes come and go (a serving version's replicas)."""

    __tablename__ = "clusters"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    driver: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))  # CREATING, READY, DELETING, DELETED
    private_key: Mapped[str] = mapped_column(EncryptedText)  # Fernet-encrypted at rest; emptied once DELETED
    public_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[dt.datetime | None]
    lock_owner: Mapped[str | None] = mapped_column(String(64))
    lock_until: Mapped[dt.datetime | None]
    job: Mapped[Job] = relationship(back_populates="clusters")
    nodes: Mapped[list[Node]] = relationship(back_populates="cluster", order_by="Node.id")


class Node(Base):
    """One VM (or local sshd node) of a cluster and the trainer process it runs."""

    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("cluster_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    task_type: Mapped[str] = mapped_column(String(32))
    task_index: Mapped[int]
    address: Mapped[str] = mapped_column(String(255))
    ssh_port: Mapped[int]
    username: Mapped[str] = mapped_column(String(64))
    host_keys: Mapped[list[Any]]
    port_first: Mapped[int]
    port_last: Mapped[int]
    environment: Mapped[dict[str, Any]] = mapped_column(default=dict)
    workdir: Mapped[str] = mapped_column(String(1024))
    runtime_root: Mapped[str] = mapped_column(String(1024))
    process_state: Mapped[str] = mapped_column(String(16), default="NONE")  # NONE, RUNNING, EXITED, STOPPED
    exit_code: Mapped[int | None]
    log_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    # Which start of the trainer the node runs (the job's restart count when it was launched), and where in
    # the stored log that start's output begins: each start writes a log file of its own on the node.
    attempt: Mapped[int] = mapped_column(default=0)
    log_base: Mapped[int] = mapped_column(BigInteger, default=0)
    cluster: Mapped[Cluster] = relationship(back_populates="nodes")

    # The fields a driver's NodeInfo (cloudml_os.cloud.base) gives a node row.
    INFO_FIELDS = ("name", "task_type", "task_index", "address", "ssh_port", "username", "host_keys", "port_first",
                   "port_last", "environment", "workdir", "runtime_root")

    @classmethod
    def from_info(cls, info: Any) -> Node:
        """A row for a node a driver returned (a :class:`cloudml_os.cloud.base.NodeInfo`)."""
        values = {field: getattr(info, field) for field in cls.INFO_FIELDS}
        return cls(**{**values, "host_keys": list(info.host_keys), "environment": dict(info.environment)})


class JobTrial(Base):
    """One trial of a hyperparameter tuning job: the values it ran with, where, and how it ended.

    ``optuna_number`` ties it to its trial in the job's Optuna study (which keeps the search's own state);
    ``slot`` is the group of the job's nodes it runs on (one group per parallel trial, reused by the next).
    """

    __tablename__ = "job_trials"
    __table_args__ = (UniqueConstraint("job_id", "trial_id"), UniqueConstraint("job_id", "optuna_number"))
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    trial_id: Mapped[int]  # 1, 2, … as v1's trialId
    optuna_number: Mapped[int]
    slot: Mapped[int]
    state: Mapped[str] = mapped_column(String(16))  # RUNNING, SUCCEEDED, FAILED, CANCELLED
    hyperparameters: Mapped[dict[str, Any]]  # parameter name -> the value passed, as a string
    objective: Mapped[float | None]
    training_step: Mapped[int | None] = mapped_column(BigInteger)
    # The highest global_step of an intermediate value already reported to the study (early stopping).
    reported_step: Mapped[int] = mapped_column(BigInteger, default=-1)
    stopped_early: Mapped[bool] = mapped_column(default=False)
    error_message: Mapped[str] = mapped_column(Text, default="")
    start_time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    end_time: Mapped[dt.datetime | None]


class PredictionShard(Base):
    """One piece of a batch prediction job's input: the records of ``input_uri`` whose first byte lies in
    ``[start, end)`` (a whole file when ``end`` is None: record formats that cannot be split).

    A shard is run by one node at a time (``node``, its ``run``-th process there); DONE only once its output
    files are in the store under their final names, so a shard run again (its node died, the worker crashed)
    replaces them and every record is in the output exactly once.
    """

    __tablename__ = "prediction_shards"
    __table_args__ = (UniqueConstraint("job_id", "index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    index: Mapped[int]
    input_uri: Mapped[str] = mapped_column(String(1100))
    start: Mapped[int] = mapped_column(BigInteger)
    end: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="PENDING")  # PENDING, RUNNING, DONE
    node: Mapped[str | None] = mapped_column(String(128))
    run: Mapped[int] = mapped_column(default=0)
    failures: Mapped[int] = mapped_column(default=0)
    records_total: Mapped[int | None] = mapped_column(BigInteger)
    records_done: Mapped[int] = mapped_column(BigInteger, default=0)
    predictions: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    node: Mapped[str | None] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(Text)


class LogChunk(Base):
    """Bytes of one node's combined stdout/stderr, keyed by their offset so a re-fetch is a no-op."""

    __tablename__ = "log_chunks"
    __table_args__ = (
        UniqueConstraint("job_id", "node", "offset"),
        Index("ix_log_chunks_job_node", "job_id", "node", "offset"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    node: Mapped[str] = mapped_column(String(128))
    offset: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Model(Base):
    """A Cloud ML Engine v1 model: a name grouping versions, one of them the default.

    ``traffic_split`` (added, as Vertex AI endpoints have it): the percent of the model's ``:predict`` calls
    each version answers, summing to 100; None is the default version's 100 %. The default version is the
    one with the largest share.
    """

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("project", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    default_version: Mapped[str | None] = mapped_column(String(128))
    traffic_split: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    create_time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    etag: Mapped[int] = mapped_column(default=1)


DEFAULT_PREDICTION_DEADLINE = 5.0


class Version(Base):
    """A deployed model version: ``replicas`` serving nodes behind the router."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))  # CREATING, READY, UPDATING, FAILED, DELETING, DELETED
    deployment_uri: Mapped[str] = mapped_column(String(1024))
    framework: Mapped[str] = mapped_column(String(32))
    runtime_version: Mapped[str] = mapped_column(String(32))
    machine_type: Mapped[str] = mapped_column(String(64))
    replicas: Mapped[int] = mapped_column(default=1)
    # Active health checks, HAProxy's semantics: probe every ``interval`` s, ``timeout`` s each; a
    # replica is up after ``rise`` successes in a row and down after ``fall`` failures in a row.
    health: Mapped[dict[str, Any]] = mapped_column(default=dict)
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # v1 requestLoggingConfig ({"samplingPercentage": fraction}); None: no request is logged.
    request_logging: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # v1 autoScaling with our defaults filled in ({"minNodes", "maxNodes", "metrics": [{"name", "target"}],
    # "stableWindow", "panicWindow"}); None: a fixed pool of ``replicas`` (manualScaling).
    auto_scaling: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Seconds a prediction may take (a request may ask for another); past it the replica is reported.
    prediction_deadline: Mapped[float] = mapped_column(default=DEFAULT_PREDICTION_DEADLINE)
    error_message: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    etag: Mapped[int] = mapped_column(default=1)


class Replica(Base):
    """One serving node of a version: node ``name`` of the version's cluster ``cml-serve-{version_id}``.

    Names are never reused, so a replaced or removed replica's node name never comes back in the cluster.
    """

    __tablename__ = "replicas"
    __table_args__ = (UniqueConstraint("version_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))  # replica-0, replica-1… (never reused)
    # PROVISIONING, STARTING (server loading), READY (in the pool), EJECTED (out of the pool, being
    # replaced), DELETING, DELETED
    state: Mapped[str] = mapped_column(String(16))
    address: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None]
    healthy: Mapped[bool] = mapped_column(default=False)
    replaces: Mapped[int | None] = mapped_column(ForeignKey("replicas.id"))
    create_time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ready_time: Mapped[dt.datetime | None]
    ejected_time: Mapped[dt.datetime | None]


class VersionEvent(Base):
    """What happened to a version and its replicas: deployments, probes failing, ejections, replacements."""

    __tablename__ = "version_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    replica: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)


class Operation(Base):
    """A v1 long-running operation (version create, delete, scale)."""

    __tablename__ = "operations"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)  # the id in projects/P/operations/NAME
    project: Mapped[str] = mapped_column(String(63), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # CREATE_VERSION, DELETE_VERSION, UPDATE_VERSION
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    target: Mapped[str] = mapped_column(String(512))  # projects/P/models/M/versions/V
    done: Mapped[bool] = mapped_column(default=False)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    create_time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    end_time: Mapped[dt.datetime | None]

    @classmethod
    def new(cls, project: str, kind: str, target: str, version_id: int | None = None, *,
            done: bool = False) -> Operation:
        """A new operation with a fresh random name (``done``: one that finished on the spot)."""
        return cls(name=uuid.uuid4().hex, project=project, kind=kind, version_id=version_id, target=target,
                   done=done, end_time=utcnow() if done else None)


class ProjectQuota(Base):
    """A project's quota overrides (NULL: the installation's default) and the row its quota checks lock.

    Every project that submits work gets a row, so that :func:`cloudml_os.quotas.check` can lock it
    (``SELECT … FOR UPDATE``) and two concurrent submissions are counted one after the other.
    """

    __tablename__ = "project_quotas"
    project: Mapped[str] = mapped_column(String(63), primary_key=True)
    gpus: Mapped[int | None]
    nodes: Mapped[int | None]
    jobs: Mapped[int | None]
    replicas: Mapped[int | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """One mutating ``/v1`` call (the admin Events panel): who made it, on what, and how it was answered.

    Denied calls are recorded too; the body never is, so no secret reaches this table.
    """

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    caller: Mapped[str] = mapped_column(String(255))  # "token 12 (description)" or a Keystone user name
    caller_project: Mapped[str] = mapped_column(String(63))
    project: Mapped[str | None] = mapped_column(String(63), index=True)  # the project the path names
    method: Mapped[str] = mapped_column(String(8))
    resource: Mapped[str] = mapped_column(String(512))
    status: Mapped[int]


class ReplicaSample(Base):
    """A replica's health probes over one sampling window (ten seconds by default): the Version page's
    latency and health over time. Written in batches by the monitor, pruned after ``replica_sample_retention``."""

    __tablename__ = "replica_samples"
    __table_args__ = (Index("ix_replica_samples_version_time", "version_id", "time"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    version_id: Mapped[int]  # no foreign keys: samples outlive nothing and never block a deletion
    replica_id: Mapped[int]
    replica: Mapped[str] = mapped_column(String(64))
    time: Mapped[dt.datetime] = mapped_column(index=True)  # the window's end
    probes: Mapped[int]
    failures: Mapped[int]
    latency_p50_ms: Mapped[float | None]
    latency_max_ms: Mapped[float | None]
    healthy: Mapped[bool]


class Installation(Base):
    """This installation's identity: one row (``id`` 1), made by the first process that asks
    (:meth:`cloudml_os.store.Store.installation_id`), so every process sharing the database agrees on it
    whatever host it runs on. Clusters carry the id; the reconciler collects only those that carry it."""

    __tablename__ = "installation"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    installation_id: Mapped[str] = mapped_column(String(56))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RevokedSession(Base):
    """A dashboard session signed out before it expired (:mod:`cloudml_os.dashboard.sessions`): refused by every
    API process until ``until``, when it would have expired anyway and the row may go."""

    __tablename__ = "dashboard_revoked_sessions"
    session_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    until: Mapped[dt.datetime] = mapped_column(index=True)


class ObjectUpload(Base):
    """A resumable upload session of the objects API (:mod:`cloudml_os.api.objects`): what the client announced.
    How many bytes are kept is the artifact store's to say (``upload_received``), never a copy here that a cut
    connection could leave behind. ``chunk_bytes`` is fixed at the start: the unit in which bytes are kept."""

    __tablename__ = "object_uploads"
    upload_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    chunk_bytes: Mapped[int] = mapped_column(BigInteger)
    md5: Mapped[str | None] = mapped_column(String(32))
    sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)

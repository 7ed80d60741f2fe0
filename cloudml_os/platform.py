"""Wiring: builds the real store, driver, artifact store, plugins, router and monitor from settings.

The only place where concrete implementations are chosen; everything else receives them as arguments.
"""

from __future__ import annotations

import datetime as dt
import io
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask
from sqlalchemy import select

from cloudml_os.artifacts import ArtifactStore, open_artifact_store
from cloudml_os.cache import TtlCache
from cloudml_os.cloud.base import load_driver
from cloudml_os.config import Settings, load_settings
from cloudml_os.frameworks.base import load_frameworks
from cloudml_os.serving.monitor import ProbeSample
from cloudml_os.serving.request_log import RequestLog
from cloudml_os.store import Node, Store
from cloudml_os.store.models import Model, Replica, Version, VersionEvent
from cloudml_os.tasks import job_starter, make_celery, operation_starter, replica_replacer, step_sender
from cloudml_os.workflows.reconcile import ReconcileContext
from cloudml_os.workflows.serve import ServingContext, eject
from cloudml_os.workflows.train import TrainingContext

ENDPOINTS_TTL = 0.2  # seconds the API trusts its list of a version's healthy replicas
SCALE_FROM_ZERO_RETRY_AFTER = 10  # seconds a client told to come back waits (Retry-After)


def _connect(settings: Settings):
    from cloudml_os.remote import connect_node

    def connect(node: Node, private_key: str):
        return connect_node(node, private_key, settings)

    return connect


def training_context(settings: Settings) -> TrainingContext:
    return TrainingContext(
        settings=settings,
        store=Store.from_settings(settings),
        driver=load_driver(settings),
        artifacts=open_artifact_store(settings),
        frameworks=load_frameworks(),
        connect=_connect(settings),
    )


def serving_context(settings: Settings) -> ServingContext:
    return ServingContext(
        settings=settings,
        store=Store.from_settings(settings),
        driver=load_driver(settings),
        artifacts=open_artifact_store(settings),
        frameworks=load_frameworks(),
        connect=_connect(settings),
        replace=replica_replacer(make_celery(settings)),
    )


def reconcile_context(settings: Settings) -> ReconcileContext:
    return ReconcileContext(
        settings=settings,
        store=Store.from_settings(settings),
        driver=load_driver(settings),
        artifacts=open_artifact_store(settings),
        send_step=step_sender(make_celery(settings)),
    )


def worker_celery(settings: Settings):
    return make_celery(settings, lambda: training_context(settings), lambda: serving_context(settings),
                       lambda: reconcile_context(settings))


class HealthyReplicas:
    """The router's view of a version's pool: READY, healthy replicas from the database, cached briefly."""

    def __init__(self, store: Store, ttl: float = ENDPOINTS_TTL):
        self.store = store
        self._cache = TtlCache(ttl)

    def __call__(self, version_id: int) -> list:
        return self._cache.get(version_id, lambda: self._load(version_id))

    def _load(self, version_id: int) -> list:
        from cloudml_os.serving.router import Endpoint

        with self.store.session() as session:
            rows = session.execute(select(Replica.id, Replica.name, Replica.address, Replica.port).where(
                Replica.version_id == version_id, Replica.state == "READY", Replica.healthy.is_(True))).all()
        return [Endpoint(replica_id=r.id, name=r.name, address=r.address, port=r.port) for r in rows]

    def forget(self, version_id: int) -> None:
        self._cache.forget(version_id)


def predictor(settings: Settings, store: Store, replace: Callable[[int], None],
              start_operation: Callable[[int], None]):
    """``predict(version_id, model_name, body, deadline)`` through the router, ejecting replicas that fail;
    a version scaled to zero is woken (a replica started) and the request waits for it (see
    :func:`_wait_for_replica`)."""
    from cloudml_os.errors import Unavailable
    from cloudml_os.serving.router import NoReplicaAvailable, Router

    pool = HealthyReplicas(store)

    def on_failure(endpoint, reason: str) -> None:
        eject(store, endpoint.replica_id, f"router: {reason}", replace)
        with store.session() as session:
            version_id = session.scalar(select(Replica.version_id).where(Replica.id == endpoint.replica_id))
        if version_id is not None:
            pool.forget(version_id)

    router = Router(pool, on_failure)

    def predict(version_id: int, model_name: str, body: bytes, deadline: float) -> tuple[int, bytes]:
        path, headers = f"/v1/models/{model_name}:predict", {"Content-Type": "application/json"}
        try:
            response = router.forward(version_id, path, body, headers, deadline)
        except NoReplicaAvailable as exc:
            if not _wait_for_replica(settings, store, pool, version_id, start_operation):
                raise Unavailable(f"No replica of this version can answer now: {exc}") from None
            try:
                response = router.forward(version_id, path, body, headers, deadline)
            except NoReplicaAvailable as again:
                raise Unavailable(f"No replica of this version can answer yet: {again}",
                                  headers={"Retry-After": str(SCALE_FROM_ZERO_RETRY_AFTER)}) from None
        return response.status, response.body

    return predict


def _wait_for_replica(settings: Settings, store: Store, pool: HealthyReplicas, version_id: int,
                      start_operation: Callable[[int], None]) -> bool:
    """For a version that may scale to zero (``autoScaling.minNodes`` 0) and has no replica: have one
    started (once, whichever request comes first) and wait until it serves, at most
    ``scale_from_zero_wait`` seconds. A version still scaling in to zero is woken once that ends. False when
    the version is not one that sleeps.

    :raises Unavailable: (503 with Retry-After) the wait ran out.
    """
    from cloudml_os.errors import Unavailable

    if not _wake(settings, store, version_id, start_operation):
        return False
    ends = time.monotonic() + settings.scale_from_zero_wait
    next_look = time.monotonic() + 1.0
    while time.monotonic() < ends:
        pool.forget(version_id)
        if pool(version_id):
            return True
        if time.monotonic() >= next_look:  # e.g. a scale-in to zero that was under way has ended
            _wake(settings, store, version_id, start_operation)
            next_look = time.monotonic() + 1.0
        time.sleep(0.2)
    raise Unavailable(f"No replica of this version started within {settings.scale_from_zero_wait:g} s; "
                      f"retry later", headers={"Retry-After": str(SCALE_FROM_ZERO_RETRY_AFTER)})


def _wake(settings: Settings, store: Store, version_id: int, start_operation: Callable[[int], None]) -> bool:
    """Scale a READY version that sleeps at zero replicas to one; False when it is not one that may sleep."""
    from cloudml_os.workflows.autoscale import scale_version

    with store.session() as session:
        row = session.execute(select(Version.state, Version.replicas, Version.auto_scaling)
                              .where(Version.id == version_id)).first()
    if row is None or not row.auto_scaling or row.auto_scaling["minNodes"] != 0:
        return False
    if row.state == "READY" and row.replicas == 0:
        scale_version(store, settings, version_id, 1, "a prediction arrived while no replica served",
                      start_operation)
    return True


def wsgi_app(settings: Settings | None = None) -> Flask:
    """The API application with its real dependencies (what gunicorn serves)."""
    from cloudml_os.app import create_app

    settings = settings or load_settings()
    store = Store.from_settings(settings)
    celery = make_celery(settings)
    artifacts = open_artifact_store(settings)
    return create_app(
        settings,
        store=store,
        artifacts=artifacts,
        frameworks=load_frameworks(),
        start_job=job_starter(celery),
        start_operation=operation_starter(celery),
        predict=predictor(settings, store, replica_replacer(celery), operation_starter(celery)),
        replace_replica=replica_replacer(celery),
        request_log=request_log(settings, store, artifacts),
    )


def request_log(settings: Settings, store: Store, artifacts: ArtifactStore) -> RequestLog:
    """The API host's request log spool, shipping to ``artifacts``; dropped records become version events."""

    def put(project: str, key: str, data: bytes) -> None:
        artifacts.put_file(project, key, io.BytesIO(data))

    def dropped(project: str, model: str, version: str, count: int) -> None:
        with store.session() as session:
            version_id = session.scalar(select(Version.id).join(Model, Model.id == Version.model_id).where(
                Model.project == project, Model.name == model, Version.name == version))
            if version_id is not None:
                session.add(VersionEvent(version_id=version_id, kind="REQUEST_LOG",
                                         message=f"{count} request log record(s) dropped: the spool is full"))

    settings.request_log_spool.mkdir(parents=True, exist_ok=True)
    return RequestLog(settings.request_log_spool, put, max_bytes=settings.request_log_max_bytes,
                      segment_seconds=settings.request_log_segment_seconds, on_dropped=dropped)


def run_monitor(settings: Settings) -> None:
    """The health monitor process: probes every READY replica, ejects those that fail (see eject), and
    scales autoscaled versions from the load its probes read (see Autoscaling)."""
    from cloudml_os.serving.monitor import HealthMonitor, Target
    from cloudml_os.workflows.autoscale import Autoscaling

    store = Store.from_settings(settings)
    celery = make_celery(settings)
    replace = replica_replacer(celery)

    def targets() -> list[Target]:
        with store.session() as session:
            rows = session.execute(select(Replica.id, Replica.address, Replica.port, Replica.healthy, Version.health)
                                   .join(Version, Version.id == Replica.version_id)
                                   .where(Replica.state == "READY")).all()
        return [Target(key=r.id, address=r.address, port=r.port, initially_healthy=r.healthy,
                       **{k: v for k, v in (r.health or {}).items() if k in ("interval", "timeout", "rise", "fall")})
                for r in rows]

    def on_change(target: Target, healthy: bool, reason: str) -> None:
        if not healthy:
            eject(store, target.key, f"health check: {reason}", replace)

    monitor = HealthMonitor(targets, on_change, sample_interval=settings.replica_sample_seconds,
                            on_samples=sample_writer(store, settings.replica_sample_retention_hours))
    stopped = threading.Event()
    autoscaling = Autoscaling(store, settings, monitor.rates, operation_starter(celery))
    threading.Thread(target=autoscaling.run, args=(stopped.is_set,), name="autoscaling", daemon=True).start()
    try:
        monitor.run_forever()
    finally:
        stopped.set()


def sample_writer(store: Store, retention_hours: float) -> Callable[[list[ProbeSample]], int]:
    """The monitor's ``on_samples``: one batch insert of the window's samples, then the samples past their
    retention deleted (a batch at a time). Returns how many samples were written."""
    def write(samples: list[ProbeSample]) -> int:
        now = store.now()
        written = store.add_replica_samples([sample_row(sample, now) for sample in samples])
        store.prune_replica_samples(now - dt.timedelta(hours=retention_hours))
        return written

    return write


def sample_row(sample: ProbeSample, time: dt.datetime) -> dict[str, Any]:
    """A monitor sample as a ``replica_samples`` row (latencies in milliseconds)."""
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 3)

    return {"replica_id": sample.key, "time": time, "probes": sample.probes, "failures": sample.failures,
            "latency_p50_ms": ms(sample.latency_p50), "latency_max_ms": ms(sample.latency_max),
            "healthy": sample.healthy}

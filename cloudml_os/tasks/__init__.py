"""The Celery side: the app, its settings for at-least-once delivery, and thin tasks over workflows/.

Only this package imports Celery. Messages are acknowledged after the step ran (``acks_late``) and
re-queued when a worker dies mid-step, so every step must be idempotent (it is: see workflows/train.py).
A polling step re-sends itself with a countdown instead of holding a task open for a whole training
run (RabbitMQ closes channels whose unacknowledged delivery outlives its consumer_timeout). Celery beat
(``cloudml-os beat``) sends the reconciler's task every ``reconcile_interval`` seconds; it re-sends steps
whose message was lost (see workflows/reconcile.py), so a message that cannot be sent is not fatal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from celery import Celery
from celery.signals import worker_shutting_down

from cloudml_os.config import Settings
from cloudml_os.states import Step

log = logging.getLogger(__name__)

TRAIN_STEP = "cloudml_os.train_step"
SERVE_OPERATION = "cloudml_os.serve_operation"
REPLACE_REPLICA = "cloudml_os.replace_replica"
RECONCILE = "cloudml_os.reconcile"


def make_celery(settings: Settings, context_factory: Callable[[], object] | None = None,
                serving_context_factory: Callable[[], object] | None = None,
                reconcile_context_factory: Callable[[], object] | None = None) -> Celery:
    """A Celery app bound to ``settings``; the factories build the workers' Training-, Serving- and
    ReconcileContext lazily (an app without them only sends tasks, and beat's schedule)."""
    broker_url, transport = settings.broker_url, None
    if broker_url.startswith("sqla+"):
        broker_url, transport = broker_url.removeprefix("sqla+"), "cloudml_os.tasks.broker:Transport"
    app = Celery("cloudml_os", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_transport=transport,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        # After a broker restart Celery lowers the prefetch count and raises it again with blocking basic.qos
        # calls from its event loop; one was seen never to get its reply, and the worker consumed nothing until
        # the broker dropped the silent connection (3 minutes). The full prefetch at once is safe: late acks.
        worker_enable_prefetch_count_reduction=False,
        task_default_queue=settings.task_queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        beat_schedule={"reconcile": {
            "task": RECONCILE, "schedule": settings.reconcile_interval,
            # A pass queued behind a stopped worker is stale once the next one is due.
            "options": {"expires": settings.reconcile_interval},
        }},
    )
    state: dict[str, object] = {}

    def built(name: str, factory: Callable[[], object] | None) -> object:
        if name not in state:
            if factory is None:
                raise RuntimeError("this Celery app only sends tasks; it has no worker context")
            state[name] = factory()
        return state[name]

    def context() -> object:
        return built("training", context_factory)

    @worker_shutting_down.connect(weak=False)
    def stop_polling(**_: object) -> None:
        """A warm shutdown waits for running tasks: let polling steps hand over now, not at their window's end;
        and wake the idle event loop, which notices the shutdown only when its poll returns (up to 10 s)."""
        training = state.get("training")
        if training is not None:
            training.stopping.set()
        _wake_event_loop()

    @app.task(name=TRAIN_STEP, bind=True)
    def train_step(self, job_pk: int, step: str, seq: int) -> None:
        from cloudml_os.workflows.train import run_step

        following = run_step(context(), job_pk, Step(step), seq)
        if following is not None:
            next_step, next_seq, delay = following
            self.app.send_task(TRAIN_STEP, args=(job_pk, next_step.value, next_seq),
                               countdown=delay or None)

    @app.task(name=RECONCILE)
    def reconcile() -> None:
        from cloudml_os.workflows.reconcile import reconcile as reconcile_pass

        reconcile_pass(built("reconcile", reconcile_context_factory))

    @app.task(name=SERVE_OPERATION)
    def serve_operation(operation_id: int) -> None:
        from cloudml_os.workflows.serve import run_operation

        run_operation(built("serving", serving_context_factory), operation_id)

    @app.task(name=REPLACE_REPLICA)
    def replace_replica(replica_id: int) -> None:
        from cloudml_os.workflows.serve import replace_replica as replace

        replace(built("serving", serving_context_factory), replica_id)

    return app


def _wake_event_loop() -> None:
    """Wake the worker's event loop so that SIGTERM stops an idle worker at once. From another thread, as kombu's
    call_soon wakes the loop only from one; the shutdown signal runs on the loop's thread, inside its poll."""
    from kombu.asynchronous import get_event_loop

    hub = get_event_loop()
    if hub is not None:
        threading.Thread(target=hub.call_soon, args=(lambda: None,), name="wake-on-shutdown", daemon=True).start()


def operation_starter(app: Celery) -> Callable[[int], None]:
    """The API's way to carry out a version operation (create, delete, scale)."""

    def start_operation(operation_id: int) -> None:
        app.send_task(SERVE_OPERATION, args=(operation_id,))

    return start_operation


def replica_replacer(app: Celery) -> Callable[[int], None]:
    """How the router and the monitor have an ejected replica replaced."""

    def replace(replica_id: int) -> None:
        app.send_task(REPLACE_REPLICA, args=(replica_id,))

    return replace


def step_sender(app: Celery) -> Callable[[int, Step, int], None]:
    """The reconciler's way to send one delivery of a job's step again."""

    def send_step(job_pk: int, step: Step, seq: int) -> None:
        app.send_task(TRAIN_STEP, args=(job_pk, step.value, seq))

    return send_step


def run_beat(app: Celery, schedule_file: str, loglevel: str = "INFO") -> None:
    """Run Celery beat in this process: it sends the reconciler's task on schedule, nothing else."""
    app.Beat(schedule=schedule_file, loglevel=loglevel, quiet=True).run()


def job_starter(app: Celery) -> Callable[[int], None]:
    """The API's way to start a job: send its first step."""

    def start_job(job_pk: int) -> None:
        app.send_task(TRAIN_STEP, args=(job_pk, Step.PROVISIONING.value, 0))

    return start_job

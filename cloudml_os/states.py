"""Job states of Cloud ML Engine v1 and the steps inside them, with the transitions allowed.

The v1 ``state`` field is what clients see; ``step`` is our added, finer field telling which idempotent
step of the training workflow owns the job now. Both change only through :func:`check_transition` so
that a redelivered task cannot move a job backwards.
"""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    STATE_UNSPECIFIED = "STATE_UNSPECIFIED"
    QUEUED = "QUEUED"
    PREPARING = "PREPARING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PREPARING, JobState.CANCELLED, JobState.FAILED}),
    JobState.PREPARING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLING}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class Step(enum.StrEnum):
    """The training workflow's steps, in order; each is one idempotent Celery task."""

    PROVISIONING = "PROVISIONING"
    BOOTSTRAPPING = "BOOTSTRAPPING"
    LAUNCHING = "LAUNCHING"
    TRAINING = "TRAINING"
    # A hyperparameter tuning job runs its trials here instead of LAUNCHING and TRAINING (workflows/tune.py).
    TUNING = "TUNING"
    # A node died or a trainer failed under restartPolicy ON_FAILURE: stop, replace, restore, then BOOTSTRAPPING.
    RESTARTING = "RESTARTING"
    EXPORTING = "EXPORTING"
    # A batch prediction job runs its shards here instead (workflows/batch_predict.py).
    PREDICTING = "PREDICTING"
    TEARING_DOWN = "TEARING_DOWN"
    DONE = "DONE"


STEP_ORDER = list(Step)

# A training job's ``scheduling.restartPolicy`` (as a Kubeflow job's): what a dead node or failed trainer
# leads to; NEVER, the first, is the default. ``scheduling.backoffLimit`` bounds ON_FAILURE's restarts.
RESTART_POLICIES = ("NEVER", "ON_FAILURE")
DEFAULT_BACKOFF_LIMIT = 3
MAX_BACKOFF_LIMIT = 100
# A training node's process_state once it stopped answering: RESTARTING replaces it, teardown skips it.
NODE_UNREACHABLE = "UNREACHABLE"


class InvalidTransition(ValueError):
    pass


def check_transition(current: JobState, new: JobState) -> None:
    """:raises InvalidTransition: when ``current`` may not become ``new``."""
    if new not in ALLOWED_TRANSITIONS[current]:
        raise InvalidTransition(f"job cannot go from {current.value} to {new.value}")

"""Hyperparameter tuning's rules over a job's ``trainingInput.hyperparameters`` (v1 HyperparameterSpec).

Pure functions and constants shared by the API (which validates the spec and counts its quota) and the
tuning workflow (which runs the trials): how many trials run at once, the goal, the parameters' names
and types, whether an earlier job's study can be resumed, and the names a trial's logs and events go
by. Nothing here touches the database, a cluster or Optuna; callers pass the stored dict, which may
come from a job recorded before the API filled in defaults, so every reader tolerates a missing field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GOALS = ("GOAL_TYPE_UNSPECIFIED", "MAXIMIZE", "MINIMIZE")  # v1: unspecified means MAXIMIZE
ALGORITHMS = ("ALGORITHM_UNSPECIFIED", "GRID_SEARCH", "RANDOM_SEARCH")  # unspecified: Optuna's TPE sampler
PARAMETER_TYPES = ("DOUBLE", "INTEGER", "CATEGORICAL", "DISCRETE")
SCALE_TYPES = ("NONE", "UNIT_LINEAR_SCALE", "UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE")
LOG_SCALES = ("UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE")  # need a strictly positive range
RANGE_TYPES = ("DOUBLE", "INTEGER")  # searched between minValue and maxValue

DEFAULT_METRIC_TAG = "training/hptuning/metric"  # cloudml-hypertune's default tag
# A parameter reaches the trainer as one ``--name=value`` argument, so its name is an option name; v1
# passes ``--job-dir`` itself, which a parameter must not shadow.
PARAMETER_NAME_PATTERN = r"[a-zA-Z][a-zA-Z0-9_]{0,127}"
RESERVED_PARAMETER_NAMES = frozenset({"job_dir", "job-dir"})

MAX_PARAMS = 100
MAX_TRIALS = 1000  # also the cap on maxParallelTrials and maxFailedTrials
MAX_VALUES = 1000  # categoricalValues and discreteValues (v1 documents 1,000 feasible points)


def trial_node(trial: int) -> str:
    """The name under which a trial's logs and events are kept: its nodes' logs under ``trial-N/NODE``
    (e.g. ``trial-3/chief-0``), its events with node ``trial-N`` or ``trial-N/NODE``."""
    return f"trial-{trial}"


def hyperparameter_spec(training_input: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The job's HyperparameterSpec, or None when the job is not a tuning job."""
    return training_input.get("hyperparameters") or None


def is_tuning(training_input: Mapping[str, Any]) -> bool:
    """Whether the job is a hyperparameter tuning job (it has a spec with parameters)."""
    spec = hyperparameter_spec(training_input)
    return bool(spec and spec.get("params"))


def _count(spec: Mapping[str, Any], name: str) -> int:
    # int() because an old row may hold v1's int32 as a JSON string; missing, 0 or less means v1's default 1.
    try:
        return max(1, int(spec.get(name) or 1))
    except (TypeError, ValueError):
        return 1


def max_trials(spec: Mapping[str, Any]) -> int:
    """``maxTrials``, default 1."""
    return _count(spec, "maxTrials")


def parallel_slots(training_input: Mapping[str, Any]) -> int:
    """How many trials of the job run at once, each on its own group of nodes of the job's topology:
    ``min(maxParallelTrials, maxTrials)`` (each defaulting to 1); 1 for a job that is not tuning.

    The quota of a tuning job is this many copies of its topology.
    """
    spec = hyperparameter_spec(training_input)
    if not spec:
        return 1
    return min(_count(spec, "maxParallelTrials"), max_trials(spec))


def goal(spec: Mapping[str, Any]) -> str:
    """``MAXIMIZE`` or ``MINIMIZE`` (v1's default and ``GOAL_TYPE_UNSPECIFIED`` are MAXIMIZE)."""
    return "MINIMIZE" if spec.get("goal") == "MINIMIZE" else "MAXIMIZE"


def parameter_types(spec: Mapping[str, Any]) -> dict[str, str]:
    """``{parameterName: type}`` of the spec's parameters."""
    return {param.get("parameterName"): param.get("type") for param in spec.get("params") or ()}


def resume_mismatch(previous: Mapping[str, Any], spec: Mapping[str, Any]) -> str | None:
    """Why a study of spec ``previous`` cannot be continued by ``spec``, or None when it can.

    A resumed study keeps its earlier trials, so the new spec must optimize in the same direction over
    parameters of the same names and types (ranges and values may change).
    """
    if goal(previous) != goal(spec):
        return f"its goal was {goal(previous)}, this job's is {goal(spec)}"
    before, now = parameter_types(previous), parameter_types(spec)
    if before != now:
        def listed(types: dict[str, str]) -> str:
            return ", ".join(f"{name} {kind}" for name, kind in sorted(types.items()))
        return f"its parameters were {listed(before)}; this job's are {listed(now)}"
    return None

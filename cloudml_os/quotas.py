"""Per-project quotas on GPUs, nodes, concurrent jobs and serving replicas, checked atomically.

Limits are the installation's defaults (settings ``default_quota_*``) unless a platform admin set an
override for the project (table ``project_quotas``); -1 means unlimited, as in OpenStack. Usage is
never stored: it is computed from the database each time, so it cannot drift from what runs.

- ``jobs``: the project's jobs not in a final state (a CANCELLING job still holds its cluster);
- ``nodes`` and ``gpus``: those jobs' topologies (a tuning job's once per parallel trial) plus the
  serving replicas of live versions;
- ``replicas``: the serving replicas of the project's live (not DELETED or FAILED) versions.

A request that adds resources calls :func:`check` inside the transaction that records it. The check
locks the project's quota row first (``SELECT … FOR UPDATE`` on PostgreSQL and MariaDB; on SQLite the
row's ``INSERT OR IGNORE`` takes the database's write lock), so a second submission of the same project
waits until the first one's rows are committed and then counts them: two together cannot exceed a
limit. A refusal is v1's 429 ``RESOURCE_EXHAUSTED`` and the transaction, hence the request, is rolled
back. Requests that only reduce usage (cancel, delete, scale down) are never refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sqlalchemy import insert, select, union
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloudml_os.config import MachineType, Settings
from cloudml_os.errors import ApiError
from cloudml_os.frameworks.base import TopologyError, topology_from_training_input
from cloudml_os.states import JobState
from cloudml_os.store import Job, Store, Token
from cloudml_os.store.models import Model, ProjectQuota, Version, utcnow
from cloudml_os.tuning import parallel_slots

QUOTAS = ("gpus", "nodes", "jobs", "replicas")
UNLIMITED = -1
FINAL_JOB_STATES = tuple(state.value for state in JobState if state.is_final)
ENDED_VERSION_STATES = ("DELETED", "FAILED")


class QuotaExceeded(ApiError):
    """429 RESOURCE_EXHAUSTED, as v1 (gRPC) answers a request over a quota."""

    code = 429
    status = "RESOURCE_EXHAUSTED"


@dataclasses.dataclass(frozen=True)
class Demand:
    """What a request adds to its project's usage (negative when it frees resources)."""

    gpus: int = 0
    nodes: int = 0
    jobs: int = 0
    replicas: int = 0


def job_demand(training_input: Mapping[str, Any], machine_types: Mapping[str, MachineType]) -> Demand:
    """One job and the nodes and GPUs of its topology; a hyperparameter tuning job's topology counts once
    per trial it runs at once (:func:`cloudml_os.tuning.parallel_slots`), each on its own nodes.

    :raises TopologyError: the trainingInput names no valid cluster (the API checks that first).
    """
    groups = topology_from_training_input(training_input, machine_types).groups
    slots = parallel_slots(training_input)
    return Demand(jobs=1, nodes=slots * sum(g.count for g in groups),
                  gpus=slots * sum(g.count * g.machine_type.gpus for g in groups))


def prediction_demand(prediction_input: Mapping[str, Any], machine_types: Mapping[str, MachineType]) -> Demand:
    """One job and at most ``maxWorkerCount`` nodes of its machine type (fewer when its input has fewer
    shards, which only the job's first step knows)."""
    count = int(prediction_input.get("maxWorkerCount") or 1)
    machine_type = machine_types.get(prediction_input.get("machineType", ""))
    return Demand(jobs=1, nodes=count, gpus=count * (machine_type.gpus if machine_type else 0))


def version_demand(replicas: int, machine_type: MachineType) -> Demand:
    """``replicas`` serving nodes of ``machine_type`` (negative to scale down)."""
    return Demand(replicas=replicas, nodes=replicas, gpus=replicas * machine_type.gpus)


def limits(session: Session, settings: Settings, project: str) -> dict[str, int]:
    """The project's limits: its overrides, else the installation's defaults."""
    row = session.get(ProjectQuota, project)
    return {name: _limit(row, settings, name) for name in QUOTAS}


def _limit(row: ProjectQuota | None, settings: Settings, name: str) -> int:
    value = getattr(row, name) if row is not None else None
    return getattr(settings, f"default_quota_{name}") if value is None else value


def usage(session: Session, settings: Settings, project: str) -> dict[str, int]:
    """What the project holds now, computed from its unfinished jobs and live versions."""
    total = {name: 0 for name in QUOTAS}
    for training_input, prediction_input in session.execute(select(Job.training_input, Job.prediction_input).where(
            Job.project == project, Job.state.not_in(FINAL_JOB_STATES))):
        if prediction_input:
            _add(total, prediction_demand(prediction_input, settings.machine_types))
            continue
        try:
            demand = job_demand(training_input, settings.machine_types)
        except TopologyError:  # a machine type removed since: its nodes still count, GPUs unknown
            demand = Demand(jobs=1, nodes=parallel_slots(training_input))
        _add(total, demand)
    versions = session.execute(
        select(Version.replicas, Version.machine_type).join(Model, Model.id == Version.model_id)
        .where(Model.project == project, Version.state.not_in(ENDED_VERSION_STATES))).all()
    for replicas, machine_type in versions:
        known = settings.machine_types.get(machine_type, MachineType(machine_type, "", 0))
        _add(total, version_demand(replicas, known))
    return total


def _add(total: dict[str, int], demand: Demand) -> None:
    for name in QUOTAS:
        total[name] += getattr(demand, name)


def _lock(session: Session, project: str) -> None:
    """Make sure the project's quota row exists and hold its lock until the session's transaction ends."""
    dialect = session.get_bind().dialect.name
    values = {"project": project, "updated_at": utcnow()}
    if dialect == "postgresql":
        statement = postgresql_insert(ProjectQuota).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":  # takes the database's write lock, which serializes writers
        statement = sqlite_insert(ProjectQuota).values(**values).on_conflict_do_nothing()
    else:  # MySQL, MariaDB
        statement = insert(ProjectQuota).values(**values).prefix_with("IGNORE")
    session.execute(statement)
    session.execute(select(ProjectQuota.project).where(ProjectQuota.project == project).with_for_update())


def room(session: Session, settings: Settings, project: str, unit: Demand) -> int | None:
    """Lock the project's quotas and say how many more of ``unit`` fit in them (None: no limit applies),
    e.g. how many replicas an autoscaler may add. Call first in the transaction that records the change."""
    _lock(session, project)
    limit = limits(session, settings, project)
    used = usage(session, settings, project)
    fits = [(limit[name] - used[name]) // getattr(unit, name) for name in QUOTAS
            if getattr(unit, name) > 0 and limit[name] != UNLIMITED]
    return max(0, min(fits)) if fits else None


def check(session: Session, settings: Settings, project: str, demand: Demand) -> None:
    """Lock the project's quotas and refuse ``demand`` if it takes a quota past its limit.

    Call first in the transaction that records the request, so that the lock covers the insert.

    :raises QuotaExceeded: naming the quota, its limit, the usage and the request.
    """
    _lock(session, project)
    limit = limits(session, settings, project)
    used = usage(session, settings, project)
    for name in QUOTAS:
        wanted = getattr(demand, name)
        if wanted > 0 and limit[name] != UNLIMITED and used[name] + wanted > limit[name]:
            raise QuotaExceeded(f"Quota exceeded for project {project}: {name} limit is {limit[name]}, "
                                f"usage is {used[name]}, the request needs {wanted} more.")


def project_quotas(store: Store, settings: Settings, project: str) -> dict[str, Any]:
    """``{"project", "quotas", "usage"}``: the shape of ``GET /v1/projects/{p}/quotas``."""
    with store.session() as session:
        return {"project": project, "quotas": limits(session, settings, project),
                "usage": usage(session, settings, project)}


def set_quotas(store: Store, settings: Settings, project: str, values: Mapping[str, int | None]) -> dict[str, Any]:
    """Override some of the project's limits (None: back to the default); returns :func:`project_quotas`.

    Lowering a limit below the usage refuses new work only; nothing running is stopped.

    :raises ValueError: an unknown quota name or a value below -1.
    """
    unknown = sorted(set(values) - set(QUOTAS))
    if unknown:
        raise ValueError(f"unknown quota(s) {', '.join(unknown)}; quotas are {', '.join(QUOTAS)}")
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < UNLIMITED):
            raise ValueError(f"quota {name} must be -1 (unlimited) or a non-negative integer")
    with store.session() as session:
        _lock(session, project)
        row = session.get(ProjectQuota, project)
        for name, value in values.items():
            setattr(row, name, value)
        row.updated_at = utcnow()
    return project_quotas(store, settings, project)


def known_projects(store: Store) -> list[str]:
    """Every project that has a token, a job, a model or a quota row, sorted."""
    query = union(select(Token.project), select(Job.project), select(Model.project), select(ProjectQuota.project))
    with store.session() as session:
        return sorted(session.scalars(query))


def all_project_quotas(store: Store, settings: Settings) -> list[dict[str, Any]]:
    """:func:`project_quotas` of every :func:`known_projects` project (the admin listing)."""
    return [project_quotas(store, settings, project) for project in known_projects(store)]

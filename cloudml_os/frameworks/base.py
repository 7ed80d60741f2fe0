"""The framework plugin contract and the Cloud ML Engine topology every framework starts from.

A training job's ``trainingInput`` names a scale tier or machine types and counts (master, workers,
parameter servers, evaluators): that is the :class:`Topology`, independent of the framework. A
:class:`Framework` turns it into the processes it needs (:class:`Role`), gives each its environment
(``TF_CONFIG``, ``DMLC_*``…), and judges from their exit codes whether the job is still running,
succeeded or failed. The command itself is the same for every framework (the trainer contract:
``python -m MODULE ARGS --job-dir DIR``) and is built by the workflow. Plugins are found through the
``cloudml_os.frameworks`` entry point group. This module must not import any ML library.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from cloudml_os.config import MachineType

# Cloud ML Engine's predefined scale tiers: (master type, workers, parameter servers, master GPUs).
SCALE_TIERS = {
    "BASIC": {"masterType": "standard"},
    "BASIC_GPU": {"masterType": "standard_gpu"},
    "STANDARD_1": {
        "masterType": "complex_model_m", "workerType": "complex_model_m", "workerCount": 4,
        "parameterServerType": "standard", "parameterServerCount": 3,
    },
    "PREMIUM_1": {
        "masterType": "complex_model_l", "workerType": "complex_model_l", "workerCount": 19,
        "parameterServerType": "large_model", "parameterServerCount": 11,
    },
}


class TopologyError(ValueError):
    """The trainingInput describes no valid cluster; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Group:
    """A Cloud ML Engine replica group: ``master``, ``worker``, ``parameterServer`` or ``evaluator``."""

    kind: str
    count: int
    machine_type: MachineType


@dataclasses.dataclass(frozen=True)
class Topology:
    groups: tuple[Group, ...]

    def group(self, kind: str) -> Group | None:
        return next((g for g in self.groups if g.kind == kind), None)


def topology_from_training_input(training_input: Mapping[str, Any],
                                 machine_types: Mapping[str, MachineType]) -> Topology:
    """Resolve the scale tier or CUSTOM machine types into replica groups.

    :raises TopologyError: unknown tier or machine type, a count without a type, negative counts.
    """
    tier = training_input.get("scaleTier", "BASIC")
    if tier == "CUSTOM":
        fields = dict(training_input)
        if not fields.get("masterType"):
            raise TopologyError("trainingInput.masterType is required when scaleTier is CUSTOM")
    elif tier in SCALE_TIERS:
        fields = dict(SCALE_TIERS[tier])
    else:
        valid = ", ".join([*SCALE_TIERS, "CUSTOM"])
        raise TopologyError(f"trainingInput.scaleTier: unknown tier {tier!r}; valid tiers: {valid}")

    groups = []
    for kind, type_field, count_field in (
        ("master", "masterType", None),
        ("worker", "workerType", "workerCount"),
        ("parameterServer", "parameterServerType", "parameterServerCount"),
        ("evaluator", "evaluatorType", "evaluatorCount"),
    ):
        count = 1 if count_field is None else _count(fields, count_field)
        if count == 0:
            continue
        type_name = fields.get(type_field)
        if not type_name:
            raise TopologyError(f"trainingInput.{type_field} is required when {count_field} > 0")
        if type_name not in machine_types:
            valid = ", ".join(sorted(machine_types))
            raise TopologyError(f"trainingInput.{type_field}: unknown machine type {type_name!r}; valid: {valid}")
        groups.append(Group(kind, count, machine_types[type_name]))
    return Topology(tuple(groups))


def _count(fields: Mapping[str, Any], name: str) -> int:
    value = fields.get(name, 0)
    try:
        count = int(value)  # v1 sends int64 counts as JSON strings
    except (TypeError, ValueError):
        raise TopologyError(f"trainingInput.{name}: {value!r} is not an integer") from None
    if count < 0:
        raise TopologyError(f"trainingInput.{name} must not be negative")
    return count


@dataclasses.dataclass(frozen=True)
class Role:
    """One process of the job, on a node of its own: e.g. (``worker``, 1) on a ``standard`` machine."""

    task_type: str
    task_index: int
    machine_type: MachineType

    @property
    def node_name(self) -> str:
        return f"{self.task_type}-{self.task_index}"


@dataclasses.dataclass(frozen=True)
class Member:
    """Where one role ended up: the node's address and the first of the ports it may use."""

    role: Role
    address: str
    port_first: int
    port_last: int


@dataclasses.dataclass(frozen=True)
class ProcessStatus:
    """``exit_code`` None while running; ``lost`` when the process vanished without an exit code;
    ``ended_at`` when it ended (epoch seconds), where known."""

    role: Role
    exit_code: int | None
    lost: bool = False
    ended_at: float | None = None


def failure_order(process: ProcessStatus) -> tuple[bool, float]:
    """Sort key putting the failure that came first first: one collective's failure makes its peers
    fail a moment later, and the first is the one worth reporting. Processes whose end time is unknown
    (lost ones, say) follow the timed ones; combine with a framework's own tie-break.
    """
    return (process.ended_at is None, process.ended_at or 0.0)


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: str  # "RUNNING", "SUCCEEDED" or "FAILED"
    message: str = ""
    failed_role: Role | None = None


class Framework(abc.ABC):
    """A framework plugin. Subclasses are stateless; one instance serves every job."""

    name: str  # the trainingInput.framework value, e.g. "TENSORFLOW"
    runtimes: Mapping[str, str]  # runtimeVersion -> runtime name (a requirements file under images/runtimes)
    default_runtime_version: str
    export_marker: str  # file name whose directory is the exported model, e.g. "saved_model.pb"

    def runtime(self, runtime_version: str | None) -> str:
        """:raises TopologyError: when the runtime version is not in the catalogue."""
        version = runtime_version or self.default_runtime_version
        if version not in self.runtimes:
            valid = ", ".join(sorted(self.runtimes))
            raise TopologyError(f"trainingInput.runtimeVersion: {self.name} has no runtime {version!r}; "
                                f"valid: {valid}")
        return self.runtimes[version]

    @abc.abstractmethod
    def roles(self, topology: Topology, training_input: Mapping[str, Any]) -> list[Role]:
        """The processes this framework runs for the topology, one node each.

        :raises TopologyError: when the framework cannot run this topology (checked at submission).
        """

    def command(self, role: Role, python: str, training_input: Mapping[str, Any], job_dir: str) -> list[str]:
        """argv of ``role``'s process: the Cloud ML Engine trainer contract, the same for every role."""
        return [python, "-m", training_input["pythonModule"], *training_input.get("args", []),
                "--job-dir", job_dir]

    def export_roles(self, roles: list[Role]) -> list[Role]:
        """Where to look for the exported model (a folder holding ``export_marker``), in order."""
        return roles[:1]

    @abc.abstractmethod
    def environment(self, member: Member, members: list[Member], job: Mapping[str, Any]) -> dict[str, str]:
        """Environment variables of ``member``'s process; ``job`` is the v1 Job body (jobId, trainingInput…),
        with ``trial``, the trial id, when the process runs a trial of a hyperparameter tuning job."""

    @abc.abstractmethod
    def outcome(self, processes: list[ProcessStatus]) -> Outcome:
        """Whether the job is still running, succeeded or failed, given every process's status."""


def load_frameworks() -> dict[str, Framework]:
    """Every installed framework plugin, by its ``trainingInput.framework`` name."""
    plugins = {}
    for entry in entry_points(group="cloudml_os.frameworks"):
        framework = entry.load()()
        plugins[framework.name] = framework
    return plugins

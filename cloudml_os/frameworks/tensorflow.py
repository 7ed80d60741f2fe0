"""The TensorFlow framework plugin: Cloud ML Engine's replica groups as TensorFlow tasks and ``TF_CONFIG``.

Each process gets ``TF_CONFIG`` exactly as Cloud ML Engine sets it, so a trainer that runs there runs
here unchanged: the cluster spec (``chief`` — ``master`` on runtimes before 2.1 —, ``worker``, ``ps``;
never the evaluator, which TensorFlow does not count as part of the training cluster), this process's
task (``trial``: the trial id, from the job body's ``trial``, empty outside hyperparameter tuning),
``"environment": "cloud"`` and the job's ``trainingInput``. This module runs in the control plane and must
not import TensorFlow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cloudml_os.frameworks.base import Framework, Member, Outcome, ProcessStatus, Role, Topology, failure_order

# Cloud ML Engine replica group -> TensorFlow task type; see primary_task_type for "master".
TASK_TYPES = {"master": "master", "worker": "worker", "parameterServer": "ps", "evaluator": "evaluator"}
# Task types that appear in the cluster spec, in Cloud ML Engine's order.
CLUSTER_TASK_TYPES = ("master", "chief", "worker", "ps")
# Task types whose failure ends the job; an evaluator only watches checkpoints.
ESSENTIAL_TASK_TYPES = ("master", "chief", "worker", "ps")


class TensorFlow(Framework):
    """TensorFlow with ``TF_CONFIG``; the chief's success ends the job (workers and ps may never exit)."""

    name = "TENSORFLOW"
    runtimes = {"2.21": "tensorflow-2.21"}
    default_runtime_version = "2.21"
    export_marker = "saved_model.pb"

    def roles(self, topology: Topology, training_input: Mapping[str, Any]) -> list[Role]:
        """One role per replica, indexes from 0, the master group first under its v1 task type."""
        roles = []
        for group in topology.groups:
            task_type = TASK_TYPES[group.kind]
            if task_type == "master":
                task_type = self.primary_task_type(topology, training_input)
            roles.extend(Role(task_type, index, group.machine_type) for index in range(group.count))
        return roles

    def primary_task_type(self, topology: Topology, training_input: Mapping[str, Any]) -> str:
        """``chief`` or ``master`` for the master replica, by Cloud ML Engine's rule.

        TensorFlow 2 refuses a ``master`` task, so v1 says ``chief`` for runtime versions 2.1 and later,
        for jobs with evaluators, and when ``useChiefInTfConfig`` is true; older runtimes keep ``master``.
        """
        if training_input.get("useChiefInTfConfig") is True or topology.group("evaluator") is not None:
            return "chief"
        version = training_input.get("runtimeVersion") or self.default_runtime_version
        return "chief" if _version(version) >= (2, 1) else "master"

    def environment(self, member: Member, members: list[Member], job: Mapping[str, Any]) -> dict[str, str]:
        """``TF_CONFIG`` for ``member``; every member listens on its first port."""
        cluster: dict[str, list[str]] = {}
        for task_type in CLUSTER_TASK_TYPES:
            tasks = sorted((m for m in members if m.role.task_type == task_type), key=lambda m: m.role.task_index)
            if tasks:
                cluster[task_type] = [f"{m.address}:{m.port_first}" for m in tasks]
        tf_config = {
            "cluster": cluster,
            "task": {"type": member.role.task_type, "index": member.role.task_index,
                     "trial": str(job.get("trial", ""))},
            "environment": "cloud",
            "job": dict(job.get("trainingInput", {})),
        }
        return {"TF_CONFIG": json.dumps(tf_config, separators=(",", ":"))}

    def export_roles(self, roles: list[Role]) -> list[Role]:
        """The chief (or master) writes the SavedModel."""
        return [r for r in roles if r.task_type in ("chief", "master")] or roles[:1]

    def outcome(self, processes: list[ProcessStatus]) -> Outcome:
        """Succeeded once the master/chief exited 0, whatever still runs (ps, PS-strategy workers).

        Before that, any master, chief, worker or ps that exited non-zero or was lost fails the job,
        since the others would wait for it forever; one that exited 0 simply finished its part (an
        MWMS worker, or a ps of a trainer that ignores ``TF_CONFIG``); an evaluator's failure is
        only its own.
        """
        for process in processes:
            if process.role.task_type in ("master", "chief") and process.exit_code == 0 and not process.lost:
                return Outcome("SUCCEEDED")
        for process in _chief_first(processes):
            if process.role.task_type not in ESSENTIAL_TASK_TYPES:
                continue
            if process.lost:
                return Outcome("FAILED", f"{process.role.node_name} was lost without an exit code", process.role)
            if process.exit_code not in (None, 0):
                message = f"{process.role.node_name} exited with code {process.exit_code}"
                return Outcome("FAILED", message, process.role)
        return Outcome("RUNNING")


def _chief_first(processes: list[ProcessStatus]) -> list[ProcessStatus]:
    """The first failure is the one worth reporting; among simultaneous ones, the chief's."""
    return sorted(processes, key=lambda p: (*failure_order(p), p.role.task_type not in ("master", "chief")))


def _version(text: str) -> tuple[int, ...]:
    """``"2.21"`` -> (2, 21); anything unparsable sorts first (its runtime is refused elsewhere)."""
    try:
        return tuple(int(part) for part in str(text).split("."))
    except ValueError:
        return (0,)

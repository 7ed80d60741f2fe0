"""The MXNet framework plugin: Cloud ML Engine's replica groups as ps-lite workers, servers and a scheduler.

Distributed MXNet trains through the ``dist_sync`` / ``dist_async`` kvstore, whose transport (ps-lite)
needs three kinds of process: workers that train, servers that hold the parameters, and one scheduler
that introduces them to each other. The master and the workers all become ps-lite workers —
``worker-0`` is the master, ``worker-1``… the workers, since ps-lite ranks workers itself and the master
has no role of its own —, each parameter server a ``server``, and one ``scheduler`` node is added.
A master alone is plain local training: one process, no ``DMLC_*`` variables.

Each process learns its role and the cluster from ``DMLC_*`` variables and binds one port: the
scheduler ``DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT``, the others ``DMLC_NODE_HOST:PORT`` (ps-lite reads
``PORT``, not a ``DMLC_`` name). Both are the member's own address and first port, so nodes that share
one network stack on distinct loopback addresses do not collide. Should that port be taken anyway, a
worker or server silently binds a random port in 10000-50000 instead (ps-lite's retry) while the
scheduler fails to start. This module runs in the control plane and must not import MXNet.

A worker whose trainer raises would not exit: the interpreter's shutdown runs MXNet's kvstore
finalisation, which waits at a barrier for workers that will never come. The command therefore runs the
trainer module under a small launcher that ends the process at once, with code 1, on an uncaught
exception, and lets a normal or ``sys.exit`` ending take its usual course.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudml_os.frameworks.base import (
    Framework,
    Member,
    Outcome,
    ProcessStatus,
    Role,
    Topology,
    TopologyError,
    failure_order,
)

WORKER, SERVER, SCHEDULER = "worker", "server", "scheduler"
# The order failures are reported in: a worker's own error explains more than a server it stranded.
REPORT_ORDER = (WORKER, SERVER, SCHEDULER)


# Runs ``python -c LAUNCHER MODULE ARGS…`` as ``python -m MODULE ARGS…`` would, except that an uncaught
# exception ends the process at once instead of in MXNet's kvstore shutdown.
LAUNCHER = """\
import os, runpy, sys, traceback
module = sys.argv.pop(1)
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    raise
except BaseException:
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
"""


class MXNet(Framework):
    """MXNet with ps-lite's ``DMLC_*``; the job succeeds once every worker exited 0."""

    name = "MXNET"
    runtimes = {"1.9": "mxnet-1.9"}
    default_runtime_version = "1.9"
    export_marker = "model-symbol.json"  # HybridBlock.export(".../model") beside model-0000.params

    def roles(self, topology: Topology, training_input: Mapping[str, Any]) -> list[Role]:
        """Workers (the master first), then servers, then the scheduler when the job is distributed.

        :raises TopologyError: evaluators (MXNet has no such role); several workers without a server.
        """
        if topology.group("evaluator") is not None:
            raise TopologyError("trainingInput.evaluatorCount: MXNet has no evaluator role; set it to 0")
        master = topology.group("master")
        workers = topology.group("worker")
        servers = topology.group("parameterServer")
        if master is None:
            raise TopologyError("trainingInput.masterType is required")
        roles = [Role(WORKER, 0, master.machine_type)]
        if workers is not None:
            roles.extend(Role(WORKER, index, workers.machine_type) for index in range(1, workers.count + 1))
        if servers is None:
            if len(roles) > 1:
                raise TopologyError("trainingInput.parameterServerCount: distributed MXNet (dist_sync, "
                                    "dist_async kvstore) needs at least 1 parameter server")
            return roles
        roles.extend(Role(SERVER, index, servers.machine_type) for index in range(servers.count))
        roles.append(Role(SCHEDULER, 0, servers.machine_type))
        return roles

    def command(self, role: Role, python: str, training_input: Mapping[str, Any], job_dir: str) -> list[str]:
        """The trainer contract, run under :data:`LAUNCHER` so that a failing worker exits instead of hanging."""
        return [python, "-c", LAUNCHER, training_input["pythonModule"], *training_input.get("args", []),
                "--job-dir", job_dir]

    def environment(self, member: Member, members: list[Member], job: Mapping[str, Any]) -> dict[str, str]:
        """``DMLC_*`` and ``PORT`` for ``member``; nothing for a job without a scheduler (local training)."""
        scheduler = next((m for m in members if m.role.task_type == SCHEDULER), None)
        if scheduler is None:
            return {}
        return {
            "DMLC_ROLE": member.role.task_type,
            "DMLC_PS_ROOT_URI": scheduler.address,
            "DMLC_PS_ROOT_PORT": str(scheduler.port_first),
            "DMLC_NUM_WORKER": str(sum(m.role.task_type == WORKER for m in members)),
            "DMLC_NUM_SERVER": str(sum(m.role.task_type == SERVER for m in members)),
            # Without these ps-lite binds the first interface's address and a random free port.
            "DMLC_NODE_HOST": member.address,
            "PORT": str(member.port_first),
        }

    def export_roles(self, roles: list[Role]) -> list[Role]:
        """Every worker, in order: the model comes from kvstore rank 0, which ps-lite picks at run time."""
        return sorted((r for r in roles if r.task_type == WORKER), key=lambda r: r.task_index)

    def outcome(self, processes: list[ProcessStatus]) -> Outcome:
        """Succeeded once every worker exited 0, whether or not servers and scheduler still run.

        Before that, any process that exited non-zero or was lost fails the job: under ``dist_sync``
        the other workers would wait for it forever. A server or the scheduler exiting 0 is MXNet
        shutting down after the last push, not a failure.
        """
        workers = [p for p in processes if p.role.task_type == WORKER]
        if workers and all(p.exit_code == 0 and not p.lost for p in workers):
            return Outcome("SUCCEEDED")
        for process in sorted(processes, key=_report_rank):
            if process.lost:
                return Outcome("FAILED", f"{process.role.node_name} was lost without an exit code", process.role)
            if process.exit_code not in (None, 0):
                message = f"{process.role.node_name} exited with code {process.exit_code}"
                return Outcome("FAILED", message, process.role)
        return Outcome("RUNNING")


def _report_rank(process: ProcessStatus) -> tuple:
    """The first failure first; among simultaneous ones a worker's, whose own error explains most."""
    task_type = process.role.task_type
    return (*failure_order(process),
            REPORT_ORDER.index(task_type) if task_type in REPORT_ORDER else len(REPORT_ORDER),
            process.role.task_index)


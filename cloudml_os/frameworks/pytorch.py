"""The PyTorch framework plugin: Cloud ML Engine's master and workers as DistributedDataParallel ranks.

Each node runs one process, given the environment ``torchrun`` gives its workers and that Cloud ML
Engine gave PyTorch jobs: ``MASTER_ADDR``/``MASTER_PORT`` (the master's address and first port, where
rank 0's ``TCPStore`` listens for ``init_process_group(init_method="env://")``), ``WORLD_SIZE`` (the
number of nodes), ``RANK`` (0 for the master, 1… for the workers in index order), and ``LOCAL_RANK``
0 of ``LOCAL_WORLD_SIZE`` 1 with the torchrun group and role variables to match. DDP has no parameter
servers and no evaluators: such jobs are refused at submission.

``NODE_ADDR`` is this node's own address, a cloudml-os addition. Gloo listens where the node's hostname
resolves to (or on the interface named by ``GLOO_SOCKET_IFNAME``), which on nodes sharing one host is
127.0.0.1 for all of them and on a VM whose hostname maps to 127.0.1.1 is unreachable from its peers;
a trainer that creates its Gloo device for ``NODE_ADDR`` listens on the address its peers know
(``examples/pytorch`` shows how). The backend is the trainer's choice (``nccl`` on GPUs, ``gloo`` on
CPUs); nothing here names it. This module runs in the control plane and must not import PyTorch.
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

MASTER, WORKER = "master", "worker"


class PyTorch(Framework):
    """PyTorch DDP through torchrun's environment; the job succeeds once every rank exited 0."""

    name = "PYTORCH"
    runtimes = {"2.13": "pytorch-2.13"}
    default_runtime_version = "2.13"
    export_marker = "model.pt"  # TorchScript, torch.jit.save(…, JOB_DIR/model/model.pt) by rank 0

    def roles(self, topology: Topology, training_input: Mapping[str, Any]) -> list[Role]:
        """The master (rank 0), then the workers (ranks 1…, indexes from 0), one process per node.

        :raises TopologyError: parameter servers or evaluators, which DistributedDataParallel has not.
        """
        if topology.group("parameterServer") is not None:
            raise TopologyError("trainingInput.parameterServerCount: PyTorch DistributedDataParallel has no "
                                "parameter servers (gradients are all-reduced between master and workers); "
                                "set it to 0")
        if topology.group("evaluator") is not None:
            raise TopologyError("trainingInput.evaluatorCount: PyTorch has no evaluator role; set it to 0")
        master = topology.group("master")
        if master is None:
            raise TopologyError("trainingInput.masterType is required")
        roles = [Role(MASTER, 0, master.machine_type)]
        workers = topology.group("worker")
        if workers is not None:
            roles.extend(Role(WORKER, index, workers.machine_type) for index in range(workers.count))
        return roles

    def environment(self, member: Member, members: list[Member], job: Mapping[str, Any]) -> dict[str, str]:
        """torchrun's variables for one process per node, plus ``NODE_ADDR``; rank 0 listens on its first port."""
        ranked = _by_rank(members)
        master = ranked[0]
        rank = str(ranked.index(member))
        world_size = str(len(ranked))
        return {
            "MASTER_ADDR": master.address,
            "MASTER_PORT": str(master.port_first),
            "WORLD_SIZE": world_size,
            "RANK": rank,
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            # torchrun's agent level: one agent (node) per rank here, all in its "default" role.
            "GROUP_RANK": rank,
            "GROUP_WORLD_SIZE": world_size,
            "ROLE_NAME": "default",
            "ROLE_RANK": rank,
            "ROLE_WORLD_SIZE": world_size,
            "NODE_ADDR": member.address,
        }

    def export_roles(self, roles: list[Role]) -> list[Role]:
        """Rank 0, the master, writes the model."""
        return [r for r in roles if r.task_type == MASTER] or roles[:1]

    def outcome(self, processes: list[ProcessStatus]) -> Outcome:
        """Succeeded once every rank exited 0; failed as soon as one exited non-zero or was lost.

        A rank that stopped leaves the others blocked in their next collective (NCCL: until a timeout of
        minutes) or failing in it (Gloo: "Connection closed by peer"), so one failure ends the job. When
        several failed before one look, a lost process is named first (its peers' errors are usually its
        consequence), then the one that ended first, then the lowest rank; the message lists the others.
        """
        failed = sorted((p for p in processes if p.lost or p.exit_code not in (None, 0)),
                        key=lambda p: (not p.lost, *failure_order(p), _rank_key(p.role)))
        if failed:
            first, others = failed[0], failed[1:]
            message = f"{first.role.node_name} {_how_it_ended(first)}"
            if others:
                message += "; also failed: " + ", ".join(f"{p.role.node_name} {_how_it_ended(p)}" for p in others)
            return Outcome("FAILED", message, first.role)
        if processes and all(p.exit_code == 0 for p in processes):
            return Outcome("SUCCEEDED")
        return Outcome("RUNNING")


def _how_it_ended(process: ProcessStatus) -> str:
    return "was lost without an exit code" if process.lost else f"exited with code {process.exit_code}"


def _rank_key(role: Role) -> tuple[bool, int]:
    return role.task_type != MASTER, role.task_index


def _by_rank(members: list[Member]) -> list[Member]:
    """Members in rank order: the master, then the workers by index.

    :raises TopologyError: no master among them (every PyTorch job has one).
    """
    ranked = sorted(members, key=lambda m: _rank_key(m.role))
    if not ranked or ranked[0].role.task_type != MASTER:
        raise TopologyError("a PyTorch job needs a master (rank 0)")
    return ranked

"""The PyTorch plugin: master and workers as DDP ranks, torchrun's environment, every rank must succeed."""

import pytest

from cloudml_os import runtimes
from cloudml_os.config import DEFAULT_MACHINE_TYPES
from cloudml_os.frameworks.base import (
    Member,
    ProcessStatus,
    Role,
    TopologyError,
    load_frameworks,
    topology_from_training_input,
)
from cloudml_os.frameworks.pytorch import PyTorch

FRAMEWORK = PyTorch()
MASTER_AND_THREE_WORKERS = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                            "workerCount": "3"}


def roles_for(training_input):
    topology = topology_from_training_input(training_input, DEFAULT_MACHINE_TYPES)
    return FRAMEWORK.roles(topology, training_input)


def members_for(training_input):
    """Members on local-driver style addresses: one loopback address and a port range per node."""
    return [Member(role, f"127.1.0.{n + 1}", 20000 + 10 * n, 20009 + 10 * n)
            for n, role in enumerate(roles_for(training_input))]


def environments(training_input, members=None):
    members = members or members_for(training_input)
    job = {"jobId": "job1", "trainingInput": training_input}
    return {m.role.node_name: FRAMEWORK.environment(m, members, job) for m in members}


def status(task_type, index=0, exit_code=None, lost=False, ended_at=None):
    return ProcessStatus(Role(task_type, index, DEFAULT_MACHINE_TYPES["standard"]), exit_code, lost, ended_at)


# --- plugin metadata ---------------------------------------------------------------------------


def test_plugin_is_found_through_its_entry_point():
    assert isinstance(load_frameworks()["PYTORCH"], PyTorch)


def test_default_runtime_version_maps_to_a_requirements_file():
    assert FRAMEWORK.runtime(None) == "pytorch-2.13"
    assert FRAMEWORK.runtime("2.13") == "pytorch-2.13"
    for name in FRAMEWORK.runtimes.values():
        assert runtimes.requirements_file(name).is_file()


def test_runtime_pins_exactly_one_torch_version():
    lines = runtimes.requirements_file("pytorch-2.13").read_text().splitlines()
    assert [line for line in lines if line.startswith("torch")] == ["torch==2.13.0"]


def test_unknown_runtime_version_names_the_valid_ones():
    with pytest.raises(TopologyError, match="valid: 2.13"):
        FRAMEWORK.runtime("1.13")


def test_export_marker_is_the_torchscript_file():
    assert FRAMEWORK.export_marker == "model.pt"


def test_command_is_the_trainer_contract():
    role = roles_for({"scaleTier": "BASIC"})[0]
    training_input = {"pythonModule": "trainer.task", "args": ["--epochs", "3"]}
    assert FRAMEWORK.command(role, "/rt/bin/python", training_input, "/job/output") == [
        "/rt/bin/python", "-m", "trainer.task", "--epochs", "3", "--job-dir", "/job/output",
    ]


# --- roles ----------------------------------------------------------------------------------


def test_basic_runs_a_single_master():
    assert [r.node_name for r in roles_for({"scaleTier": "BASIC"})] == ["master-0"]


def test_master_and_three_workers_are_four_ranks_master_first():
    assert [r.node_name for r in roles_for(MASTER_AND_THREE_WORKERS)] == [
        "master-0", "worker-0", "worker-1", "worker-2",
    ]


def test_roles_keep_each_groups_machine_type():
    training_input = {"scaleTier": "CUSTOM", "masterType": "large_model", "workerType": "standard_gpu",
                      "workerCount": 1}
    assert [(r.task_type, r.machine_type.name) for r in roles_for(training_input)] == [
        ("master", "large_model"), ("worker", "standard_gpu"),
    ]


def test_parameter_servers_are_refused():
    training_input = MASTER_AND_THREE_WORKERS | {"parameterServerType": "standard", "parameterServerCount": "1"}
    with pytest.raises(TopologyError, match="parameterServerCount: PyTorch DistributedDataParallel has no "
                                            "parameter servers"):
        roles_for(training_input)


def test_scale_tiers_with_parameter_servers_are_refused():
    with pytest.raises(TopologyError, match="parameterServerCount"):
        roles_for({"scaleTier": "STANDARD_1"})


def test_evaluators_are_refused():
    training_input = MASTER_AND_THREE_WORKERS | {"evaluatorType": "standard", "evaluatorCount": "1"}
    with pytest.raises(TopologyError, match="evaluatorCount: PyTorch has no evaluator role"):
        roles_for(training_input)


def test_zero_parameter_servers_and_evaluators_are_fine():
    training_input = MASTER_AND_THREE_WORKERS | {"parameterServerCount": "0", "evaluatorCount": 0}
    assert len(roles_for(training_input)) == 4


# --- environment ------------------------------------------------------------------------------


def test_single_master_environment_is_torchruns_for_a_world_of_one():
    assert environments({"scaleTier": "BASIC"}) == {"master-0": {
        "MASTER_ADDR": "127.1.0.1", "MASTER_PORT": "20000", "WORLD_SIZE": "1", "RANK": "0",
        "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
        "ROLE_NAME": "default", "ROLE_RANK": "0", "ROLE_WORLD_SIZE": "1", "NODE_ADDR": "127.1.0.1",
    }}


def test_every_rank_meets_at_the_masters_address_and_first_port():
    envs = environments(MASTER_AND_THREE_WORKERS)
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"]) for e in envs.values()} == {
        ("127.1.0.1", "20000", "4"),
    }


def test_master_is_rank_0_and_workers_follow_in_index_order():
    envs = environments(MASTER_AND_THREE_WORKERS)
    assert {name: e["RANK"] for name, e in envs.items()} == {
        "master-0": "0", "worker-0": "1", "worker-1": "2", "worker-2": "3",
    }
    assert all(e["GROUP_RANK"] == e["ROLE_RANK"] == e["RANK"] for e in envs.values())


def test_each_process_is_alone_on_its_node():
    for env in environments(MASTER_AND_THREE_WORKERS).values():
        assert (env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("0", "1")
        assert env["GROUP_WORLD_SIZE"] == env["ROLE_WORLD_SIZE"] == env["WORLD_SIZE"]


def test_node_addr_is_each_processes_own_address():
    envs = environments(MASTER_AND_THREE_WORKERS)
    assert {name: e["NODE_ADDR"] for name, e in envs.items()} == {
        "master-0": "127.1.0.1", "worker-0": "127.1.0.2", "worker-1": "127.1.0.3", "worker-2": "127.1.0.4",
    }


def test_ranks_follow_the_roles_not_the_members_order():
    members = list(reversed(members_for(MASTER_AND_THREE_WORKERS)))
    envs = environments(MASTER_AND_THREE_WORKERS, members)
    assert envs["worker-2"]["RANK"] == "3"
    assert envs["worker-2"]["MASTER_ADDR"] == "127.1.0.1"
    assert envs["master-0"]["RANK"] == "0"


def test_environment_names_no_backend_and_only_strings():
    env = environments(MASTER_AND_THREE_WORKERS)["worker-0"]
    assert all(isinstance(value, str) for value in env.values())
    assert not {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCHELASTIC_RUN_ID"} & set(env)


def test_members_without_a_master_are_refused():
    members = [m for m in members_for(MASTER_AND_THREE_WORKERS) if m.role.task_type != "master"]
    with pytest.raises(TopologyError, match="master"):
        FRAMEWORK.environment(members[0], members, {"trainingInput": MASTER_AND_THREE_WORKERS})


# --- outcome --------------------------------------------------------------------------------


def test_running_while_no_process_ended():
    assert FRAMEWORK.outcome([status("master"), status("worker", 0)]).state == "RUNNING"


def test_running_while_some_ranks_finished_and_others_train():
    processes = [status("master", exit_code=0), status("worker", 0, exit_code=0), status("worker", 1)]
    assert FRAMEWORK.outcome(processes).state == "RUNNING"


def test_succeeded_when_every_rank_exited_zero():
    processes = [status("master", exit_code=0), status("worker", 0, exit_code=0), status("worker", 1, exit_code=0)]
    assert FRAMEWORK.outcome(processes).state == "SUCCEEDED"


def test_a_single_master_that_exited_zero_succeeds():
    assert FRAMEWORK.outcome([status("master", exit_code=0)]).state == "SUCCEEDED"


def test_no_process_is_not_a_success():
    assert FRAMEWORK.outcome([]).state == "RUNNING"


def test_worker_non_zero_exit_fails_at_once_and_names_it():
    outcome = FRAMEWORK.outcome([status("master"), status("worker", 0), status("worker", 1, exit_code=3)])
    assert (outcome.state, outcome.message) == ("FAILED", "worker-1 exited with code 3")
    assert outcome.failed_role.node_name == "worker-1"


def test_master_non_zero_exit_fails_and_names_it():
    outcome = FRAMEWORK.outcome([status("master", exit_code=1), status("worker", 0, exit_code=0)])
    assert (outcome.state, outcome.message) == ("FAILED", "master-0 exited with code 1")
    assert outcome.failed_role.node_name == "master-0"


def test_a_failure_after_others_succeeded_still_fails():
    outcome = FRAMEWORK.outcome([status("master", exit_code=0), status("worker", 0, exit_code=-9)])
    assert (outcome.state, outcome.message) == ("FAILED", "worker-0 exited with code -9")


def test_lost_rank_fails():
    outcome = FRAMEWORK.outcome([status("master"), status("worker", 1, lost=True)])
    assert (outcome.state, outcome.message) == ("FAILED", "worker-1 was lost without an exit code")
    assert outcome.failed_role.node_name == "worker-1"


def test_a_lost_rank_is_named_before_the_ranks_that_failed_because_of_it():
    outcome = FRAMEWORK.outcome([status("master", exit_code=1), status("worker", 0, lost=True)])
    assert outcome.failed_role.node_name == "worker-0"
    assert outcome.message == "worker-0 was lost without an exit code; also failed: master-0 exited with code 1"


def test_several_failures_name_the_lowest_rank_and_list_the_others():
    processes = [status("worker", 1, exit_code=1), status("worker", 0), status("master", exit_code=134)]
    outcome = FRAMEWORK.outcome(processes)
    assert outcome.failed_role.node_name == "master-0"
    assert outcome.message == "master-0 exited with code 134; also failed: worker-1 exited with code 1"


def test_the_rank_that_failed_first_is_named_when_its_peers_failed_in_the_collective_after_it():
    processes = [status("master", exit_code=1, ended_at=1000.6), status("worker", 0, exit_code=1, ended_at=1000.1)]
    outcome = FRAMEWORK.outcome(processes)
    assert outcome.failed_role.node_name == "worker-0"
    assert outcome.message == "worker-0 exited with code 1; also failed: master-0 exited with code 1"


# --- export ---------------------------------------------------------------------------------


def test_export_roles_are_the_master_only():
    assert [r.node_name for r in FRAMEWORK.export_roles(roles_for(MASTER_AND_THREE_WORKERS))] == ["master-0"]

"""The MXNet plugin: ps-lite roles, DMLC_* environments on shared-host nodes, and the job's success policy."""

import subprocess
import sys

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
from cloudml_os.frameworks.mxnet import MXNet

FRAMEWORK = MXNet()
MASTER_TWO_WORKERS_ONE_SERVER = {
    "scaleTier": "CUSTOM", "masterType": "complex_model_m",
    "workerType": "standard", "workerCount": "2",
    "parameterServerType": "large_model", "parameterServerCount": "1",
}
DMLC_VARIABLES = {"DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_WORKER", "DMLC_NUM_SERVER",
                  "DMLC_NODE_HOST", "PORT"}


def roles_for(training_input):
    topology = topology_from_training_input(training_input, DEFAULT_MACHINE_TYPES)
    return FRAMEWORK.roles(topology, training_input)


def members_for(training_input):
    """Members on local-driver style addresses: one loopback address and a port range per node."""
    return [Member(role, f"127.1.0.{n + 1}", 20000 + 10 * n, 20009 + 10 * n)
            for n, role in enumerate(roles_for(training_input))]


def environments(training_input):
    job = {"jobId": "job1", "trainingInput": training_input}
    members = members_for(training_input)
    return {m.role.node_name: FRAMEWORK.environment(m, members, job) for m in members}


def status(task_type, index=0, exit_code=None, lost=False):
    return ProcessStatus(Role(task_type, index, DEFAULT_MACHINE_TYPES["standard"]), exit_code, lost)


def distributed(worker_exits=(None, None), server_exits=(None,), scheduler_exit=None):
    """Statuses of a job with workers, servers and a scheduler; "lost" marks a lost process."""
    def one(task_type, index, exit_code):
        return status(task_type, index, None if exit_code == "lost" else exit_code, lost=exit_code == "lost")

    return ([one("worker", i, code) for i, code in enumerate(worker_exits)]
            + [one("server", i, code) for i, code in enumerate(server_exits)]
            + [one("scheduler", 0, scheduler_exit)])


# --- plugin metadata ---------------------------------------------------------------------------


def test_plugin_is_found_through_its_entry_point():
    assert isinstance(load_frameworks()["MXNET"], MXNet)


def test_default_runtime_version_maps_to_a_requirements_file():
    assert FRAMEWORK.runtime(None) == "mxnet-1.9"
    assert FRAMEWORK.runtime("1.9") == "mxnet-1.9"
    for name in FRAMEWORK.runtimes.values():
        assert runtimes.requirements_file(name).is_file()


def test_runtime_pins_the_numpy_that_mxnet_1_9_imports_with():
    requirements = runtimes.requirements_file("mxnet-1.9").read_text().split()
    assert {"mxnet==1.9.1", "numpy==1.23.5"} <= set(requirements)


def test_unknown_runtime_version_names_the_valid_ones():
    with pytest.raises(TopologyError, match="valid: 1.9"):
        FRAMEWORK.runtime("2.21")


def test_export_marker_is_the_symbol_file_of_hybrid_block_export():
    assert FRAMEWORK.export_marker == "model-symbol.json"


# --- roles ----------------------------------------------------------------------------------


def test_basic_is_one_worker_training_locally():
    assert [(r.node_name, r.machine_type.name) for r in roles_for({"scaleTier": "BASIC"})] == [
        ("worker-0", "standard"),
    ]


def test_master_and_workers_become_workers_then_servers_then_one_scheduler():
    assert [(r.node_name, r.machine_type.name) for r in roles_for(MASTER_TWO_WORKERS_ONE_SERVER)] == [
        ("worker-0", "complex_model_m"),  # the master
        ("worker-1", "standard"),
        ("worker-2", "standard"),
        ("server-0", "large_model"),
        ("scheduler-0", "large_model"),  # on the parameter server machine type
    ]


def test_master_with_servers_but_no_workers_is_distributed_too():
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard",
                      "parameterServerType": "standard", "parameterServerCount": 2}
    assert [r.node_name for r in roles_for(training_input)] == [
        "worker-0", "server-0", "server-1", "scheduler-0",
    ]


def test_standard_1_runs_five_workers_three_servers_and_a_scheduler():
    names = [r.node_name for r in roles_for({"scaleTier": "STANDARD_1"})]
    assert names == [*(f"worker-{i}" for i in range(5)), "server-0", "server-1", "server-2", "scheduler-0"]


def test_workers_without_a_parameter_server_are_refused():
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                      "workerCount": 2}
    with pytest.raises(TopologyError, match=r"trainingInput\.parameterServerCount.*at least 1"):
        roles_for(training_input)


def test_evaluators_are_refused():
    training_input = MASTER_TWO_WORKERS_ONE_SERVER | {"evaluatorType": "standard", "evaluatorCount": "1"}
    with pytest.raises(TopologyError, match=r"trainingInput\.evaluatorCount.*no evaluator"):
        roles_for(training_input)


# --- environment ----------------------------------------------------------------------------


def test_local_training_gets_no_dmlc_variables():
    assert environments({"scaleTier": "BASIC"}) == {"worker-0": {}}


def test_every_role_knows_the_scheduler_and_the_cluster_size():
    scheduler_address, scheduler_port = "127.1.0.5", "20040"  # the fifth member
    for name, environment in environments(MASTER_TWO_WORKERS_ONE_SERVER).items():
        assert set(environment) == DMLC_VARIABLES, name
        assert environment["DMLC_PS_ROOT_URI"] == scheduler_address
        assert environment["DMLC_PS_ROOT_PORT"] == scheduler_port
        assert (environment["DMLC_NUM_WORKER"], environment["DMLC_NUM_SERVER"]) == ("3", "1")


def test_each_role_has_its_ps_lite_role():
    roles = {name: env["DMLC_ROLE"] for name, env in environments(MASTER_TWO_WORKERS_ONE_SERVER).items()}
    assert roles == {"worker-0": "worker", "worker-1": "worker", "worker-2": "worker",
                     "server-0": "server", "scheduler-0": "scheduler"}


def test_each_process_binds_its_own_address_and_a_port_of_its_own_range():
    members = members_for(MASTER_TWO_WORKERS_ONE_SERVER)
    job = {"trainingInput": MASTER_TWO_WORKERS_ONE_SERVER}
    for member in members:
        environment = FRAMEWORK.environment(member, members, job)
        assert environment["DMLC_NODE_HOST"] == member.address
        assert member.port_first <= int(environment["PORT"]) <= member.port_last


def test_scheduler_listens_inside_its_own_range():
    members = members_for(MASTER_TWO_WORKERS_ONE_SERVER)
    (scheduler,) = [m for m in members if m.role.task_type == "scheduler"]
    environment = FRAMEWORK.environment(scheduler, members, {"trainingInput": MASTER_TWO_WORKERS_ONE_SERVER})
    assert environment["DMLC_PS_ROOT_URI"] == scheduler.address
    assert scheduler.port_first <= int(environment["DMLC_PS_ROOT_PORT"]) <= scheduler.port_last


def test_no_tf_config_is_set():
    for environment in environments(MASTER_TWO_WORKERS_ONE_SERVER).values():
        assert "TF_CONFIG" not in environment


def test_scheduler_is_found_whatever_the_member_order():
    members = list(reversed(members_for(MASTER_TWO_WORKERS_ONE_SERVER)))
    environment = FRAMEWORK.environment(members[-1], members, {"trainingInput": MASTER_TWO_WORKERS_ONE_SERVER})
    assert (environment["DMLC_ROLE"], environment["DMLC_NODE_HOST"]) == ("worker", "127.1.0.1")
    assert (environment["DMLC_PS_ROOT_URI"], environment["DMLC_PS_ROOT_PORT"]) == ("127.1.0.5", "20040")


# --- export roles ---------------------------------------------------------------------------


def test_every_worker_may_hold_the_export_in_worker_order():
    # ps-lite assigns kvstore rank 0, the exporting worker, at run time.
    roles = list(reversed(roles_for(MASTER_TWO_WORKERS_ONE_SERVER)))
    assert [r.node_name for r in FRAMEWORK.export_roles(roles)] == ["worker-0", "worker-1", "worker-2"]


def test_local_training_exports_from_its_only_worker():
    roles = roles_for({"scaleTier": "BASIC"})
    assert FRAMEWORK.export_roles(roles) == roles


# --- outcome --------------------------------------------------------------------------------


def test_running_while_no_process_ended():
    assert FRAMEWORK.outcome(distributed()).state == "RUNNING"


def test_all_workers_exit_zero_succeeds_while_servers_and_scheduler_still_run():
    assert FRAMEWORK.outcome(distributed(worker_exits=(0, 0))).state == "SUCCEEDED"


def test_success_stands_after_the_workflow_stops_servers_and_scheduler():
    processes = distributed(worker_exits=(0, 0), server_exits=(-9,), scheduler_exit="lost")
    assert FRAMEWORK.outcome(processes).state == "SUCCEEDED"


def test_single_local_worker_exit_zero_succeeds():
    assert FRAMEWORK.outcome([status("worker", 0, exit_code=0)]).state == "SUCCEEDED"


def test_a_worker_that_finished_first_keeps_the_job_running():
    assert FRAMEWORK.outcome(distributed(worker_exits=(0, None))).state == "RUNNING"


def test_servers_and_scheduler_ending_cleanly_before_the_last_worker_keep_it_running():
    # MXNet stops them once rank 0 pushed its last update; a slower worker may still be exiting.
    processes = distributed(worker_exits=(0, None), server_exits=(0,), scheduler_exit=0)
    assert FRAMEWORK.outcome(processes).state == "RUNNING"


def test_a_worker_exiting_non_zero_fails_at_once_and_names_it():
    outcome = FRAMEWORK.outcome(distributed(worker_exits=(None, 1)))
    assert (outcome.state, outcome.message) == ("FAILED", "worker-1 exited with code 1")
    assert outcome.failed_role.node_name == "worker-1"


def test_a_worker_failing_after_another_succeeded_fails():
    outcome = FRAMEWORK.outcome(distributed(worker_exits=(0, 1)))
    assert (outcome.state, outcome.failed_role.node_name) == ("FAILED", "worker-1")


def test_a_lost_worker_fails():
    outcome = FRAMEWORK.outcome(distributed(worker_exits=("lost", None)))
    assert (outcome.state, outcome.message) == ("FAILED", "worker-0 was lost without an exit code")


def test_a_lost_server_fails_before_the_workers_finished():
    outcome = FRAMEWORK.outcome(distributed(server_exits=("lost",)))
    assert (outcome.state, outcome.message) == ("FAILED", "server-0 was lost without an exit code")
    assert outcome.failed_role.task_type == "server"


def test_a_server_crash_fails_and_names_its_exit_code():
    outcome = FRAMEWORK.outcome(distributed(worker_exits=(0, None), server_exits=(134,)))
    assert (outcome.state, outcome.message) == ("FAILED", "server-0 exited with code 134")


def test_a_scheduler_crash_fails():
    outcome = FRAMEWORK.outcome(distributed(scheduler_exit=1))
    assert (outcome.state, outcome.message) == ("FAILED", "scheduler-0 exited with code 1")


def test_a_worker_failure_is_reported_before_the_server_it_stranded():
    outcome = FRAMEWORK.outcome(distributed(worker_exits=(None, 2), server_exits=("lost",), scheduler_exit=1))
    assert outcome.message == "worker-1 exited with code 2"


def _run_launcher(tmp_path, body: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "launched_trainer.py").write_text(body)
    role = MXNet().roles(*_single_worker())[0]
    argv = MXNet().command(role, sys.executable, {"pythonModule": "launched_trainer", "args": list(args)}, "/out")
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(tmp_path)})


def _single_worker():
    training_input = {"scaleTier": "BASIC"}
    return topology_from_training_input(training_input, DEFAULT_MACHINE_TYPES), training_input


def test_the_command_runs_the_trainer_module_with_its_arguments(tmp_path):
    done = _run_launcher(tmp_path, "import sys\nprint(sys.argv[1:])\n", "--note", "$(id); x")
    assert done.returncode == 0
    assert done.stdout.strip() == str(["--note", "$(id); x", "--job-dir", "/out"])


def test_an_uncaught_exception_ends_the_process_at_once_with_code_1(tmp_path):
    # The atexit hook stands for MXNet's kvstore shutdown, which would wait for the other workers.
    body = "import atexit, time\natexit.register(time.sleep, 600)\nraise RuntimeError('Injected failure')\n"
    done = _run_launcher(tmp_path, body)
    assert done.returncode == 1
    assert "Injected failure" in done.stderr


def test_sys_exit_keeps_its_code(tmp_path):
    assert _run_launcher(tmp_path, "import sys\nsys.exit(3)\n").returncode == 3

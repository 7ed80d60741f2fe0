"""The TensorFlow plugin: roles, TF_CONFIG as Cloud ML Engine sets it, and the job's success policy."""

import json

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
from cloudml_os.frameworks.tensorflow import TensorFlow

FRAMEWORK = TensorFlow()
CHIEF_WORKERS_PS_EVALUATOR = {
    "scaleTier": "CUSTOM", "masterType": "standard",
    "workerType": "standard", "workerCount": "1",
    "parameterServerType": "standard", "parameterServerCount": "1",
    "evaluatorType": "standard", "evaluatorCount": "1",
}


def roles_for(training_input):
    topology = topology_from_training_input(training_input, DEFAULT_MACHINE_TYPES)
    return FRAMEWORK.roles(topology, training_input)


def members_for(training_input):
    """Members on local-driver style addresses: one loopback address and a port range per node."""
    return [Member(role, f"127.1.0.{n + 1}", 20000 + 10 * n, 20009 + 10 * n)
            for n, role in enumerate(roles_for(training_input))]


def tf_configs(training_input):
    job = {"jobId": "job1", "trainingInput": training_input}
    members = members_for(training_input)
    return {m.role.node_name: FRAMEWORK.environment(m, members, job)["TF_CONFIG"] for m in members}


def status(task_type, index=0, exit_code=None, lost=False):
    return ProcessStatus(Role(task_type, index, DEFAULT_MACHINE_TYPES["standard"]), exit_code, lost)


# --- plugin metadata ---------------------------------------------------------------------------


def test_plugin_is_found_through_its_entry_point():
    assert isinstance(load_frameworks()["TENSORFLOW"], TensorFlow)


def test_default_runtime_version_maps_to_a_requirements_file():
    assert FRAMEWORK.runtime(None) == "tensorflow-2.21"
    assert FRAMEWORK.runtime("2.21") == "tensorflow-2.21"
    for name in FRAMEWORK.runtimes.values():
        assert runtimes.requirements_file(name).is_file()


def test_unknown_runtime_version_names_the_valid_ones():
    with pytest.raises(TopologyError, match="valid: 2.21"):
        FRAMEWORK.runtime("1.15")


def test_export_marker_is_the_saved_model_file():
    assert FRAMEWORK.export_marker == "saved_model.pb"


# --- roles ----------------------------------------------------------------------------------


def test_basic_on_the_default_runtime_runs_a_single_chief():
    # Cloud ML Engine names the primary replica "chief" on runtime 2.1 and later: TF2 refuses "master".
    assert [r.node_name for r in roles_for({"scaleTier": "BASIC"})] == ["chief-0"]


def test_roles_map_groups_to_tensorflow_task_types_with_indexes_from_zero():
    training_input = CHIEF_WORKERS_PS_EVALUATOR | {"workerCount": "2", "parameterServerCount": "2"}
    assert [r.node_name for r in roles_for(training_input)] == [
        "chief-0", "worker-0", "worker-1", "ps-0", "ps-1", "evaluator-0",
    ]


def test_roles_keep_each_groups_machine_type():
    training_input = {"scaleTier": "CUSTOM", "masterType": "large_model", "workerType": "standard_gpu",
                      "workerCount": 1}
    assert [(r.task_type, r.machine_type.name) for r in roles_for(training_input)] == [
        ("chief", "large_model"), ("worker", "standard_gpu"),
    ]


def test_runtimes_before_2_1_keep_the_master_task_type():
    roles = roles_for({"scaleTier": "STANDARD_1", "runtimeVersion": "1.15"})
    assert [r.task_type for r in roles][:2] == ["master", "worker"]


@pytest.mark.parametrize("extra", [
    {"useChiefInTfConfig": True},
    {"evaluatorType": "standard", "evaluatorCount": "1"},
    {"runtimeVersion": "2.1"},
])
def test_chief_replaces_master_by_cloud_ml_engines_rule(extra):
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard", "runtimeVersion": "1.15"} | extra
    assert roles_for(training_input)[0].node_name == "chief-0"


# --- TF_CONFIG ------------------------------------------------------------------------------


def test_basic_tf_config_is_compact_json_exactly_as_cloud_ml_engine_sets_it():
    training_input = {"scaleTier": "BASIC", "pythonModule": "trainer.task", "region": "local"}
    assert tf_configs(training_input) == {
        "chief-0": '{"cluster":{"chief":["127.1.0.1:20000"]},'
                   '"task":{"type":"chief","index":0,"trial":""},'
                   '"environment":"cloud",'
                   '"job":{"scaleTier":"BASIC","pythonModule":"trainer.task","region":"local"}}'
    }


def test_chief_and_two_workers_share_one_cluster_spec():
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                      "workerCount": "2"}
    configs = {name: json.loads(value) for name, value in tf_configs(training_input).items()}
    cluster = {"chief": ["127.1.0.1:20000"], "worker": ["127.1.0.2:20010", "127.1.0.3:20020"]}
    assert configs == {
        "chief-0": {"cluster": cluster, "task": {"type": "chief", "index": 0, "trial": ""},
                    "environment": "cloud", "job": training_input},
        "worker-0": {"cluster": cluster, "task": {"type": "worker", "index": 0, "trial": ""},
                     "environment": "cloud", "job": training_input},
        "worker-1": {"cluster": cluster, "task": {"type": "worker", "index": 1, "trial": ""},
                     "environment": "cloud", "job": training_input},
    }


def test_evaluator_gets_a_task_but_is_not_in_the_cluster_spec():
    configs = {name: json.loads(value) for name, value in tf_configs(CHIEF_WORKERS_PS_EVALUATOR).items()}
    expected_cluster = {"chief": ["127.1.0.1:20000"], "worker": ["127.1.0.2:20010"], "ps": ["127.1.0.3:20020"]}
    assert {name: config["cluster"] for name, config in configs.items()} == {
        name: expected_cluster for name in ("chief-0", "worker-0", "ps-0", "evaluator-0")
    }
    assert configs["evaluator-0"]["task"] == {"type": "evaluator", "index": 0, "trial": ""}
    assert configs["ps-0"]["task"] == {"type": "ps", "index": 0, "trial": ""}


def test_cluster_spec_lists_chief_then_worker_then_ps():
    config = tf_configs(CHIEF_WORKERS_PS_EVALUATOR)["chief-0"]
    assert list(json.loads(config)["cluster"]) == ["chief", "worker", "ps"]


def test_master_runtime_puts_master_in_the_cluster_spec_and_task():
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                      "workerCount": 1, "runtimeVersion": "1.15"}
    configs = {name: json.loads(value) for name, value in tf_configs(training_input).items()}
    assert set(configs) == {"master-0", "worker-0"}
    assert configs["master-0"]["cluster"] == {"master": ["127.1.0.1:20000"], "worker": ["127.1.0.2:20010"]}
    assert configs["master-0"]["task"]["type"] == "master"
    assert configs["worker-0"]["job"]["runtimeVersion"] == "1.15"


def test_use_chief_in_tf_config_puts_chief_in_the_cluster_spec_and_task():
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                      "workerCount": 1, "runtimeVersion": "1.15", "useChiefInTfConfig": True}
    configs = {name: json.loads(value) for name, value in tf_configs(training_input).items()}
    assert configs["chief-0"]["cluster"] == {"chief": ["127.1.0.1:20000"], "worker": ["127.1.0.2:20010"]}
    assert configs["worker-0"]["task"] == {"type": "worker", "index": 0, "trial": ""}
    assert configs["worker-0"]["job"]["useChiefInTfConfig"] is True


def test_addresses_follow_the_members_not_their_order():
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                      "workerCount": 2}
    members = list(reversed(members_for(training_input)))
    job = {"trainingInput": training_input}
    config = json.loads(FRAMEWORK.environment(members[0], members, job)["TF_CONFIG"])
    assert config["cluster"]["worker"] == ["127.1.0.2:20010", "127.1.0.3:20020"]
    assert config["task"] == {"type": "worker", "index": 1, "trial": ""}


def test_environment_sets_only_tf_config():
    training_input = {"scaleTier": "BASIC"}
    members = members_for(training_input)
    assert set(FRAMEWORK.environment(members[0], members, {"trainingInput": training_input})) == {"TF_CONFIG"}


# --- outcome --------------------------------------------------------------------------------


def test_running_while_no_process_ended():
    processes = [status("master"), status("worker", 0), status("ps")]
    assert FRAMEWORK.outcome(processes).state == "RUNNING"


def test_master_exit_zero_succeeds_while_ps_and_workers_still_run():
    processes = [status("master", exit_code=0), status("worker", 0), status("worker", 1), status("ps")]
    assert FRAMEWORK.outcome(processes).state == "SUCCEEDED"


def test_chief_exit_zero_succeeds():
    assert FRAMEWORK.outcome([status("chief", exit_code=0), status("worker", 0)]).state == "SUCCEEDED"


def test_success_stands_after_the_workflow_kills_the_rest():
    processes = [status("master", exit_code=0), status("worker", 0, exit_code=-9), status("ps", lost=True)]
    assert FRAMEWORK.outcome(processes).state == "SUCCEEDED"


def test_workers_that_finished_first_keep_the_job_running():
    processes = [status("master"), status("worker", 0, exit_code=0), status("worker", 1, exit_code=0)]
    assert FRAMEWORK.outcome(processes).state == "RUNNING"


def test_master_non_zero_exit_fails_and_names_it():
    outcome = FRAMEWORK.outcome([status("master", exit_code=1), status("worker", 0)])
    assert (outcome.state, outcome.message) == ("FAILED", "master-0 exited with code 1")
    assert outcome.failed_role.node_name == "master-0"


def test_worker_non_zero_exit_fails_and_names_it():
    outcome = FRAMEWORK.outcome([status("master"), status("worker", 0), status("worker", 1, exit_code=3)])
    assert (outcome.state, outcome.message) == ("FAILED", "worker-1 exited with code 3")
    assert outcome.failed_role.node_name == "worker-1"


def test_lost_worker_fails():
    outcome = FRAMEWORK.outcome([status("master"), status("worker", 1, lost=True)])
    assert outcome.state == "FAILED"
    assert outcome.message == "worker-1 was lost without an exit code"


def test_lost_master_fails():
    outcome = FRAMEWORK.outcome([status("master", lost=True), status("worker", 0)])
    assert (outcome.state, outcome.failed_role.task_type) == ("FAILED", "master")


def test_parameter_server_crash_fails():
    outcome = FRAMEWORK.outcome([status("master"), status("worker", 0), status("ps", exit_code=134)])
    assert (outcome.state, outcome.message) == ("FAILED", "ps-0 exited with code 134")


def test_evaluator_failure_does_not_fail_the_job():
    processes = [status("master"), status("worker", 0), status("evaluator", exit_code=1)]
    assert FRAMEWORK.outcome(processes).state == "RUNNING"
    processes = [status("master", exit_code=0), status("evaluator", lost=True)]
    assert FRAMEWORK.outcome(processes).state == "SUCCEEDED"


def test_master_failure_is_reported_before_a_worker_failure():
    outcome = FRAMEWORK.outcome([status("worker", 0, exit_code=1), status("master", exit_code=2)])
    assert outcome.message == "master-0 exited with code 2"

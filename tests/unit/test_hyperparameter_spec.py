"""The API side of hyperparameter tuning: v1 HyperparameterSpec validation (every rule a 400 naming the
field, nothing created), resuming an earlier study, the quota of parallel trials, and the ``trial`` filter
of a job's logs and events."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cloudml_os import quotas, tuning
from cloudml_os.config import DEFAULT_MACHINE_TYPES
from cloudml_os.states import JobState
from cloudml_os.store import Job
from tests.unit.test_api import Env, assert_v1_error
from tests.unit.test_api import env as env  # fixtures, as are store and migrated_db
from tests.unit.test_api import migrated_db as migrated_db
from tests.unit.test_api import store as store
from tests.unit.test_quotas import GPU_JOB, QuotaEnv

FIELD = "trainingInput.hyperparameters"

ALL_TYPES = {
    "goal": "MINIMIZE",
    "params": [
        {"parameterName": "learning_rate", "type": "DOUBLE", "minValue": 0.0001, "maxValue": 0.1,
         "scaleType": "UNIT_LOG_SCALE"},
        {"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 8, "scaleType": "UNIT_LINEAR_SCALE"},
        {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd", "--x=$(id)"]},
        {"parameterName": "dropout", "type": "DISCRETE", "discreteValues": [0.1, 0.25, 0.5]},
    ],
    "maxTrials": "20", "maxParallelTrials": 4, "maxFailedTrials": "3",
    "hyperparameterMetricTag": "accuracy", "enableTrialEarlyStopping": True, "algorithm": "RANDOM_SEARCH",
}


def spec(*params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A valid spec with one DOUBLE parameter, or ``params``, and ``fields`` changed."""
    return {"params": list(params) or [{"parameterName": "lr", "type": "DOUBLE", "minValue": 0.01, "maxValue": 1}],
            **fields}


def refused(env: Env, hyperparameters: Any, field: str) -> str:
    """Submitting the spec is a 400 naming ``FIELD.field``; no job is created or started."""
    message = assert_v1_error(env.submit(hyperparameters=hyperparameters), 400, "INVALID_ARGUMENT")
    assert f"{FIELD}.{field}: " in message, message
    assert env.store.find_job("p", "job_1") is None and env.started == []
    return message


# ---- accepted specs -------------------------------------------------------------------------------------


def test_a_spec_of_all_four_types_is_accepted_stored_and_shown_as_v1(env):
    response = env.submit(hyperparameters=ALL_TYPES)
    assert response.status_code == 200, response.get_json()
    stored = env.job("job_1").training_input["hyperparameters"]
    assert stored == {**ALL_TYPES, "maxTrials": 20, "maxFailedTrials": 3, "params": [
        {**ALL_TYPES["params"][0]}, {**ALL_TYPES["params"][1], "minValue": 1.0, "maxValue": 8.0},
        ALL_TYPES["params"][2], ALL_TYPES["params"][3]]}
    shown = response.get_json()["trainingInput"]["hyperparameters"]
    assert (shown["maxTrials"], shown["maxParallelTrials"], shown["maxFailedTrials"]) == (20, 4, 3)  # v1 int32
    assert shown["params"] == stored["params"] and shown["goal"] == "MINIMIZE"


def test_defaults_are_filled_in(env):
    assert env.submit(hyperparameters=spec()).status_code == 200
    assert env.job("job_1").training_input["hyperparameters"] == {
        **spec(), "goal": "MAXIMIZE", "maxTrials": 1, "maxParallelTrials": 1, "maxFailedTrials": 0,
        "hyperparameterMetricTag": "training/hptuning/metric", "enableTrialEarlyStopping": False,
        "algorithm": "ALGORITHM_UNSPECIFIED"}


def test_goal_type_unspecified_is_maximize(env):
    assert env.submit(hyperparameters=spec(goal="GOAL_TYPE_UNSPECIFIED")).status_code == 200
    assert env.job("job_1").training_input["hyperparameters"]["goal"] == "MAXIMIZE"


def test_more_parallel_trials_than_trials_and_a_hundred_parameters_are_fine(env):
    params = [{"parameterName": f"p{i}", "type": "INTEGER", "minValue": 0, "maxValue": 1} for i in range(100)]
    assert env.submit(hyperparameters=spec(*params, maxTrials=2, maxParallelTrials=10)).status_code == 200


def test_grid_search_takes_integer_categorical_and_discrete_even_a_wide_integer_range(env):
    params = [{"parameterName": "steps", "type": "INTEGER", "minValue": 1, "maxValue": 1_000_000},
              *ALL_TYPES["params"][2:]]
    assert env.submit(hyperparameters=spec(*params, algorithm="GRID_SEARCH", maxTrials=1000)).status_code == 200


def test_reverse_log_scale_of_a_positive_integer_range_and_the_longest_names_are_fine(env):
    params = [{"parameterName": "B" + "a_1" * 42 + "z", "type": "INTEGER", "minValue": 1, "maxValue": 2,
               "scaleType": "UNIT_REVERSE_LOG_SCALE"},
              {"parameterName": "n", "type": "CATEGORICAL", "categoricalValues": ["x"], "scaleType": "NONE"},
              {"parameterName": "d", "type": "DISCRETE", "discreteValues": list(range(1000))}]
    assert env.submit(hyperparameters=spec(*params)).status_code == 200


# ---- refused specs: one rule each ----------------------------------------------------------------------

DOUBLE = {"parameterName": "lr", "type": "DOUBLE", "minValue": 0.01, "maxValue": 1.0}
INTEGER = {"parameterName": "n", "type": "INTEGER", "minValue": 1, "maxValue": 10}
CATEGORICAL = {"parameterName": "opt", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]}
DISCRETE = {"parameterName": "d", "type": "DISCRETE", "discreteValues": [1, 2, 4]}


def param(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``base`` with ``changes`` (a value of None removes the key)."""
    changed = {**copy.deepcopy(base), **changes}
    return {key: value for key, value in changed.items() if value is not None}


@pytest.mark.parametrize("hyperparameters, field", [
    # the spec
    ({}, "params"),
    (spec(params=[]), "params"),
    (spec(*[param(INTEGER, parameterName=f"p{i}") for i in range(101)]), "params"),
    (spec(goal="BIGGER"), "goal"),
    (spec(maxTrials=0), "maxTrials"),
    (spec(maxTrials=1001), "maxTrials"),
    (spec(maxTrials="many"), "maxTrials"),
    (spec(maxTrials=True), "maxTrials"),
    (spec(maxTrials=2.5), "maxTrials"),
    (spec(maxTrials="99999999999"), "maxTrials"),
    (spec(maxParallelTrials=0), "maxParallelTrials"),
    (spec(maxParallelTrials="-1"), "maxParallelTrials"),
    (spec(maxFailedTrials=-1), "maxFailedTrials"),
    (spec(algorithm="BAYESIAN"), "algorithm"),
    (spec(algorithm="GRID_SEARCH"), "params[0].type"),
    (spec(INTEGER, DOUBLE, algorithm="GRID_SEARCH"), "params[1].type"),
    (spec(hyperparameterMetricTag=""), "hyperparameterMetricTag"),
    (spec(hyperparameterMetricTag=3), "hyperparameterMetricTag"),
    (spec(enableTrialEarlyStopping="maybe"), "enableTrialEarlyStopping"),
    (spec(resumePreviousJobId="1job"), "resumePreviousJobId"),
    (spec(resumePreviousJobId="job-1"), "resumePreviousJobId"),
    (spec(studyConfig={"algorithm": "x"}), "studyConfig"),  # not a v1 field: unknown fields are refused
    # parameter names
    (spec(param(DOUBLE, parameterName=None)), "params[0].parameterName"),
    (spec(param(DOUBLE, parameterName="1lr")), "params[0].parameterName"),
    (spec(param(DOUBLE, parameterName="learning-rate")), "params[0].parameterName"),
    (spec(param(DOUBLE, parameterName="lr=0.5 --x")), "params[0].parameterName"),
    (spec(param(DOUBLE, parameterName="lr\n")), "params[0].parameterName"),
    (spec(param(DOUBLE, parameterName="a" * 129)), "params[0].parameterName"),
    (spec(param(DOUBLE, parameterName="job_dir")), "params[0].parameterName"),
    (spec(DOUBLE, param(INTEGER, parameterName="lr")), "params[1].parameterName"),
    # types
    (spec(param(DOUBLE, type=None)), "params[0].type"),
    (spec(param(DOUBLE, type="PARAMETER_TYPE_UNSPECIFIED")), "params[0].type"),
    (spec(param(DOUBLE, type="FLOAT")), "params[0].type"),
    (spec(param(DOUBLE, colour="red")), "params[0].colour"),
    # DOUBLE and INTEGER ranges
    (spec(param(DOUBLE, minValue=None)), "params[0].minValue"),
    (spec(param(DOUBLE, maxValue=None)), "params[0].maxValue"),
    (spec(param(DOUBLE, minValue=1.0, maxValue=1.0)), "params[0].minValue"),
    (spec(param(DOUBLE, minValue=2.0)), "params[0].minValue"),
    (spec(param(DOUBLE, minValue="low")), "params[0].minValue"),
    (spec(param(DOUBLE, maxValue=float("inf"))), "params[0].maxValue"),
    (spec(param(DOUBLE, minValue=float("nan"))), "params[0].minValue"),
    (spec(param(INTEGER, minValue=1.5)), "params[0].minValue"),
    (spec(param(INTEGER, maxValue=9.99)), "params[0].maxValue"),
    (spec(param(DOUBLE, categoricalValues=["a"])), "params[0].categoricalValues"),
    (spec(param(INTEGER, discreteValues=[1, 2])), "params[0].discreteValues"),
    # scales
    (spec(param(DOUBLE, scaleType="UNIT_SQUARE_SCALE")), "params[0].scaleType"),
    (spec(param(DOUBLE, minValue=0.0, scaleType="UNIT_LOG_SCALE")), "params[0].minValue"),
    (spec(param(INTEGER, minValue=-1, scaleType="UNIT_REVERSE_LOG_SCALE")), "params[0].minValue"),
    (spec(param(CATEGORICAL, scaleType="UNIT_LINEAR_SCALE")), "params[0].scaleType"),
    (spec(param(DISCRETE, scaleType="UNIT_LOG_SCALE")), "params[0].scaleType"),
    # CATEGORICAL
    (spec(param(CATEGORICAL, categoricalValues=None)), "params[0].categoricalValues"),
    (spec(param(CATEGORICAL, categoricalValues=[])), "params[0].categoricalValues"),
    (spec(param(CATEGORICAL, categoricalValues=["a", "b", "a"])), "params[0].categoricalValues"),
    (spec(param(CATEGORICAL, categoricalValues=["a", 1])), "params[0].categoricalValues[1]"),
    (spec(param(CATEGORICAL, categoricalValues=[str(i) for i in range(1001)])), "params[0].categoricalValues"),
    (spec(param(CATEGORICAL, minValue=0.0)), "params[0].minValue"),
    (spec(param(CATEGORICAL, discreteValues=[1])), "params[0].discreteValues"),
    # DISCRETE
    (spec(param(DISCRETE, discreteValues=None)), "params[0].discreteValues"),
    (spec(param(DISCRETE, discreteValues=[])), "params[0].discreteValues"),
    (spec(param(DISCRETE, discreteValues=[1, 1, 2])), "params[0].discreteValues"),
    (spec(param(DISCRETE, discreteValues=[1, 3, 2])), "params[0].discreteValues"),
    (spec(param(DISCRETE, discreteValues=[1, "x"])), "params[0].discreteValues[1]"),
    (spec(param(DISCRETE, discreteValues=list(range(1001)))), "params[0].discreteValues"),
    (spec(param(DISCRETE, maxValue=5.0)), "params[0].maxValue"),
    (spec(param(DISCRETE, categoricalValues=["a"])), "params[0].categoricalValues"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_each_rule_of_the_spec_is_a_400_naming_the_field(env, hyperparameters, field):
    refused(env, hyperparameters, field)


def test_hyperparameters_may_not_be_null_or_a_list(env):
    for value in (None, [spec()]):
        message = assert_v1_error(env.submit(hyperparameters=value), 400, "INVALID_ARGUMENT")
        assert message.startswith(f"{FIELD}: ")
    assert env.started == []


def test_errors_of_several_parameters_are_all_named(env):
    message = refused(env, spec(param(DOUBLE, minValue=5.0), param(CATEGORICAL, categoricalValues=[])),
                      "params[0].minValue")
    assert f"{FIELD}.params[1].categoricalValues: " in message


def test_the_openapi_document_shows_trials_as_int32_and_the_rules(env):
    schemas = env.client.get("/v1/openapi.json").get_json()["components"]["schemas"]
    hyperparameters = schemas["HyperparameterSpec"]
    assert hyperparameters["required"] == ["params"]
    assert hyperparameters["properties"]["maxTrials"]["type"] == "integer"
    assert hyperparameters["properties"]["maxTrials"]["format"] == "int32"
    assert set(schemas["ParameterSpec"]["required"]) == {"parameterName", "type"}


# ---- resumePreviousJobId --------------------------------------------------------------------------------


def old_job(env: Env, job_id: str, state: JobState, project: str = "p", **training_input: Any) -> Job:
    job = env.store.create_job(Job(project=project, job_id=job_id, state="QUEUED", step="PROVISIONING",
                                   framework="TENSORFLOW", labels={},
                                   training_input={"packageUris": ["store://p/x"], "pythonModule": "t.task",
                                                   **training_input}))
    if state != JobState.QUEUED:
        assert env.store.transition(job.id, [JobState.QUEUED], state)
    return job


def test_a_finished_tuning_job_of_the_same_goal_and_parameters_can_be_resumed(env):
    old_job(env, "study_1", JobState.FAILED, hyperparameters=spec(DOUBLE, CATEGORICAL, goal="GOAL_TYPE_UNSPECIFIED"))
    resumed = spec(param(CATEGORICAL, categoricalValues=["adam"]), param(DOUBLE, maxValue=0.5),
                   goal="MAXIMIZE", resumePreviousJobId="study_1", maxTrials=50)
    response = env.submit(hyperparameters=resumed)
    assert response.status_code == 200, response.get_json()
    assert env.job("job_1").training_input["hyperparameters"]["resumePreviousJobId"] == "study_1"


@pytest.mark.parametrize("previous, fragment", [
    (None, "projects/p/jobs/study_1 not found"),
    ({"state": JobState.SUCCEEDED}, "job study_1 was not a hyperparameter tuning job"),
    ({"state": JobState.QUEUED, "hyperparameters": spec(DOUBLE)}, "job study_1 is QUEUED; only a finished"),
    ({"state": JobState.CANCELLING, "hyperparameters": spec(DOUBLE)}, "job study_1 is CANCELLING"),
    ({"state": JobState.SUCCEEDED, "hyperparameters": spec(DOUBLE, goal="MINIMIZE")},
     "its goal was MINIMIZE, this job's is MAXIMIZE"),
    ({"state": JobState.SUCCEEDED, "hyperparameters": spec(param(DOUBLE, parameterName="rate"))},
     "its parameters were rate DOUBLE; this job's are lr DOUBLE"),
    ({"state": JobState.SUCCEEDED, "hyperparameters": spec(DOUBLE, INTEGER)},
     "its parameters were lr DOUBLE, n INTEGER; this job's are lr DOUBLE"),
    ({"state": JobState.SUCCEEDED, "hyperparameters": spec(param(DOUBLE, type="DISCRETE", minValue=None,
                                                                 maxValue=None, discreteValues=[1, 2]))},
     "its parameters were lr DISCRETE; this job's are lr DOUBLE"),
])
def test_resume_needs_a_finished_tuning_job_of_the_same_goal_and_parameters(env, previous, fragment):
    if previous is not None:
        state = previous.pop("state")
        old_job(env, "study_1", state, **previous)
    message = refused(env, spec(DOUBLE, resumePreviousJobId="study_1"), "resumePreviousJobId")
    assert fragment in message, message


def test_resume_only_looks_in_the_jobs_own_project(env):
    old_job(env, "study_1", JobState.SUCCEEDED, project="q", hyperparameters=spec(DOUBLE))
    message = refused(env, spec(DOUBLE, resumePreviousJobId="study_1"), "resumePreviousJobId")
    assert "projects/p/jobs/study_1 not found" in message


# ---- quotas: one topology per parallel trial ------------------------------------------------------------


@pytest.mark.parametrize("hyperparameters, slots", [
    (None, 1),
    ({}, 1),
    (spec(), 1),
    (spec(maxTrials=10, maxParallelTrials=3), 3),
    (spec(maxTrials=2, maxParallelTrials=5), 2),
    (spec(maxParallelTrials=5), 1),  # maxTrials defaults to 1
    ({"params": [DOUBLE], "maxTrials": "8", "maxParallelTrials": "4"}, 4),  # a row stored without the API
    ({"params": [DOUBLE], "maxTrials": 0, "maxParallelTrials": None}, 1),
])
def test_parallel_slots_is_the_trials_that_run_at_once(hyperparameters, slots):
    training_input = {} if hyperparameters is None else {"hyperparameters": hyperparameters}
    assert tuning.parallel_slots(training_input) == slots


def test_job_demand_counts_the_topology_once_per_parallel_trial():
    tuning_job = {**GPU_JOB, "hyperparameters": spec(maxTrials=10, maxParallelTrials=3)}
    assert quotas.job_demand(tuning_job, DEFAULT_MACHINE_TYPES) == quotas.Demand(jobs=1, nodes=6, gpus=15)
    assert quotas.job_demand(GPU_JOB, DEFAULT_MACHINE_TYPES) == quotas.Demand(jobs=1, nodes=2, gpus=5)


def test_a_tuning_job_over_the_quota_of_its_parallel_trials_is_refused(tmp_path, store):
    qenv = QuotaEnv(tmp_path, store, default_quota_gpus=10)
    message = assert_v1_error(qenv.submit("wide", **GPU_JOB, hyperparameters=spec(maxTrials=9, maxParallelTrials=3)),
                              429, "RESOURCE_EXHAUSTED")
    assert "gpus limit is 10" in message and "needs 15" in message and qenv.jobs_in_db() == 0
    assert qenv.submit("narrow", **GPU_JOB, hyperparameters=spec(maxTrials=9, maxParallelTrials=2)).status_code == 200
    assert qenv.quotas().get_json()["usage"] == {"gpus": 10, "nodes": 4, "jobs": 1, "replicas": 0}


# ---- the trial filter of logs and events ----------------------------------------------------------------


@pytest.fixture
def tuning_job(env: Env) -> Job:
    job = old_job(env, "study_1", JobState.QUEUED, hyperparameters=spec(maxTrials=40, maxParallelTrials=2))
    env.store.append_logs(job.id, [(0, "trial-3/chief-0", 0, b"trial 3 chief\n"),
                                   (0, "trial-3/worker-0", 0, b"trial 3 worker\n"),
                                   (0, "trial-30/chief-0", 0, b"trial 30 chief\n"),
                                   (0, "chief-0", 0, b"the job's own\n")])
    env.store.append_logs(job.id, [(0, "trial-3/chief-0", 14, b"more\n")])
    for node, message in (("trial-3", "Trial 3 started"), ("trial-3/chief-0", "chief up"),
                          ("trial-30", "Trial 30 started"), ("trial-3x", "not a trial's"), (None, "job event"),
                          ("trial-3/worker-0", "worker up")):
        env.store.add_event(job.id, "TRIAL", message, node=node)
    return job


def get(env: Env, path: str, **query: Any) -> Any:
    response = env.client.get(f"/v1/projects/p/jobs/study_1/{path}", headers=env.admin, query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def test_logs_of_a_trial_list_only_that_trials_nodes(env, tuning_job):
    logs = get(env, "logs", trial=3).get_json()["logs"]
    assert [(entry["node"], entry["text"]) for entry in logs] == [("trial-3/chief-0", "trial 3 chief\nmore\n"),
                                                                   ("trial-3/worker-0", "trial 3 worker\n")]
    assert get(env, "logs", trial=4).get_json()["logs"] == []
    assert len(get(env, "logs").get_json()["logs"]) == 4  # without trial: every log, the trials' included


def test_a_trials_node_reads_its_log_from_an_offset(env, tuning_job):
    logs = get(env, "logs", trial=3, node="chief-0", offset=14).get_json()["logs"]
    assert logs == [{"node": "trial-3/chief-0", "offset": 14, "nextOffset": 19, "text": "more\n"}]
    assert get(env, "logs", node="trial-3/chief-0").get_json()["logs"][0]["text"] == "trial 3 chief\nmore\n"


def test_following_a_trials_node_streams_its_log(env, tuning_job):
    env.store.transition(tuning_job.id, [JobState.QUEUED], JobState.CANCELLED)
    response = get(env, "logs", trial=30, node="chief-0", follow="true")
    assert response.mimetype == "text/plain" and response.get_data(as_text=True) == "trial 30 chief\n"


def test_events_of_a_trial_are_those_of_its_node_prefix(env, tuning_job):
    events = get(env, "events", trial=3).get_json()["events"]
    assert [(event["node"], event["message"]) for event in events] == [
        ("trial-3", "Trial 3 started"), ("trial-3/chief-0", "chief up"), ("trial-3/worker-0", "worker up")]
    after = get(env, "events", trial=3, after=events[0]["id"]).get_json()["events"]
    assert [event["message"] for event in after] == ["chief up", "worker up"]
    assert [event["message"] for event in get(env, "events", trial=30).get_json()["events"]] == ["Trial 30 started"]
    assert len(get(env, "events").get_json()["events"]) == 7  # "Job queued" and all six


@pytest.mark.parametrize("path, query", [
    ("logs", {"trial": 0}), ("logs", {"trial": -1}), ("logs", {"trial": "three"}), ("events", {"trial": 0}),
    ("events", {"trial": "1.5"}), ("logs", {"trial": 3, "follow": "true"}), ("logs", {"trial": 3, "offset": 4}),
])
def test_a_bad_trial_or_one_without_node_for_offset_and_follow_is_400(env, tuning_job, path, query):
    response = env.client.get(f"/v1/projects/p/jobs/study_1/{path}", headers=env.admin, query_string=query)
    message = assert_v1_error(response, 400, "INVALID_ARGUMENT")
    assert message.split(":")[0] in ("trial", "follow", "offset")

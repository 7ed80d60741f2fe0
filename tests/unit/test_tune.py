"""The tuning workflow's pure parts: values passed to trainers, grids, the metric file, the best trial."""

from __future__ import annotations

import json

import pytest

from cloudml_os.store import JobTrial
from cloudml_os.workflows import tune

SPEC = {"params": [
    {"parameterName": "lr", "type": "DOUBLE", "minValue": 0.001, "maxValue": 0.1, "scaleType": "UNIT_LOG_SCALE"},
    {"parameterName": "keep", "type": "DOUBLE", "minValue": 0.5, "maxValue": 1.0,
     "scaleType": "UNIT_REVERSE_LOG_SCALE"},
    {"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 4},
    {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]},
    {"parameterName": "batch", "type": "DISCRETE", "discreteValues": [16, 32, 0.5]},
]}


def test_values_reach_the_trainer_as_strings_of_their_type():
    values = tune.trial_values(SPEC, {"lr": 0.01, "keep": 0.5, "layers": 3, "optimizer": "sgd", "batch": 32.0})
    assert values == {"lr": "0.01", "keep": "1.0", "layers": "3", "optimizer": "sgd", "batch": "32"}
    assert tune.trial_values(SPEC, {"lr": 0.01, "keep": 0.9, "layers": 3, "optimizer": "sgd",
                                    "batch": 0.5})["batch"] == "0.5"


def test_reverse_log_scale_crowds_values_towards_the_maximum():
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    spec = {"params": [SPEC["params"][1]]}
    keep = [float(tune.trial_values(spec, study.ask(tune.distributions(spec)).params)["keep"]) for _ in range(400)]
    assert all(0.5 <= value <= 1.0 for value in keep)
    assert sum(value > 0.75 for value in keep) > sum(value < 0.75 for value in keep) * 1.2


def test_log_scale_is_an_optuna_log_distribution():
    distributions = tune.distributions(SPEC)
    assert distributions["lr"].log is True and distributions["layers"].log is False
    assert distributions["optimizer"].choices == ("adam", "sgd")


def test_grid_search_runs_at_most_the_grid_points():
    spec = {"algorithm": "GRID_SEARCH", "maxTrials": 100, "params": [SPEC["params"][2], SPEC["params"][3]]}
    assert tune.grid(spec) == {"layers": [1, 2, 3, 4], "optimizer": ["adam", "sgd"]}
    assert tune.total_trials(spec) == 8
    assert tune.total_trials({**spec, "maxTrials": 5}) == 5
    assert tune.total_trials({"params": SPEC["params"]}) == 1  # maxTrials defaults to 1


def test_the_metric_file_is_read_as_cloudml_hypertune_writes_it():
    lines = [json.dumps({"timestamp": 1.0, "trial": "2", "acc": "0.5", "global_step": "10", "checkpoint_path": ""},
                        sort_keys=True),
             "not json",
             json.dumps({"timestamp": 2.0, "trial": "2", "loss": "0.1", "global_step": "20"}),
             json.dumps({"timestamp": 3.0, "trial": "2", "acc": "0.75", "global_step": "0"})]
    assert tune.parse_metric_file("\n".join(lines), "acc") == [(10, 0.5), (0, 0.75)]
    assert tune.parse_metric_file("", "acc") == []


def _trial(trial_id: int, state: str, objective: float | None, stopped_early: bool = False) -> JobTrial:
    return JobTrial(trial_id=trial_id, state=state, objective=objective, stopped_early=stopped_early)


@pytest.mark.parametrize(("goal", "best"), [("MAXIMIZE", 2), ("MINIMIZE", 1), (None, 2)])
def test_the_best_trial_follows_the_goal_and_skips_failed_and_stopped_trials(goal, best):
    trials = [_trial(1, "SUCCEEDED", 0.2), _trial(2, "SUCCEEDED", 0.9), _trial(3, "FAILED", None),
              _trial(4, "SUCCEEDED", 5.0, stopped_early=True), _trial(5, "SUCCEEDED", -5.0, stopped_early=True),
              _trial(6, "RUNNING", None)]
    assert tune.best_trial({"goal": goal} if goal else {}, trials).trial_id == best
    assert tune.best_trial({}, [_trial(1, "FAILED", None)]) is None


def test_the_study_storage_keeps_optuna_apart_from_the_platforms_tables(tmp_path):
    storage = tune.study_storage(f"sqlite:///{tmp_path}/cloudml.sqlite")
    assert storage.url.endswith("cloudml-optuna.sqlite")
    assert (tmp_path / "cloudml-optuna.sqlite").exists() and not (tmp_path / "cloudml.sqlite").exists()

"""``store://`` words in a job's args: the paths trainers get, and the submissions refused (through the API)."""

from __future__ import annotations

import dataclasses

import pytest

from cloudml_os.app import create_app
from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.artifacts.trainer_args import StoreArgError, check_store_args, node_args, store_uri_in
from cloudml_os.cloud.base import node_store_root
from cloudml_os.config import load_settings
from cloudml_os.states import Step
from cloudml_os.workflows.train import run_step
from tests.unit.test_api import Env, FakeTensorFlow, assert_v1_error
from tests.unit.test_api import env as env  # a fixture, as are migrated_db and store
from tests.unit.test_api import migrated_db as migrated_db
from tests.unit.test_api import store as store
from tests.unit.test_train_workflow import FakeSession, RecordingDriver, deliver, submit
from tests.unit.test_train_workflow import world as training_world  # noqa: F401 (a fixture)


def test_store_uris_become_node_paths_whole_or_after_a_flag_with_wildcards_kept():
    args = ["--train-files", "store://p/data/train-*.csv", "--eval-files=store://p/data/eval-[0-9].csv",
            "store://p/models/", "-x=store://p/a b/ü.csv", "--epochs", "5"]
    assert node_args(args, "p", "/store") == [
        "--train-files", "/store/p/data/train-*.csv", "--eval-files=/store/p/data/eval-[0-9].csv",
        "/store/p/models/", "-x=/store/p/a b/ü.csv", "--epochs", "5"]


@pytest.mark.parametrize("arg", ["see store://q/x", "--note=a store://q/x", "xstore://q/x", "--flag", "",
                                 "store:/p/x", "STORE://p/x", "positional=store://q/x"])
def test_free_text_holding_store_is_passed_on_unchanged(arg):
    assert store_uri_in(arg) is None
    assert node_args([arg], "p", "/store") == [arg]
    assert node_args([arg], "p", None) == [arg]  # nothing to map: no store needed


@pytest.mark.parametrize(("args", "index", "message"), [
    (["--a", "store://q/data/x.csv"], 1, "'store://q/data/x.csv' is not in project p"),
    (["--files=store://other-project/x"], 0, "is not in project p"),
    (["store://p/../q/x"], 0, "is not a valid artifact URI"),
    (["store://p//x"], 0, "is not a valid artifact URI"),
    (["store://p"], 0, "is not a valid artifact URI"),
    (["--f=store://p/a,store://p/b"], 0, "is not a valid artifact URI; an argument holds one"),
    (["store://p/x\n"], 0, "is not a valid artifact URI"),
    (["store://P/x"], 0, "is not a valid artifact URI"),
])
def test_malformed_or_foreign_uris_are_refused_naming_their_index(args, index, message):
    with pytest.raises(StoreArgError, match=message) as caught:
        check_store_args(args, "p", "/store")
    assert caught.value.index == index
    with pytest.raises(StoreArgError):
        node_args(args, "p", "/store")


def test_a_store_uri_is_refused_where_nodes_do_not_see_the_store():
    with pytest.raises(StoreArgError, match="not mounted on this installation's nodes") as caught:
        node_args(["--epochs", "1", "--data=store://p/x"], "p", None)
    assert caught.value.index == 2


def test_the_driver_decides_whether_nodes_see_the_store(tmp_path):
    assert node_store_root(load_settings(environ={}, data_dir=tmp_path)) == "/store"
    assert node_store_root(load_settings(environ={}, data_dir=tmp_path, artifacts="swift")) is None
    assert node_store_root(load_settings(environ={}, data_dir=tmp_path, driver="openstack")) is None


# ---- at submission ---------------------------------------------------------------------------------------


def test_submission_keeps_own_store_args_as_written(env):
    args = ["--train-files", "store://p/data/train-*.csv"]
    response = env.submit(args=args)
    assert response.status_code == 200, response.get_json()
    assert env.job("job_1").training_input["args"] == args  # mapped at launch, not stored mapped


@pytest.mark.parametrize(("args", "message"), [
    (["--x", "store://other/data/a.csv"], "trainingInput.args[1]: 'store://other/data/a.csv' is not in project p"),
    (["--train-files=store://p/../other/a.csv"], "trainingInput.args[0]: 'store://p/../other/a.csv' is not a "
                                                 "valid artifact URI"),
])
def test_submission_with_a_foreign_or_malformed_store_arg_is_refused(env, args, message):
    response = env.submit(args=args)
    assert message in assert_v1_error(response, 400, "INVALID_ARGUMENT")
    assert env.store.find_job("p", "job_1") is None and env.started == []


@pytest.mark.parametrize("overrides", [{"driver": "openstack"}, {"artifacts": "swift"}])
def test_submission_with_a_store_arg_is_refused_where_nodes_do_not_see_the_store(tmp_path, store, overrides):
    elsewhere = Env(tmp_path, store)
    settings = load_settings(environ={}, data_dir=str(tmp_path), **overrides)
    elsewhere.app = create_app(settings, store=store, artifacts=LocalArtifactStore(elsewhere.artifacts_root),
                               frameworks={"TENSORFLOW": FakeTensorFlow()}, start_job=elsewhere.start_job)
    elsewhere.client = elsewhere.app.test_client()
    response = elsewhere.submit(args=["--epochs", "1", "store://p/data/a.csv"])
    message = assert_v1_error(response, 400, "INVALID_ARGUMENT")
    assert message.startswith("trainingInput.args[2]: 'store://p/data/a.csv': the store is not mounted on this "
                              "installation's nodes")
    assert elsewhere.submit(job_id="plain", args=["--epochs", "1"]).status_code == 200


# ---- at launch ---------------------------------------------------------------------------------------------

SPEC = {"goal": "MAXIMIZE", "hyperparameterMetricTag": "acc", "maxTrials": 1,
        "params": [{"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 4}]}


class MountingDriver(RecordingDriver):
    @classmethod
    def store_mount(cls, settings):
        return "/mnt/objects"


@pytest.fixture
def launched(training_world):  # noqa: F811
    """The training workflow's world with a driver whose nodes see the store, and the argv of every trainer."""
    ctx, _, exits, started, nodes = training_world
    argvs: list[list[str]] = []

    @dataclasses.dataclass
    class RecordingSession(FakeSession):
        def start_process(self, proc_dir, argv, *, env, cwd):
            argvs.append(list(argv))
            super().start_process(proc_dir, argv, env=env, cwd=cwd)

    ctx = dataclasses.replace(ctx, driver=MountingDriver(),
                              connect=lambda node, key: RecordingSession(node.name, exits, started, nodes))
    return ctx, argvs


def run_until_started(ctx, job_pk, argvs, limit=10):
    message = deliver(ctx, job_pk, Step.PROVISIONING)
    for _ in range(limit):
        if argvs or message is None:
            return
        message = run_step(ctx, job_pk, *message[:2])


def test_a_trainer_gets_its_store_args_as_paths_where_its_driver_mounts_the_store(launched):
    ctx, argvs = launched
    job_pk = submit(ctx, args=["--train-files", "store://p/data/*.csv", "--x=store://p/m/"])
    run_until_started(ctx, job_pk, argvs)
    [argv] = argvs
    assert argv[1:-1] == ["-m", "trainer.task", "--train-files", "/mnt/objects/p/data/*.csv", "--x=/mnt/objects/p/m/",
                          "--job-dir"]
    assert ctx.store.get_job(job_pk).training_input["args"][1] == "store://p/data/*.csv"  # the job keeps what was sent


def test_a_tuning_trial_gets_its_store_args_as_paths_before_its_hyperparameters(launched):
    ctx, argvs = launched
    run_until_started(ctx, submit(ctx, hyperparameters=SPEC, args=["--data", "store://p/d.csv"]), argvs)
    [argv] = argvs
    assert argv[argv.index("--data") + 1] == "/mnt/objects/p/d.csv"
    assert argv.index("--data") < next(i for i, word in enumerate(argv) if word.startswith("--layers="))


def test_a_store_arg_where_nodes_no_longer_see_the_store_fails_the_job_at_launch(training_world):  # noqa: F811
    ctx, _, _, started, _ = training_world  # its driver offers no store mount
    job_pk = submit(ctx, args=["--epochs", "1", "store://p/d.csv"])
    message = deliver(ctx, job_pk, Step.PROVISIONING)
    for _ in range(20):
        if message is None:
            break
        message = run_step(ctx, job_pk, *message[:2])
    job = ctx.store.get_job(job_pk)
    assert job.state == "FAILED" and started == []
    assert job.error_message.startswith("trainingInput.args[2]: 'store://p/d.csv': the store is not mounted")

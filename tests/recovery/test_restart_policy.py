"""The restart policy on its own: its reading and validation, the backoff, and the workflow's decisions.

The workflow runs here with the in-memory driver and node sessions of tests/unit/test_train_workflow.py,
so each rule is isolated; test_node_failures.py runs the same path for real.
"""

from __future__ import annotations

import time

import pytest
from marshmallow import ValidationError

from cloudml_os.api.schemas import TrainingInputSchema
from cloudml_os.cloud.base import NodeInfo
from cloudml_os.remote import CommandResult, RemoteError
from cloudml_os.states import Step
from cloudml_os.workflows import outputs
from cloudml_os.workflows.restart import RestartPolicy, backoff_seconds
from cloudml_os.workflows.train import output_sources, run_step
from tests.unit.test_train_workflow import FakeSession, RecordingDriver, deliver, drive, submit, world  # noqa: F401

BASE = {"packageUris": ["store://p/packages/t.tar.gz"], "pythonModule": "trainer.task"}


class ReplacingDriver(RecordingDriver):
    """Replaces a node in place, as the local driver does (same name, new host key)."""

    def __init__(self):
        super().__init__()
        self.replaced: list[str] = []

    def replace_node(self, spec, node):
        self.replaced.append(node)
        nodes = self.clusters[spec.name]
        index = next(i for i, info in enumerate(nodes) if info.name == node)
        old = nodes[index]
        nodes[index] = NodeInfo(old.name, old.task_type, old.task_index, old.address, old.ssh_port, old.username,
                                ("ssh-ed25519 BBBB",), old.port_first, old.port_last, old.workdir, old.runtime_root)
        return nodes[index]


class CheckpointingSession(FakeSession):
    """A node whose job directory holds a checkpoint file naming the node (as the output copy lists and
    reads it); what a restore puts onto nodes is recorded."""

    uploads: list[str] = []

    def run(self, argv, **kwargs):
        if argv[:2] == ["/bin/sh", "-c"] and "find . -type f" in argv[2]:  # the output copy's listing
            listing = f"now {time.time():.3f}\0f {len(self.node)} 1700000000.5 checkpoints/ckpt-2.index\0end 0\0"
            return CommandResult(0, listing, "")
        return super().run(argv, **kwargs)

    def get_file(self, remote_path, target, size):
        assert remote_path.endswith("/output/checkpoints/ckpt-2.index")
        target.write(self.node.encode())
        return len(self.node)

    def put_tree(self, local_dir, remote_dir):
        self.uploads.append(f"{self.node}:{(local_dir / 'checkpoints' / 'ckpt-2.index').read_text()}")


@pytest.fixture
def replacing(world):  # noqa: F811
    """The workflow with a driver that replaces nodes; nodes named in ``unreachable`` refuse connections
    until replaced (a replaced node has a new host key)."""
    ctx, _, exits, started, nodes = world
    ctx.driver = ReplacingDriver()
    unreachable: set[str] = set()
    CheckpointingSession.uploads = []

    def connect(node, key):
        if node.name in unreachable and node.host_keys == ["ssh-ed25519 AAAA"]:
            raise RemoteError(f"{node.name}: connection refused")
        return CheckpointingSession(node.name, exits, started, nodes)

    ctx.connect = connect
    return ctx, exits, started, unreachable


def until(ctx, job_pk, message, step: Step):
    """Deliver messages until the next one is for ``step``; return it."""
    for _ in range(50):
        if message[0] == step:
            return message
        message = run_step(ctx, job_pk, *message[:2])
    raise AssertionError(f"never reached {step}")


@pytest.mark.parametrize(("scheduling", "expected"), [
    ({}, RestartPolicy("NEVER", 3)),
    ({"restartPolicy": "ON_FAILURE"}, RestartPolicy("ON_FAILURE", 3)),
    ({"restartPolicy": "ON_FAILURE", "backoffLimit": 0}, RestartPolicy("ON_FAILURE", 0)),
])
def test_the_policy_defaults_to_never_with_a_backoff_limit_of_three(scheduling, expected):
    loaded = TrainingInputSchema().load({**BASE, "scheduling": scheduling})
    assert RestartPolicy.of(loaded) == expected


@pytest.mark.parametrize(("scheduling", "field", "words"), [
    ({"restartPolicy": "ALWAYS"}, "restartPolicy",
     "unknown restart policy 'ALWAYS'; valid policies: NEVER, ON_FAILURE"),
    ({"restartPolicy": "on_failure"}, "restartPolicy", "unknown restart policy"),
    ({"backoffLimit": -1}, "backoffLimit", "must be between 0 and 100"),
    ({"backoffLimit": 101}, "backoffLimit", "must be between 0 and 100"),
    ({"backoffLimit": "three"}, "backoffLimit", "Not a valid integer"),
])
def test_a_bad_policy_or_limit_is_refused_naming_the_field(scheduling, field, words):
    with pytest.raises(ValidationError) as refused:
        TrainingInputSchema().load({**BASE, "scheduling": scheduling})
    assert words in str(refused.value.messages["scheduling"][field])


def test_only_on_failure_restarts_and_only_below_the_limit():
    assert not RestartPolicy("NEVER", 3).allows_restart(0)
    assert RestartPolicy("ON_FAILURE", 2).allows_restart(1)
    assert not RestartPolicy("ON_FAILURE", 2).allows_restart(2)
    assert not RestartPolicy("ON_FAILURE", 0).allows_restart(0)


def test_the_backoff_doubles_from_its_base_up_to_six_minutes():
    assert [backoff_seconds(10, n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff_seconds(10, 9) == 360
    assert backoff_seconds(0, 5) == 0


def test_on_failure_restarts_every_trainer_after_a_failed_one_and_then_succeeds(replacing):
    ctx, exits, started, _ = replacing
    job_pk = submit(ctx, scaleTier="CUSTOM", masterType="standard", workerType="standard", workerCount=1,
                    scheduling={"restartPolicy": "ON_FAILURE"})
    message = until(ctx, job_pk, deliver(ctx, job_pk, Step.PROVISIONING), Step.TRAINING)
    exits["worker-0"] = 1
    message = until(ctx, job_pk, message, Step.RESTARTING)
    assert ctx.store.get_job(job_pk).restart_count == 1
    first = run_step(ctx, job_pk, *message[:2])
    assert first[:2] == (Step.RESTARTING, 1)  # the backoff: the same step again, later
    assert first[2] == ctx.settings.restart_backoff_seconds
    exits.clear()
    message = until(ctx, job_pk, run_step(ctx, job_pk, *first[:2]), Step.TRAINING)
    assert sorted(started) == ["chief-0", "chief-0", "worker-0", "worker-0"]
    nodes = ctx.store.cluster_of(job_pk).nodes
    assert {node.attempt for node in nodes} == {1}
    # The chief's job directory was copied to the store before the restart and put onto every node.
    assert sorted(CheckpointingSession.uploads) == ["chief-0:chief-0", "worker-0:chief-0"]
    assert (ctx.settings.artifacts_root / "p" / "jobs" / "j" / "checkpoints" / "ckpt-2.index").read_text() == "chief-0"
    exits.update({"chief-0": 0, "worker-0": 0})
    drive(ctx, job_pk, message)
    job = ctx.store.get_job(job_pk)
    assert (job.state, job.restart_count) == ("SUCCEEDED", 1)
    assert ctx.driver.replaced == []  # a failed trainer is restarted; its node answered, so it stays


def test_an_unreachable_node_is_replaced_before_the_restart(replacing):
    ctx, exits, _, unreachable = replacing
    job_pk = submit(ctx, scaleTier="CUSTOM", masterType="standard", workerType="standard", workerCount=1,
                    scheduling={"restartPolicy": "ON_FAILURE"})
    message = until(ctx, job_pk, deliver(ctx, job_pk, Step.PROVISIONING), Step.TRAINING)
    unreachable.add("worker-0")
    message = until(ctx, job_pk, run_step(ctx, job_pk, *message[:2]), Step.TRAINING)
    assert ctx.driver.replaced == ["worker-0"]
    assert ctx.store.get_job(job_pk).restart_count == 1
    events = [event.message for event in ctx.store.events(job_pk)]
    assert any(m.startswith("Node worker-0 is unreachable: worker-0: connection refused") for m in events)
    exits.update({"chief-0": 0, "worker-0": 0})
    drive(ctx, job_pk, message)
    assert ctx.store.get_job(job_pk).state == "SUCCEEDED"


def test_a_lost_chiefs_last_synced_job_directory_is_restored_onto_its_replacement(replacing):
    ctx, exits, _, unreachable = replacing
    job_pk = submit(ctx, scaleTier="CUSTOM", masterType="standard", workerType="standard", workerCount=1,
                    scheduling={"restartPolicy": "ON_FAILURE"})
    message = until(ctx, job_pk, deliver(ctx, job_pk, Step.PROVISIONING), Step.TRAINING)
    job, cluster = ctx.store.get_job(job_pk), ctx.store.cluster_of(job_pk)
    outputs.final_sync(ctx, job, cluster, output_sources(ctx, job, cluster))  # a round of the watch's copier
    unreachable.add("chief-0")
    message = until(ctx, job_pk, run_step(ctx, job_pk, *message[:2]), Step.TRAINING)
    assert ctx.driver.replaced == ["chief-0"]
    assert sorted(CheckpointingSession.uploads) == ["chief-0:chief-0", "worker-0:chief-0"]
    events = [event.message for event in ctx.store.events(job_pk)]
    assert any(m.startswith("Job directory restored from store://p/jobs/j/ (1 file(s), as copied at ") and
               m.endswith(") onto 2 node(s)") for m in events), events
    exits.update({"chief-0": 0, "worker-0": 0})
    drive(ctx, job_pk, message)
    assert ctx.store.get_job(job_pk).state == "SUCCEEDED"


def test_never_fails_at_once_naming_the_unreachable_node(replacing):
    ctx, _, _, unreachable = replacing
    job_pk = submit(ctx, scaleTier="CUSTOM", masterType="standard", workerType="standard", workerCount=1)
    message = until(ctx, job_pk, deliver(ctx, job_pk, Step.PROVISIONING), Step.TRAINING)
    unreachable.add("worker-0")
    drive(ctx, job_pk, message)
    job = ctx.store.get_job(job_pk)
    assert job.state == "FAILED"
    assert job.error_message.startswith("Node worker-0 stopped answering")
    assert (job.restart_count, ctx.driver.replaced) == (0, [])


def test_a_limit_of_zero_fails_the_first_failure_saying_the_limit_is_reached(replacing):
    ctx, exits, _, _ = replacing
    job_pk = submit(ctx, scheduling={"restartPolicy": "ON_FAILURE", "backoffLimit": 0})
    message = until(ctx, job_pk, deliver(ctx, job_pk, Step.PROVISIONING), Step.TRAINING)
    exits["chief-0"] = 2
    drive(ctx, job_pk, message)
    job = ctx.store.get_job(job_pk)
    assert job.state == "FAILED"
    assert job.error_message.startswith("Job failed after 0 restart(s): scheduling.backoffLimit (0) is reached")
    assert "chief-0" in job.error_message


def test_recovery_settings_are_read_from_the_environment_and_checked(tmp_path):
    from cloudml_os.config import ConfigError, load_settings

    environ = {"CLOUDML_OS_LOCAL_NETWORK_ISOLATION": "false", "CLOUDML_OS_NODE_UNREACHABLE_SECONDS": "12"}
    settings = load_settings(environ=environ, data_dir=tmp_path)
    assert (settings.local_network_isolation, settings.node_unreachable_seconds) == (False, 12.0)
    isolated = load_settings(environ={"CLOUDML_OS_LOCAL_NETWORK_ISOLATION": "true"}, data_dir=tmp_path)
    assert isolated.local_network_isolation is True
    for bad, words in [({"local_network_isolation": "maybe"}, "local_network_isolation"),
                       ({"local_network_subnet": "10.232.0.0/33"}, "local_network_subnet"),
                       ({"local_network_bridge": "a-bridge-name-too-long"}, "local_network_bridge"),
                       ({"node_unreachable_seconds": 0}, "node_unreachable_seconds")]:
        with pytest.raises(ConfigError, match=words):
            load_settings(environ={}, data_dir=tmp_path, **bad)

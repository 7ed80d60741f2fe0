"""The training workflow's delivery rules, with an in-memory driver and node sessions.

The same steps run for real in tests/integration; here each rule is isolated: duplicates do nothing,
a cancel wins over any step, every failure still deletes the cluster.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import pytest

from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.cloud.base import Driver, DriverError, NodeInfo
from cloudml_os.config import load_settings
from cloudml_os.frameworks.tensorflow import TensorFlow
from cloudml_os.remote import ProcessStatus, RemoteError
from cloudml_os.states import JobState, Step
from cloudml_os.store import Job, Package, Store, migrate
from cloudml_os.workflows.train import TrainingContext, run_step


class RecordingDriver(Driver):
    name = "memory"

    def __init__(self, fail_create: bool = False):
        self.clusters: dict[str, list[NodeInfo]] = {}
        self.creates: list[str] = []
        self.deletes: list[str] = []
        self.fail_create = fail_create

    def create_cluster(self, spec):
        self.creates.append(spec.name)
        if self.fail_create:
            raise DriverError("no capacity for flavor m1.medium")
        self.clusters.setdefault(spec.name, [
            NodeInfo(n.name, n.task_type, n.task_index, f"127.9.0.{i + 1}", 22, "root", ("ssh-ed25519 AAAA",),
                     30000 + 10 * i, 30009 + 10 * i, f"/nodes/{n.name}", "/runtimes")
            for i, n in enumerate(spec.nodes)])
        return self.clusters[spec.name]

    def resize_cluster(self, spec):
        raise NotImplementedError("training never resizes a cluster")

    def replace_node(self, spec, node):
        raise NotImplementedError("training never replaces a node")

    def delete_cluster(self, name):
        self.deletes.append(name)
        self.clusters.pop(name, None)

    def list_clusters(self):
        return list(self.clusters)


@dataclasses.dataclass
class FakeFollower:
    """A node's log stream: the chunks the test queued for the node, ending when its process exits
    (or when the test cuts it: ``cut`` holds nodes whose next poll ends the stream)."""

    session: FakeSession

    def poll(self):
        node, world = self.session.node, self.session.world
        data = b"".join(world.queued.pop(node, []))
        world.logs[node] = world.logs.get(node, b"") + data
        ended = self.session.exits.get(node) is not None or node in world.cut
        world.cut.discard(node)
        return data, ended

    def fileno(self):
        """Never readable: the watch looks at the fake streams whenever something falls due."""
        return _NEVER_READABLE

    def close(self):
        pass


_NEVER_READABLE, _WRITE_END = os.pipe()  # nothing is ever written


@dataclasses.dataclass
class FakeNodes:
    """What the test's nodes hold beyond exit codes: each node's log, and chunks queued for its stream."""

    logs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    queued: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    follows: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (node, offset) per stream opened
    cut: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class FakeSession:
    """A node as the workflow sees it: processes that exit when the test says so."""

    node: str
    exits: dict[str, int | None]
    started: list[str]
    world: FakeNodes = dataclasses.field(default_factory=FakeNodes)
    fail: bool = False

    def __enter__(self):
        if self.fail:
            raise RemoteError(f"{self.node}: connection refused")
        return self

    def __exit__(self, *exc):
        return False

    def run(self, argv, **kwargs):
        return type("Result", (), {"exit_code": 0 if argv[0] != "test" or "bootstrap.done" not in argv[-1]
                                   else 1, "stdout": "", "stderr": ""})()

    def close(self):
        pass

    def put(self, data, remote_path, mode=0o644):
        pass

    def start_process(self, proc_dir, argv, *, env, cwd):
        self.started.append(self.node)
        self.exits.setdefault(self.node, None)

    def process_status(self, proc_dir):
        code = self.exits.get(self.node)
        return ProcessStatus(running=code is None, exit_code=code, lost=False)

    def follow(self, proc_dir, offset, check_every):
        self.world.follows.append((self.node, offset))
        return FakeFollower(self)

    def stop_process(self, proc_dir, grace):
        self.exits[self.node] = self.exits.get(self.node) if self.exits.get(self.node) is not None else 143

    def read_file(self, path, offset, limit):
        return self.world.logs.get(self.node, b"")[offset:offset + limit] if path.endswith("output.log") else b""

    def find(self, remote_dir, name):
        return []


@pytest.fixture
def world(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    migrate(url)
    store = Store(url)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    (tmp_path / "artifacts" / "p" / "packages").mkdir(parents=True)
    (tmp_path / "artifacts" / "p" / "packages" / "t.tar.gz").write_bytes(b"x")
    store.add(Package(project="p", uri="store://p/packages/t.tar.gz", filename="t.tar.gz", kind="archive",
                      sha256="0" * 64, size=1))
    exits: dict[str, int | None] = {}
    started: list[str] = []
    nodes = FakeNodes()
    driver = RecordingDriver()
    ctx = TrainingContext(
        settings=load_settings(environ={}, data_dir=tmp_path, watch_window=0, watch_interval=0.01),
        store=store, driver=driver, artifacts=artifacts,
        frameworks={"TENSORFLOW": TensorFlow()},
        connect=lambda node, key: FakeSession(node.name, exits, started, nodes),
    )
    return ctx, driver, exits, started, nodes


def submit(ctx: TrainingContext, **training_input) -> int:
    job = ctx.store.create_job(Job(
        project="p", job_id="j", state="QUEUED", step="PROVISIONING", framework="TENSORFLOW",
        training_input={"scaleTier": "BASIC", "packageUris": ["store://p/packages/t.tar.gz"],
                        "pythonModule": "trainer.task", **training_input}))
    return job.id


def deliver(ctx, job_pk, step: Step, seq: int = 0):
    return run_step(ctx, job_pk, step, seq)


def drive(ctx, job_pk, message, limit=50):
    """Deliver messages the way the task layer does, until none is left."""
    for _ in range(limit):
        if message is None:
            return
        step, seq, _delay = message
        message = run_step(ctx, job_pk, step, seq)
    raise AssertionError("the workflow did not settle")


def test_a_job_runs_through_every_step_and_deletes_its_cluster(world):
    ctx, driver, exits, started, _ = world
    job_pk = submit(ctx)
    message = deliver(ctx, job_pk, Step.PROVISIONING)
    for _ in range(3):
        message = run_step(ctx, job_pk, *message[:2])
    assert message[0] == Step.TRAINING
    assert started == ["chief-0"]
    exits["chief-0"] = 0
    drive(ctx, job_pk, message)
    job = ctx.store.get_job(job_pk)
    assert (job.state, job.step) == ("SUCCEEDED", "DONE")
    assert len(driver.creates) == 1
    assert driver.deletes == driver.creates


def test_a_duplicate_delivery_of_a_finished_step_does_nothing(world):
    ctx, driver, _, _, _ = world
    job_pk = submit(ctx)
    first = deliver(ctx, job_pk, Step.PROVISIONING)
    assert first == (Step.BOOTSTRAPPING, 0, 0.0)
    assert deliver(ctx, job_pk, Step.PROVISIONING) is None
    assert len(driver.creates) == 1


def test_a_stale_poll_dies_out_instead_of_doubling(world):
    ctx, _, _, _, _ = world
    job_pk = submit(ctx)
    message = deliver(ctx, job_pk, Step.PROVISIONING)
    while message[0] != Step.TRAINING:
        message = run_step(ctx, job_pk, *message[:2])
    again = run_step(ctx, job_pk, *message[:2])
    assert again[:2] == (Step.TRAINING, 1)
    assert run_step(ctx, job_pk, *message[:2]) is None  # the same poll delivered twice


def test_a_cancel_wins_over_the_next_step_and_still_tears_down(world):
    ctx, driver, _, _, _ = world
    job_pk = submit(ctx)
    message = deliver(ctx, job_pk, Step.PROVISIONING)
    assert ctx.store.transition(job_pk, [JobState.PREPARING], JobState.CANCELLING)
    drive(ctx, job_pk, message)
    assert ctx.store.get_job(job_pk).state == "CANCELLED"
    assert len(driver.deletes) == 1


def test_cancelling_a_queued_job_creates_nothing(world):
    ctx, driver, _, _, _ = world
    job_pk = submit(ctx)
    assert ctx.store.transition(job_pk, [JobState.QUEUED], JobState.CANCELLED)
    assert deliver(ctx, job_pk, Step.PROVISIONING) is None
    assert driver.creates == []


def test_a_driver_failure_fails_the_job_with_its_message(world):
    ctx, driver, _, _, _ = world
    driver.fail_create = True
    job_pk = submit(ctx)
    drive(ctx, job_pk, deliver(ctx, job_pk, Step.PROVISIONING))
    job = ctx.store.get_job(job_pk)
    assert job.state == "FAILED"
    assert "no capacity" in job.error_message
    assert len(driver.deletes) == 1  # whatever half-exists is deleted


def test_a_worker_exit_code_fails_the_job_and_names_the_node(world):
    ctx, driver, exits, _, _ = world
    job_pk = submit(ctx, scaleTier="CUSTOM", masterType="standard", workerType="standard", workerCount=1)
    message = deliver(ctx, job_pk, Step.PROVISIONING)
    while message[0] != Step.TRAINING:
        message = run_step(ctx, job_pk, *message[:2])
    exits["worker-0"] = 3
    drive(ctx, job_pk, message)
    job = ctx.store.get_job(job_pk)
    assert job.state == "FAILED"
    assert "worker-0" in job.error_message
    assert len(driver.deletes) == 1


def test_max_running_time_fails_a_job_that_runs_too_long(world):
    ctx, driver, _, _, _ = world
    job_pk = submit(ctx, scheduling={"maxRunningTime": "0.000001s"})
    drive(ctx, job_pk, deliver(ctx, job_pk, Step.PROVISIONING))
    job = ctx.store.get_job(job_pk)
    assert job.state == "FAILED"
    assert "maxRunningTime" in job.error_message


def _until_training(ctx, job_pk):
    """Deliver the steps before TRAINING; returns TRAINING's message."""
    message = deliver(ctx, job_pk, Step.PROVISIONING)
    while message[0] != Step.TRAINING:
        message = run_step(ctx, job_pk, message[0], message[1])
    return message


def test_a_worker_shutting_down_ends_its_polling_window_at_once(world):
    ctx, _, exits, _, _ = world
    ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, watch_window=3600))
    job_pk = submit(ctx)
    step, seq, _ = _until_training(ctx, job_pk)
    handed_over = []
    polling = threading.Thread(target=lambda: handed_over.append(run_step(ctx, job_pk, step, seq)), daemon=True)
    polling.start()
    polling.join(0.5)
    assert polling.is_alive()  # the window is an hour long: still polling
    ctx.stopping.set()  # what the worker's shutdown signal does
    polling.join(10)
    assert not polling.is_alive()
    assert handed_over[0][0] == Step.TRAINING  # handed over to the next delivery; the trainers run on
    assert ctx.store.get_job(job_pk).state == "RUNNING" and set(exits.values()) == {None}


def test_the_streamed_log_is_stored_in_order_and_a_new_window_resumes_where_the_last_stopped(world):
    ctx, _, exits, _, nodes = world
    ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, watch_window=0.05))
    job_pk = submit(ctx)
    message = _until_training(ctx, job_pk)
    nodes.queued["chief-0"] = [b"epoch 1\n", b"epoch 2\n"]
    message = run_step(ctx, job_pk, *message[:2])
    assert message[0] == Step.TRAINING  # the window ended, the trainer runs on
    nodes.queued["chief-0"] = [b"epoch 3\n"]
    exits["chief-0"] = 0
    drive(ctx, job_pk, message)
    assert ctx.store.read_log(job_pk, "chief-0", 0, 1 << 20)[0] == b"epoch 1\nepoch 2\nepoch 3\n"
    assert nodes.follows[:2] == [("chief-0", 0), ("chief-0", len(b"epoch 1\nepoch 2\n"))]
    assert ctx.store.get_job(job_pk).state == "SUCCEEDED"


def test_a_stream_that_ends_while_its_trainer_runs_is_followed_again(world):
    ctx, _, exits, _, nodes = world
    ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, watch_window=1.5))
    job_pk = submit(ctx)
    message = _until_training(ctx, job_pk)
    nodes.cut.add("chief-0")  # its tail died; the status command says the trainer still runs
    assert run_step(ctx, job_pk, *message[:2])[0] == Step.TRAINING
    assert [node for node, _ in nodes.follows] == ["chief-0", "chief-0"]
    assert ctx.store.get_job(job_pk).state == "RUNNING" and exits["chief-0"] is None


def test_several_nodes_log_lines_are_stored_in_one_call_and_a_repeated_call_stores_nothing_twice(world):
    ctx, _, _, _, _ = world
    job_pk = submit(ctx, scaleTier="CUSTOM", masterType="standard", workerType="standard", workerCount=1)
    _until_training(ctx, job_pk)
    first, second = ctx.store.cluster_of(job_pk).nodes
    chunks = [(first.id, first.name, 0, b"chief line\n"), (second.id, second.name, 0, b"worker line\n")]
    ctx.store.append_logs(job_pk, chunks)
    ctx.store.append_logs(job_pk, chunks)  # a watch re-delivered after a crash stores the same bytes again
    assert ctx.store.read_log(job_pk, first.name) == (b"chief line\n", 11)
    assert ctx.store.read_log(job_pk, second.name) == (b"worker line\n", 12)
    offsets = {node.name: node.log_offset for node in ctx.store.cluster_of(job_pk).nodes}
    assert offsets == {first.name: 11, second.name: 12}


class CancelDuringTeardown:
    """``ctx.store`` for one job, with the API's cancel (RUNNING → CANCELLING) landing just before the
    ``at``-th store call that teardown makes once the cluster is deleted: each value of ``at`` is one
    moment between teardown's reads and writes (and, past their number, a cancel after the job ended)."""

    def __init__(self, store: Store, driver: RecordingDriver, job_pk: int, at: int):
        self._store, self._driver, self._job_pk, self._at = store, driver, job_pk, at
        self.calls = 0
        self.cancelled: bool | None = None  # whether the cancel moved the job, once it was sent

    def __getattr__(self, name):
        attribute = getattr(self._store, name)
        if not callable(attribute) or name in ("now", "session"):
            return attribute

        def call(*args, **kwargs):
            if self._driver.deletes:  # the cluster is deleted: teardown's ending runs
                if self.calls == self._at:
                    self.cancelled = self._store.transition(self._job_pk, [JobState.PREPARING, JobState.RUNNING],
                                                            JobState.CANCELLING)
                self.calls += 1
            return attribute(*args, **kwargs)

        return call


@pytest.mark.parametrize("at", range(12))
def test_a_cancel_landing_at_any_moment_of_teardown_ends_the_job_cancelled_or_in_its_outcome(world, at):
    ctx, driver, exits, _, _ = world
    job_pk = submit(ctx)
    message = _until_training(ctx, job_pk)
    exits["chief-0"] = 0
    store = CancelDuringTeardown(ctx.store, driver, job_pk, at)
    drive(dataclasses.replace(ctx, store=store), job_pk, message)
    job = ctx.store.get_job(job_pk)
    assert job.step == "DONE"
    assert job.state == ("CANCELLED" if store.cancelled else "SUCCEEDED"), (store.calls, store.cancelled)
    assert job.end_time is not None
    assert [e.message for e in ctx.store.events(job_pk) if e.kind == "STATE"][-1] == f"Job {job.state}"

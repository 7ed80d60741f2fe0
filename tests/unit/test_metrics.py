"""A job's metric curves (cloudml_os.metrics, GET …/jobs/{job}/metrics): the TensorBoard event files in the job's
directory in the store (TF2 scalar tensors and TF1 simple values, one curve per node and tag, other summaries
ignored), copied there while the job runs, else metrics read from its log lines.

The event files are written with TensorBoard's own writer (the format TensorFlow writes; a real TensorFlow
trainer's files are read in tests/browser/test_dashboard.py).
"""

from __future__ import annotations

import io

import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.metrics import metric_points
from cloudml_os.metrics import tensorboard_scalars as read_scalars
from cloudml_os.store import Job
from tests.unit.test_api import Env
from tests.unit.test_api import migrated_db as migrated_db  # a fixture, as is store
from tests.unit.test_api import store as store

SCALARS = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
IMAGES = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"))


def write_events(folder, values: list[tuple[int, summary_pb2.Summary.Value]]) -> None:
    writer = EventFileWriter(str(folder))
    for step, value in values:
        writer.add_event(event_pb2.Event(step=step, wall_time=1.0, summary=summary_pb2.Summary(value=[value])))
    writer.close()


def tensor_value(tag: str, number, metadata=SCALARS) -> summary_pb2.Summary.Value:
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor_util.make_tensor_proto(number))


def test_scalars_of_every_node_are_read_by_step(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    job_dir = store.root / "team-a" / "jobs" / "j1" / "tensorboard"
    write_events(job_dir / "chief-0" / "tensorboard", [
        (128, tensor_value("loss", 0.5)), (64, tensor_value("loss", 1.5)),
        (64, tensor_value("picture", [[0.1, 0.2]], IMAGES)),  # not a scalar: ignored
        (64, tensor_value("text", "hello", summary_pb2.SummaryMetadata()))])  # not a number: ignored
    write_events(job_dir / "worker-0" / "train", [
        (10, summary_pb2.Summary.Value(tag="accuracy", simple_value=0.25))])  # a TF1 summary
    assert read_scalars(store, "store://team-a/jobs/j1") == {
        "chief-0: loss": [{"x": 64.0, "y": 1.5}, {"x": 128.0, "y": 0.5}],
        "worker-0: accuracy": [{"x": 10.0, "y": 0.25}]}


def test_a_job_without_event_files_has_no_curves(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    assert read_scalars(store, "store://team-a/jobs/none") == {}
    store.put_file("team-a", "jobs/logs-only/logs/chief-0.log", io.BytesIO(b"epoch 1/1 step 1 loss 0.5\n"))
    assert read_scalars(store, "store://team-a/jobs/logs-only") == {}


def test_metric_points_come_from_step_and_value_log_lines_or_json_lines():
    assert metric_points("2026-12-02 trainer INFO epoch 2/3 step 128 loss 0.010196") == [("loss", 128.0, 0.010196)]
    assert metric_points('{"metric": "accuracy", "value": 0.5, "step": 7}') == [("accuracy", 7.0, 0.5)]
    assert metric_points("step 3 loss 1.5e-3 acc=0.75 count 4") == [("loss", 3.0, 0.0015), ("acc", 3.0, 0.75)]
    assert metric_points("no step here, loss 0.1") == []
    assert metric_points('{"metric": "broken"}') == []


@pytest.fixture
def env(tmp_path, store) -> Env:  # noqa: F811  (store is the fixture above)
    return Env(tmp_path, store)


def _job_with_log(env: Env, job_id: str, state: str, log: bytes) -> Job:
    job = env.store.create_job(Job(project="p", job_id=job_id, state=state, step="TRAINING", framework="TENSORFLOW",
                                   training_input={"scaleTier": "BASIC", "pythonModule": "trainer.task",
                                                   "packageUris": ["x"]}, labels={}))
    env.store.append_logs(job.id, [(None, "chief-0", 0, log)])
    return job


def test_the_api_gives_curves_from_the_log_lines_of_trainers_that_wrote_no_summaries(env):
    _job_with_log(env, "running", "RUNNING", b"epoch 1/2 step 8 loss 0.5\nepoch 2/2 step 16 loss 0.25\n")
    response = env.client.get("/v1/projects/p/jobs/running/metrics", headers=env.admin)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"source": "logs", "series": {
        "chief-0: loss": [{"x": 8.0, "y": 0.5}, {"x": 16.0, "y": 0.25}]}}


@pytest.mark.parametrize("state", ["RUNNING", "SUCCEEDED"])
def test_the_api_prefers_the_tensorboard_scalars_in_the_store_while_the_job_runs_and_after(env, state):
    _job_with_log(env, "summaries", state, b"epoch 1/1 step 8 loss 0.5\n")
    write_events(env.artifacts_root / "p" / "jobs" / "summaries" / "tensorboard" / "chief-0",
                 [(8, tensor_value("loss", 0.5))])
    response = env.client.get("/v1/projects/p/jobs/summaries/metrics", headers=env.headers("p", "viewer"))
    assert response.get_json() == {"source": "tensorboard", "series": {"chief-0: loss": [{"x": 8.0, "y": 0.5}]}}
    other = env.client.get("/v1/projects/p/jobs/summaries/metrics", headers=env.headers("q", "admin"))
    assert other.status_code == 404

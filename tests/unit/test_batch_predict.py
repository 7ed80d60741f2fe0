"""Batch prediction's planning and its node-side runner, without nodes: shards cover every record once."""

from __future__ import annotations

import gzip
import json
import random
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cloudml_os.artifacts import pattern_regex
from cloudml_os.workflows.batch_predict import SHARD_MIN_BYTES, errors_name, plan_shards, results_name

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cloudml_os" / "serving" / "runtime"))
import batch_predict  # noqa: E402  (the runner, as the node imports it: beside model_server.py)
import model_server  # noqa: E402


def test_a_pattern_star_matches_within_one_folder():
    pattern = pattern_regex("data/train-*.json")
    assert pattern.match("data/train-1.json") and pattern.match("data/train-.json")
    assert not pattern.match("data/train-1.json.gz") and not pattern.match("data/train-x/1.json")
    assert pattern_regex("data/a+b(1).csv").match("data/a+b(1).csv")


def test_text_inputs_are_cut_so_that_every_node_gets_work_and_record_files_stay_whole():
    objects = [("store://p/a.json", 10 * SHARD_MIN_BYTES), ("store://p/b.json", 100), ("store://p/empty.json", 0)]
    shards = plan_shards(objects, "JSON", max_workers=2)
    piece = -(-(10 * SHARD_MIN_BYTES + 100) // 8)
    assert shards[0] == ("store://p/a.json", 0, piece)
    assert shards[-1] == ("store://p/b.json", 0, 100)
    assert all(end - start <= piece for _, start, end in shards)
    assert plan_shards(objects, "TF_RECORD", max_workers=2) == [(uri, 0, None) for uri, _ in objects]
    assert len(plan_shards([("store://p/small.csv", 5000)], "CSV", max_workers=10)) == 1  # 1 MiB at least
    assert results_name(2, 12) == "prediction.results-00002-of-00012"
    assert errors_name(0, 1) == "prediction.errors_stats-00000-of-00001"


@pytest.mark.parametrize("seed", range(5))
def test_byte_ranges_give_every_line_to_exactly_one_shard(tmp_path, seed):
    rng = random.Random(seed)
    lines = [("x" * rng.randint(0, 40)).encode() for _ in range(300)]
    path = tmp_path / "in.json"
    path.write_bytes(b"\n".join(lines) + (b"\n" if seed % 2 else b""))  # with and without a last newline
    size = path.stat().st_size
    cuts = sorted({0, size, *(rng.randint(0, size) for _ in range(rng.randint(0, 30)))})
    seen = [line for start, end in zip(cuts, cuts[1:], strict=False)
            for _, line in batch_predict.text_records(str(path), start, end)]
    assert [line.rstrip(b"\n") for line in seen] == [line for line in lines if line.strip()]


def tf_record_file(path: Path, records: list[bytes], compressed: bool) -> None:
    data = b"".join(struct.pack("<Q", len(r)) + b"crc!" + r + b"crc!" for r in records)
    path.write_bytes(gzip.compress(data) if compressed else data)


@pytest.mark.parametrize("compressed", [False, True])
def test_tf_records_are_read_in_order_and_a_cut_file_is_an_error(tmp_path, compressed):
    records = [json.dumps([float(i)]).encode() for i in range(50)] + [b""]
    path = tmp_path / "in.tfrecord"
    tf_record_file(path, records, compressed)
    assert [data for _, data in batch_predict.tf_records(str(path), compressed)] == records
    tf_record_file(path, records[:3], False)
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(ValueError, match="record 2: the file ends inside its data"):
        list(batch_predict.tf_records(str(path), False))


class Doubler:
    """A model the runner cannot tell from a framework's: doubles its one input; refuses a row holding 13."""

    inputs = [model_server.Tensor("x", np.dtype(np.float32))]
    outputs = None

    def predict(self, inputs):
        if (inputs["x"] == 13).any():
            raise model_server.bad_request("13 is unlucky")
        return {"y": inputs["x"] * 2}


def run(tmp_path: Path, lines: list[str], data_format: str = "JSON", output_format: str = "JSON") -> tuple:
    """One shard through the runner's inbox, as the platform gives it."""
    source = tmp_path / "in.txt"
    source.write_text("".join(line + "\n" for line in lines))
    inbox, out = tmp_path / "inbox", tmp_path / "run-1"
    inbox.mkdir()
    (inbox / "00000001.json").write_text(json.dumps({
        "input": str(source), "inputName": "store://p/in.txt", "start": 0, "end": None, "dataFormat": data_format,
        "outputFormat": output_format, "batchSize": 4, "out": str(out)}))
    batch_predict.serve(Doubler(), str(inbox), poll_interval=0, stop=lambda: (out / "status.json").exists())
    assert json.loads((out / "status.json").read_text()) == {"ok": True}
    assert not list(inbox.iterdir()) and (out / "assignment.json").is_file()
    errors = [json.loads(line) for line in (out / "errors").read_text().splitlines()]
    return (out / "results").read_text().splitlines(), errors, json.loads((out / "progress.json").read_text())


def test_bad_records_cost_only_themselves_and_are_reported_with_their_line(tmp_path):
    lines = ["[1.0]", "[2.0]", "not json", "[13.0]", "[4.0]", "", "[5.0]", '{"x": [6.0]}']
    results, errors, progress = run(tmp_path, lines)
    assert [json.loads(line) for line in results] == [
        {"instance": [1.0], "prediction": [2.0]}, {"instance": [2.0], "prediction": [4.0]},
        {"instance": [4.0], "prediction": [8.0]}, {"instance": [5.0], "prediction": [10.0]},
        {"instance": {"x": [6.0]}, "prediction": [12.0]}]
    assert [(e["line"], e["byteOffset"]) for e in errors] == [("not json", 12), ("[13.0]", 21)]
    assert errors[0]["error"].startswith("not JSON") and errors[1]["error"] == "13 is unlucky"
    assert errors[0]["inputPath"] == "store://p/in.txt"
    assert progress == {"total": 7, "done": 7, "errors": 2}  # the blank line is no record
    assert not list(tmp_path.glob("**/*.partial"))


def test_csv_in_and_out(tmp_path):
    results, errors, _ = run(tmp_path, ["1,2", "3,x", "0.5,1.5"], data_format="CSV", output_format="CSV")
    assert results == ["2.0,4.0", "1.0,3.0"]
    assert [e["line"] for e in errors] == ["3,x"]


def test_the_runner_goes_on_after_an_unreadable_input_and_sets_aside_what_is_no_assignment(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "00000001.json").write_text("{not an assignment")
    (inbox / ".00000002.json.1234.part").write_text("an upload in progress")
    (inbox / "00000003.json").write_text(json.dumps({
        "input": str(tmp_path / "missing.json"), "inputName": "store://p/missing.json", "dataFormat": "JSON",
        "outputFormat": "JSON", "batchSize": 4, "out": str(tmp_path / "run-3")}))
    source = tmp_path / "in.json"
    source.write_text("[1.0]\n")
    (inbox / "00000004.json").write_text(json.dumps({
        "input": str(source), "inputName": "store://p/in.json", "dataFormat": "JSON", "outputFormat": "JSON",
        "batchSize": 4, "out": str(tmp_path / "run-4")}))
    batch_predict.serve(Doubler(), str(inbox), poll_interval=0,
                        stop=lambda: (tmp_path / "run-4" / "status.json").exists())
    failed = json.loads((tmp_path / "run-3" / "status.json").read_text())
    assert failed["ok"] is False and "cannot read store://p/missing.json" in failed["error"]
    assert json.loads((tmp_path / "run-4" / "status.json").read_text()) == {"ok": True}
    assert sorted(path.name for path in inbox.iterdir()) == [".00000002.json.1234.part", "00000001.json.invalid"]


class NodeWithoutRunner:
    """A node whose shard runner is gone without an exit code (the node rebooted); records what is asked of it."""

    def __init__(self):
        self.commands, self.starts, self.files = [], [], {}

    def process_status(self, proc_dir):
        from cloudml_os.remote import ProcessStatus

        return ProcessStatus(running=False, exit_code=None, lost=True)

    def read_file(self, path, offset=0, limit=1 << 20):
        return self.files.get(path, b"")[offset:offset + limit]

    def run(self, argv, **kwargs):
        self.commands.append(list(argv))

    def start_process(self, proc_dir, argv, *, env, cwd):
        self.starts.append(proc_dir)

    def put(self, data, path, mode=0o644):
        self.files[path] = data


def test_a_shard_whose_runner_vanished_goes_back_to_the_queue_and_the_next_runs_under_a_new_runner(tmp_path):
    from cloudml_os.artifacts.local import LocalArtifactStore
    from cloudml_os.config import load_settings
    from cloudml_os.frameworks.pytorch import PyTorch
    from cloudml_os.store import Cluster, Job, Node, Store, migrate
    from cloudml_os.store.models import PredictionShard
    from cloudml_os.workflows import batch_predict as workflow
    from cloudml_os.workflows.train import TrainingContext

    url = f"sqlite:///{tmp_path}/db.sqlite"
    migrate(url)
    store = Store(url)
    ctx = TrainingContext(settings=load_settings(environ={}, data_dir=tmp_path), store=store,
                          driver=SimpleNamespace(store_mount=lambda settings: "/store"),
                          artifacts=LocalArtifactStore(tmp_path / "artifacts"), frameworks={"PYTORCH": PyTorch()},
                          connect=None)
    job = store.create_job(Job(project="p", job_id="b", state="RUNNING", step="PREDICTING", framework="PYTORCH",
                               training_input={}, prediction_input={"dataFormat": "JSON", "outputDataFormat": "JSON",
                                                                    "batchSize": 64}))
    cluster = store.create_cluster(Cluster(job_id=job.id, name="c", driver="local", state="READY", private_key="k",
                                           public_key="p"))
    store.record_nodes(cluster.id, [Node(name="worker-0", task_type="worker", task_index=0, address="127.0.0.1",
                                         ssh_port=22, username="root", host_keys=[], port_first=1, port_last=2,
                                         workdir="/w", runtime_root="/r", attempt=1, process_state="RUNNING")])
    node = store.cluster_of(job.id).nodes[0]
    store.add(PredictionShard(job_id=job.id, index=0, input_uri="store://p/in.json", start=0, end=10,
                              state="RUNNING", node="worker-0", run=7))
    shard = workflow._shards(ctx, job)[0]
    session = NodeWithoutRunner()
    workflow._look_at(ctx, job, node, session, [shard], 1, first_look=True, read_progress=False)
    after = workflow._shards(ctx, job)[0]
    assert (after.state, after.node, after.failures) == ("PENDING", None, 0)  # a reboot is not the shard's fault
    assert ["rm", "-f", "/w/job/shards/inbox/00000007.json"] in session.commands
    assert "runs again" in store.events(job.id)[-1].message
    assert workflow._start_next(ctx, job, node, session, 1)
    assert session.starts == ["/w/job/process-2"]  # a new runner, in a new process folder
    assignment = json.loads(session.files["/w/job/shards/inbox/00000008.json"])
    assert assignment["out"] == "/w/job/shards/run-8" and assignment["input"] == "/store/p/in.json"
    assert (workflow._shards(ctx, job)[0].state, store.cluster_of(job.id).nodes[0].attempt) == ("RUNNING", 2)

"""Batch prediction jobs (v1 ``predictionInput``): the project's model over files in the store, on a cluster.

PROVISIONING (plan the shards, create ``min(maxWorkerCount, shards)`` nodes) → BOOTSTRAPPING (the model, the
model server's code and the shard runner on every node) → PREDICTING (one runner per node,
:mod:`cloudml_os.serving.runtime.batch_predict`, loads the model once and runs the shards put in its inbox, one
at a time) → TEARING_DOWN → DONE, delivered by the training workflow's task machinery
(:func:`cloudml_os.workflows.train.run_step`: leases, compare-and-set hand-overs, cancel).

Nodes read their input through the store view every node of a project's cluster has (``/store/PROJECT``).
A shard's progress lives in its database row (:class:`cloudml_os.store.models.PredictionShard`): a shard is
DONE only once its two files are in the store under their final names, ``prediction.results-NNNNN-of-NNNNN``
and ``prediction.errors_stats-NNNNN-of-NNNNN`` (one pair per shard). A shard whose node died or whose runner
failed runs again (on another node, or under a new run number) and replaces them, so each input record is in
the output exactly once however often a worker or node dies. A node's runner is its process (``node.attempt``
numbers its starts, as a trainer's restarts); a shard's ``run`` (unique in the job) names its folder on the
node. A worker that dies mid-step leaves the runners working; the next delivery finds each running shard by
its row (node, run) and follows on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select, update

from cloudml_os.artifacts import ArtifactStore, ObjectInfo, files_of, make_uri, matching_objects, parse_uri
from cloudml_os.cloud.base import ClusterSpec, NodeSpec
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import NodeSession, RemoteError, fan_out
from cloudml_os.runtimes import runtime_python
from cloudml_os.states import NODE_UNREACHABLE, JobState, Step
from cloudml_os.store import Cluster, Job, Node
from cloudml_os.store.models import PredictionShard
from cloudml_os.workflows import train
from cloudml_os.workflows.train import Handover, StepError, TrainingContext

log = logging.getLogger(__name__)

RUNTIME = Path(__file__).resolve().parents[1] / "serving" / "runtime"
RUNNER_FILES = ("model_server.py", "batch_predict.py")
TEXT_FORMATS = ("JSON", "TEXT", "CSV")  # split at any byte; TFRecord files are one shard each
SHARD_MIN_BYTES, SHARD_MAX_BYTES = 1 << 20, 64 << 20
SHARDS_PER_NODE = 4  # shards planned per node at most, so a slow node holds back little of the job
MAX_SHARD_FAILURES = 3  # runs of one shard that may fail before the job fails
RUNNER_QUEUE = 2  # shards a node holds at once: the one it runs and the next, so it never waits between them
PROGRESS_INTERVAL = 1.0  # seconds between reads of the running shards' progress and logs


def is_prediction(job: Job) -> bool:
    return job.prediction_input is not None


def results_name(index: int, total: int) -> str:
    return f"prediction.results-{index:05d}-of-{total:05d}"


def errors_name(index: int, total: int) -> str:
    return f"prediction.errors_stats-{index:05d}-of-{total:05d}"


# ---- planning ------------------------------------------------------------------------------------------

def expand_inputs(artifacts: ArtifactStore, patterns: list[str]) -> list[ObjectInfo]:
    """The objects ``patterns`` name, each once, in key order.

    :raises StepError: a pattern naming nothing (checked at submission too; objects may go meanwhile).
    """
    found: dict[str, ObjectInfo] = {}
    for index, uri in enumerate(patterns):
        project = parse_uri(uri)[0]
        matched = {make_uri(project, info.key): info for info in matching_objects(artifacts, uri)}
        if not matched:
            raise StepError(f"predictionInput.inputPaths[{index}]: {uri} names no object")
        found.update(matched)
    return [found[uri] for uri in sorted(found)]


def plan_shards(objects: list[tuple[str, int]], data_format: str,
                max_workers: int) -> list[tuple[str, int, int | None]]:
    """(input URI, first byte, end byte or None for the whole file) of every shard, in input order.

    Text inputs are cut into pieces of about total / (SHARDS_PER_NODE × max_workers) bytes (within 1 and
    64 MiB), so that every node has work and one shard is small to redo; an empty file is no shard.
    """
    if data_format not in TEXT_FORMATS:
        return [(uri, 0, None) for uri, _ in objects]
    total = sum(size for _, size in objects)
    piece = min(SHARD_MAX_BYTES, max(SHARD_MIN_BYTES, -(-total // (SHARDS_PER_NODE * max_workers))))
    return [(uri, start, min(start + piece, size)) for uri, size in objects for start in range(0, size, piece)]


# ---- the steps -----------------------------------------------------------------------------------------

def provision(ctx: TrainingContext, job: Job) -> Handover:
    """Plan the shards (once), then create the job's cluster of one node per shard, at most maxWorkerCount."""
    if job.state == JobState.QUEUED.value:
        if not ctx.store.transition(job.id, [JobState.QUEUED], JobState.PREPARING):
            return Handover(None)  # cancelled while queued
    prediction_input = job.prediction_input
    shards = _shards(ctx, job)
    if not shards:
        objects = expand_inputs(ctx.artifacts, prediction_input["inputPaths"])
        planned = plan_shards([(make_uri(job.project, info.key), info.size) for info in objects],
                              prediction_input["dataFormat"], int(prediction_input["maxWorkerCount"]))
        if not planned:
            raise StepError("predictionInput.inputPaths: every input file is empty")
        with ctx.store.session() as session:
            session.add_all(PredictionShard(job_id=job.id, index=index, input_uri=uri, start=start, end=end)
                            for index, (uri, start, end) in enumerate(planned))
        shards = _shards(ctx, job)
        ctx.store.add_event(job.id, "PLAN", f"{len(shards)} shard(s) of {len(objects)} input file(s), "
                                            f"{sum(info.size for info in objects)} bytes")
    _update_output(ctx, job)
    machine_type = ctx.settings.machine_types[prediction_input["machineType"]]
    count = min(int(prediction_input["maxWorkerCount"]), len(shards))
    private_key, public_key = generate_keypair(f"cloudml-os-job-{job.id}")
    name = train.cluster_name(job).replace("cml-train-", "cml-batch-", 1)
    cluster = ctx.store.create_cluster(Cluster(job_id=job.id, name=name, driver=ctx.driver.name, state="CREATING",
                                               private_key=private_key, public_key=public_key))
    spec = ClusterSpec(name=cluster.name, public_key=cluster.public_key,
                       nodes=tuple(NodeSpec(f"worker-{index}", "worker", index, machine_type.flavor, machine_type.gpus)
                                   for index in range(count)),
                       labels={"project": job.project, "job": str(job.id)})
    infos = ctx.driver.create_cluster(spec)
    ctx.store.record_nodes(cluster.id, [Node.from_info(info) for info in infos])
    ctx.store.add_event(job.id, "CLUSTER", f"Cluster {name} ready with {len(infos)} node(s)")
    return Handover(Step.BOOTSTRAPPING)


def bootstrap(ctx: TrainingContext, job: Job) -> Handover:
    """Put the model, the model server and the shard runner on every node that lacks them (a marker says)."""
    cluster = train._cluster(ctx, job)
    python_of = _python(ctx, job)

    def install(node: Node, session: NodeSession, model: Path) -> None:
        root = train.job_root(node)
        if session.run(["test", "-e", f"{root}/bootstrap.done"], check=False).exit_code == 0:
            return
        if session.run(["test", "-x", python_of(node)], check=False).exit_code != 0:
            raise StepError(f"node {node.name}: runtime {python_of(node)} is missing (build it with "
                            "`cloudml-os runtime build`)")
        for relative, local in files_of(model):
            session.put(local, f"{root}/model/{relative}")
        for name in RUNNER_FILES:
            session.put(RUNTIME / name, f"{root}/{name}")
        session.run(["mkdir", "-p", _inbox(node)])
        session.run(["touch", f"{root}/bootstrap.done"])

    with ctx.artifacts.local_tree(job.prediction_output["modelUri"]) as model, \
            train._Sessions(ctx, cluster) as sessions:
        sessions.each(lambda node, session: install(node, session, model))
    ctx.store.add_event(job.id, "BOOTSTRAP", f"Model and runner on {len(cluster.nodes)} node(s)")
    return Handover(Step.PREDICTING)


def predict(ctx: TrainingContext, job: Job) -> Handover:
    """Run the shards on the nodes, one per node at a time, for one window of ``watch_window`` seconds.

    Each look: a node whose shard ended has its files copied to the store (DONE) or the shard handed back
    (the input could not be read, or the runner died: again, up to MAX_SHARD_FAILURES failed runs); every node
    is given PENDING shards until it holds RUNNER_QUEUE (idle nodes first; its runner started first if it has
    none). A node that cannot be
    reached is lost to the job and its shard goes back to PENDING; with every node lost the job fails. When
    every shard is DONE the job has succeeded.
    """
    ctx.store.transition(job.id, [JobState.PREPARING], JobState.RUNNING)
    cluster = train._cluster(ctx, job)
    window_ends = time.monotonic() + ctx.settings.watch_window
    with _LiveSessions(ctx, job, cluster) as live:
        first_look = True
        progress_due = 0.0
        while True:
            shards = _shards(ctx, job)
            if all(shard.state == "DONE" for shard in shards):
                return _succeeded(ctx, job, cluster, shards)
            held: dict[str, list[PredictionShard]] = {}
            for shard in sorted((shard for shard in shards if shard.state == "RUNNING"), key=lambda s: s.run):
                held.setdefault(shard.node, []).append(shard)
            now = time.monotonic()
            read_progress = now >= progress_due
            if read_progress:
                progress_due = now + PROGRESS_INTERVAL
            for node in live.nodes():
                try:
                    _look_at(ctx, job, node, live.sessions[node.name], held.get(node.name, []), len(shards),
                             first_look, read_progress)
                except (RemoteError, OSError) as exc:
                    live.lose(node, str(exc))
            _fill_queues(ctx, job, live, len(shards))
            if not live.nodes():
                raise StepError("every node of the job was lost; see the events")
            if read_progress:
                _update_output(ctx, job)
            first_look = False
            if time.monotonic() >= window_ends or ctx.stopping.is_set() or \
                    ctx.store.get_job(job.id).state != JobState.RUNNING.value:
                return Handover(Step.PREDICTING)
            time.sleep(ctx.settings.watch_interval)


def teardown(ctx: TrainingContext, job: Job) -> Handover:
    """Stop the shard runners, keep their last log lines, delete the cluster, give the job its final state."""
    cluster = ctx.store.cluster_of(job.id)
    if cluster is not None:
        ctx.store.update_cluster(cluster.id, state="DELETING")

        def stop(node: Node) -> None:
            try:
                with ctx.connect(node, cluster.private_key) as session:
                    session.stop_process(train.process_dir(node), ctx.settings.stop_grace_seconds)
                    _fetch_log(ctx, job, node, session)
            except (RemoteError, OSError) as exc:
                log.warning("job %s: could not stop the runner on %s before deletion: %s", job.id, node.name, exc)

        fan_out([n for n in cluster.nodes if n.process_state != NODE_UNREACHABLE], stop, ctx.settings.ssh_parallelism)
        ctx.driver.delete_cluster(cluster.name)
        ctx.store.update_cluster(cluster.id, state="DELETED", deleted_at=ctx.store.now())
        ctx.store.add_event(job.id, "CLUSTER", f"Cluster {cluster.name} deleted")
        _update_output(ctx, job, cluster)
    ctx.store.finish_job(job.id)
    return Handover(Step.DONE)


STEPS = {
    Step.PROVISIONING: provision,
    Step.BOOTSTRAPPING: bootstrap,
    Step.PREDICTING: predict,
    Step.TEARING_DOWN: teardown,
}


# ---- one node, its runner, one shard at a time ---------------------------------------------------------

def _inbox(node: Node) -> str:
    return f"{train.job_root(node)}/shards/inbox"


def _shard_dir(node: Node, shard: PredictionShard) -> str:
    return f"{train.job_root(node)}/shards/run-{shard.run}"


def _assignment_name(node: Node, shard: PredictionShard) -> str:
    return f"{_inbox(node)}/{shard.run:08d}.json"


def _fill_queues(ctx: TrainingContext, job: Job, live: _LiveSessions, total: int) -> None:
    """Give every node PENDING shards until it holds RUNNER_QUEUE of them: first one to each idle node, then
    the next to each, so that the last shards do not queue behind a busy node while another has nothing."""
    held = {node.name: 0 for node in live.nodes()}
    for shard in _shards(ctx, job):
        if shard.state == "RUNNING" and shard.node in held:
            held[shard.node] += 1
    for depth in range(RUNNER_QUEUE):
        for node in live.nodes():
            if held[node.name] > depth:
                continue
            try:
                if not _start_next(ctx, job, node, live.sessions[node.name], total):
                    return  # nothing left to start
            except (RemoteError, OSError) as exc:
                live.lose(node, str(exc))
                continue
            held[node.name] += 1


def _start_next(ctx: TrainingContext, job: Job, node: Node, session: NodeSession, total: int) -> bool:
    """Give ``node`` the next PENDING shard (starting its runner if it has none); False when none is left."""
    with ctx.store.session() as db:
        shard = db.scalar(select(PredictionShard).where(PredictionShard.job_id == job.id,
                                                        PredictionShard.state == "PENDING")
                          .order_by(PredictionShard.index).limit(1))
        run = db.scalar(select(func.coalesce(func.max(PredictionShard.run), 0))
                        .where(PredictionShard.job_id == job.id)) + 1
    if shard is None:
        return False
    if node.process_state != "RUNNING":
        _start_runner(ctx, job, node, session)
    with ctx.store.session() as db:
        taken = db.execute(update(PredictionShard).where(PredictionShard.id == shard.id,
                                                         PredictionShard.state == "PENDING")
                           .values(state="RUNNING", node=node.name, run=run)).rowcount
    if not taken:
        return True
    shard.run, shard.node = run, node.name
    _assign(ctx, job, node, session, shard)
    ctx.store.add_event(job.id, "SHARD", f"Shard {shard.index + 1}/{total} ({_describe(shard)}) given to the node",
                        node=node.name)
    return True


def _start_runner(ctx: TrainingContext, job: Job, node: Node, session: NodeSession) -> None:
    """Start the node's runner under a new process number (its log goes on where the last one's ended)."""
    attempt = node.attempt + 1
    # The node's row first: a crash before the start leaves a process folder that never appears, which the
    # next delivery's first look finds lost (and starts another).
    ctx.store.update_node(node.id, attempt=attempt, log_base=node.log_offset, process_state="RUNNING",
                          exit_code=None)
    node.attempt, node.log_base, node.process_state = attempt, node.log_offset, "RUNNING"
    root = train.job_root(node)
    argv = [_python(ctx, job)(node), f"{root}/batch_predict.py", "--framework", job.framework,
            "--model-dir", f"{root}/model", "--inbox", _inbox(node)]
    session.start_process(train.process_dir(node), argv, env={**node.environment, "PYTHONUNBUFFERED": "1"},
                          cwd=root)


def _assign(ctx: TrainingContext, job: Job, node: Node, session: NodeSession, shard: PredictionShard) -> None:
    """Put the shard's assignment in the node's inbox (whole or not at all); the runner takes it from there."""
    prediction_input = job.prediction_input
    project, key = parse_uri(shard.input_uri)
    assignment = {"input": f"{ctx.driver.store_mount(ctx.settings)}/{project}/{key}", "inputName": shard.input_uri,
                  "start": shard.start, "end": shard.end, "dataFormat": prediction_input["dataFormat"],
                  "outputFormat": prediction_input["outputDataFormat"],
                  "batchSize": int(prediction_input["batchSize"]), "out": _shard_dir(node, shard)}
    session.put(json.dumps(assignment).encode(), _assignment_name(node, shard))


def _look_at(ctx: TrainingContext, job: Job, node: Node, session: NodeSession, shards: list[PredictionShard],
             total: int, first_look: bool, read_progress: bool) -> None:
    """Follow ``node``: its runner, its log, and the ``shards`` it holds (in the order it runs them): what
    follows the end of each.

    The first look of a delivery asks whether the runner lives (a node's reboot or a crash between the
    runner's row and its start leave none); later looks only whether it recorded an exit code.
    """
    if node.process_state != "RUNNING":
        return  # no runner yet (or its end is handled): the node is idle until it is given a shard
    unfinished = []
    for shard in shards:
        status = session.read_file(f"{_shard_dir(node, shard)}/status.json", 0, 65536)
        if status:
            _fetch_log(ctx, job, node, session)
            _shard_ended(ctx, job, node, session, shard, total, _status(status))
        else:
            unfinished.append(shard)
    if not unfinished and not first_look:
        return
    runner = session.process_status(train.process_dir(node)) if first_look else \
        session.exit_status(train.process_dir(node))
    if runner.running:
        for shard in unfinished if first_look else ():
            if not session.read_file(f"{_shard_dir(node, shard)}/assignment.json", 0, 1) and \
                    not session.read_file(_assignment_name(node, shard), 0, 1):
                _assign(ctx, job, node, session, shard)  # the last delivery died between taking it and this
        if read_progress:
            _fetch_log(ctx, job, node, session)
            for shard in unfinished:
                _record_progress(ctx, shard, session.read_file(f"{_shard_dir(node, shard)}/progress.json", 0, 4096))
        return
    _fetch_log(ctx, job, node, session)
    ctx.store.update_node(node.id, process_state="EXITED", exit_code=runner.exit_code)
    node.process_state = "EXITED"
    message = "the runner vanished" if runner.lost else f"the runner exited with code {runner.exit_code}"
    ctx.store.add_event(job.id, "NODE", f"Shard runner ended: {message}", node=node.name)
    for position, shard in enumerate(unfinished):
        # Not taken yet, the assignment would be run by the next runner as well: take it back.
        session.run(["rm", "-f", _assignment_name(node, shard)])
        # The runner was running the first; a runner gone without an exit code (its node rebooted) is not the
        # shard's fault.
        _shard_ended(ctx, job, node, session, shard, total,
                     {"ok": False, "error": message, "counts": position == 0 and not runner.lost})


def _status(data: bytes) -> dict:
    """The runner's status file; a node is not trusted, so anything but ``{"ok": true}`` is a failure."""
    try:
        status = json.loads(data)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        return {"ok": False, "error": "the runner's status file is unreadable"}
    return {"ok": status.get("ok") is True, "error": str(status.get("error", "no reason given"))[:2000]}


def _shard_ended(ctx: TrainingContext, job: Job, node: Node, session: NodeSession, shard: PredictionShard,
                 total: int, status: dict) -> None:
    """A shard's run ended: its files to the store (DONE), or the shard back in the queue."""
    if status["ok"]:
        _collect(ctx, job, node, session, shard, total)
        return
    failures = shard.failures + (1 if status.get("counts", True) else 0)
    _hand_back(ctx, shard, failures=failures)
    message = f"Shard {shard.index + 1}/{total}: {status['error']}"
    ctx.store.add_event(job.id, "SHARD", message + ("; it runs again" if failures < MAX_SHARD_FAILURES else ""),
                        node=node.name)
    if failures >= MAX_SHARD_FAILURES:
        text, _ = ctx.store.read_log(job.id, node.name, node.log_base or 0, 1 << 20)
        tail = "\n".join(text.decode("utf-8", "replace").rstrip().splitlines()[-train.ERROR_LOG_LINES:])
        raise StepError(f"{message}, {failures} times; last log lines of {node.name}:\n{tail}")


def _hand_back(ctx: TrainingContext, shard: PredictionShard, **fields: int) -> None:
    """The running ``shard`` back to PENDING (unless it moved on meanwhile); its next run starts from scratch."""
    with ctx.store.session() as db:
        db.execute(update(PredictionShard).where(PredictionShard.id == shard.id, PredictionShard.state == "RUNNING",
                                                 PredictionShard.run == shard.run)
                   .values(state="PENDING", node=None, records_done=0, **fields))


def _collect(ctx: TrainingContext, job: Job, node: Node, session: NodeSession, shard: PredictionShard,
             total: int) -> None:
    """Copy a finished shard's two files to the store under their final names, then mark it DONE."""
    project, folder = parse_uri(job.prediction_input["outputPath"].rstrip("/"))
    with tempfile.TemporaryDirectory() as tmp:
        session.get_tree(_shard_dir(node, shard), Path(tmp))
        counts = _counts((Path(tmp) / "progress.json").read_bytes() if (Path(tmp) / "progress.json").is_file()
                         else b"")
        for local, name in (("results", results_name(shard.index, total)), ("errors", errors_name(shard.index, total))):
            path = Path(tmp) / local
            if not path.is_file():
                raise StepError(f"node {node.name}: shard {shard.index + 1} ended without its {local} file")
            with path.open("rb") as source:
                ctx.artifacts.put_file(project, f"{folder}/{name}", source)
    done, errors = counts.get("done", 0), counts.get("errors", 0)
    with ctx.store.session() as db:
        marked = db.execute(update(PredictionShard).where(PredictionShard.id == shard.id,
                                                          PredictionShard.state == "RUNNING",
                                                          PredictionShard.run == shard.run)
                            .values(state="DONE", records_total=counts.get("total", done), records_done=done,
                                    predictions=done - errors, errors=errors)).rowcount
    if marked:
        ctx.store.add_event(job.id, "SHARD", f"Shard {shard.index + 1}/{total} done: {done - errors} "
                                             f"prediction(s), {errors} error(s)", node=node.name)


def _record_progress(ctx: TrainingContext, shard: PredictionShard, data: bytes) -> None:
    counts = _counts(data)
    if not counts:
        return
    with ctx.store.session() as db:
        db.execute(update(PredictionShard).where(PredictionShard.id == shard.id, PredictionShard.state == "RUNNING",
                                                 PredictionShard.run == shard.run)
                   .values(records_total=counts.get("total"), records_done=counts.get("done", 0)))


def _counts(data: bytes) -> dict[str, int]:
    """The runner's progress file, or {} when it is absent or unreadable (the node is not trusted)."""
    try:
        counts = json.loads(data) if data else {}
    except ValueError:
        return {}
    if not isinstance(counts, dict):
        return {}
    return {key: value for key, value in counts.items()
            if key in ("total", "done", "errors") and isinstance(value, int) and 0 <= value < 1 << 62}


def _fetch_log(ctx: TrainingContext, job: Job, node: Node, session: NodeSession) -> None:
    """Append the node's new log bytes (of its current run) to the store."""
    while True:
        data = session.read_file(f"{train.process_dir(node)}/output.log", train._log_file_offset(node),
                                 train.LOG_FETCH_LIMIT)
        if not data:
            return
        train._store_logs(ctx, job, [(node, data)])
        if len(data) < train.LOG_FETCH_LIMIT:
            return


# ---- bookkeeping ---------------------------------------------------------------------------------------

def _shards(ctx: TrainingContext, job: Job) -> list[PredictionShard]:
    with ctx.store.session() as db:
        return list(db.scalars(select(PredictionShard).where(PredictionShard.job_id == job.id)
                               .order_by(PredictionShard.index)))


def _shard(ctx: TrainingContext, shard_id: int) -> PredictionShard:
    with ctx.store.session() as db:
        return db.get(PredictionShard, shard_id)


def _describe(shard: PredictionShard) -> str:
    if shard.end is None:
        return shard.input_uri
    return f"{shard.input_uri} bytes {shard.start}-{shard.end - 1}"


def _update_output(ctx: TrainingContext, job: Job, cluster: Cluster | None = None) -> None:
    """predictionOutput from the shards' rows: counts so far, and nodeHours once the cluster is deleted."""
    with ctx.store.session() as db:
        row = db.execute(select(func.count(), func.count().filter(PredictionShard.state == "DONE"),
                                func.coalesce(func.sum(PredictionShard.predictions), 0),
                                func.coalesce(func.sum(PredictionShard.errors), 0),
                                func.coalesce(func.sum(PredictionShard.records_done), 0),
                                func.count(PredictionShard.records_total),
                                func.coalesce(func.sum(PredictionShard.records_total), 0))
                         .where(PredictionShard.job_id == job.id)).one()
    shards, done, predictions, errors, records_done, counted, records_total = (int(value) for value in row)
    output = {**ctx.store.get_job(job.id).prediction_output, "predictionCount": str(predictions),
              "errorCount": str(errors), "recordsDone": str(records_done), "shardsDone": done,
              "shardsTotal": shards}
    if shards and counted == shards:
        output["recordsTotal"] = str(records_total)
    if cluster is not None and cluster.nodes:
        hours = (ctx.store.now() - cluster.created_at).total_seconds() / 3600 * len(cluster.nodes)
        output["nodeHours"] = round(hours, 4)
    ctx.store.update_job(job.id, prediction_output=output)


def _succeeded(ctx: TrainingContext, job: Job, cluster: Cluster, shards: list[PredictionShard]) -> Handover:
    _update_output(ctx, job)
    ctx.store.update_job(job.id, outcome=JobState.SUCCEEDED.value)
    ctx.store.add_event(job.id, "OUTCOME", f"{sum(s.predictions for s in shards)} prediction(s), "
                                           f"{sum(s.errors for s in shards)} error(s) in {len(shards)} shard(s), "
                                           f"written to {job.prediction_input['outputPath']}")
    return Handover(Step.TEARING_DOWN)


def _python(ctx: TrainingContext, job: Job):
    framework = ctx.frameworks[job.framework]
    runtime = framework.runtime(job.prediction_input.get("runtimeVersion"))
    return lambda node: runtime_python(node.runtime_root, runtime)


class _LiveSessions:
    """One SSH session per node still usable by the job, for one window; a node that cannot be reached (now
    or during the window) is lost: marked UNREACHABLE, its running shard back to PENDING."""

    def __init__(self, ctx: TrainingContext, job: Job, cluster: Cluster):
        self.ctx, self.job, self.cluster = ctx, job, cluster
        self.sessions: dict[str, NodeSession] = {}
        self._nodes = [node for node in cluster.nodes if node.process_state != NODE_UNREACHABLE]

    def __enter__(self) -> _LiveSessions:
        def connect(node: Node) -> NodeSession | str:
            try:
                return self.ctx.connect(node, self.cluster.private_key)
            except (RemoteError, OSError) as exc:
                return str(exc)

        for node, result in zip(self._nodes, fan_out(self._nodes, connect, self.ctx.settings.ssh_parallelism),
                                strict=True):
            if isinstance(result, str):
                self.lose(node, result)
            else:
                self.sessions[node.name] = result
        return self

    def __exit__(self, *exc_info: object) -> None:
        for session in self.sessions.values():
            with contextlib.suppress(Exception):
                session.close()

    def nodes(self) -> list[Node]:
        return [node for node in self._nodes if node.name in self.sessions]

    def lose(self, node: Node, reason: str) -> None:
        session = self.sessions.pop(node.name, None)
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        self.ctx.store.update_node(node.id, process_state=NODE_UNREACHABLE)
        with self.ctx.store.session() as db:
            db.execute(update(PredictionShard).where(PredictionShard.job_id == self.job.id,
                                                     PredictionShard.node == node.name,
                                                     PredictionShard.state == "RUNNING")
                       .values(state="PENDING", node=None, records_done=0))
        self.ctx.store.add_event(self.job.id, "NODE", f"Node lost; its shard will run on another node: {reason}",
                                 node=node.name)

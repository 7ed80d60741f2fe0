"""``/v1/projects/{p}/jobs``: submit, read, list, cancel training jobs; their events and logs.

Paths, bodies and errors are Cloud ML Engine v1's (``events`` and ``logs`` are added endpoints). A
view only validates, records and hands over: creating a job inserts the QUEUED row and calls
``start_job`` (which enqueues the workflow's first step); cancelling only moves the state, and the
workflow notices and tears the cluster down. No view waits on a cluster.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterator
from typing import Any

from flask import Response
from sqlalchemy import ColumnElement, delete, or_, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from cloudml_os import metrics, quotas, tuning
from cloudml_os.api import ApiBlueprint, resource_name, services
from cloudml_os.api.filters import Condition, compare, parse_list_filter
from cloudml_os.api.logwatch import LogWatch
from cloudml_os.api.schemas import (
    CancelJobRequestSchema,
    EmptySchema,
    EventListSchema,
    EventsQuerySchema,
    JobCreateSchema,
    JobMetricsSchema,
    JobSchema,
    ListJobsQuerySchema,
    ListJobsResponseSchema,
    LogListSchema,
    LogsQuerySchema,
    MetricsQuerySchema,
)
from cloudml_os.artifacts import ArtifactError, job_dir_uri, matching_objects, parse_uri
from cloudml_os.artifacts.trainer_args import StoreArgError, check_store_args, store_uri_in
from cloudml_os.cloud.base import node_store_root
from cloudml_os.config import DEFAULT_MACHINE_TYPE
from cloudml_os.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cloudml_os.frameworks.base import TopologyError, topology_from_training_input
from cloudml_os.states import JobState, Step
from cloudml_os.store import Job, JobEvent, Store
from cloudml_os.store.models import Model, Version

log = logging.getLogger(__name__)

blp = ApiBlueprint("jobs", __name__, url_prefix="/v1/projects/<project:project>",
                   description="Training jobs (Cloud ML Engine v1), with added events and logs.")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
LOG_LIMIT_ONE_NODE = 1 << 20
LOG_LIMIT_EACH_NODE = 256 << 10  # keeps a listing of a 30-node job's logs to a few MiB
METRICS_LOG_LIMIT = 16 << 20  # the part of each node's log that log-line metrics are read from


def _job_or_404(project: str, job_id: str) -> Job:
    job = services().store.find_job(project, job_id)
    if job is None:
        raise NotFound(f"{resource_name(project, 'jobs', job_id)} not found")
    return job


# ---- create -------------------------------------------------------------------------------------------


def _check_training_input(project: str, training_input: dict[str, Any]) -> None:
    """The checks that need this installation: framework, machine types, runtime, packages, jobDir, and the
    ``store://`` args (of this project, on nodes that see the store)."""
    svc = services()
    name = training_input["framework"]
    if name not in svc.frameworks:
        valid = ", ".join(sorted(svc.frameworks)) or "none installed"
        raise InvalidArgument(f"trainingInput.framework: unknown framework {name!r}; valid: {valid}")
    try:
        topology = topology_from_training_input(training_input, svc.settings.machine_types)
        svc.frameworks[name].runtime(training_input.get("runtimeVersion"))
        svc.frameworks[name].roles(topology, training_input)  # e.g. no parameter servers for PyTorch
    except TopologyError as exc:
        raise InvalidArgument(str(exc)) from None
    for index, uri in enumerate(training_input["packageUris"]):
        field = f"trainingInput.packageUris[{index}]"
        try:
            uri_project, _ = parse_uri(uri)
        except ArtifactError:
            uri_project = None
        if uri_project != project or svc.store.package_by_uri(uri) is None:
            raise InvalidArgument(f"{field}: {uri!r} is not a package of project {project}; upload it with "
                                  f"POST /v1/projects/{project}/packages and use the uri it returns")
    job_dir = training_input.get("jobDir")
    if job_dir:
        try:
            dir_project, _ = parse_uri(job_dir)
        except ArtifactError as exc:
            raise InvalidArgument(f"trainingInput.jobDir: {exc}; job outputs go to the artifact store") from None
        if dir_project != project:
            raise InvalidArgument(f"trainingInput.jobDir: {job_dir!r} is not in project {project}")
    args = training_input.get("args", [])
    if any(store_uri_in(arg) for arg in args):  # asks the driver only then
        try:
            check_store_args(args, project, node_store_root(svc.settings))
        except StoreArgError as exc:
            raise InvalidArgument(f"trainingInput.args[{exc.index}]: {exc}") from None
    spec = tuning.hyperparameter_spec(training_input)
    if spec and spec.get("resumePreviousJobId"):
        _check_resumed_study(project, spec)


def _check_resumed_study(project: str, spec: dict[str, Any]) -> None:
    """``resumePreviousJobId`` names a finished tuning job of the project whose study this spec can continue."""
    field = "trainingInput.hyperparameters.resumePreviousJobId"
    previous_id = spec["resumePreviousJobId"]
    previous = services().store.find_job(project, previous_id)
    if previous is None:
        raise InvalidArgument(f"{field}: {resource_name(project, 'jobs', previous_id)} not found")
    if not tuning.is_tuning(previous.training_input):
        raise InvalidArgument(f"{field}: job {previous_id} was not a hyperparameter tuning job")
    if not JobState(previous.state).is_final:
        raise InvalidArgument(f"{field}: job {previous_id} is {previous.state}; only a finished tuning job's "
                              "study can be resumed")
    mismatch = tuning.resume_mismatch(tuning.hyperparameter_spec(previous.training_input), spec)
    if mismatch:
        raise InvalidArgument(f"{field}: job {previous_id} cannot be resumed: {mismatch}")


def _forget_job(store: Store, job_pk: int) -> None:
    """Undo a create whose workflow could not be queued, so that the client can retry the same jobId."""
    try:
        with store.session() as session:
            session.execute(delete(JobEvent).where(JobEvent.job_id == job_pk))
            session.execute(delete(Job).where(Job.id == job_pk, Job.state == JobState.QUEUED.value))
    except SQLAlchemyError:
        log.exception("could not remove job %s after its start failed", job_pk)


def _prediction_job(project: str, job_id: str, prediction_input: dict[str, Any], labels: dict[str, str]) -> Job:
    """A batch prediction job's row: its model resolved now (a later change of the model's default version
    does not change what a submitted job predicts with), named in ``predictionOutput.modelUri``."""
    for index, uri in enumerate(prediction_input["inputPaths"]):
        _own_uri(project, f"predictionInput.inputPaths[{index}]", uri)
        if next(matching_objects(services().artifacts, uri, page=100), None) is None:
            raise InvalidArgument(f"predictionInput.inputPaths[{index}]: {uri!r} names no object of project "
                                  f"{project}; upload the input first (PUT /v1/projects/{project}/objects/NAME)")
    _own_uri(project, "predictionInput.outputPath", prediction_input["outputPath"])
    model_uri, framework, runtime_version, machine_type = _prediction_model(project, prediction_input)
    svc = services()
    try:
        runtime_version = runtime_version or svc.frameworks[framework].default_runtime_version
        svc.frameworks[framework].runtime(runtime_version)
    except TopologyError as exc:
        raise InvalidArgument(f"predictionInput.runtimeVersion: {str(exc).partition(': ')[2] or exc}") from None
    if node_store_root(svc.settings) is None:
        raise InvalidArgument("predictionInput.inputPaths: the store is not mounted on this installation's nodes, "
                              "so batch prediction cannot read its input")
    prediction_input = {**prediction_input, "runtimeVersion": runtime_version, "machineType": machine_type}
    return Job(project=project, job_id=job_id, state=JobState.QUEUED.value, step=Step.PROVISIONING.value,
               framework=framework, training_input={}, prediction_input=prediction_input, labels=labels,
               prediction_output={"outputPath": prediction_input["outputPath"], "modelUri": model_uri})


def _own_uri(project: str, field: str, uri: str) -> None:
    try:
        uri_project, _ = parse_uri(uri)
    except ArtifactError as exc:
        raise InvalidArgument(f"{field}: {exc}") from None
    if uri_project != project:
        raise InvalidArgument(f"{field}: {uri!r} is not in project {project}")


def _prediction_model(project: str, prediction_input: dict[str, Any]) -> tuple[str, str, str | None, str]:
    """(model URI, framework, runtime version or None, machine type) of the model a prediction job names."""
    svc = services()
    if prediction_input.get("uri"):
        uri = prediction_input["uri"].rstrip("/")
        _own_uri(project, "predictionInput.uri", uri)
        framework = prediction_input.get("framework") or _exported_framework(uri)
        if framework not in svc.frameworks:
            raise InvalidArgument(f"predictionInput.framework: unknown framework {framework!r}; valid: "
                                  f"{', '.join(sorted(svc.frameworks))}")
        return uri, framework, prediction_input.get("runtimeVersion"), DEFAULT_MACHINE_TYPE
    field = "modelName" if prediction_input.get("modelName") else "versionName"
    parts = prediction_input[field].split("/")
    if len(parts) in (1, 3):  # MODEL or MODEL/versions/VERSION, within this project
        parts = ["projects", project, "models", *parts]
    expected = 4 if field == "modelName" else 6
    if len(parts) != expected or parts[0] != "projects" or parts[2] != "models" or \
            (expected == 6 and parts[4] != "versions"):
        shape = "projects/PROJECT/models/MODEL" + ("/versions/VERSION" if expected == 6 else "")
        raise InvalidArgument(f"predictionInput.{field}: {prediction_input[field]!r} is not {shape}")
    if parts[1] != project:
        raise InvalidArgument(f"predictionInput.{field}: {prediction_input[field]!r} is not in project {project}")
    with svc.store.session() as session:
        model = session.scalar(select(Model).where(Model.project == project, Model.name == parts[3]))
        if model is None:
            raise InvalidArgument(f"predictionInput.{field}: {resource_name(project, 'models', parts[3])} not found")
        version_name = parts[5] if expected == 6 else model.default_version
        version = session.scalar(select(Version).where(Version.model_id == model.id, Version.name == version_name,
                                                       Version.state.not_in(("DELETING", "DELETED"))))
    if version is None:
        what = f"version {version_name}" if expected == 6 else "a default version"
        raise InvalidArgument(f"predictionInput.{field}: model {parts[3]} has no {what}")
    runtime_version = prediction_input.get("runtimeVersion") or version.runtime_version
    return version.deployment_uri, version.framework, runtime_version, version.machine_type


def _exported_framework(uri: str) -> str:
    """The framework whose export marker (``saved_model.pb``, ``model-symbol.json``, ``model.pt``) lies in the
    folder ``uri``."""
    svc = services()
    project, key = parse_uri(uri)
    names = {info.key.rpartition("/")[2] for info in svc.artifacts.list_objects(project, key + "/", "", 1000)
             if "/" not in info.key[len(key) + 1:]}
    found = [name for name, framework in sorted(svc.frameworks.items()) if framework.export_marker in names]
    if not found:
        raise InvalidArgument(f"predictionInput.uri: {uri!r} holds no exported model (none of "
                              f"{sorted(f.export_marker for f in svc.frameworks.values())})")
    return found[0]


@blp.route("/jobs", methods=["POST"])
@blp.arguments(JobCreateSchema)
@blp.response(200, JobSchema)
def create_job(body: dict[str, Any], project: str) -> Job:
    """Submit a training job or a batch prediction job (v1 ``jobs.create``)."""
    svc = services()
    name = resource_name(project, "jobs", body["jobId"])
    if "predictionInput" in body:
        job = _prediction_job(project, body["jobId"], body["predictionInput"], body["labels"])
        demand = quotas.prediction_demand(job.prediction_input, svc.settings.machine_types)
    else:
        training_input = body["trainingInput"]
        _check_training_input(project, training_input)
        job = Job(project=project, job_id=body["jobId"], state=JobState.QUEUED.value, step=Step.PROVISIONING.value,
                  framework=training_input["framework"], training_input=training_input, labels=body["labels"])
        demand = quotas.job_demand(training_input, svc.settings.machine_types)
    if svc.store.find_job(project, body["jobId"]) is not None:
        raise AlreadyExists(f"{name} already exists")
    try:  # the quota check locks the project's quotas until the job row is in (429 and nothing created)
        svc.store.create_job(job, check=lambda session: quotas.check(session, svc.settings, project, demand))
    except IntegrityError:  # a concurrent create with the same jobId won
        raise AlreadyExists(f"{name} already exists") from None
    try:
        svc.start_job(job.id)
    except Exception:
        log.exception("could not start job %s (%s)", job.id, name)
        _forget_job(svc.store, job.id)
        raise Unavailable("The job queue is unavailable; the job was not created. Retry later.") from None
    return job  # as created (QUEUED), even if a worker has already moved it on


# ---- read, list ----------------------------------------------------------------------------------------


@blp.route("/jobs/<resource_id:job>", methods=["GET"])
@blp.response(200, JobSchema)
def get_job(project: str, job: str) -> Job:
    """Describe a job (v1 ``jobs.get``)."""
    return _job_or_404(project, job)


def parse_filter(text: str) -> list[Condition]:
    """Parse a v1-style job filter such as ``state=RUNNING AND labels.team="ml"``.

    :raises InvalidArgument: naming what was not understood.
    """
    return parse_list_filter(text, {"state": [s.value for s in JobState], "labels": ()})


def _where(condition: Condition) -> ColumnElement[bool]:
    return compare(Job.labels if condition.field.startswith("labels.") else Job.state, condition)


def encode_page_token(job_pk: int) -> str:
    return base64.urlsafe_b64encode(str(job_pk).encode()).decode()


def decode_page_token(token: str) -> int:
    """:raises InvalidArgument: the token was not made by :func:`encode_page_token`."""
    try:
        job_pk = int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        job_pk = 0
    if job_pk <= 0:
        raise InvalidArgument("pageToken: invalid page token")
    return job_pk


@blp.route("/jobs", methods=["GET"])
@blp.arguments(ListJobsQuerySchema, location="query")
@blp.response(200, ListJobsResponseSchema)
def list_jobs(args: dict[str, Any], project: str) -> dict[str, Any]:
    """List a project's jobs, newest first (v1 ``jobs.list``)."""
    page_size = min(args["pageSize"] or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    conditions = [_where(c) for c in parse_filter(args["filter"])]
    query = select(Job).where(Job.project == project, *conditions).order_by(Job.id.desc()).limit(page_size + 1)
    if args["pageToken"]:
        query = query.where(Job.id < decode_page_token(args["pageToken"]))
    with services().store.session() as session:
        jobs = list(session.scalars(query))
    result: dict[str, Any] = {"jobs": jobs[:page_size]}
    if len(jobs) > page_size:
        result["nextPageToken"] = encode_page_token(jobs[page_size - 1].id)
    return result


# ---- cancel --------------------------------------------------------------------------------------------


@blp.route("/jobs/<resource_id:job>:cancel", methods=["POST"])
@blp.arguments(CancelJobRequestSchema, required=False)
@blp.response(200, EmptySchema)
def cancel_job(_body: dict[str, Any], project: str, job: str) -> dict[str, Any]:
    """Cancel a job (v1 ``jobs.cancel``): a queued one at once, a running one once torn down."""
    store = services().store
    row = _job_or_404(project, job)
    if store.transition(row.id, [JobState.QUEUED], JobState.CANCELLED):
        return {}
    if store.transition(row.id, [JobState.PREPARING, JobState.RUNNING], JobState.CANCELLING):
        return {}
    current = store.get_job(row.id) or row
    if current.state == JobState.CANCELLING.value:  # asked twice: the first request is in progress
        return {}
    raise FailedPrecondition(f"{resource_name(project, 'jobs', job)}: job is already {current.state}")


# ---- events and logs (added endpoints) -----------------------------------------------------------------


@blp.route("/jobs/<resource_id:job>/events", methods=["GET"])
@blp.arguments(EventsQuerySchema, location="query")
@blp.response(200, EventListSchema)
def list_events(args: dict[str, Any], project: str, job: str) -> dict[str, Any]:
    """The job's events (state and step changes, node events), oldest first; page with ``after``."""
    row = _job_or_404(project, job)
    store = services().store
    if "trial" in args:
        return {"events": trial_events(store, row.id, args["trial"], after_id=args["after"])}
    return {"events": store.events(row.id, after_id=args["after"])}


def trial_events(store: Store, job_pk: int, trial: int, *, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
    """Like :meth:`Store.events`, only the events of one trial of a tuning job."""
    name = tuning.trial_node(trial)
    with store.session() as session:
        return list(session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_pk, JobEvent.id > after_id,
                                   or_(JobEvent.node == name, JobEvent.node.startswith(f"{name}/", autoescape=True)))
            .order_by(JobEvent.id).limit(limit)
        ))


def complete_utf8_length(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a multi-byte UTF-8 character.

    Log bytes arrive in arbitrary pieces; cutting there keeps a character split across two reads
    from being shown as two replacement characters.
    """
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last character's lead byte
            return len(data) - back if _utf8_sequence_length(byte) > back else len(data)
    return len(data)


def _utf8_sequence_length(lead: int) -> int:
    """Bytes in the character a lead byte starts (1 for ASCII and for bytes that start none)."""
    for length, prefix, bits in ((2, 0b110, 5), (3, 0b1110, 4), (4, 0b11110, 3)):
        if lead >> bits == prefix:
            return length
    return 1


def follow_log(store: Store, job_pk: int, node: str, offset: int, watch: LogWatch,
               safety_timeout: float = 30.0) -> Iterator[str]:
    """Yield a node's log text from ``offset`` as it grows, until the job has ended and all is read.

    Between reads it waits on ``watch`` for the job's state or logs to change (at most ``safety_timeout``
    seconds). The job's state is read before the log: the workflow stores a node's last bytes before it
    marks the job final, so a final state followed by an empty read means nothing more will come.
    """
    pending = b""
    with watch.following(job_pk):
        while True:
            mark = watch.mark(job_pk)
            job = store.get_job(job_pk)
            ended = job is None or JobState(job.state).is_final
            data, offset = store.read_log(job_pk, node, offset)
            if data:
                data = pending + data
                cut = complete_utf8_length(data)
                pending = data[cut:]
                yield data[:cut].decode("utf-8", errors="replace")
                continue
            if ended:
                if pending:
                    yield pending.decode("utf-8", errors="replace")
                return
            watch.wait(job_pk, mark, safety_timeout)


@blp.route("/jobs/<resource_id:job>/logs", methods=["GET"])
@blp.arguments(LogsQuerySchema, location="query")
@blp.response(200, LogListSchema)
@blp.doc(responses={200: {"content": {"text/plain": {"schema": {
    "type": "string", "description": "with follow=true: the node's log, streamed until the job has ended"}}}}})
def job_logs(args: dict[str, Any], project: str, job: str) -> dict[str, Any] | Response:
    """Every node's log from the start (or one node's from ``offset``); ``follow=true`` streams one node.

    With ``trial``, only that trial's logs: ``node`` then names a node of the trial (its log key is
    ``trial-N/NODE``)."""
    store = services().store
    row = _job_or_404(project, job)
    node = args.get("node")
    prefix = f"{tuning.trial_node(args['trial'])}/" if "trial" in args else ""
    if node:
        node = prefix + node
    if args["follow"]:
        stream = follow_log(store, row.id, node, args["offset"], services().log_watch)
        return Response(stream, mimetype="text/plain",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    ended = JobState(row.state).is_final
    nodes = [node] if node else sorted(name for name in store.log_nodes(row.id) if name.startswith(prefix))
    limit = LOG_LIMIT_ONE_NODE if node else LOG_LIMIT_EACH_NODE
    entries = []
    for name in nodes:
        data, next_offset = store.read_log(row.id, name, args["offset"], limit=limit)
        cut = len(data) if ended else complete_utf8_length(data)
        entries.append({"node": name, "offset": args["offset"], "nextOffset": next_offset - (len(data) - cut),
                        "text": data[:cut].decode("utf-8", errors="replace")})
    return {"logs": entries}


@blp.route("/jobs/<resource_id:job>/metrics", methods=["GET"])
@blp.arguments(MetricsQuerySchema, location="query")
@blp.response(200, JobMetricsSchema)
def job_metrics(args: dict[str, Any], project: str, job: str) -> dict[str, Any]:
    """The job's training metric curves: the TensorBoard scalars its trainers wrote, copied to the store while
    they run (seconds behind), else, for trainers that write no summaries, the metrics their log lines
    report (see :mod:`cloudml_os.metrics`). With ``trial``, only that trial's curves (a tuning job's series
    are named ``trial-N/NODE: METRIC``)."""
    svc = services()
    row = _job_or_404(project, job)
    prefix = f"{tuning.trial_node(args['trial'])}/" if "trial" in args else ""
    series = metrics.tensorboard_scalars(svc.artifacts, job_dir_uri(project, row.job_id, row.training_input))
    series = {name: points for name, points in series.items() if name.startswith(prefix)}
    if series:
        return {"source": "tensorboard", "series": series}
    logs = {}
    for name in sorted(svc.store.log_nodes(row.id)):
        if not name.startswith(prefix):
            continue
        chunks, offset = [], 0
        while offset < METRICS_LOG_LIMIT:
            data, offset = svc.store.read_log(row.id, name, offset, limit=LOG_LIMIT_ONE_NODE)
            if not data:
                break
            chunks.append(data)
        logs[name] = b"".join(chunks).decode("utf-8", errors="replace")
    return {"source": "logs", "series": metrics.log_series(logs)}

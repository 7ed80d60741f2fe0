"""marshmallow schemas of the ``/v1`` API: they validate requests and, through flask-smorest, are the
OpenAPI document, so what is documented is what is enforced.

Field names are v1's camelCase. ``trainingInput`` accepts every field the Cloud ML Engine v1
discovery document lists (clients send some we do not act on, such as ``region``) and rejects
unknown ones. Checks that need the installation (machine types, frameworks, runtimes, uploaded
packages) happen in the views; these schemas only know the v1 shapes.
"""

from __future__ import annotations

import base64
import itertools
import re
import unicodedata
from typing import Any

from marshmallow import (
    EXCLUDE,
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    validate,
    validates,
    validates_schema,
)

from cloudml_os import tuning
from cloudml_os.api import RESOURCE_ID_PATTERN
from cloudml_os.serving.autoscaler import (
    CPU_USAGE,
    DEFAULT_PANIC_WINDOW,
    DEFAULT_STABLE_WINDOW,
    DEFAULT_TARGETS,
    GPU_DUTY_CYCLE,
    REQUESTS_IN_FLIGHT,
)
from cloudml_os.states import DEFAULT_BACKOFF_LIMIT, MAX_BACKOFF_LIMIT, RESTART_POLICIES, JobState
from cloudml_os.store.models import DEFAULT_PREDICTION_DEADLINE

MAX_PREDICTION_DEADLINE = 600.0
SCALE_TIERS = ("BASIC", "STANDARD_1", "PREMIUM_1", "BASIC_GPU", "CUSTOM")
PYTHON_MODULE_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
DURATION_PATTERN = r"\d{1,12}(\.\d{1,9})?s"
MAX_LABELS = 64
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # RFC 3339 as v1 writes it; times are stored as naive UTC


class Int64(fields.Field):
    """A v1 int64: JSON sends it as a string of digits (``"4"``) and clients also send plain integers.

    Loaded as a Python int; dumped as a string, as v1 responses do.
    """

    default_error_messages = {"invalid": "Not a valid integer."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,19}", value.strip()):
            return int(value)
        raise self.make_error("invalid")

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else str(int(value))


class Int32(Int64):
    """A v1 int32: JSON numbers, and strings of digits as proto3 JSON also allows; dumped as a number."""

    default_error_messages = {"invalid": "Not a valid integer.", "range": "Not a 32-bit integer."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        number = super()._deserialize(value, attr, data, **kwargs)
        if not -(1 << 31) <= number < 1 << 31:
            raise self.make_error("range")
        return number

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> int | None:
        return None if value is None else int(value)


class Timestamp(fields.DateTime):
    """RFC 3339 UTC with a ``Z``, e.g. ``2026-11-27T16:00:00Z``, like v1's google-datetime."""

    def __init__(self, **kwargs: Any):
        super().__init__(format=TIMESTAMP_FORMAT, **kwargs)


def _label_char(char: str) -> bool:
    return unicodedata.category(char) in ("Ll", "Lo") or char.isdigit() or char in "_-"


def validate_label_key(key: str) -> None:
    """v1 label keys: 1–63 lowercase letters (international ones too), digits, ``_`` and ``-``,
    starting with a letter."""
    if not (0 < len(key) <= 63 and unicodedata.category(key[0]) in ("Ll", "Lo") and all(map(_label_char, key))):
        raise ValidationError(f"invalid label key {key!r}: 1-63 lowercase letters, digits, '_' or '-', "
                              "starting with a letter")


def validate_label_value(value: str) -> None:
    """v1 label values: up to 63 of the characters keys may hold, possibly empty."""
    if not (len(value) <= 63 and all(map(_label_char, value))):
        raise ValidationError(f"invalid label value {value!r}: at most 63 lowercase letters, digits, '_' or '-'")


def _labels_field(**kwargs: Any) -> fields.Dict:
    return fields.Dict(keys=fields.String(validate=validate_label_key),
                       values=fields.String(validate=validate_label_value),
                       validate=validate.Length(max=MAX_LABELS, error=f"at most {MAX_LABELS} labels"), **kwargs)


def _duration(**kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Regexp(rf"^{DURATION_PATTERN}\Z", error="must be a duration like '3600s'"),
                         metadata={"format": "google-duration", "example": "3600s"}, **kwargs)


def _non_negative() -> validate.Range:
    return validate.Range(min=0, error="must not be negative")


# ---- trainingInput (v1 GoogleCloudMlV1__TrainingInput and the types it holds) ------------------


class AcceleratorConfigSchema(Schema):
    count = Int64(validate=_non_negative())
    type = fields.String()


class DiskConfigSchema(Schema):
    bootDiskSizeGb = fields.Integer(validate=_non_negative())
    bootDiskType = fields.String()


class ReplicaConfigSchema(Schema):
    """v1 per-replica configuration; kept with the job (accelerators and disks map to flavors later)."""

    acceleratorConfig = fields.Nested(AcceleratorConfigSchema)
    containerArgs = fields.List(fields.String())
    containerCommand = fields.List(fields.String())
    diskConfig = fields.Nested(DiskConfigSchema)
    imageUri = fields.String()
    tpuTfVersion = fields.String()


class SchedulingSchema(Schema):
    maxRunningTime = _duration()
    maxWaitTime = _duration()
    priority = fields.Integer()
    restartPolicy = fields.String(
        validate=validate.OneOf(RESTART_POLICIES, error="unknown restart policy {input!r}; valid policies: "
                                                        + ", ".join(RESTART_POLICIES)),
        metadata={"description": "added field, as Kubeflow's restartPolicy: NEVER (default) fails the job when a "
                                 "node dies or a trainer fails; ON_FAILURE replaces dead nodes and restarts "
                                 "every trainer, up to backoffLimit times"})
    backoffLimit = fields.Integer(
        validate=validate.Range(min=0, max=MAX_BACKOFF_LIMIT, error="must be between {min} and {max}"),
        metadata={"description": f"added field: restarts allowed under ON_FAILURE (default {DEFAULT_BACKOFF_LIMIT})"})


class EncryptionConfigSchema(Schema):
    kmsKeyName = fields.String()


class ParameterSpecSchema(Schema):
    """v1 ParameterSpec: one hyperparameter, passed to every trial as ``--parameterName=value``."""

    parameterName = fields.String(required=True, validate=[
        validate.Regexp(rf"^{tuning.PARAMETER_NAME_PATTERN}\Z",
                        error="must start with a letter and hold at most 128 letters, digits or '_' "
                              "(it becomes the trainer's --name=value argument)"),
        validate.NoneOf(tuning.RESERVED_PARAMETER_NAMES, error="{input!r} is reserved: the platform passes "
                                                                "--job-dir itself")])
    type = fields.String(required=True, validate=validate.OneOf(
        tuning.PARAMETER_TYPES, error="unknown type {input!r}; valid types: " + ", ".join(tuning.PARAMETER_TYPES)))
    minValue = fields.Float(metadata={"description": "DOUBLE and INTEGER (required): the smallest value"})
    maxValue = fields.Float(metadata={"description": "DOUBLE and INTEGER (required): the largest value, "
                                                     "more than minValue"})
    categoricalValues = fields.List(fields.String(), validate=validate.Length(
        min=1, max=tuning.MAX_VALUES, error=f"give 1 to {tuning.MAX_VALUES} values"),
        metadata={"description": "CATEGORICAL (required): distinct strings"})
    discreteValues = fields.List(fields.Float(), validate=validate.Length(
        min=1, max=tuning.MAX_VALUES, error=f"give 1 to {tuning.MAX_VALUES} values"),
        metadata={"description": "DISCRETE (required): numbers in strictly increasing order"})
    scaleType = fields.String(validate=validate.OneOf(
        tuning.SCALE_TYPES, error="unknown scale type {input!r}; valid: " + ", ".join(tuning.SCALE_TYPES)),
        metadata={"description": "DOUBLE and INTEGER only; the log scales need minValue > 0"})

    @validates_schema
    def _fields_of_the_type(self, data: dict[str, Any], **kwargs: Any) -> None:
        kind = data["type"]
        wanted = {"DOUBLE": ("minValue", "maxValue"), "INTEGER": ("minValue", "maxValue"),
                  "CATEGORICAL": ("categoricalValues",), "DISCRETE": ("discreteValues",)}[kind]
        errors: dict[str, list[str]] = {}
        for name in ("minValue", "maxValue", "categoricalValues", "discreteValues"):
            if name in wanted and name not in data:
                errors[name] = [f"required for a {kind} parameter"]
            elif name not in wanted and name in data:
                errors[name] = [f"not allowed for a {kind} parameter"]
        scale = data.get("scaleType", "NONE")
        if kind not in tuning.RANGE_TYPES and scale != "NONE":
            errors["scaleType"] = [f"only DOUBLE and INTEGER parameters are scaled; leave it unset for {kind}"]
        if errors:
            raise ValidationError(errors)
        if kind in tuning.RANGE_TYPES:
            self._check_range(kind, data["minValue"], data["maxValue"], scale)
        elif kind == "CATEGORICAL" and len(set(data["categoricalValues"])) < len(data["categoricalValues"]):
            raise ValidationError("values must be distinct", field_name="categoricalValues")
        elif kind == "DISCRETE":
            values = data["discreteValues"]
            if any(later <= earlier for earlier, later in itertools.pairwise(values)):
                raise ValidationError("values must be in strictly increasing order", field_name="discreteValues")

    @staticmethod
    def _check_range(kind: str, low: float, high: float, scale: str) -> None:
        if kind == "INTEGER":
            for name, value in (("minValue", low), ("maxValue", high)):
                if not value.is_integer():
                    raise ValidationError("must be an integer for an INTEGER parameter", field_name=name)
        if low >= high:
            raise ValidationError("must be less than maxValue", field_name="minValue")
        if scale in tuning.LOG_SCALES and low <= 0:
            raise ValidationError(f"must be more than 0 with scaleType {scale}", field_name="minValue")


def _trials(minimum: int, **kwargs: Any) -> Int32:
    return Int32(validate=validate.Range(min=minimum, max=tuning.MAX_TRIALS, error="must be between {min} and {max}"),
                 **kwargs)


class HyperparameterSpecSchema(Schema):
    """v1 HyperparameterSpec: every field of v1 is honoured; defaults are filled in when loaded."""

    goal = fields.String(load_default="MAXIMIZE", validate=validate.OneOf(
        tuning.GOALS, error="unknown goal {input!r}; valid: MAXIMIZE, MINIMIZE"),
        metadata={"description": "MAXIMIZE (default; also for GOAL_TYPE_UNSPECIFIED) or MINIMIZE"})
    params = fields.List(fields.Nested(ParameterSpecSchema), required=True, validate=validate.Length(
        min=1, max=tuning.MAX_PARAMS, error=f"give 1 to {tuning.MAX_PARAMS} parameters"))
    maxTrials = _trials(1, load_default=1, metadata={"description": "default 1"})
    maxParallelTrials = _trials(1, load_default=1, metadata={
        "description": "default 1; more than maxTrials runs maxTrials at once"})
    maxFailedTrials = _trials(0, load_default=0, metadata={
        "description": "failed trials that fail the job; 0 (default): no limit, every trial may fail"})
    hyperparameterMetricTag = fields.String(
        load_default=tuning.DEFAULT_METRIC_TAG, validate=validate.Length(min=1, max=1024),
        metadata={"description": f"the metric the trials report (default {tuning.DEFAULT_METRIC_TAG})"})
    resumePreviousJobId = fields.String(validate=validate.Regexp(
        rf"^{RESOURCE_ID_PATTERN}\Z", error="must be a job id: a letter, then at most 127 letters, digits or '_'"),
        metadata={"description": "a finished tuning job of this project, same goal and parameter names and "
                                 "types, whose trials this study continues"})
    enableTrialEarlyStopping = fields.Boolean(load_default=False)
    algorithm = fields.String(load_default="ALGORITHM_UNSPECIFIED", validate=validate.OneOf(
        tuning.ALGORITHMS, error="unknown algorithm {input!r}; valid: " + ", ".join(tuning.ALGORITHMS)),
        metadata={"description": "ALGORITHM_UNSPECIFIED (default: Bayesian, Optuna's TPE), GRID_SEARCH "
                                 "(no DOUBLE parameters) or RANDOM_SEARCH"})

    @validates_schema
    def _params_fit_together(self, data: dict[str, Any], **kwargs: Any) -> None:
        errors: dict[int, dict[str, list[str]]] = {}
        seen: set[str] = set()
        for index, param in enumerate(data["params"]):
            if param["parameterName"] in seen:
                errors[index] = {"parameterName": [f"{param['parameterName']!r} is given twice"]}
            seen.add(param["parameterName"])
            if data["algorithm"] == "GRID_SEARCH" and param["type"] == "DOUBLE":
                errors.setdefault(index, {})["type"] = [
                    "GRID_SEARCH cannot search a DOUBLE parameter; use INTEGER, CATEGORICAL or DISCRETE"]
        if errors:
            raise ValidationError({"params": errors})

    @post_load
    def _goal(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {**data, "goal": tuning.goal(data)}


class TrainingInputSchema(Schema):
    """v1 ``trainingInput`` plus our ``framework``. Loaded as a camelCase dict, stored with the job as is."""

    scaleTier = fields.String(
        load_default="BASIC",
        validate=validate.OneOf(SCALE_TIERS, error="unknown tier {input!r}; valid tiers: " + ", ".join(SCALE_TIERS)),
    )
    masterType = fields.String()
    workerType = fields.String()
    parameterServerType = fields.String()
    evaluatorType = fields.String()
    workerCount = Int64(validate=_non_negative())
    parameterServerCount = Int64(validate=_non_negative())
    evaluatorCount = Int64(validate=_non_negative())
    masterConfig = fields.Nested(ReplicaConfigSchema)
    workerConfig = fields.Nested(ReplicaConfigSchema)
    parameterServerConfig = fields.Nested(ReplicaConfigSchema)
    evaluatorConfig = fields.Nested(ReplicaConfigSchema)
    packageUris = fields.List(fields.String(validate=validate.Length(min=1)), required=True,
                              validate=validate.Length(min=1, max=100, error="give 1 to 100 package URIs"),
                              metadata={"description": "store://PROJECT/packages/... URIs of uploaded packages"})
    pythonModule = fields.String(
        required=True,
        validate=validate.Regexp(rf"^{PYTHON_MODULE_PATTERN}\Z", error="must be a dotted Python module name"),
    )
    args = fields.List(fields.String(), metadata={
        "description": "passed to the module literally, no shell; a store://PROJECT/NAME argument (or the value "
                       "of --flag=store://PROJECT/NAME) of this project reaches the trainer as the path where "
                       "its node sees the object (/store/PROJECT/NAME on the local driver)"})
    hyperparameters = fields.Nested(HyperparameterSpecSchema)
    region = fields.String()
    jobDir = fields.String()
    runtimeVersion = fields.String()
    pythonVersion = fields.String()
    network = fields.String()
    serviceAccount = fields.String()
    useChiefInTfConfig = fields.Boolean()
    enableWebAccess = fields.Boolean()
    scheduling = fields.Nested(SchedulingSchema)
    encryptionConfig = fields.Nested(EncryptionConfigSchema)
    framework = fields.String(load_default="TENSORFLOW",
                              metadata={"description": "added field: TENSORFLOW (default) or another "
                                                       "installed framework plugin, e.g. MXNET"})


# ---- Job ------------------------------------------------------------------------------------------

_OUTPUT_ONLY = {"readOnly": True, "description": "output only; ignored on create"}


PREDICTION_DATA_FORMATS = ("JSON", "TEXT", "CSV", "TF_RECORD", "TF_RECORD_GZIP")
PREDICTION_OUTPUT_FORMATS = ("JSON", "CSV")
DEFAULT_MAX_WORKER_COUNT = 10
MAX_PREDICTION_INPUT_PATHS = 100


class PredictionInputSchema(Schema):
    """v1 PredictionInput: a batch prediction job over files in the store (``workflows/batch_predict.py``).

    Exactly one of ``modelName`` (its default version), ``versionName`` or ``uri`` names the model; which of
    them names something of this project is checked by the view.
    """

    dataFormat = fields.String(required=True, validate=validate.OneOf(PREDICTION_DATA_FORMATS), metadata={
        "description": "JSON (TEXT is the same): one instance per line, as an item of an online request's "
                       "instances; CSV: one instance per line, its comma-separated numbers; TF_RECORD, "
                       "TF_RECORD_GZIP: one JSON instance per record"})
    outputDataFormat = fields.String(load_default="JSON", validate=validate.OneOf(PREDICTION_OUTPUT_FORMATS))
    inputPaths = fields.List(fields.String(validate=validate.Length(min=1, max=1100)), required=True,
                             validate=validate.Length(min=1, max=MAX_PREDICTION_INPUT_PATHS,
                                                      error=f"give 1 to {MAX_PREDICTION_INPUT_PATHS} paths"),
                             metadata={"description": "store://PROJECT/NAME of this project; * matches any "
                                                      "characters but /"})
    outputPath = fields.String(required=True, validate=validate.Length(min=1, max=900), metadata={
        "description": "store://PROJECT/FOLDER the prediction.results-* and prediction.errors_stats-* "
                       "files are written to"})
    modelName = fields.String(metadata={"description": "projects/PROJECT/models/MODEL: its default version"})
    versionName = fields.String(metadata={"description": "projects/PROJECT/models/MODEL/versions/VERSION"})
    uri = fields.String(metadata={"description": "store://PROJECT/FOLDER of an exported model"})
    framework = fields.String(metadata={"description": "added field, with uri only: TENSORFLOW, MXNET or "
                                                       "PYTORCH (default: told by the model's files)"})
    runtimeVersion = fields.String()
    maxWorkerCount = Int64(load_default=DEFAULT_MAX_WORKER_COUNT,
                           validate=validate.Range(min=1, max=1000, error="must be 1 to 1000"))
    batchSize = Int64(load_default=64, validate=validate.Range(min=1, max=10000, error="must be 1 to 10000"))
    signatureName = fields.String(load_default="serving_default", validate=validate.OneOf(
        ["serving_default"], error="only serving_default is served (the signature online prediction uses)"))
    region = fields.String()

    @validates_schema
    def _one_model(self, data: dict[str, Any], **kwargs: Any) -> None:
        given = [name for name in ("modelName", "versionName", "uri") if data.get(name)]
        if len(given) != 1:
            raise ValidationError("give exactly one of modelName, versionName and uri"
                                  + (f" (got {', '.join(given)})" if given else ""), "modelName")
        if data.get("framework") and not data.get("uri"):
            raise ValidationError("only with uri: a version's framework is the version's", "framework")


class JobCreateSchema(Schema):
    """The v1 Job body of ``jobs.create``: a training job (``trainingInput``) or a batch prediction job
    (``predictionInput``). Output-only fields (as in a job fetched earlier) are ignored."""

    jobId = fields.String(required=True, validate=validate.Regexp(
        rf"^{RESOURCE_ID_PATTERN}\Z", error="must start with a letter and hold at most 128 letters, digits or '_'"))
    trainingInput = fields.Nested(TrainingInputSchema)
    predictionInput = fields.Nested(PredictionInputSchema)
    labels = _labels_field(load_default=dict)
    createTime = fields.Raw(metadata=_OUTPUT_ONLY)
    startTime = fields.Raw(metadata=_OUTPUT_ONLY)
    endTime = fields.Raw(metadata=_OUTPUT_ONLY)
    state = fields.Raw(metadata=_OUTPUT_ONLY)
    errorMessage = fields.Raw(metadata=_OUTPUT_ONLY)
    trainingOutput = fields.Raw(metadata=_OUTPUT_ONLY)
    predictionOutput = fields.Raw(metadata=_OUTPUT_ONLY)
    jobPosition = fields.Raw(metadata=_OUTPUT_ONLY)
    etag = fields.Raw(metadata=_OUTPUT_ONLY)
    step = fields.Raw(metadata=_OUTPUT_ONLY)
    framework = fields.Raw(metadata=_OUTPUT_ONLY)
    restartCount = fields.Raw(metadata=_OUTPUT_ONLY)

    @validates_schema
    def _one_input(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("trainingInput" in data) == ("predictionInput" in data):
            raise ValidationError("give exactly one of trainingInput (a training job) and predictionInput (a "
                                  "batch prediction job)", "trainingInput")

    @post_load
    def _keep_inputs(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        kept = ("jobId", "trainingInput", "predictionInput", "labels")
        return {key: data[key] for key in kept if key in data}


class JobSchema(Schema):
    """The v1 Job resource, dumped from a stored job; ``step`` and ``framework`` are added fields."""

    jobId = fields.String(attribute="job_id")
    trainingInput = fields.Nested(TrainingInputSchema, attribute="training_input")
    predictionInput = fields.Dict(attribute="prediction_input")
    createTime = Timestamp(attribute="create_time")
    startTime = Timestamp(attribute="start_time")
    endTime = Timestamp(attribute="end_time")
    state = fields.String(validate=validate.OneOf([s.value for s in JobState]))
    errorMessage = fields.String(attribute="error_message")
    trainingOutput = fields.Dict(attribute="training_output")
    predictionOutput = fields.Dict(attribute="prediction_output", metadata={
        "description": "v1 PredictionOutput (outputPath, predictionCount, errorCount, nodeHours) with added "
                       "modelUri, recordsDone, recordsTotal (once every shard has been counted), shardsDone, "
                       "shardsTotal"})
    labels = fields.Dict(keys=fields.String(), values=fields.String())
    etag = fields.Method("_etag", metadata={"format": "byte"})
    step = fields.String(metadata={"description": "added field: the workflow step that owns the job now"})
    framework = fields.String(metadata={"description": "added field: the framework plugin running the job"})
    restartCount = fields.Integer(attribute="restart_count", metadata={
        "description": "added field: times the trainers were restarted (scheduling.restartPolicy ON_FAILURE)"})

    def _etag(self, job: Any) -> str:
        # v1 etags are opaque bytes sent base64-encoded; ours is the row's version counter.
        return base64.b64encode(str(job.etag).encode()).decode()

    @post_dump
    def _omit_empty(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # v1 leaves out unset fields rather than sending null or empty values.
        return {key: value for key, value in data.items() if value not in (None, "", {})}


class ListJobsQuerySchema(Schema):
    pageSize = fields.Integer(load_default=0, validate=_non_negative(),
                              metadata={"description": "default 100; larger values are lowered to 1000"})
    pageToken = fields.String(load_default="")
    filter = fields.String(load_default="", metadata={
        "description": 'conditions on state and labels joined by AND, e.g. state=RUNNING AND labels.team="ml"; '
                       "operators = and !="})


class ListJobsResponseSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
    nextPageToken = fields.String()


class CancelJobRequestSchema(Schema):
    """v1's empty CancelJobRequest."""


class EmptySchema(Schema):
    """v1's google.protobuf.Empty: ``{}``."""


# ---- added endpoints: events and logs -------------------------------------------------------------


class EventSchema(Schema):
    id = fields.Integer()
    time = Timestamp()
    kind = fields.String(metadata={"description": "STATE, STEP, or a workflow-specific kind"})
    node = fields.String(metadata={"description": "the node the event concerns, when one does"})
    message = fields.String()

    @post_dump
    def _omit_null(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if value is not None}


def _trial_query(description: str) -> fields.Integer:
    return fields.Integer(validate=validate.Range(min=1, max=(1 << 31) - 1, error="must be a positive trial id"),
                          metadata={"description": description})


class EventsQuerySchema(Schema):
    after = fields.Integer(load_default=0, validate=_non_negative(),
                           metadata={"description": "only events with a larger id (the last id seen)"})
    trial = _trial_query("only the events of this trial of a hyperparameter tuning job (node trial-N or trial-N/…)")


class EventListSchema(Schema):
    events = fields.List(fields.Nested(EventSchema))


class LogsQuerySchema(Schema):
    node = fields.String(validate=validate.Length(min=1, max=128),
                         metadata={"description": "one node, e.g. master-0; default every node"})
    trial = _trial_query("only the logs of this trial of a hyperparameter tuning job; node then names a node "
                         "of the trial (the log trial-N/NODE)")
    offset = fields.Integer(load_default=0, validate=_non_negative(),
                            metadata={"description": "byte offset to read from (needs node)"})
    follow = fields.Boolean(load_default=False, metadata={
        "description": "stream the node's log as text/plain until the job has ended (needs node)"})

    @validates_schema
    def _node_for_offset_and_follow(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "node" not in data:
            if data.get("offset"):
                raise ValidationError("offset needs node", field_name="offset")
            if data.get("follow"):
                raise ValidationError("follow needs node", field_name="follow")


class LogEntrySchema(Schema):
    node = fields.String()
    offset = fields.Integer()
    nextOffset = fields.Integer(metadata={"description": "offset to ask for next"})
    text = fields.String(metadata={"description": "UTF-8 text; undecodable bytes become U+FFFD"})


class LogListSchema(Schema):
    logs = fields.List(fields.Nested(LogEntrySchema))


class MetricPointSchema(Schema):
    x = fields.Float(metadata={"description": "the training step"})
    y = fields.Float(metadata={"description": "the metric's value at that step"})


class MetricsQuerySchema(Schema):
    trial = _trial_query("only the curves of this trial of a hyperparameter tuning job (series 'trial-N/NODE: …')")


class JobMetricsSchema(Schema):
    source = fields.String(metadata={"enum": ["tensorboard", "logs"], "description":
                                     "tensorboard: the scalars of the event files the trainers wrote under their job "
                                     "directory (archived when the job ends); logs: metrics read from log lines"})
    series = fields.Dict(keys=fields.String(), values=fields.List(fields.Nested(MetricPointSchema)),
                         metadata={"description": "one curve per 'NODE: METRIC', points by step"})


# ---- packages -------------------------------------------------------------------------------------


class PackageUploadSchema(Schema):
    file = fields.Raw(required=True, metadata={"type": "string", "format": "binary",
                                               "description": ".tar.gz, .tgz, .tar, .zip or .whl"})


class PackageSchema(Schema):
    uri = fields.String(metadata={"description": "store:// URI to put in trainingInput.packageUris"})
    kind = fields.String(metadata={"description": "sdist (a Python source distribution), wheel or archive"})
    sha256 = fields.String()
    size = fields.Integer()
    filename = fields.String()
    createTime = Timestamp(attribute="created_at")


class PackageListSchema(Schema):
    packages = fields.List(fields.Nested(PackageSchema))


# ---- project configuration (v1 getConfig, with added runtimes and machine types) -------------------


class RuntimeSchema(Schema):
    framework = fields.String(metadata={"description": "trainingInput.framework value"})
    runtimeVersion = fields.String(metadata={"description": "trainingInput.runtimeVersion value"})
    default = fields.Boolean(metadata={"description": "used when runtimeVersion is not given"})


class MachineTypeSchema(Schema):
    name = fields.String()
    flavor = fields.String(metadata={"description": "the OpenStack flavor (or local equivalent) it maps to"})
    gpus = fields.Integer()


class QuotaValuesSchema(Schema):
    """One number per quota: a limit (-1 unlimited) or a usage."""

    gpus = fields.Integer(strict=True, validate=validate.Range(min=-1))
    nodes = fields.Integer(strict=True, validate=validate.Range(min=-1))
    jobs = fields.Integer(strict=True, validate=validate.Range(min=-1))
    replicas = fields.Integer(strict=True, validate=validate.Range(min=-1))


MAX_QUOTA = (1 << 31) - 1  # the column is a 32-bit integer


class QuotaOverridesSchema(Schema):
    """Limits to override; null puts a quota back to the installation's default."""

    gpus = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=-1, max=MAX_QUOTA))
    nodes = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=-1, max=MAX_QUOTA))
    jobs = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=-1, max=MAX_QUOTA))
    replicas = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=-1, max=MAX_QUOTA))


class QuotaUpdateSchema(Schema):
    quotas = fields.Nested(QuotaOverridesSchema, required=True)


class ProjectQuotasSchema(Schema):
    project = fields.String()
    quotas = fields.Nested(QuotaValuesSchema, metadata={"description": "limits; -1 is unlimited"})
    usage = fields.Nested(QuotaValuesSchema, metadata={"description": "computed from unfinished jobs and "
                                                                      "live versions"})


class ProjectQuotasListSchema(Schema):
    projects = fields.List(fields.Nested(ProjectQuotasSchema))


class ProjectConfigSchema(Schema):
    serviceAccount = fields.String()
    serviceAccountProject = fields.String()
    config = fields.Dict()
    runtimes = fields.List(fields.Nested(RuntimeSchema))
    machineTypes = fields.List(fields.Nested(MachineTypeSchema))
    quotas = fields.Nested(ProjectQuotasSchema, metadata={"description": "added: the project's quotas and usage"})


# ---- errors (documentation of the v1 error body; errors.py builds it) -------------------------------


class ErrorStatusSchema(Schema):
    code = fields.Integer(metadata={"description": "HTTP status code"})
    message = fields.String()
    status = fields.String(metadata={"description": "e.g. INVALID_ARGUMENT, NOT_FOUND"})


class ErrorSchema(Schema):
    error = fields.Nested(ErrorStatusSchema)


# ---- models, versions, operations, prediction (v1 Model, Version, Operation; added fields marked) -----

MAX_NODES = 32
VERSION_STATES = ("CREATING", "READY", "UPDATING", "FAILED", "DELETING")
HEALTH_CHECK_DEFAULTS = {"interval": 1.0, "timeout": 1.0, "rise": 2, "fall": 3}
OPERATION_METADATA_TYPE = "type.googleapis.com/google.cloud.ml.v1.OperationMetadata"
_RESOURCE_ID = validate.Regexp(rf"^{RESOURCE_ID_PATTERN}\Z",
                               error="must start with a letter and hold at most 128 letters, digits or '_'")
_UNSUPPORTED = {"description": "not supported: the version is served by the framework's model server"}


class _OmitEmpty(Schema):
    """A response schema leaving out unset fields, as v1 does, rather than sending null or empty values."""

    @post_dump
    def _omit_empty(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if value not in (None, "", {})}


def _etag_of(row: Any) -> str:
    # v1 etags are opaque bytes sent base64-encoded; ours is the row's version counter.
    return base64.b64encode(str(row.etag).encode()).decode()


class ManualScalingSchema(Schema):
    nodes = fields.Integer(required=True, validate=validate.Range(
        min=1, max=MAX_NODES, error=f"must be between 1 and {MAX_NODES}"))


class MetricSpecSchema(Schema):
    """v1's MetricSpec: what the autoscaler keeps near its target, per replica."""

    name = fields.String(required=True, validate=validate.OneOf(
        (REQUESTS_IN_FLIGHT, CPU_USAGE, GPU_DUTY_CYCLE),
        error=f"must be {REQUESTS_IN_FLIGHT}, {CPU_USAGE} or {GPU_DUTY_CYCLE}"), metadata={
        "description": f"{REQUESTS_IN_FLIGHT} (added, as Knative's concurrency: requests in flight per replica), "
                       f"{CPU_USAGE} (percent of a replica node's cores) or {GPU_DUTY_CYCLE} (percent of the time "
                       f"its GPUs ran a kernel; machine types with GPUs only)"})
    target = fields.Float(required=True, allow_nan=False, validate=validate.Range(
        min=0, min_inclusive=False, max=10000, error="must be more than 0 and at most 10000"), metadata={
        "description": f"per replica; default {DEFAULT_TARGETS[REQUESTS_IN_FLIGHT]:g} requests in flight or "
                       f"{DEFAULT_TARGETS[CPU_USAGE]:g} % CPU"})

    @validates_schema
    def _percent(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("name") in (CPU_USAGE, GPU_DUTY_CYCLE) and data.get("target", 0) > 100:
            raise ValidationError(f"a {data['name']} target is a percent: at most 100", field_name="target")


class AutoScalingSchema(Schema):
    """v1's AutoScaling, with Knative's windows added; loads to the stored policy with every default filled
    in (see cloudml_os.serving.autoscaler)."""

    minNodes = fields.Integer(required=True, validate=validate.Range(
        min=0, max=MAX_NODES, error=f"must be between 0 and {MAX_NODES}"), metadata={
        "description": "0 lets the version scale to zero: the first request then waits for a replica"})
    maxNodes = fields.Integer(validate=validate.Range(min=1, max=MAX_NODES, error=f"must be between 1 and "
                                                                                  f"{MAX_NODES}"),
                              metadata={"description": "default: minNodes (at least 1)"})
    metrics = fields.List(fields.Nested(MetricSpecSchema), validate=validate.Length(min=1, max=3), metadata={
        "description": f"default [{{name: {REQUESTS_IN_FLIGHT}, target: "
                       f"{DEFAULT_TARGETS[REQUESTS_IN_FLIGHT]:g}}}]; with several, the largest want wins"})
    stableWindow = fields.Float(allow_nan=False, validate=validate.Range(
        min=6, max=3600, error="must be from 6 to 3600 seconds"), metadata={
        "description": f"added (Knative's window): seconds of load averaged; scale-in waits this long "
                       f"(default {DEFAULT_STABLE_WINDOW:g})"})
    panicWindow = fields.Float(allow_nan=False, validate=validate.Range(
        min=1, max=3600, error="must be from 1 to 3600 seconds"), metadata={
        "description": f"added: seconds of load a sudden step is judged on (default {DEFAULT_PANIC_WINDOW:g})"})

    @validates_schema
    def _consistent(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("maxNodes") is not None and data.get("minNodes", 0) > data["maxNodes"]:
            raise ValidationError("must be at least minNodes", field_name="maxNodes")
        names = [metric.get("name") for metric in data.get("metrics") or []]
        if len(set(names)) != len(names):
            raise ValidationError("each metric at most once", field_name="metrics")
        if data.get("panicWindow", 0) > data.get("stableWindow", DEFAULT_STABLE_WINDOW):
            raise ValidationError("must be at most stableWindow", field_name="panicWindow")

    @post_load
    def _defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"minNodes": data["minNodes"], "maxNodes": data.get("maxNodes", max(data["minNodes"], 1)),
                "metrics": data.get("metrics") or [{"name": REQUESTS_IN_FLIGHT,
                                                    "target": DEFAULT_TARGETS[REQUESTS_IN_FLIGHT]}],
                "stableWindow": data.get("stableWindow", DEFAULT_STABLE_WINDOW),
                "panicWindow": data.get("panicWindow", DEFAULT_PANIC_WINDOW)}


class AutoScalingPatchSchema(Schema):
    """``autoScaling`` in a ``versions.patch`` body: the named fields are laid over the version's policy,
    and the result is loaded with :class:`AutoScalingSchema`."""

    class Meta:
        unknown = EXCLUDE

    minNodes = fields.Raw()
    maxNodes = fields.Raw()
    metrics = fields.Raw()
    stableWindow = fields.Raw()
    panicWindow = fields.Raw()


class HealthCheckSchema(Schema):
    """Added: the health monitor's active checks (HAProxy semantics). A replica leaves the pool after
    ``fall`` failed probes in a row and rejoins after ``rise`` good ones."""

    interval = fields.Float(load_default=HEALTH_CHECK_DEFAULTS["interval"], validate=validate.Range(
        min=0, min_inclusive=False, max=3600, error="must be more than 0 and at most 3600 seconds"),
        metadata={"description": "seconds between probes of one replica (default 1)"})
    timeout = fields.Float(load_default=HEALTH_CHECK_DEFAULTS["timeout"], validate=validate.Range(
        min=0, min_inclusive=False, max=3600, error="must be more than 0 and at most 3600 seconds"),
        metadata={"description": "seconds a probe may take, at most interval (default 1)"})
    rise = fields.Integer(load_default=HEALTH_CHECK_DEFAULTS["rise"], validate=validate.Range(
        min=1, max=100, error="must be between 1 and 100"),
        metadata={"description": "good probes in a row before a replica serves again (default 2)"})
    fall = fields.Integer(load_default=HEALTH_CHECK_DEFAULTS["fall"], validate=validate.Range(
        min=1, max=100, error="must be between 1 and 100"),
        metadata={"description": "failed probes in a row before a replica is ejected (default 3)"})

    @validates_schema
    def _timeout_within_interval(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("timeout", 0) > data.get("interval", float("inf")):
            raise ValidationError("must not exceed interval", field_name="timeout")


class ModelCreateSchema(Schema):
    """The v1 Model body of ``models.create``; output-only fields (as in a fetched model) are ignored."""

    name = fields.String(required=True, validate=_RESOURCE_ID)
    description = fields.String(load_default="")
    labels = _labels_field(load_default=dict)
    regions = fields.List(fields.String(), validate=validate.Length(max=1, error="at most one region"),
                          metadata={"description": "accepted and ignored: the installation's cloud serves"})
    onlinePredictionLogging = fields.Boolean(metadata={
        "description": "false only: request logs are set per version (requestLoggingConfig)"})
    onlinePredictionConsoleLogging = fields.Boolean(metadata={
        "description": "false only: model servers' output is in the replica's node log"})
    defaultVersion = fields.Raw(metadata=_OUTPUT_ONLY)
    etag = fields.Raw(metadata=_OUTPUT_ONLY)

    @validates("onlinePredictionLogging", "onlinePredictionConsoleLogging")
    def _logging_off(self, value: bool, **kwargs: Any) -> None:
        if value:
            raise ValidationError("not supported: log a version's requests with its requestLoggingConfig "
                                  "(versions.create or versions.patch)")

    @post_load
    def _keep_inputs(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"name": data["name"], "description": data["description"], "labels": data["labels"]}


class VersionNameSchema(Schema):
    name = fields.String(required=True, metadata={"description": "a version id or its full resource name"})


class ModelPatchSchema(Schema):
    """The v1 Model body of ``models.patch``: only the fields named in ``updateMask`` are read."""

    class Meta:
        unknown = EXCLUDE

    description = fields.String()
    labels = _labels_field()
    defaultVersion = fields.Nested(VersionNameSchema)
    trafficSplit = fields.Dict(keys=fields.String(validate=_RESOURCE_ID),
                               values=fields.Integer(strict=True, validate=validate.Range(0, 100)),
                               metadata={"description": "added (as Vertex AI endpoints): version id → percent of "
                                                        "the model's :predict calls, summing to 100"})

    @validates("trafficSplit")
    def _sums_to_100(self, value: dict[str, int], **_: Any) -> None:
        if not value:
            raise ValidationError("give at least one version and its percent")
        if sum(value.values()) != 100:
            raise ValidationError(f"the percents sum to {sum(value.values())}, not 100")


class UpdateMaskQuerySchema(Schema):
    updateMask = fields.String(required=True, validate=validate.Length(min=1), metadata={
        "description": "comma-separated fields to change, e.g. description,labels"})


class RequestLoggingConfigSchema(Schema):
    """v1's RequestLoggingConfig: the share of online predictions logged; the log goes to the project's store
    (``store://PROJECT/request-logs/MODEL/VERSION/…``), not to BigQuery."""

    samplingPercentage = fields.Float(required=True, allow_nan=False, validate=validate.Range(0, 1), metadata={
        "description": "the fraction of requests logged, from 0 to 1 (as v1)"})
    bigqueryTableName = fields.Raw(metadata={"description": "not supported: request logs go to the store"})

    @validates("bigqueryTableName")
    def _no_bigquery(self, value: Any, **kwargs: Any) -> None:
        raise ValidationError("not supported: request logs are JSON lines in the project's store, under "
                              "store://PROJECT/request-logs/MODEL/VERSION/")


class VersionCreateSchema(Schema):
    """The v1 Version body of ``versions.create`` plus our ``healthCheck``; output-only fields are ignored."""

    name = fields.String(required=True, validate=_RESOURCE_ID)
    description = fields.String(load_default="")
    deploymentUri = fields.String(required=True, validate=validate.Length(min=1), metadata={
        "description": "store://PROJECT/... folder of an exported model (a training job's export)"})
    framework = fields.String(load_default="TENSORFLOW", metadata={
        "description": "TENSORFLOW (default) or another installed framework plugin, e.g. MXNET, PYTORCH"})
    runtimeVersion = fields.String(metadata={"description": "default: the framework's default runtime"})
    machineType = fields.String(metadata={"description": "an installation machine type; default standard"})
    manualScaling = fields.Nested(ManualScalingSchema)
    autoScaling = fields.Nested(AutoScalingSchema)
    pythonVersion = fields.String(metadata={"description": "accepted; the runtime decides the Python version"})
    labels = _labels_field(load_default=dict)
    healthCheck = fields.Nested(HealthCheckSchema, load_default=lambda: dict(HEALTH_CHECK_DEFAULTS),
                                metadata={"description": "added field"})
    predictionDeadline = fields.Float(allow_nan=False, validate=validate.Range(
        min=0.1, max=MAX_PREDICTION_DEADLINE, error=f"must be from 0.1 to {MAX_PREDICTION_DEADLINE:g} seconds"),
        metadata={"description": "added: seconds a prediction may take (default 5); a replica that has not "
                                 "answered by then is ejected. A request may ask for another with the "
                                 "X-Prediction-Deadline header"})
    packageUris = fields.Raw(metadata=_UNSUPPORTED)
    predictionClass = fields.Raw(metadata=_UNSUPPORTED)
    container = fields.Raw(metadata=_UNSUPPORTED)
    routes = fields.Raw(metadata=_UNSUPPORTED)
    acceleratorConfig = fields.Raw(metadata=_UNSUPPORTED)
    explanationConfig = fields.Raw(metadata=_UNSUPPORTED)
    serviceAccount = fields.Raw(metadata=_UNSUPPORTED)
    requestLoggingConfig = fields.Nested(RequestLoggingConfigSchema)
    createTime = fields.Raw(metadata=_OUTPUT_ONLY)
    lastUseTime = fields.Raw(metadata=_OUTPUT_ONLY)
    lastMigrationTime = fields.Raw(metadata=_OUTPUT_ONLY)
    lastMigrationModelId = fields.Raw(metadata=_OUTPUT_ONLY)
    state = fields.Raw(metadata=_OUTPUT_ONLY)
    errorMessage = fields.Raw(metadata=_OUTPUT_ONLY)
    isDefault = fields.Raw(metadata=_OUTPUT_ONLY)
    etag = fields.Raw(metadata=_OUTPUT_ONLY)
    replicas = fields.Raw(metadata=_OUTPUT_ONLY)

    @validates("packageUris", "predictionClass", "container", "routes", "acceleratorConfig", "explanationConfig",
               "serviceAccount")
    def _unsupported(self, value: Any, **kwargs: Any) -> None:
        raise ValidationError("not supported: custom prediction routines, containers and accelerators are not "
                              "available; the framework's model server serves deploymentUri")

    @validates_schema
    def _one_scaling(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "manualScaling" in data and "autoScaling" in data:
            raise ValidationError("give manualScaling or autoScaling, not both", field_name="autoScaling")

    @post_load
    def _keep_inputs(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        nodes = data["autoScaling"]["minNodes"] if "autoScaling" in data else data.get("manualScaling",
                                                                                        {"nodes": 1})["nodes"]
        kept = {key: data[key] for key in ("name", "description", "deploymentUri", "framework", "labels",
                                           "healthCheck")}
        return {**kept, "autoScaling": data.get("autoScaling"), "runtimeVersion": data.get("runtimeVersion"),
                "machineType": data.get("machineType"),
                "nodes": nodes, "requestLoggingConfig": data.get("requestLoggingConfig"),
                "predictionDeadline": data.get("predictionDeadline", DEFAULT_PREDICTION_DEADLINE)}


class VersionPatchSchema(Schema):
    """The v1 Version body of ``versions.patch``: only the fields named in ``updateMask`` are read."""

    class Meta:
        unknown = EXCLUDE

    description = fields.String()
    labels = _labels_field()
    manualScaling = fields.Nested(ManualScalingSchema)
    autoScaling = fields.Nested(AutoScalingPatchSchema)
    requestLoggingConfig = fields.Nested(RequestLoggingConfigSchema)
    predictionDeadline = fields.Float(allow_nan=False, validate=validate.Range(
        min=0.1, max=MAX_PREDICTION_DEADLINE, error=f"must be from 0.1 to {MAX_PREDICTION_DEADLINE:g} seconds"),
        metadata={"description": "added: seconds a prediction may take (default 5); a replica that has not "
                                 "answered by then is ejected. A request may ask for another with the "
                                 "X-Prediction-Deadline header"})


class SetDefaultVersionRequestSchema(Schema):
    """v1's empty SetDefaultVersionRequest."""


class ReplicaSchema(Schema):
    """Added: one serving node of a version."""

    name = fields.String(metadata={"description": "replica-0, replica-1, … (never reused)"})
    state = fields.String(metadata={
        "description": "PROVISIONING, STARTING, READY, EJECTED, DRAINING, FAILED, DELETING"})
    healthy = fields.Boolean(metadata={"description": "in the router's pool"})
    address = fields.Method("_address", metadata={"description": "host:port of its model server"})

    def _address(self, replica: Any) -> str | None:
        return f"{replica.address}:{replica.port}" if replica.address and replica.port else None

    @post_dump
    def _omit_null(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if value is not None}


class VersionSchema(_OmitEmpty):
    """The v1 Version resource, dumped from a view holding the row, its replicas and whether it is the default;
    ``healthCheck`` and ``replicas`` are added fields."""

    name = fields.String(metadata={"description": "projects/PROJECT/models/MODEL/versions/VERSION"})
    description = fields.String(attribute="version.description")
    isDefault = fields.Boolean(attribute="is_default")
    deploymentUri = fields.String(attribute="version.deployment_uri")
    createTime = Timestamp(attribute="version.create_time")
    state = fields.String(attribute="version.state", metadata={
        "enum": list(VERSION_STATES), "description": "a finished delete operation shows DELETED"})
    errorMessage = fields.String(attribute="version.error_message")
    framework = fields.String(attribute="version.framework")
    runtimeVersion = fields.String(attribute="version.runtime_version")
    machineType = fields.String(attribute="version.machine_type")
    manualScaling = fields.Method("_manual", metadata={"type": "object", "properties": {
        "nodes": {"type": "integer"}}})
    autoScaling = fields.Dict(attribute="version.auto_scaling", metadata={
        "description": "the policy with its defaults filled in; the current count is manualScaling's absence "
                       "and len(replicas)"})
    labels = fields.Dict(attribute="version.labels", keys=fields.String(), values=fields.String())
    etag = fields.Method("_etag", metadata={"format": "byte"})
    healthCheck = fields.Nested(HealthCheckSchema, attribute="version.health", metadata={"description": "added"})
    predictionDeadline = fields.Float(attribute="version.prediction_deadline", metadata={"description": "added"})
    requestLoggingConfig = fields.Dict(attribute="version.request_logging", metadata={
        "description": "samplingPercentage: the fraction of online predictions logged to the store"})
    replicas = fields.List(fields.Nested(ReplicaSchema), metadata={"description": "added: the serving nodes"})

    def _manual(self, view: Any) -> dict[str, int] | None:
        return None if view.version.auto_scaling else {"nodes": view.version.replicas}

    def _etag(self, view: Any) -> str:
        return _etag_of(view.version)


class ModelSchema(_OmitEmpty):
    """The v1 Model resource, dumped from a view holding the row and its default version."""

    name = fields.String(metadata={"description": "projects/PROJECT/models/MODEL"})
    description = fields.String(attribute="model.description")
    labels = fields.Dict(attribute="model.labels", keys=fields.String(), values=fields.String())
    defaultVersion = fields.Nested(VersionSchema, attribute="default_version")
    trafficSplit = fields.Method("_split", metadata={
        "description": "added: version id → percent of the model's :predict calls it answers"})
    etag = fields.Method("_etag", metadata={"format": "byte"})

    def _etag(self, view: Any) -> str:
        return _etag_of(view.model)

    def _split(self, view: Any) -> dict[str, int] | None:
        if view.model.traffic_split:
            return view.model.traffic_split
        return {view.model.default_version: 100} if view.default_version is not None else None


class _ListQuerySchema(Schema):
    pageSize = fields.Integer(load_default=0, validate=_non_negative(),
                              metadata={"description": "default 100; larger values are lowered to 1000"})
    pageToken = fields.String(load_default="")


class ListModelsQuerySchema(_ListQuerySchema):
    filter = fields.String(load_default="", metadata={
        "description": 'conditions on labels joined by AND, e.g. labels.team="ml"; operators = and !='})


class ListModelsResponseSchema(Schema):
    models = fields.List(fields.Nested(ModelSchema))
    nextPageToken = fields.String()


class ListVersionsQuerySchema(_ListQuerySchema):
    filter = fields.String(load_default="", metadata={
        "description": "conditions on state and labels joined by AND, e.g. state=READY AND labels.team=ml"})


class ListVersionsResponseSchema(Schema):
    versions = fields.List(fields.Nested(VersionSchema))
    nextPageToken = fields.String()


class VersionEventSchema(Schema):
    """Added: something that happened to a version or one of its replicas."""

    id = fields.Integer()
    time = Timestamp()
    kind = fields.String(metadata={"description": "STATE, OPERATION, REPLICA, EJECTED, REPLACING, …"})
    replica = fields.String(metadata={"description": "the replica the event concerns, when one does"})
    message = fields.String()

    @post_dump
    def _omit_null(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if value is not None}


class VersionEventListSchema(Schema):
    events = fields.List(fields.Nested(VersionEventSchema))


class ReplicaStatsQuerySchema(Schema):
    minutes = fields.Integer(load_default=60, validate=validate.Range(min=1, max=24 * 60),
                             metadata={"description": "how far back, in minutes (1 to 1440; samples are kept 24 h)"})


class ReplicaSampleSchema(Schema):
    """Added: one replica's health probes over one sampling window (10 s by default) of the health monitor."""

    replica = fields.String()
    time = Timestamp(metadata={"description": "the end of the window"})
    probes = fields.Integer()
    failures = fields.Integer()
    latencyP50Ms = fields.Float(attribute="latency_p50_ms", allow_none=True,
                                metadata={"description": "median latency of the answered probes; null if none"})
    latencyMaxMs = fields.Float(attribute="latency_max_ms", allow_none=True)
    healthy = fields.Boolean(metadata={"description": "the replica's health at the end of the window"})


class ReplicaStatsSchema(Schema):
    samples = fields.List(fields.Nested(ReplicaSampleSchema))


class OperationMetadataSchema(_OmitEmpty):
    """v1 OperationMetadata, dumped from a view holding the operation row, its model name and version."""

    type = fields.Constant(OPERATION_METADATA_TYPE, data_key="@type", metadata={"type": "string"})
    createTime = Timestamp(attribute="operation.create_time")
    endTime = Timestamp(attribute="operation.end_time")
    operationType = fields.String(attribute="operation.kind", metadata={"enum": [
        "CREATE_VERSION", "DELETE_VERSION", "UPDATE_VERSION", "DELETE_MODEL", "UPDATE_MODEL"]})
    modelName = fields.String(attribute="model_name")
    version = fields.Nested(VersionSchema)
    isCancellationRequested = fields.Boolean(attribute="operation.cancel_requested")


class OperationErrorSchema(Schema):
    """v1 google.rpc.Status; ``status`` (the code's name) is an added field."""

    code = fields.Integer(metadata={"description": "google.rpc.Code, e.g. 13 (INTERNAL), 1 (CANCELLED)"})
    message = fields.String()
    status = fields.String()


class OperationSchema(_OmitEmpty):
    """v1 google.longrunning.Operation."""

    name = fields.String(metadata={"description": "projects/PROJECT/operations/OPERATION"})
    metadata = fields.Nested(OperationMetadataSchema)
    done = fields.Boolean()
    error = fields.Nested(OperationErrorSchema)
    response = fields.Dict(metadata={"description": "when done without error: the Version (create, update), "
                                                    "the Model (model update) or Empty (deletes), with @type"})


class ListOperationsQuerySchema(_ListQuerySchema):
    filter = fields.String(load_default="", metadata={
        "description": "conditions on done and operationType joined by AND, e.g. done=false"})


class ListOperationsResponseSchema(Schema):
    operations = fields.List(fields.Nested(OperationSchema))
    nextPageToken = fields.String()


class PredictRequestSchema(Schema):
    """v1 online prediction body; the whole body, other keys included, goes to the model server as sent."""

    class Meta:
        unknown = INCLUDE

    instances = fields.List(fields.Raw(allow_none=True), required=True,
                            validate=validate.Length(min=1, error="must hold at least one instance"))
    signature_name = fields.String()


class PredictResponseSchema(Schema):
    predictions = fields.List(fields.Raw(), metadata={"description": "the model server's answer, passed through"})

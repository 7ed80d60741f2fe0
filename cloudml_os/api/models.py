"""``/v1/projects/{p}/models``: models, their versions and online prediction (Cloud ML Engine v1).

A model is a name grouping versions; a version is an exported model served by ``replicas`` nodes behind
the router. As for jobs, a view only validates, records and hands over: creating, deleting or scaling a
version moves its state, inserts an :class:`Operation` and calls ``start_operation`` (the serving workflow
does the work and marks the operation done); no view waits on a node. Changes that need no node
(descriptions, labels, the default version) are made at once and answered with an operation that is
already done, as v1 does. Prediction is the one view on the serving path: it checks that the version can
serve and forwards the body unchanged through ``predict``. Added to v1: a version's ``healthCheck``,
``replicas`` and events, and a model's ``trafficSplit`` (the share of its ``:predict`` calls each version
answers, as Vertex AI endpoints have it).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import random
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from flask import Response, request
from marshmallow import ValidationError
from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session

from cloudml_os import quotas
from cloudml_os.api import ApiBlueprint, resource_name, services
from cloudml_os.api.filters import compare, parse_list_filter
from cloudml_os.api.jobs import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_page_token, encode_page_token
from cloudml_os.api.schemas import (
    MAX_PREDICTION_DEADLINE,
    VERSION_STATES,
    AutoScalingSchema,
    EventsQuerySchema,
    ListModelsQuerySchema,
    ListModelsResponseSchema,
    ListVersionsQuerySchema,
    ListVersionsResponseSchema,
    ModelCreateSchema,
    ModelPatchSchema,
    ModelSchema,
    OperationSchema,
    PredictRequestSchema,
    PredictResponseSchema,
    ReplicaStatsQuerySchema,
    ReplicaStatsSchema,
    SetDefaultVersionRequestSchema,
    UpdateMaskQuerySchema,
    VersionCreateSchema,
    VersionEventListSchema,
    VersionPatchSchema,
    VersionSchema,
)
from cloudml_os.artifacts import ArtifactError, parse_uri
from cloudml_os.config import DEFAULT_MACHINE_TYPE, MachineType
from cloudml_os.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cloudml_os.frameworks.base import TopologyError
from cloudml_os.store import Store
from cloudml_os.store.models import Model, Operation, Replica, ReplicaSample, Version, VersionEvent, utcnow

log = logging.getLogger(__name__)

blp = ApiBlueprint("models", __name__, url_prefix="/v1/projects/<project:project>",
                   description="Models, versions and online prediction (Cloud ML Engine v1), with added "
                               "health checks, replicas and version events.")

VERSION_TYPE = "type.googleapis.com/google.cloud.ml.v1.Version"
MODEL_TYPE = "type.googleapis.com/google.cloud.ml.v1.Model"
EMPTY_TYPE = "type.googleapis.com/google.protobuf.Empty"
SERVING_STATES = ("READY", "UPDATING")  # a scale in progress keeps the replicas that serve serving
DELETABLE_STATES = ("READY", "FAILED")
EVENT_LIMIT = 1000
SAMPLE_LIMIT = 20000  # a day of 10 s samples of 2 replicas or so; the chart needs no more
MODEL_MESSAGE_LIMIT = 2000  # a model's error message is passed on, but not a whole traceback
REQUEST_ID_LIMIT = 128  # characters of a client's X-Request-Id kept
# google.rpc.Code, which operation errors carry (v1's google.rpc.Status).
RPC_CODES = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
             "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
             "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
             "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
_LIVE = Version.state != "DELETED"


# ---- what the response schemas show ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VersionView:
    """A version as :class:`VersionSchema` shows it: the row, its replicas, whether it is the default."""

    name: str
    version: Version
    is_default: bool
    replicas: list[Replica]


@dataclasses.dataclass(frozen=True)
class ModelView:
    name: str
    model: Model
    default_version: VersionView | None


@dataclasses.dataclass(frozen=True)
class OperationMetadataView:
    operation: Operation
    model_name: str
    version: VersionView | None


@dataclasses.dataclass(frozen=True)
class OperationView:
    name: str
    metadata: OperationMetadataView
    done: bool
    error: dict[str, Any] | None
    response: dict[str, Any] | None


def version_views(session: Session, versions: list[Version]) -> list[VersionView]:
    """Views of versions (of any models), with their models and replicas read in one query each."""
    if not versions:
        return []
    models = {m.id: m for m in session.scalars(select(Model).where(Model.id.in_({v.model_id for v in versions})))}
    replicas: dict[int, list[Replica]] = {v.id: [] for v in versions}
    for replica in session.scalars(select(Replica).where(Replica.version_id.in_(list(replicas)),
                                                         Replica.state != "DELETED").order_by(Replica.id)):
        replicas[replica.version_id].append(replica)
    views = []
    for version in versions:
        model = models[version.model_id]
        views.append(VersionView(
            name=resource_name(model.project, "models", model.name, "versions", version.name), version=version,
            is_default=model.default_version == version.name and version.state != "DELETED",
            replicas=replicas[version.id]))
    return views


def model_views(session: Session, models: list[Model]) -> list[ModelView]:
    """Views of models, each with its default version (when it has a live one)."""
    named = {m.id: m.default_version for m in models if m.default_version}
    defaults: dict[int, Version] = {}
    if named:
        for version in session.scalars(select(Version).where(
                Version.model_id.in_(list(named)), Version.name.in_(set(named.values())), _LIVE)):
            if named[version.model_id] == version.name:
                defaults[version.model_id] = version
    by_version = {view.version.id: view for view in version_views(session, list(defaults.values()))}
    return [ModelView(resource_name(m.project, "models", m.name), m,
                      by_version[defaults[m.id].id] if m.id in defaults else None) for m in models]


def rpc_status(error: Mapping[str, Any]) -> dict[str, Any]:
    """A stored operation error as google.rpc.Status. The workflow stores ``{"code": 13, "message": …}``;
    a code's name (``"CANCELLED"``) is understood too."""
    code = error.get("code", RPC_CODES["INTERNAL"])
    if isinstance(code, str):
        code = RPC_CODES.get(code, RPC_CODES["UNKNOWN"])
    status = next((name for name, value in RPC_CODES.items() if value == code), "UNKNOWN")
    return {"code": code, "message": str(error.get("message") or ""), "status": status}


def operation_views(session: Session, operations: list[Operation]) -> list[OperationView]:
    """Views of operations: v1 metadata with the version as it is now, and the result once done."""
    version_ids = {op.version_id for op in operations if op.version_id is not None}
    versions = list(session.scalars(select(Version).where(Version.id.in_(version_ids)))) if version_ids else []
    by_id = {view.version.id: view for view in version_views(session, versions)}
    views = []
    for op in operations:
        model_name = op.target.split("/versions/", 1)[0]
        version = by_id.get(op.version_id) if op.version_id is not None else None
        error = rpc_status(op.error) if op.done and op.error else None
        response = None
        if op.done and error is None:
            response = _operation_response(session, op, model_name, version)
        views.append(OperationView(resource_name(op.project, "operations", op.name),
                                   OperationMetadataView(op, model_name, version), op.done, error, response))
    return views


def _operation_response(session: Session, op: Operation, model_name: str,
                        version: VersionView | None) -> dict[str, Any]:
    if op.kind in ("CREATE_VERSION", "UPDATE_VERSION") and version is not None:
        return {"@type": VERSION_TYPE, **VersionSchema().dump(version)}
    if op.kind == "UPDATE_MODEL":
        model = session.scalar(select(Model).where(Model.project == op.project,
                                                   Model.name == model_name.rsplit("/", 1)[-1]))
        if model is not None:
            return {"@type": MODEL_TYPE, **ModelSchema().dump(model_views(session, [model])[0])}
        return {"@type": MODEL_TYPE, "name": model_name}
    return {"@type": EMPTY_TYPE}


def _operation_view(operation_pk: int) -> OperationView:
    with services().store.session() as session:
        return operation_views(session, [session.get(Operation, operation_pk)])[0]


def _version_view(version_pk: int) -> VersionView:
    with services().store.session() as session:
        return version_views(session, [session.get(Version, version_pk)])[0]


# ---- shared by the list endpoints --------------------------------------------------------------------

def list_page(session: Session, query: Select, key: InstrumentedAttribute[int], args: Mapping[str, Any], *,
              newest_first: bool = False) -> tuple[list[Any], str | None]:
    """One page of ``query`` ordered by the primary key ``key``, and the token of the next page if any."""
    page_size = min(args["pageSize"] or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if args["pageToken"]:
        after = decode_page_token(args["pageToken"])
        query = query.where(key < after if newest_first else key > after)
    rows = list(session.scalars(query.order_by(key.desc() if newest_first else key).limit(page_size + 1)))
    if len(rows) > page_size:
        return rows[:page_size], encode_page_token(rows[page_size - 1].id)
    return rows, None


def update_mask(text: str, supported: Collection[str]) -> list[str]:
    """The paths of a v1 ``updateMask`` in camelCase (``manual_scaling.nodes`` → ``manualScaling.nodes``).

    :raises InvalidArgument: a path that cannot be updated.
    """
    paths = []
    for part in text.split(","):
        path = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), part.strip())
        if path not in supported:
            raise InvalidArgument(f"updateMask: cannot update {part.strip()!r}; supported: {', '.join(supported)}")
        if path not in paths:
            paths.append(path)
    return paths


def _masked(body: Mapping[str, Any], paths: list[str]) -> None:
    """:raises InvalidArgument: a path of the mask has no value in the body."""
    for path in paths:
        top, _, sub = path.partition(".")
        if top not in body or (sub and sub not in body[top]):
            raise InvalidArgument(f"{path}: named in updateMask but missing from the body")


# ---- lookups -------------------------------------------------------------------------------------------


def _model_or_404(session: Session, project: str, model: str) -> Model:
    row = session.scalar(select(Model).where(Model.project == project, Model.name == model))
    if row is None:
        raise NotFound(f"{resource_name(project, 'models', model)} not found")
    return row


def _version_or_404(session: Session, model: Model, version: str) -> Version:
    """A version that is not DELETED (a deleted one is gone, as in v1)."""
    row = session.scalar(select(Version).where(Version.model_id == model.id, Version.name == version, _LIVE))
    if row is None:
        raise NotFound(f"{resource_name(model.project, 'models', model.name, 'versions', version)} not found")
    return row


def _has_live_default(session: Session, model: Model) -> bool:
    return model.default_version is not None and session.scalar(select(Version.id).where(
        Version.model_id == model.id, Version.name == model.default_version, _LIVE)) is not None


def _tombstone(name: str, pk: int) -> str:
    """The name a deleted model or version takes so that its own can be used again (as in v1): ``~ID~name``,
    which no v1 id can be. The row stays, with the history that refers to it, and its primary key is never
    reused (SQLite would reuse a deleted row's key, and serving clusters are named after it)."""
    return f"~{pk}~{name}"[:128]


def _start(operation: Operation, undo: Callable[[Session], None], outcome: str) -> None:
    """Hand the operation to the serving workflow; if it cannot be queued, undo the request and answer 503
    so that the client can retry it as it was."""
    svc = services()
    try:
        svc.start_operation(operation.id)
    except Exception:
        log.exception("could not start operation %s (%s of %s)", operation.name, operation.kind, operation.target)
        try:
            with svc.store.session() as session:
                session.execute(delete(Operation).where(Operation.id == operation.id))
                undo(session)
        except SQLAlchemyError:
            log.exception("could not undo operation %s after its start failed", operation.name)
        raise Unavailable(f"The operation queue is unavailable; {outcome}. Retry later.") from None


def _set_default(session: Session, model_pk: int, version: str | None, *, expected: str | None = None,
                 check: bool = False) -> None:
    """Make ``version`` (None: no version) the model's default; with ``check``, only if the default is still
    ``expected`` (an undo must not overwrite a default set by another request meanwhile)."""
    query = update(Model).where(Model.id == model_pk)
    if check:
        query = query.where(Model.default_version.is_(None) if expected is None else
                            Model.default_version == expected)
    session.execute(query.values(default_version=version, traffic_split=None, etag=Model.etag + 1)
                    .execution_options(synchronize_session=False))


# ---- models ----------------------------------------------------------------------------------------------


@blp.route("/models", methods=["POST"])
@blp.arguments(ModelCreateSchema)
@blp.response(200, ModelSchema)
def create_model(body: dict[str, Any], project: str) -> ModelView:
    """Create a model (v1 ``models.create``): a name its versions share."""
    name = resource_name(project, "models", body["name"])
    model = Model(project=project, name=body["name"], description=body["description"], labels=body["labels"])
    try:
        with services().store.session() as session:
            if session.scalar(select(Model.id).where(Model.project == project, Model.name == body["name"])):
                raise AlreadyExists(f"{name} already exists")
            session.add(model)
    except IntegrityError:  # a concurrent create of the same name won
        raise AlreadyExists(f"{name} already exists") from None
    return ModelView(name, model, None)


@blp.route("/models/<resource_id:model>", methods=["GET"])
@blp.response(200, ModelSchema)
def get_model(project: str, model: str) -> ModelView:
    """Describe a model and its default version (v1 ``models.get``)."""
    with services().store.session() as session:
        return model_views(session, [_model_or_404(session, project, model)])[0]


@blp.route("/models", methods=["GET"])
@blp.arguments(ListModelsQuerySchema, location="query")
@blp.response(200, ListModelsResponseSchema)
def list_models(args: dict[str, Any], project: str) -> dict[str, Any]:
    """List a project's models, oldest first (v1 ``models.list``)."""
    conditions = [compare(Model.labels, c) for c in parse_list_filter(args["filter"], {"labels": ()})]
    with services().store.session() as session:
        query = select(Model).where(Model.project == project, Model.name.not_like("~%"), *conditions)
        rows, token = list_page(session, query, Model.id, args)
        result: dict[str, Any] = {"models": model_views(session, rows)}
    if token:
        result["nextPageToken"] = token
    return result


@blp.route("/models/<resource_id:model>", methods=["PATCH"])
@blp.arguments(ModelPatchSchema)
@blp.arguments(UpdateMaskQuerySchema, location="query")
@blp.response(200, OperationSchema)
def patch_model(body: dict[str, Any], args: dict[str, Any], project: str, model: str) -> OperationView:
    """Change a model's description, labels, default version or traffic split (v1 ``models.patch``; the split
    is added); the operation returned is already done."""
    paths = update_mask(args["updateMask"], ("description", "labels", "defaultVersion.name", "trafficSplit"))
    _masked(body, paths)
    if "defaultVersion.name" in paths and "trafficSplit" in paths:
        raise InvalidArgument("updateMask: give defaultVersion.name or trafficSplit, not both (a default version "
                              "is a split of 100 % to it)")
    with services().store.session() as session:
        row = _model_or_404(session, project, model)
        values: dict[str, Any] = {key: body[key] for key in ("description", "labels") if key in paths}
        if "defaultVersion.name" in paths:
            version = _version_or_404(session, row, body["defaultVersion"]["name"].rsplit("/", 1)[-1])
            _check_can_be_default(row, version)
            values.update(default_version=version.name, traffic_split=None)
        if "trafficSplit" in paths:
            values.update(_split_values(session, row, body["trafficSplit"]))
        session.execute(update(Model).where(Model.id == row.id).values(etag=Model.etag + 1, **values)
                        .execution_options(synchronize_session=False))
        operation = Operation.new(project, "UPDATE_MODEL", resource_name(project, "models", model), done=True)
        session.add(operation)
    return _operation_view(operation.id)


def _split_values(session: Session, model: Model, split: dict[str, int]) -> dict[str, Any]:
    """The model's columns for ``split``: the versions with a share (each must be able to serve as a default),
    None for one version's 100 %, and the default version, the one with the largest share (the current
    default among equals, else the first by name).

    :raises InvalidArgument: a version named is not one of the model's.
    :raises FailedPrecondition: a version with a share has failed or is being deleted.
    """
    shares = {name: percent for name, percent in sorted(split.items()) if percent > 0}
    for name in split:
        version = session.scalar(select(Version).where(Version.model_id == model.id, Version.name == name, _LIVE))
        if version is None:
            raise InvalidArgument(f"trafficSplit: {name!r} is not a version of "
                                  f"{resource_name(model.project, 'models', model.name)}")
        if name in shares:
            _check_can_be_default(model, version)
    largest = max(shares.values())
    leaders = [name for name, percent in shares.items() if percent == largest]
    default = model.default_version if model.default_version in leaders else leaders[0]
    return {"default_version": default, "traffic_split": shares if len(shares) > 1 else None}


@blp.route("/models/<resource_id:model>", methods=["DELETE"])
@blp.response(200, OperationSchema)
def delete_model(project: str, model: str) -> OperationView:
    """Delete a model that has no versions left (v1 ``models.delete``); the operation returned is done."""
    name = resource_name(project, "models", model)
    with services().store.session() as session:
        row = _model_or_404(session, project, model)
        live = list(session.scalars(select(Version.name).where(Version.model_id == row.id, _LIVE)
                                    .order_by(Version.name)))
        if live:
            raise FailedPrecondition(f"{name} still has versions ({', '.join(live)}); delete them first")
        session.execute(update(Model).where(Model.id == row.id)
                        .values(name=_tombstone(row.name, row.id), default_version=None, etag=Model.etag + 1)
                        .execution_options(synchronize_session=False))
        operation = Operation.new(project, "DELETE_MODEL", name, done=True)
        session.add(operation)
    return _operation_view(operation.id)


# ---- versions ----------------------------------------------------------------------------------------------


def _check_version(project: str, body: dict[str, Any]) -> tuple[str, str]:
    """The checks that need this installation; returns the runtime version and machine type to use."""
    svc = services()
    name = body["framework"]
    if name not in svc.frameworks:
        valid = ", ".join(sorted(svc.frameworks)) or "none installed"
        raise InvalidArgument(f"framework: unknown framework {name!r}; valid: {valid}")
    framework = svc.frameworks[name]
    try:
        framework.runtime(body["runtimeVersion"])
    except TopologyError as exc:  # its message names the field as trainingInput's
        raise InvalidArgument(str(exc).removeprefix("trainingInput.")) from None
    machine_type = body["machineType"] or DEFAULT_MACHINE_TYPE
    if machine_type not in svc.settings.machine_types:
        valid = ", ".join(sorted(svc.settings.machine_types))
        raise InvalidArgument(f"machineType: unknown machine type {machine_type!r}; valid: {valid}")
    uri = body["deploymentUri"]
    try:
        uri_project, _ = parse_uri(uri)
    except ArtifactError:
        uri_project = None
    if uri_project != project or not svc.artifacts.exists(uri):
        raise InvalidArgument(f"deploymentUri: {uri!r} is not an exported model in project {project}'s artifact "
                              f"store; use the store://{project}/… folder a training job exported")
    return body["runtimeVersion"] or framework.default_runtime_version, machine_type


def _check_can_be_default(model: Model, version: Version) -> None:
    if version.state in ("FAILED", "DELETING"):
        name = resource_name(model.project, "models", model.name, "versions", version.name)
        raise FailedPrecondition(f"{name} cannot be the default version in state {version.state}")


@blp.route("/models/<resource_id:model>/versions", methods=["POST"])
@blp.arguments(VersionCreateSchema)
@blp.response(200, OperationSchema)
def create_version(body: dict[str, Any], project: str, model: str) -> OperationView:
    """Deploy a version (v1 ``versions.create``): the operation is done once its replicas serve.

    A model's first version becomes its default.
    """
    store = services().store
    with store.session() as session:
        _model_or_404(session, project, model)
    runtime_version, machine_type = _check_version(project, body)
    _check_gpu_metric(body["autoScaling"], machine_type)
    name = resource_name(project, "models", model, "versions", body["name"])
    svc = services()
    demand = quotas.version_demand(body["nodes"], svc.settings.machine_types[machine_type])
    try:
        with store.session() as session:
            quotas.check(session, svc.settings, project, demand)  # locks the project's quotas until committed
            parent = _model_or_404(session, project, model)
            existing = session.scalar(select(Version).where(Version.model_id == parent.id,
                                                            Version.name == body["name"]))
            if existing is not None:
                if existing.state != "DELETED":
                    raise AlreadyExists(f"{name} already exists")
                session.execute(update(Version).where(Version.id == existing.id)
                                .values(name=_tombstone(existing.name, existing.id))
                                .execution_options(synchronize_session=False))
                session.expunge(existing)
            version = Version(model_id=parent.id, name=body["name"], state="CREATING",
                              deployment_uri=body["deploymentUri"], framework=body["framework"],
                              runtime_version=runtime_version, machine_type=machine_type, replicas=body["nodes"],
                              health=body["healthCheck"], description=body["description"], labels=body["labels"],
                              request_logging=body["requestLoggingConfig"], auto_scaling=body["autoScaling"],
                              prediction_deadline=body["predictionDeadline"])
            session.add(version)
            session.flush()
            becomes_default = not _has_live_default(session, parent)
            if becomes_default:
                _set_default(session, parent.id, version.name)
            operation = Operation.new(project, "CREATE_VERSION", name, version.id)
            session.add_all([operation, VersionEvent(
                version_id=version.id, kind="STATE",
                message=f"Version creation requested: {body['nodes']} × {machine_type}, {body['framework']} "
                        f"{runtime_version}")])
    except IntegrityError:  # a concurrent create of the same name won
        raise AlreadyExists(f"{name} already exists") from None

    def undo(session: Session) -> None:
        session.execute(delete(VersionEvent).where(VersionEvent.version_id == version.id))
        session.execute(delete(Version).where(Version.id == version.id))
        if becomes_default:
            _set_default(session, parent.id, None, expected=version.name, check=True)

    _start(operation, undo, "the version was not created")
    return _operation_view(operation.id)


@blp.route("/models/<resource_id:model>/versions/<resource_id:version>", methods=["GET"])
@blp.response(200, VersionSchema)
def get_version(project: str, model: str, version: str) -> VersionView:
    """Describe a version, its replicas and their health (v1 ``versions.get``)."""
    with services().store.session() as session:
        return version_views(session, [_version_or_404(session, _model_or_404(session, project, model), version)])[0]


@blp.route("/models/<resource_id:model>/versions", methods=["GET"])
@blp.arguments(ListVersionsQuerySchema, location="query")
@blp.response(200, ListVersionsResponseSchema)
def list_versions(args: dict[str, Any], project: str, model: str) -> dict[str, Any]:
    """List a model's versions, oldest first (v1 ``versions.list``)."""
    conditions = [compare(Version.labels if c.field.startswith("labels.") else Version.state, c)
                  for c in parse_list_filter(args["filter"], {"state": VERSION_STATES, "labels": ()})]
    with services().store.session() as session:
        parent = _model_or_404(session, project, model)
        query = select(Version).where(Version.model_id == parent.id, _LIVE, *conditions)
        rows, token = list_page(session, query, Version.id, args)
        result: dict[str, Any] = {"versions": version_views(session, rows)}
    if token:
        result["nextPageToken"] = token
    return result


@blp.route("/models/<resource_id:model>/versions/<resource_id:version>", methods=["DELETE"])
@blp.response(200, OperationSchema)
def delete_version(project: str, model: str, version: str) -> OperationView:
    """Delete a version and its replica nodes (v1 ``versions.delete``).

    The default version can only be deleted when it is the model's last one (as in v1).
    """
    name = resource_name(project, "models", model, "versions", version)
    with services().store.session() as session:
        parent = _model_or_404(session, project, model)
        row = _version_or_404(session, parent, version)
        if row.state == "DELETING":  # asked twice: answer with the deletion in progress
            pending = session.scalar(select(Operation.id).where(
                Operation.version_id == row.id, Operation.kind == "DELETE_VERSION", Operation.done.is_(False)))
            if pending is not None:
                return operation_views(session, [session.get(Operation, pending)])[0]
        if row.state not in DELETABLE_STATES:
            raise FailedPrecondition(f"{name} cannot be deleted in state {row.state}; wait for its operation to "
                                     f"finish (or cancel it)")
        is_default = parent.default_version == row.name
        if parent.traffic_split and row.name in parent.traffic_split:
            raise FailedPrecondition(f"{name} answers {parent.traffic_split[row.name]} % of "
                                     f"{resource_name(project, 'models', model)}'s traffic; shift it to other "
                                     f"versions first (models.patch trafficSplit)")
        if is_default and session.scalar(select(func.count()).select_from(Version).where(
                Version.model_id == parent.id, Version.id != row.id, _LIVE)):
            raise FailedPrecondition(f"{name} is the default version of {resource_name(project, 'models', model)}; "
                                     f"make another version the default first (:setDefault)")
        moved = session.execute(update(Version).where(Version.id == row.id, Version.state == row.state)
                                .values(state="DELETING", etag=Version.etag + 1)
                                .execution_options(synchronize_session=False)).rowcount
        if not moved:
            raise FailedPrecondition(f"{name} changed while it was being deleted; retry")
        if is_default:
            _set_default(session, parent.id, None)
        operation = Operation.new(project, "DELETE_VERSION", name, row.id)
        event = VersionEvent(version_id=row.id, kind="STATE", message="Version deletion requested")
        session.add_all([operation, event])
    previous_state = row.state

    def undo(session: Session) -> None:
        session.execute(delete(VersionEvent).where(VersionEvent.id == event.id))
        session.execute(update(Version).where(Version.id == row.id, Version.state == "DELETING")
                        .values(state=previous_state, etag=Version.etag + 1))
        if is_default:
            _set_default(session, parent.id, row.name, expected=None, check=True)

    _start(operation, undo, "the version was not deleted")
    return _operation_view(operation.id)


@blp.route("/models/<resource_id:model>/versions/<resource_id:version>", methods=["PATCH"])
@blp.arguments(VersionPatchSchema)
@blp.arguments(UpdateMaskQuerySchema, location="query")
@blp.response(200, OperationSchema)
def patch_version(body: dict[str, Any], args: dict[str, Any], project: str, model: str,
                  version: str) -> OperationView:
    """Change a version's description, labels, request logging or deadline (done at once) or how it scales
    (v1 ``versions.patch``): ``manualScaling.nodes`` fixes the count; ``autoScaling`` (whole, or some of its
    fields) lays the given fields over the version's policy, and the count moves into the new bounds at once."""
    scaling_fields = ("minNodes", "maxNodes", "metrics", "stableWindow", "panicWindow")
    paths = update_mask(args["updateMask"], ("description", "labels", "requestLoggingConfig", "predictionDeadline",
                                             "manualScaling.nodes", "autoScaling",
                                             *(f"autoScaling.{field}" for field in scaling_fields)))
    _masked(body, paths)
    auto_paths = [path for path in paths if path.startswith("autoScaling")]
    if "manualScaling.nodes" in paths and auto_paths:
        raise InvalidArgument("updateMask: give manualScaling.nodes or autoScaling fields, not both")
    values: dict[str, Any] = {key: body[key] for key in ("description", "labels") if key in paths}
    if "requestLoggingConfig" in paths:
        values["request_logging"] = body["requestLoggingConfig"]
    if "predictionDeadline" in paths:
        values["prediction_deadline"] = body["predictionDeadline"]
    nodes = None
    if "manualScaling.nodes" in paths:
        nodes, values["auto_scaling"] = body["manualScaling"]["nodes"], None
    name = resource_name(project, "models", model, "versions", version)
    if auto_paths:
        with services().store.session() as session:
            row = _version_or_404(session, _model_or_404(session, project, model), version)
        given = body["autoScaling"] if "autoScaling" in paths else {
            path.split(".", 1)[1]: body["autoScaling"][path.split(".", 1)[1]] for path in auto_paths}
        base = {} if "autoScaling" in paths else (row.auto_scaling or {"minNodes": row.replicas})
        try:
            policy = AutoScalingSchema().load({**base, **given})
        except ValidationError as error:
            raise InvalidArgument(f"autoScaling: {error.messages}") from None
        _check_gpu_metric(policy, row.machine_type)
        values["auto_scaling"] = policy
        nodes = min(max(row.replicas, policy["minNodes"]), policy["maxNodes"])
        if nodes == row.replicas:  # the autoscaler moves it from here
            nodes = None
    if nodes is None:
        with services().store.session() as session:
            row = _version_or_404(session, _model_or_404(session, project, model), version)
            session.execute(update(Version).where(Version.id == row.id).values(etag=Version.etag + 1, **values)
                            .execution_options(synchronize_session=False))
            operation = Operation.new(project, "UPDATE_VERSION", name, row.id, done=True)
            session.add(operation)
        return _operation_view(operation.id)
    with services().store.session() as session:
        row = _version_or_404(session, _model_or_404(session, project, model), version)
        if row.state != "READY":
            raise FailedPrecondition(f"{name} cannot be scaled in state {row.state}"
                                     + ("; delete it and create it again" if row.state == "FAILED" else
                                        "; wait for its operation to finish"))
        settings = services().settings
        machine_type = settings.machine_types.get(row.machine_type, MachineType(row.machine_type, "", 0))
        quotas.check(session, settings, project, quotas.version_demand(nodes - row.replicas, machine_type))
        moved = session.execute(update(Version).where(Version.id == row.id, Version.state == "READY")
                                .values(state="UPDATING", replicas=nodes, etag=Version.etag + 1, **values)
                                .execution_options(synchronize_session=False)).rowcount
        if not moved:
            raise FailedPrecondition(f"{name} changed while it was being scaled; retry")
        operation = Operation.new(project, "UPDATE_VERSION", name, row.id)
        event = VersionEvent(version_id=row.id, kind="STATE",
                             message=f"Scaling requested: {row.replicas} → {nodes} replicas")
        session.add_all([operation, event])
    previous = {"state": "READY", "replicas": row.replicas, "description": row.description, "labels": row.labels,
                "request_logging": row.request_logging, "prediction_deadline": row.prediction_deadline,
                "auto_scaling": row.auto_scaling}

    def undo(session: Session) -> None:
        session.execute(delete(VersionEvent).where(VersionEvent.id == event.id))
        session.execute(update(Version).where(Version.id == row.id, Version.state == "UPDATING")
                        .values(etag=Version.etag + 1, **previous))

    _start(operation, undo, "the version was not changed")
    return _operation_view(operation.id)


@blp.route("/models/<resource_id:model>/versions/<resource_id:version>:setDefault", methods=["POST"])
@blp.arguments(SetDefaultVersionRequestSchema, required=False)
@blp.response(200, VersionSchema)
def set_default_version(_body: dict[str, Any], project: str, model: str, version: str) -> VersionView:
    """Make this version the one ``models/{m}:predict`` uses (v1 ``versions.setDefault``)."""
    with services().store.session() as session:
        parent = _model_or_404(session, project, model)
        row = _version_or_404(session, parent, version)
        _check_can_be_default(parent, row)
        _set_default(session, parent.id, row.name)
    return _version_view(row.id)


@blp.route("/models/<resource_id:model>/versions/<resource_id:version>/events", methods=["GET"])
@blp.arguments(EventsQuerySchema, location="query")
@blp.response(200, VersionEventListSchema)
def list_version_events(args: dict[str, Any], project: str, model: str, version: str) -> dict[str, Any]:
    """The version's events (operations, replicas starting, ejected, replaced), oldest first; page with
    ``after``."""
    with services().store.session() as session:
        row = _version_or_404(session, _model_or_404(session, project, model), version)
        events = list(session.scalars(select(VersionEvent).where(
            VersionEvent.version_id == row.id, VersionEvent.id > args["after"]).order_by(VersionEvent.id)
            .limit(EVENT_LIMIT)))
    return {"events": events}


@blp.route("/models/<resource_id:model>/versions/<resource_id:version>/replicaStats", methods=["GET"])
@blp.arguments(ReplicaStatsQuerySchema, location="query")
@blp.response(200, ReplicaStatsSchema)
def replica_stats(args: dict[str, Any], project: str, model: str, version: str) -> dict[str, Any]:
    """Added: the health monitor's samples of the version's replicas over the last ``minutes``, oldest first
    (at most the newest SAMPLE_LIMIT): probes, failures, median and maximum latency, health."""
    since = utcnow() - dt.timedelta(minutes=args["minutes"])
    with services().store.session() as session:
        row = _version_or_404(session, _model_or_404(session, project, model), version)
        newest = list(session.scalars(select(ReplicaSample).where(
            ReplicaSample.version_id == row.id, ReplicaSample.time >= since)
            .order_by(ReplicaSample.time.desc(), ReplicaSample.id.desc()).limit(SAMPLE_LIMIT)))
    return {"samples": newest[::-1]}


# ---- online prediction -----------------------------------------------------------------------------------


@blp.after_request
def _forget_lookups(response: Response) -> Response:
    """A change of a model or version made through this process applies to its next prediction at once
    (through other API processes, within LOOKUP_TTL)."""
    if request.method != "GET" and not request.path.endswith(":predict"):
        services().lookups.clear()
    return response


@dataclasses.dataclass(frozen=True)
class _Serving:
    """The version a prediction goes to."""

    pk: int
    name: str
    sampling: float  # the fraction of its requests logged
    deadline: float  # seconds a prediction may take


def _serving_version(project: str, model: str, version: str | None) -> _Serving:
    """The version to predict with, checked to be serving: ``version``, or when it is None the model's traffic
    split's pick (:func:`_pick`), or its default version. Both lookups come from the API's short-lived cache
    (:data:`~cloudml_os.api.LOOKUP_TTL`): a prediction pays no database query for them.

    :raises NotFound: no such model or version.
    :raises FailedPrecondition: the model has no default version, or the version is not serving.
    """
    store, lookups = services().store, services().lookups
    if version is None:
        found = lookups.get(("model", project, model), lambda: _routing_of_model(store, project, model))
        if found is None:
            raise NotFound(f"{resource_name(project, 'models', model)} not found")
        if found.default_version is None:
            raise FailedPrecondition(f"{resource_name(project, 'models', model)} has no default version; "
                                     f"create a version or predict with versions/VERSION:predict")
        version = _pick(found.traffic_split) if found.traffic_split else found.default_version
    row = lookups.get(("version", project, model, version), lambda: _serving_row(store, project, model, version))
    if row is None:  # the rare path: say which part is missing
        with store.session() as session:
            _version_or_404(session, _model_or_404(session, project, model), version)
    if row.state not in SERVING_STATES:
        lookups.forget(("version", project, model, version))  # asked again, it is read again: it may be READY
        name = resource_name(project, "models", model, "versions", row.name)
        raise FailedPrecondition(f"{name} is not ready (state {row.state})")
    return _Serving(row.id, row.name, float((row.request_logging or {}).get("samplingPercentage", 0)),
                    row.prediction_deadline)


def _check_gpu_metric(policy: dict[str, Any] | None, machine_type: str) -> None:
    """:raises InvalidArgument: the policy scales on GPU_DUTY_CYCLE but the machine type has no GPU."""
    names = [metric["name"] for metric in (policy or {}).get("metrics", [])]
    known = services().settings.machine_types.get(machine_type)
    if "GPU_DUTY_CYCLE" in names and (known is None or not known.gpus):
        raise InvalidArgument(f"autoScaling.metrics: GPU_DUTY_CYCLE needs a machine type with GPUs; "
                              f"{machine_type} has none")


def _routing_of_model(store: Store, project: str, model: str) -> Any:
    with store.session() as session:
        return session.execute(select(Model.default_version, Model.traffic_split).where(
            Model.project == project, Model.name == model)).first()


def _serving_row(store: Store, project: str, model: str, version: str) -> Any:
    with store.session() as session:
        return session.execute(select(Version.id, Version.name, Version.state, Version.request_logging,
                                      Version.prediction_deadline)
                               .join(Model, Model.id == Version.model_id)
                               .where(Model.project == project, Model.name == model, Version.name == version,
                                      _LIVE)).first()


def _pick(split: dict[str, int]) -> str:
    """A version drawn by its share of ``split``: by the request's ``X-Request-Id`` when it has one (the same
    id always goes to the same version while the split stands), else at random."""
    request_id = request.headers.get("X-Request-Id")
    if request_id:
        point = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") % 100
    else:
        point = random.randrange(100)  # noqa: S311 - a load balancer's draw, not a secret
    for name, percent in sorted(split.items()):
        if point < percent:
            return name
        point -= percent
    return max(split, key=split.get)  # not reached while the shares sum to 100


def _model_message(body: bytes, status: int) -> str:
    """The message of a model server's ``{"error": "…"}`` answer (or of a v1-shaped error)."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    message = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    if not isinstance(message, str) or not message:
        message = f"The model rejected the request (HTTP {status})."
    return message[:MODEL_MESSAGE_LIMIT]


def _predict(project: str, model: str, version: str | None) -> Response:
    svc = services()
    deadline = _requested_deadline()
    serving = _serving_version(project, model, version)
    status, body = svc.predict(serving.pk, model, request.get_data(), deadline or serving.deadline)
    if 200 <= status < 300:
        # Added: the request's id (the client's X-Request-Id, else a new one: the request log's key, to which
        # ground truth can be attached later) and which version answered (the split's pick, if any).
        request_id = request.headers.get("X-Request-Id", "")[:REQUEST_ID_LIMIT] or uuid.uuid4().hex
        if svc.request_log is not None and serving.sampling > 0 and random.random() < serving.sampling:  # noqa: S311
            svc.request_log.record(project, model, serving.name, request_id, request.get_data(), body)
        return Response(body, status=200, mimetype="application/json",
                        headers={"X-Model-Version": serving.name, "X-Request-Id": request_id})
    if 400 <= status < 500:
        raise InvalidArgument(_model_message(body, status))
    log.warning("a replica of %s answered HTTP %s: %r", resource_name(project, "models", model), status, body[:500])
    raise Unavailable("The model version could not answer this prediction; retry later.")


def _requested_deadline() -> float | None:
    """The request's own deadline (``X-Prediction-Deadline``, seconds), if it asks for one.

    :raises InvalidArgument: not a number of seconds from 0.1 to MAX_PREDICTION_DEADLINE.
    """
    text = request.headers.get("X-Prediction-Deadline")
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0.1 <= seconds <= MAX_PREDICTION_DEADLINE:
        raise InvalidArgument(f"X-Prediction-Deadline: {text[:40]!r} is not a number of seconds from 0.1 to "
                              f"{MAX_PREDICTION_DEADLINE:g}")
    return seconds


@blp.route("/models/<resource_id:model>:predict", methods=["POST"])
@blp.arguments(PredictRequestSchema)
@blp.response(200, PredictResponseSchema)
def predict_default(_body: dict[str, Any], project: str, model: str) -> Response:
    """Online prediction with the model's default version (v1 ``projects.predict``)."""
    return _predict(project, model, None)


@blp.route("/models/<resource_id:model>/versions/<resource_id:version>:predict", methods=["POST"])
@blp.arguments(PredictRequestSchema)
@blp.response(200, PredictResponseSchema)
def predict_version(_body: dict[str, Any], project: str, model: str, version: str) -> Response:
    """Online prediction with one version (v1 ``projects.predict``)."""
    return _predict(project, model, version)

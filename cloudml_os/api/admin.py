"""``/v1/caller`` and ``/v1/admin/…``: who is calling, and what platform admins see across projects.

``GET /v1/caller`` tells any authenticated caller its own project and role (the dashboard's login uses it).
Everything under ``/v1/admin`` is for platform admins alone (:func:`cloudml_os.auth.is_platform_admin`):
tokens (list, create, revoke), every project's jobs, clusters with their nodes (and replacing a serving
replica's node), serving replicas with their health, and the audit trail of mutating API calls, which
:func:`record_audit` writes after every such request. Replacing a node goes through the serving workflow's
own :func:`~cloudml_os.workflows.serve.eject`, as the health monitor does; nothing here touches a node.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, g, request
from marshmallow import Schema, fields, validate
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from cloudml_os.api import ApiBlueprint, resource_name, services
from cloudml_os.api.jobs import _where as job_condition
from cloudml_os.api.jobs import parse_filter
from cloudml_os.api.models import list_page
from cloudml_os.api.schemas import EmptySchema, JobSchema, Timestamp
from cloudml_os.auth import ROLES, is_platform_admin, is_write
from cloudml_os.auth.tokens import PROJECT_ID, create_token, hash_token
from cloudml_os.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from cloudml_os.store.models import AuditEvent, Cluster, Job, Model, Node, Replica, Token, Version
from cloudml_os.workflows.serve import eject

log = logging.getLogger(__name__)

blp = ApiBlueprint("admin", __name__, url_prefix="/v1",
                   description="The caller's identity, and platform administration across projects (added).")

SERVING_CLUSTER_PREFIX = "cml-serve-"
# POSTs that change nothing and come by the thousand: predictions stay off the audit trail.
# Predictions, and the pieces of a resumable upload (its start, and the object it makes, are audited).
NOT_AUDITED = frozenset({"models.predict_default", "models.predict_version", "objects.put_upload"})


# ---- schemas -------------------------------------------------------------------------------------------


class CallerSchema(Schema):
    project = fields.String()
    role = fields.String()
    platformAdmin = fields.Boolean(metadata={"description": "admin of every project (role admin in the "
                                                            "installation's admin project)"})


class TokenSchema(Schema):
    id = fields.String(metadata={"description": "the token's number (never the token itself)"})
    project = fields.String()
    role = fields.String()
    description = fields.String()
    createTime = Timestamp(attribute="created_at")


class TokenListSchema(Schema):
    tokens = fields.List(fields.Nested(TokenSchema))


class TokenCreateSchema(Schema):
    project = fields.String(required=True, validate=validate.Regexp(
        PROJECT_ID.pattern + r"\Z", error="must match [a-z][a-z0-9-]{{0,61}}"))
    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    description = fields.String(load_default="", validate=validate.Length(max=255))


class CreatedTokenSchema(TokenSchema):
    token = fields.String(metadata={"description": "the token, shown this once"})


class AdminJobSchema(JobSchema):
    project = fields.String()


class AdminJobListQuerySchema(Schema):
    project = fields.String(load_default="", metadata={"description": "only this project's jobs"})
    pageSize = fields.Integer(load_default=0, validate=validate.Range(min=0))
    pageToken = fields.String(load_default="")
    filter = fields.String(load_default="", metadata={"description": "as in jobs.list: state and labels"})


class AdminJobListSchema(Schema):
    jobs = fields.List(fields.Nested(AdminJobSchema))
    nextPageToken = fields.String()


class NodeSchema(Schema):
    name = fields.String()
    role = fields.String(attribute="task_type", metadata={"description": "chief, worker, ps, replica…"})
    index = fields.Integer(attribute="task_index")
    address = fields.String()
    sshPort = fields.Integer(attribute="ssh_port")
    state = fields.String(attribute="process_state", metadata={"description": "NONE, RUNNING, EXITED, STOPPED"})


class ClusterSchema(Schema):
    name = fields.String()
    project = fields.String()
    owner = fields.String(metadata={"description": "the job or model version the cluster runs"})
    driver = fields.String()
    state = fields.String()
    createTime = Timestamp(attribute="created_at")
    nodes = fields.List(fields.Nested(NodeSchema))


class ClusterListQuerySchema(Schema):
    all = fields.Boolean(load_default=False, metadata={"description": "include deleted clusters"})


class ClusterListSchema(Schema):
    clusters = fields.List(fields.Nested(ClusterSchema))


class AdminReplicaSchema(Schema):
    project = fields.String()
    version = fields.String(metadata={"description": "projects/P/models/M/versions/V"})
    name = fields.String()
    state = fields.String()
    healthy = fields.Boolean()
    createTime = Timestamp(attribute="create_time")
    readyTime = Timestamp(attribute="ready_time")
    ejectedTime = Timestamp(attribute="ejected_time")


class AdminReplicaListSchema(Schema):
    replicas = fields.List(fields.Nested(AdminReplicaSchema))


class AuditEventSchema(Schema):
    id = fields.Integer()
    time = Timestamp()
    caller = fields.String()
    callerProject = fields.String(attribute="caller_project")
    project = fields.String()
    method = fields.String()
    resource = fields.String()
    status = fields.Integer()


class AuditQuerySchema(Schema):
    project = fields.String(load_default="")
    pageSize = fields.Integer(load_default=0, validate=validate.Range(min=0))
    pageToken = fields.String(load_default="")


class AuditListSchema(Schema):
    events = fields.List(fields.Nested(AuditEventSchema))
    nextPageToken = fields.String()


# ---- who is calling --------------------------------------------------------------------------------------


@blp.route("/caller", methods=["GET"])
@blp.response(200, CallerSchema)
def get_caller() -> dict[str, Any]:
    """The calling token's project and role, and whether it is a platform admin."""
    return {"project": g.token.project, "role": g.token.role,
            "platformAdmin": is_platform_admin(g.token, services().settings)}


def _require_platform_admin() -> None:
    if not is_platform_admin(g.token, services().settings):
        raise PermissionDenied("only platform admins (role admin in project "
                               f"{services().settings.admin_project!r}) may use /v1/admin")


@blp.before_request
def _admins_only() -> None:
    """Everything under /v1/admin is the platform admins'; /v1/caller is everyone's."""
    if request.path.startswith("/v1/admin/") and hasattr(g, "token"):
        _require_platform_admin()


# ---- tokens --------------------------------------------------------------------------------------------


@blp.route("/admin/tokens", methods=["GET"])
@blp.response(200, TokenListSchema)
def list_tokens() -> dict[str, Any]:
    """Every local API token (number, project, role, description; never the token or its hash)."""
    with services().store.session() as session:
        return {"tokens": [_token_view(t) for t in session.scalars(select(Token).order_by(Token.id))]}


def _token_view(token: Token) -> dict[str, Any]:
    return {"id": str(token.id), "project": token.project, "role": token.role, "description": token.description,
            "created_at": token.created_at}


@blp.route("/admin/tokens", methods=["POST"])
@blp.arguments(TokenCreateSchema)
@blp.response(200, CreatedTokenSchema)
def create_admin_token(body: dict[str, Any]) -> dict[str, Any]:
    """Make a local API token for a project and role; the answer holds the token, shown this once."""
    if services().settings.auth != "local":
        raise FailedPrecondition("this installation authenticates with Keystone; make users and roles there")
    try:
        secret = create_token(services().store, body["project"], body["role"], body["description"])
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    return {**_token_view(services().store.token_by_hash(hash_token(secret))), "token": secret}


@blp.route("/admin/tokens/<int:token_id>", methods=["DELETE"])
@blp.response(200, EmptySchema)
def revoke_token(token_id: int) -> dict[str, Any]:
    """Revoke a token: requests that present it are refused from now on (through other API processes, once
    their LOOKUP_TTL cache of it has passed). A caller cannot revoke its own."""
    with services().store.session() as session:
        token = session.get(Token, token_id)
        if token is None:
            raise NotFound(f"admin/tokens/{token_id} not found")
        if token.id == getattr(g.token, "id", None):
            raise FailedPrecondition("a token cannot revoke itself; use another platform admin token")
        session.delete(token)
    services().lookups.forget(("token", token.token_hash))  # other API processes: within LOOKUP_TTL
    return {}


# ---- jobs of every project -------------------------------------------------------------------------------


@blp.route("/admin/jobs", methods=["GET"])
@blp.arguments(AdminJobListQuerySchema, location="query")
@blp.response(200, AdminJobListSchema)
def list_all_jobs(args: dict[str, Any]) -> dict[str, Any]:
    """Every project's jobs (or one project's), newest first; ``filter`` as in ``jobs.list``."""
    query = select(Job).where(*[job_condition(c) for c in parse_filter(args["filter"])])
    if args["project"]:
        query = query.where(Job.project == args["project"])
    with services().store.session() as session:
        jobs, next_page = list_page(session, query, Job.id, args, newest_first=True)
    return {"jobs": jobs, **({"nextPageToken": next_page} if next_page else {})}


# ---- clusters, nodes and replicas ------------------------------------------------------------------------


def _serving_owners(session: Any, clusters: list[Cluster]) -> dict[int, tuple[str, str]]:
    """``version id -> (project, version resource name)`` for the serving clusters among ``clusters``."""
    ids = {int(c.name.removeprefix(SERVING_CLUSTER_PREFIX)) for c in clusters
           if c.job_id is None and c.name.removeprefix(SERVING_CLUSTER_PREFIX).isdigit()}
    if not ids:
        return {}
    rows = session.execute(select(Version.id, Version.name, Model.project, Model.name.label("model"))
                           .join(Model, Model.id == Version.model_id).where(Version.id.in_(ids))).all()
    return {r.id: (r.project, resource_name(r.project, "models", r.model.split("~")[-1], "versions",
                                            r.name.split("~")[-1])) for r in rows}


@blp.route("/admin/clusters", methods=["GET"])
@blp.arguments(ClusterListQuerySchema, location="query")
@blp.response(200, ClusterListSchema)
def list_clusters(args: dict[str, Any]) -> dict[str, Any]:
    """Every project's clusters (training jobs' and serving versions'), newest first, with their nodes."""
    query = select(Cluster).order_by(Cluster.id.desc())
    if not args["all"]:
        query = query.where(Cluster.state != "DELETED")
    with services().store.session() as session:
        clusters = list(session.scalars(query))
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_({c.job_id for c in clusters
                                                                                  if c.job_id})))}
        serving = _serving_owners(session, clusters)
        nodes: dict[int, list[Node]] = {c.id: [] for c in clusters}
        if clusters:
            for node in session.scalars(select(Node).where(Node.cluster_id.in_(list(nodes))).order_by(Node.id)):
                nodes[node.cluster_id].append(node)
    views = []
    for cluster in clusters:
        if cluster.job_id in jobs:
            job = jobs[cluster.job_id]
            project, owner = job.project, resource_name(job.project, "jobs", job.job_id)
        else:
            project, owner = serving.get(int(cluster.name.removeprefix(SERVING_CLUSTER_PREFIX))
                                         if cluster.name.removeprefix(SERVING_CLUSTER_PREFIX).isdigit() else -1,
                                         ("", ""))
        views.append({"name": cluster.name, "project": project, "owner": owner, "driver": cluster.driver,
                      "state": cluster.state, "created_at": cluster.created_at, "nodes": nodes[cluster.id]})
    return {"clusters": views}


@blp.route("/admin/clusters/<string:cluster>/nodes/<string:node>:replace", methods=["POST"])
@blp.response(200, EmptySchema)
def replace_node(cluster: str, node: str) -> dict[str, Any]:
    """Replace a serving replica's node: the replica leaves the pool at once and a new one is started, as
    when the health monitor finds it dead. Training nodes are the job's (its restartPolicy replaces them)."""
    name = f"admin/clusters/{cluster}/nodes/{node}"
    suffix = cluster.removeprefix(SERVING_CLUSTER_PREFIX)
    with services().store.session() as session:
        row = session.scalar(select(Cluster).where(Cluster.name == cluster, Cluster.state != "DELETED"))
        if row is None or session.scalar(select(Node.id).where(Node.cluster_id == row.id, Node.name == node)) is None:
            raise NotFound(f"{name} not found")
        if row.job_id is not None or not suffix.isdigit():
            raise FailedPrecondition(f"{name} is a training node: its job's restartPolicy replaces failed nodes; "
                                     f"cancel the job to free them")
        replica = session.scalar(select(Replica).where(Replica.version_id == int(suffix), Replica.name == node))
    if replica is None or replica.state != "READY":
        state = replica.state if replica is not None else "unknown"
        raise FailedPrecondition(f"{name}: only a READY replica can be replaced (this one is {state})")
    caller = _caller_name(g.token)
    if not eject(services().store, replica.id, f"replaced by a platform admin ({caller})",
                 services().replace_replica):
        raise FailedPrecondition(f"{name} is already being replaced")
    return {}


@blp.route("/admin/replicas", methods=["GET"])
@blp.response(200, AdminReplicaListSchema)
def list_replicas() -> dict[str, Any]:
    """Every project's serving replicas that are not deleted, with their health and times."""
    with services().store.session() as session:
        rows = session.execute(
            select(Replica, Version.name.label("version"), Model.name.label("model"), Model.project)
            .join(Version, Version.id == Replica.version_id).join(Model, Model.id == Version.model_id)
            .where(Replica.state != "DELETED").order_by(Replica.id)).all()
    return {"replicas": [
        {"project": r.project, "version": resource_name(r.project, "models", r.model, "versions", r.version),
         "name": r.Replica.name, "state": r.Replica.state, "healthy": r.Replica.healthy,
         "create_time": r.Replica.create_time, "ready_time": r.Replica.ready_time,
         "ejected_time": r.Replica.ejected_time} for r in rows]}


# ---- audit trail ---------------------------------------------------------------------------------------


def _caller_name(token: Any) -> str:
    user = getattr(token, "user", None)
    if user:
        return str(user)[:255]
    description = getattr(token, "description", "")
    return f"token {getattr(token, 'id', '?')}" + (f" ({description})" if description else "")


def record_audit(response: Response) -> Response:
    """After every mutating ``/v1`` request of a known caller (not predictions): one row of who, what and the
    answer.

    A database failure here is logged and the response still goes out: the call itself has happened.
    """
    token = g.get("token")
    if (token is None or not request.path.startswith("/v1/") or not is_write(request.method)
            or request.endpoint in NOT_AUDITED):
        return response
    event = AuditEvent(caller=_caller_name(token), caller_project=token.project,
                       project=(request.view_args or {}).get("project"), method=request.method.upper()[:8],
                       resource=request.path.removeprefix("/v1/")[:512], status=response.status_code)
    try:
        services().store.add(event)
    except SQLAlchemyError:
        log.exception("could not record the audit event of %s %s", request.method, request.path)
    return response


@blp.route("/admin/events", methods=["GET"])
@blp.arguments(AuditQuerySchema, location="query")
@blp.response(200, AuditListSchema)
def list_audit_events(args: dict[str, Any]) -> dict[str, Any]:
    """The audit trail: mutating API calls of every project (or one), newest first."""
    query = select(AuditEvent)
    if args["project"]:
        query = query.where(AuditEvent.project == args["project"])
    with services().store.session() as session:
        events, next_page = list_page(session, query, AuditEvent.id, args, newest_first=True)
    return {"events": events, **({"nextPageToken": next_page} if next_page else {})}

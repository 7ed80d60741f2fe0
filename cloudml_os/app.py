"""The Flask application factory of the ``/v1`` REST API.

:func:`create_app` receives every dependency (settings, store, artifact store, framework plugins, the
functions that enqueue a job's first step and a serving operation, and the one that forwards a
prediction to a replica) and wires them into one app: the resource
blueprints, authentication (local bearer tokens, or Keystone tokens through keystonemiddleware in
OpenStack mode), v1 error bodies and the OpenAPI document generated from the
same schemas that validate requests. It creates no connections and starts no workers itself; the CLI
(or a test) builds the dependencies and passes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flask import Flask, g, request
from flask_smorest import Api
from sqlalchemy import text
from werkzeug.exceptions import LengthRequired

from cloudml_os import __version__
from cloudml_os.api import (
    CONVERTERS,
    EXTENSION,
    Services,
    admin,
    jobs,
    models,
    no_operation_queue,
    no_prediction,
    no_replacement,
    objects,
    operations,
    packages,
    projects,
    quotas,
    services,
)
from cloudml_os.api.logwatch import LogWatch
from cloudml_os.api.schemas import ErrorSchema, Int32, Int64
from cloudml_os.artifacts import ArtifactStore
from cloudml_os.auth import authorize
from cloudml_os.auth.keystone import caller_from_headers, keystone_middleware
from cloudml_os.auth.tokens import token_from_header
from cloudml_os.config import Settings
from cloudml_os.dashboard import register_dashboard
from cloudml_os.errors import register_error_handlers
from cloudml_os.frameworks.base import Framework
from cloudml_os.serving.request_log import RequestLog
from cloudml_os.store import Store

# Requests that need no token: the API description and the load balancer's health probe.
PUBLIC_ENDPOINTS = frozenset({"api-docs.openapi_json", "healthz"})
LOG_FOLLOW_INTERVAL = 0.5  # seconds between two looks at the followed jobs' logs (one query for all)


class V1Api(Api):
    """flask-smorest's Api documenting and answering errors with the v1 body instead of its own."""

    ERROR_SCHEMA = ErrorSchema

    def _register_error_handlers(self) -> None:
        register_error_handlers(self._app)


def _authenticate() -> None:
    """Before every ``/v1`` request: a known bearer token, of the path's project, whose role allows it."""
    if request.url_rule is None or request.endpoint in PUBLIC_ENDPOINTS or not request.path.startswith("/v1/"):
        return  # routing errors answer 404/405 on their own; public endpoints need nothing
    svc = services()
    if svc.settings.auth == "keystone":
        token = caller_from_headers(request.headers)
    else:
        token = token_from_header(svc.store, request.headers.get("Authorization"), svc.lookups)
    g.token = token  # before the check, so that a denied call is in the audit trail too
    project = (request.view_args or {}).get("project")
    if project is not None:
        authorize(token, project, request.method, request.path.removeprefix("/v1/").split(":", 1)[0],
                  svc.settings)


def _require_length() -> None:
    """Refuse bodies without a Content-Length (chunked), as S3 does: werkzeug stops reading those at the
    body limit without saying so, so a too-big one would be cut short instead of answered 413."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        raise LengthRequired("send the body with a Content-Length header; chunked bodies are not accepted")


def _healthz() -> dict[str, str]:
    """Liveness and readiness in one: answers only when the database does (else 503 via the handler)."""
    with services().store.session() as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok"}


def create_app(settings: Settings, *, store: Store, artifacts: ArtifactStore,
               frameworks: Mapping[str, Framework], start_job: Callable[[int], None],
               start_operation: Callable[[int], None] = no_operation_queue,
               predict: Callable[[int, str, bytes, float], tuple[int, bytes]] = no_prediction,
               replace_replica: Callable[[int], None] = no_replacement, request_log: RequestLog | None = None) -> Flask:
    """Build the API application.

    :param settings: the installation's settings (machine types among them).
    :param store: the database repository.
    :param artifacts: where uploaded packages are stored.
    :param frameworks: framework plugins by ``trainingInput.framework`` name.
    :param start_job: called with a new job's primary key once its row exists; enqueues the workflow.
    :param start_operation: called with a new Operation's primary key (version create, delete, scale)
        once its rows exist; enqueues the serving workflow. Without it, those requests answer 503.
    :param predict: ``(version primary key, model name, request body, deadline) -> (HTTP status, body)``
        from one of the version's replicas; raises :class:`~cloudml_os.errors.Unavailable` when none can
        answer within the deadline (seconds).
        Without it, predictions answer 503.
    :param replace_replica: called with an ejected replica's primary key; enqueues its replacement (a
        platform admin's "replace node"). Without it, that request answers 503.
    :param request_log: a :class:`~cloudml_os.serving.request_log.RequestLog` that sampled predictions go to
        (its shipper starts in the process that serves the first request); without it none is logged.
    """
    app = Flask("cloudml_os")
    app.config.update(
        API_TITLE="cloudml-os",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/v1",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS={
            "info": {"description": "Cloud ML Engine v1 training and serving API on OpenStack. Every request except "
                                    "this document needs 'Authorization: Bearer <token>'."},
            "security": [{"bearerAuth": []}],
        },
        MAX_CONTENT_LENGTH=settings.max_request_bytes,  # a bigger body is answered 413, unread
        PACKAGE_MAX_BYTES=settings.max_package_bytes,
    )
    app.extensions[EXTENSION] = Services(settings=settings, store=store, artifacts=artifacts,
                                         frameworks=dict(frameworks), start_job=start_job,
                                         start_operation=start_operation, predict=predict,
                                         replace_replica=replace_replica, request_log=request_log,
                                         log_watch=LogWatch(store, LOG_FOLLOW_INTERVAL))
    for name, (converter, _) in CONVERTERS.items():
        app.url_map.converters[name] = converter

    api = V1Api(app)
    api.spec.components.security_scheme("bearerAuth", {
        "type": "http", "scheme": "bearer",
        "description": "a local API token from 'cloudml-os token create' (cmlos_…)",
    })
    api.register_field(Int64, "string", "int64")
    api.register_field(Int32, "integer", "int32")
    for converter, schema in CONVERTERS.values():
        api.register_converter(converter, lambda _converter, schema=schema: dict(schema))
    api.register_blueprint(jobs.blp)
    api.register_blueprint(packages.blp)
    api.register_blueprint(objects.blp)
    api.register_blueprint(projects.blp)
    api.register_blueprint(models.blp)
    api.register_blueprint(operations.blp)
    api.register_blueprint(quotas.blp)
    api.register_blueprint(admin.blp)

    if request_log is not None:
        app.before_request(request_log.start)  # the serving process's shipper (gunicorn forks after this)
    app.before_request(_require_length)
    app.before_request(_authenticate)
    app.after_request(admin.record_audit)
    register_dashboard(app, settings, store)
    app.add_url_rule("/healthz", "healthz", _healthz)
    if settings.auth == "keystone":
        app.wsgi_app = keystone_middleware(app.wsgi_app, settings)
    return app

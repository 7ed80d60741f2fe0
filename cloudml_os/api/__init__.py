"""The ``/v1`` REST API: pieces every resource blueprint shares.

The blueprints (``jobs``, ``packages``, ``models``, ``operations``…) hold no state of their own: the dependencies that
``create_app`` was given sit in ``app.extensions`` as one :class:`Services` and views reach them with
:func:`services`. Request bodies and query strings are parsed by :class:`V1Parser`, which turns
marshmallow's errors into one 400 ``INVALID_ARGUMENT`` naming the fields, as v1 does, instead of
webargs' 422.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping

import flask
import marshmallow as ma
from flask_smorest import Blueprint
from webargs.flaskparser import FlaskParser
from werkzeug.routing import BaseConverter

from cloudml_os.api.logwatch import LogWatch
from cloudml_os.artifacts import PROJECT_ID_PATTERN, ArtifactStore
from cloudml_os.cache import TtlCache
from cloudml_os.config import Settings
from cloudml_os.errors import InvalidArgument, Unavailable, flatten_messages
from cloudml_os.frameworks.base import Framework
from cloudml_os.serving.request_log import RequestLog
from cloudml_os.store import Store

EXTENSION = "cloudml_os"
RESOURCE_ID_PATTERN = r"[A-Za-z][A-Za-z0-9_]{0,127}"  # v1 job, model and version ids
OPERATION_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
# Seconds an API process trusts a token or a serving version it looked up: a token revoked or a version
# changed through another API process applies within this (at once through this one).
LOOKUP_TTL = 1.0


def no_operation_queue(operation_pk: int) -> None:
    """``start_operation`` of an app built without one: creating a version answers 503."""
    raise RuntimeError("create_app was given no start_operation; model versions cannot be deployed")


def no_replacement(replica_pk: int) -> None:
    """``replace_replica`` of an app built without a task queue: replacing a node answers 503."""
    raise Unavailable("Replica replacement is not configured on this server.")


def no_prediction(version_pk: int, model: str, body: bytes, deadline: float) -> tuple[int, bytes]:
    """``predict`` of an app built without a router."""
    raise Unavailable("Online prediction is not configured on this server.")


@dataclasses.dataclass(frozen=True)
class Services:
    """What the views need, handed to ``create_app`` by its caller (tests pass fakes)."""

    settings: Settings
    store: Store
    artifacts: ArtifactStore
    frameworks: Mapping[str, Framework]
    start_job: Callable[[int], None]
    # Enqueues the serving workflow for an Operation row (version create, delete, scale).
    start_operation: Callable[[int], None] = no_operation_queue
    # (version row id, model name, request body, deadline in seconds) -> (HTTP status, body) from one of the
    # version's replicas; raises cloudml_os.errors.Unavailable when no replica can answer in time.
    predict: Callable[[int, str, bytes, float], tuple[int, bytes]] = no_prediction
    # Enqueues the replacement of an ejected replica (a platform admin's "replace node").
    replace_replica: Callable[[int], None] = no_replacement
    # Where sampled online predictions go (cloudml_os.serving.request_log.RequestLog); None: nowhere.
    request_log: RequestLog | None = None
    # What follow=true log streams wait on (cloudml_os.api.logwatch.LogWatch); create_app makes it.
    log_watch: LogWatch | None = None
    # Tokens by hash and serving versions, trusted for LOOKUP_TTL seconds (a prediction's two queries).
    lookups: TtlCache = dataclasses.field(default_factory=lambda: TtlCache(LOOKUP_TTL))


def services() -> Services:
    """The current application's dependencies."""
    return flask.current_app.extensions[EXTENSION]


class ProjectIdConverter(BaseConverter):
    """``<project:p>``: a project id; anything else is an unknown URL (404)."""

    regex = PROJECT_ID_PATTERN


class ResourceIdConverter(BaseConverter):
    """``<resource_id:j>``: a v1 id, which cannot hold ``:``, so ``jobs/<j>:cancel`` routes to cancel."""

    regex = RESOURCE_ID_PATTERN


class OperationIdConverter(BaseConverter):
    """``<operation_id:o>``: a server-assigned operation id (no ``:``, so ``operations/<o>:cancel`` routes)."""

    regex = OPERATION_ID_PATTERN


CONVERTERS: dict[str, tuple[type[BaseConverter], dict[str, str]]] = {
    "project": (ProjectIdConverter, {"type": "string", "pattern": f"^{PROJECT_ID_PATTERN}$"}),
    "resource_id": (ResourceIdConverter, {"type": "string", "pattern": f"^{RESOURCE_ID_PATTERN}$"}),
    "operation_id": (OperationIdConverter, {"type": "string", "pattern": f"^{OPERATION_ID_PATTERN}$"}),
}


class V1Parser(FlaskParser):
    """webargs parser answering bad input the v1 way: 400 INVALID_ARGUMENT, fields named in the message."""

    DEFAULT_VALIDATION_STATUS = 400

    def handle_error(self, error: ma.ValidationError, req: flask.Request, schema: ma.Schema, *,
                     error_status_code: int | None,
                     error_headers: typing.Mapping[str, str] | None) -> typing.NoReturn:
        messages = error.messages
        # webargs nests messages under the location ({"json": {...}}); clients know no locations.
        if isinstance(messages, dict) and len(messages) == 1 and next(iter(messages)) in self.__location_map__:
            messages = next(iter(messages.values()))
        raise InvalidArgument("; ".join(flatten_messages(messages)) or "Invalid request.")

    def _handle_invalid_json_error(self, error: Exception, req: flask.Request, *args: typing.Any,
                                   **kwargs: typing.Any) -> typing.NoReturn:
        raise InvalidArgument(f"Invalid JSON payload received: {error}")


class ApiBlueprint(Blueprint):
    """A flask-smorest blueprint whose ``@arguments`` use :class:`V1Parser`."""

    ARGUMENTS_PARSER = V1Parser()


def resource_name(project: str, *parts: str) -> str:
    """The v1 resource name, e.g. ``projects/p/jobs/j``, as used in NOT_FOUND messages."""
    return "/".join(("projects", project, *parts))

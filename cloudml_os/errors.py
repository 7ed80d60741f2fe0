"""The API's exceptions and their mapping to Cloud ML Engine v1 error bodies.

Views raise an :class:`ApiError` subclass; the handlers that :func:`register_error_handlers` installs
turn it, and every other failure (unknown route, wrong method, a database that is down, a bug), into
``{"error": {"code": 404, "message": "…", "status": "NOT_FOUND"}}`` so that v1 clients see one shape.
Internals (tracebacks, SQL, paths) never reach the body: an unexpected exception is logged and answered
with a generic message.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from sqlalchemy.exc import DataError, OperationalError
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    """An error a client may see: the HTTP ``code``, the v1 ``status`` and a message for humans."""

    code = 500
    status = "INTERNAL"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidArgument(ApiError):
    code = 400
    status = "INVALID_ARGUMENT"


class FailedPrecondition(ApiError):
    """The request is well formed but the resource's state forbids it (cancel a finished job)."""

    code = 400
    status = "FAILED_PRECONDITION"


class Unauthenticated(ApiError):
    code = 401
    status = "UNAUTHENTICATED"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="cloudml-os"'})


class PermissionDenied(ApiError):
    code = 403
    status = "PERMISSION_DENIED"


class NotFound(ApiError):
    code = 404
    status = "NOT_FOUND"


class AlreadyExists(ApiError):
    code = 409
    status = "ALREADY_EXISTS"


class Aborted(ApiError):
    """409: a concurrent change or an out-of-order piece (a resumable upload sent from the wrong offset)."""

    code = 409
    status = "ABORTED"


class OutOfRange(ApiError):
    """416: a ``Range`` beyond the end of an object."""

    code = 416
    status = "OUT_OF_RANGE"


class RequestTooLarge(ApiError):
    """413: gRPC, whose codes v1 uses, answers an oversized message with RESOURCE_EXHAUSTED."""

    code = 413
    status = "RESOURCE_EXHAUSTED"


class Unavailable(ApiError):
    """A dependency (database, queue) is down; the client may retry the same request later."""

    code = 503
    status = "UNAVAILABLE"


# v1 status for HTTP errors raised by Flask/werkzeug themselves (routing, body size, methods).
HTTP_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    416: "OUT_OF_RANGE",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

INTERNAL_MESSAGE = "Internal error encountered."


def error_body(code: int, status: str, message: str) -> dict[str, Any]:
    """The v1 error envelope."""
    return {"error": {"code": code, "message": message, "status": status}}


def error_response(code: int, status: str, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(error_body(code, status, message))
    response.status_code = code
    response.headers.update(headers or {})
    return response


def flatten_messages(messages: Any, prefix: str = "") -> list[str]:
    """Turn marshmallow's nested error dict into ``["trainingInput.scaleTier: Must be one of …"]``.

    List indexes become ``[i]`` so that ``packageUris[1]`` names the element, and marshmallow's
    ``_schema`` key (a whole-object error) adds no name.
    """
    if isinstance(messages, dict):
        lines = []
        for key, value in messages.items():
            if key == "_schema":
                name = prefix
            elif isinstance(key, int):
                name = f"{prefix}[{key}]"
            else:
                name = f"{prefix}.{key}" if prefix else str(key)
            lines.extend(flatten_messages(value, name))
        return lines
    if isinstance(messages, list | tuple):
        if all(isinstance(item, str) for item in messages):
            text = " ".join(messages)
            return [f"{prefix}: {text}" if prefix else text]
        lines = []
        for item in messages:
            lines.extend(flatten_messages(item, prefix))
        return lines
    return [f"{prefix}: {messages}" if prefix else str(messages)]


def _handle_api_error(error: ApiError) -> Response:
    return error_response(error.code, error.status, error.message, error.headers)


def _handle_http_exception(error: HTTPException) -> Response:
    code = error.code or 500
    status = HTTP_STATUS_NAMES.get(code, "INVALID_ARGUMENT" if code < 500 else "INTERNAL")
    data = getattr(error, "data", None) or {}
    if "messages" in data:  # a webargs abort that bypassed our parser
        message = "; ".join(flatten_messages(data["messages"]))
    elif code == 404:
        message = f"The requested URL {request.path} was not found on this server."
    elif code == 405:
        message = f"Method {request.method} is not allowed on {request.path}."
    elif code >= 500:
        message = INTERNAL_MESSAGE
    else:
        message = error.description or error.name
    headers = {k: v for k, v in error.get_headers() if k.lower() in ("allow", "www-authenticate")}
    return error_response(code, status, message, headers)


def _handle_database_down(error: OperationalError) -> Response:
    current_app.logger.error("database unavailable: %s", error.orig)
    return error_response(503, "UNAVAILABLE", "The service is temporarily unavailable; retry later.")


def _handle_data_error(error: DataError) -> Response:
    """A value the schemas let through but the database cannot hold (an id past 64 bits): the request's
    fault, so 400; the database's own message (SQL, column names) stays in the log."""
    current_app.logger.warning("value refused by the database on %s %s: %s", request.method, request.path,
                               error.orig)
    return error_response(400, "INVALID_ARGUMENT", "A value in the request is out of range for its field.")


def _handle_unexpected(error: Exception) -> Response:
    current_app.logger.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "INTERNAL", INTERNAL_MESSAGE)


def register_error_handlers(app: Flask) -> None:
    """Install the handlers; call after flask-smorest's Api so that ours replace its HTTP handler."""
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(OperationalError, _handle_database_down)
    app.register_error_handler(DataError, _handle_data_error)
    app.register_error_handler(Exception, _handle_unexpected)

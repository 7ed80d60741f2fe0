"""The one HTTP client of ``cloudml``: the platform's public ``/v1`` API, spoken with ``requests``.

Every command goes through :class:`ApiClient`, which adds the credential (a local API token as
``Authorization: Bearer``, a Keystone token as ``X-Auth-Token``), turns a v1 error body into an
:class:`ApiError` carrying the API's own message, and an unreachable endpoint into a one-line
:class:`CliError`. It knows paths and bodies, never how they are shown: that is ``output``'s job.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import click
import requests

from cloudml_os import __version__

TIMEOUT = 60  # seconds for one request; uploads may take longer, see upload_package
UPLOAD_TIMEOUT = (30, 600)  # connect, then read: the server inspects a large archive before it answers


class CliError(click.ClickException):
    """An error of the command: one message on stderr (``ERROR: …``), exit status ``exit_code`` (1)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"ERROR: {self.format_message()}", err=True)


class ApiError(CliError):
    """A v1 error answer: ``{"error": {"code": 404, "message": "…", "status": "NOT_FOUND"}}``."""

    def __init__(self, code: int, status: str, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.code, self.status = code, status


def _error_of(response: requests.Response) -> ApiError:
    try:
        error = response.json()["error"]
        message = error.get("message") or response.reason
        if response.status_code == 401:
            message += " (set a token with `cloudml config set token …` or `cloudml auth login`)"
        return ApiError(response.status_code, str(error.get("status", "")), message)
    except (ValueError, KeyError, TypeError, AttributeError):
        # Not a v1 error body: another server at this address, or a proxy in between.
        text = " ".join(response.text.split())[:200]
        return ApiError(response.status_code, "", f"HTTP {response.status_code} from {response.url}: {text}")


_CONNECTION_FAILURES = (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                        ("Failed to resolve", "unknown host"), ("timed out", "timed out"),
                        ("No route to host", "no route to host"), ("SSLError", "TLS error"))


def _unreachable(url: str, exc: requests.RequestException) -> CliError:
    """One line for a connection failure (requests' own message is a long chain of wrapped errors)."""
    text = str(exc)
    reason = next((reason for needle, reason in _CONNECTION_FAILURES if needle in text), None)
    if reason is None:
        reason = text.splitlines()[0][:160] if text else type(exc).__name__
    return CliError(f"cannot reach the API at {url}: {reason}")


class MultipartFile:
    """A ``multipart/form-data`` body of one file field, read in pieces (so ``requests`` streams it with a
    ``Content-Length``, which the API requires), telling ``on_read`` how many of the file's bytes each read
    took (a progress bar's advance).

    Deliberately not an ``io`` object: ``requests`` would ask it ``tell()`` and fall back to chunked
    transfer, which the API refuses (411)."""

    def __init__(self, path: Path, field: str, on_read: Callable[[int], None] = lambda n: None):
        boundary = uuid.uuid4().hex
        name = path.name.replace('"', "%22").replace("\r", "").replace("\n", "")
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        self._length = len(head) + path.stat().st_size + len(tail)
        self._file = path.open("rb")
        self._parts: list[IO[bytes]] = [io.BytesIO(head), self._file, io.BytesIO(tail)]
        self._on_read = on_read

    def __len__(self) -> int:
        return self._length

    def __enter__(self) -> MultipartFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self, size: int | None = -1) -> bytes:
        size = self._length if size is None or size < 0 else size
        out = b""
        while self._parts and len(out) < size:
            part = self._parts[0]
            piece = part.read(size - len(out))
            if not piece:
                self._parts.pop(0).close()
                continue
            if part is self._file:
                self._on_read(len(piece))
            out += piece
        return out

    def close(self) -> None:
        for part in (*self._parts, self._file):
            part.close()
        self._parts = []


class ApiClient:
    """One project's view of the ``/v1`` API at ``endpoint``.

    :param endpoint: the API's base URL, e.g. ``http://127.0.0.1:8080`` (``/v1`` is added here).
    :param project: the project in every path; may be None for calls outside a project.
    :param token: a local API token, or a Keystone token when ``auth_type`` is ``keystone``.
    """

    def __init__(self, endpoint: str, project: str | None, token: str | None, auth_type: str = "local",
                 session: requests.Session | None = None):
        self.endpoint = endpoint.rstrip("/")
        self.project = project
        self.token = token
        self.auth_type = auth_type
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = f"cloudml/{__version__}"

    # ---- transport ------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        """``path`` under the project (``/jobs`` → ``…/v1/projects/P/jobs``), or under ``/v1`` if it starts
        with ``/v1/`` already."""
        if path.startswith("/v1/"):
            return self.endpoint + path
        if not self.project:
            raise CliError("no project set: use --project, CLOUDML_PROJECT or `cloudml config set project P`", 2)
        return f"{self.endpoint}/v1/projects/{self.project}{path}"

    def _headers(self) -> dict[str, str]:
        if not self.token:
            return {}
        if self.auth_type == "keystone":
            return {"X-Auth-Token": self.token}
        return {"Authorization": f"Bearer {self.token}"}

    def send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send one request; the answer whatever its status, and ``requests``' exceptions as they are (for a
        caller that retries; :meth:`unreachable` makes the final one a one-line error)."""
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", TIMEOUT)
        return self.session.request(method, self.url(path), headers=headers, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send one request; the answer whatever its status. :raises CliError: the endpoint is unreachable."""
        try:
            return self.send(method, path, **kwargs)
        except requests.RequestException as exc:
            raise self.unreachable(exc) from None

    def unreachable(self, exc: requests.RequestException) -> CliError:
        """The one-line error of a connection failure."""
        return _unreachable(self.endpoint, exc)

    @staticmethod
    def error(response: requests.Response) -> ApiError:
        """The error of an answer of status 400 or more: the API's v1 message."""
        return _error_of(response)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return its JSON answer. :raises ApiError: a v1 error answer."""
        response = self.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise self.error(response)
        try:
            return response.json()
        except ValueError:
            raise CliError(f"the API at {self.endpoint} answered {path} with something that is not JSON") from None

    def pages(self, path: str, key: str, params: dict[str, Any] | None = None, limit: int | None = None
              ) -> Iterator[dict[str, Any]]:
        """Every item of a v1 list, following ``nextPageToken``; at most ``limit`` of them."""
        params = {key: value for key, value in (params or {}).items() if value not in (None, "")}
        count = 0
        while True:
            page = self.call("GET", path, params=params)
            for item in page.get(key, []):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield item
            if not page.get("nextPageToken"):
                return
            params["pageToken"] = page["nextPageToken"]

    # ---- packages and jobs ----------------------------------------------------------------------

    def upload_package(self, path: Path, on_read: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
        """Upload a trainer package (multipart field ``file``); the package resource with its ``store://`` URI."""
        with MultipartFile(path, "file", on_read) as body:
            return self.call("POST", "/packages", data=body, headers={"Content-Type": body.content_type},
                             timeout=UPLOAD_TIMEOUT)

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", "/jobs", json=body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> None:
        self.call("POST", f"/jobs/{job_id}:cancel", json={})

    def job_logs(self, job_id: str, node: str | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """Log entries: every node's from the start, or one node's from ``offset`` (byte)."""
        params = {"node": node, "offset": offset} if node else {}
        return self.call("GET", f"/jobs/{job_id}/logs", params=params)["logs"]

    # ---- models, versions, operations -----------------------------------------------------------

    def operation(self, name: str) -> dict[str, Any]:
        """An operation by its id or its full name (``projects/P/operations/ID``)."""
        return self.call("GET", f"/operations/{name.rstrip('/').rsplit('/', 1)[-1]}")

    def predict(self, model: str, version: str | None, body: dict[str, Any]) -> dict[str, Any]:
        path = f"/models/{model}/versions/{version}:predict" if version else f"/models/{model}:predict"
        return self.call("POST", path, json=body)

"""The dashboard's only way to read and change anything: the ``/v1`` API of its own app, called in-process.

A request goes through the app's whole WSGI stack (Keystone's middleware in OpenStack mode, authentication,
:func:`cloudml_os.auth.authorize`, validation, the views and their workflows) with the signed-in user's
credential, exactly as if the browser had called the API itself; no socket is opened.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import IO, Any

from flask import Flask
from werkzeug.test import Client


@dataclasses.dataclass
class V1Error(Exception):
    """The API refused a call; ``message`` is its v1 error message, fit to show the user."""

    status: int
    code: str
    message: str

    def __str__(self) -> str:
        return self.message


class V1Client:
    """One user's calls to the ``/v1`` API of ``app``."""

    def __init__(self, app: Flask, credential: str, *, keystone: bool, remote_addr: str | None = None):
        self._client = Client(app)
        self._headers = {"X-Auth-Token": credential} if keystone else {"Authorization": f"Bearer {credential}"}
        self._environ = {"REMOTE_ADDR": remote_addr or "127.0.0.1"}

    def call(self, method: str, path: str, *, body: Any = None, query: dict[str, Any] | None = None,
             file: tuple[IO[bytes], str] | None = None) -> dict[str, Any]:
        """``METHOD /v1{path}`` with a JSON ``body`` (or a multipart ``file``); the JSON answer.

        :raises V1Error: the API answered with an error.
        """
        kwargs: dict[str, Any] = {"headers": self._headers, "environ_base": self._environ,
                                  "query_string": {k: v for k, v in (query or {}).items() if v not in (None, "")}}
        if file is not None:
            kwargs["data"] = {"file": file}
        elif body is not None:
            kwargs["json"] = body
        response = self._client.open(f"/v1{path}", method=method, **kwargs)
        try:
            payload = json.loads(response.get_data()) if response.get_data() else {}
        finally:
            response.close()
        if response.status_code >= 400:
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            raise V1Error(response.status_code, str(error.get("status", "UNKNOWN")),
                          str(error.get("message") or f"The API answered HTTP {response.status_code}."))
        return payload

    def stream(self, path: str) -> tuple[int, dict[str, str], Iterator[bytes]]:
        """``GET /v1{path}`` of a byte stream (an object): status, headers and the body as it is produced.

        :raises V1Error: the API answered with an error.
        """
        response = self._client.open(f"/v1{path}", method="GET", headers=self._headers,
                                     environ_base=self._environ, buffered=False)
        if response.status_code >= 400:
            try:
                payload = json.loads(response.get_data() or b"{}")
            finally:
                response.close()
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            raise V1Error(response.status_code, str(error.get("status", "UNKNOWN")),
                          str(error.get("message") or f"The API answered HTTP {response.status_code}."))
        return response.status_code, dict(response.headers), _closing(response)

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        return self.call("GET", path, query=query)

    def post(self, path: str, body: Any = None, **query: Any) -> dict[str, Any]:
        return self.call("POST", path, body=body if body is not None else {}, query=query)


def _closing(response: Any) -> Iterator[bytes]:
    """The response's body, closing it (and the app's iterator) when the last piece is read or the client goes."""
    try:
        yield from response.iter_encoded()
    finally:
        response.close()

"""The artifact store: trainer packages and exported models, named by ``store://PROJECT/KEY`` URIs.

A URI never names a host path or a Swift account, so a request can only reach its own project's objects;
the backend (a local folder for the embedded default, Swift in OpenStack mode) maps the URI to where the
bytes live. Workflows use only :class:`ArtifactStore`; :func:`open_artifact_store` picks the backend.
Every backend maps a URI only through :func:`parse_uri`, which is therefore the one place that decides
what a project and a key may be. This module imports nothing heavy (no Flask, no database): nodes and the
client side may use it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from cloudml_os.config import Settings

SCHEME = "store://"
# A project id, as the API's paths and tokens take it. Defined here, where everything that maps a URI can
# import it without Flask or the database: cloudml_os.api imports this package (so this package cannot
# import it back) and cloudml_os.auth.tokens brings in the store. tests/unit/test_store_uris.py keeps the
# API's copy and the token command's equal to it.
PROJECT_ID_PATTERN = r"[a-z][a-z0-9-]{0,61}"
MAX_KEY_BYTES = 1024  # Swift's limit on an object name (the project is the container, the key the name)
_PROJECT_ID = re.compile(PROJECT_ID_PATTERN)
# C0 and C1 controls (NUL, newlines, escapes…) and lone surrogates, which no file or object name can hold.
_REFUSED_IN_KEY = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class ArtifactError(ValueError):
    """A URI is malformed, points outside its project, or names nothing; the message is safe to show."""


def parse_uri(uri: str) -> tuple[str, str]:
    """Split ``store://PROJECT/KEY`` into (project, key).

    PROJECT is a project id (:data:`PROJECT_ID_PATTERN`); KEY is a relative path of non-empty segments,
    none ``.`` or ``..``, without control characters, of at most :data:`MAX_KEY_BYTES` bytes in UTF-8. One
    trailing ``/`` (a folder) is dropped.

    :raises ArtifactError: on any other shape.
    """
    if not uri.startswith(SCHEME):
        raise ArtifactError(f"{_shown(uri)} is not an artifact URI (expected {SCHEME}PROJECT/PATH)")
    project, _, key = uri[len(SCHEME):].partition("/")
    key = key.removesuffix("/")
    if (not _PROJECT_ID.fullmatch(project) or not key or _REFUSED_IN_KEY.search(key)
            or len(key.encode()) > MAX_KEY_BYTES or any(part in ("", ".", "..") for part in key.split("/"))):
        raise ArtifactError(f"{_shown(uri)} is not a valid artifact URI")
    return project, key


def _shown(uri: str) -> str:
    """The URI for a message: quoted (control characters escaped) and cut short."""
    text = repr(uri)
    return text if len(text) <= 200 else text[:200] + "…"


def make_uri(project: str, key: str) -> str:
    return f"{SCHEME}{project}/{key}"


def job_dir_uri(project: str, job_id: str, training_input: dict) -> str:
    """Where a training job's outputs go (model, logs, TensorBoard files): its ``jobDir``, or the project's
    ``jobs/JOB_ID`` in the artifact store."""
    return training_input.get("jobDir") or make_uri(project, f"jobs/{job_id}")


class ArtifactStore(Protocol):
    """What the API and the workflows need from an artifact store."""

    def exists(self, uri: str) -> bool:
        """Whether the URI names an object or a tree holding at least one object."""

    def put_file(self, project: str, key: str, source: BinaryIO) -> str:
        """Store a stream under the key, atomically for readers; return its URI."""

    def put_tree(self, project: str, key: str, source: Path) -> str:
        """Store a local directory under the key, replacing what was there (a repeated export is a no-op)."""

    def local_file(self, uri: str) -> contextlib.AbstractContextManager[Path]:
        """A local path holding the object's bytes while the context is open.

        :raises ArtifactError: when the URI names no object.
        """

    def local_tree(self, uri: str) -> contextlib.AbstractContextManager[Path]:
        """A local directory holding the tree's files while the context is open.

        :raises ArtifactError: when the URI names no tree.
        """


def files_of(tree: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX name, path) of every file under a local directory, in a stable order."""
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            yield path.relative_to(tree).as_posix(), path


def open_artifact_store(settings: Settings) -> ArtifactStore:
    """The backend named by ``settings.artifacts``: ``local`` (a folder) or ``swift`` (OpenStack)."""
    if settings.artifacts == "swift":
        from cloudml_os.artifacts.swift import SwiftArtifactStore

        return SwiftArtifactStore.from_settings(settings)
    from cloudml_os.artifacts.local import LocalArtifactStore

    return LocalArtifactStore(settings.artifacts_root)

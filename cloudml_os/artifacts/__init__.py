"""The artifact store: trainer packages and exported models, named by ``store://PROJECT/KEY`` URIs.

A URI never names a host path or a Swift account, so a request can only reach its own project's objects;
the backend (a local folder for the embedded default, Swift in OpenStack mode) maps the URI to where the
bytes live. Workflows use only :class:`ArtifactStore`; :func:`open_artifact_store` picks the backend.
Every backend maps a URI only through :func:`parse_uri`, which is therefore the one place that decides
what a project and a key may be. This module imports nothing heavy (no Flask, no database): nodes and the
client side may use it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
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


class ChecksumMismatch(ArtifactError):
    """The bytes received do not have the checksum the client sent; nothing was stored."""


class IncompleteBody(ArtifactError):
    """The source ended before the bytes it announced (a cut connection); nothing was committed."""


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key in the project, size, MD5 (hex; None where the backend does not know it)
    and last change (naive UTC)."""

    key: str
    size: int
    md5: str | None
    updated: dt.datetime


@dataclasses.dataclass(frozen=True)
class Expected:
    """Checksums a client sent with an upload (hex digests); an absent one is not checked."""

    md5: str | None = None
    sha256: str | None = None


class Hashes:
    """MD5 (always: it is the object's ``md5Hash``) and SHA-256 (only when a client asked for it to be checked)
    of bytes seen in order."""

    def __init__(self, expected: Expected = Expected()) -> None:
        self.expected = expected
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256() if expected.sha256 else None

    def update(self, data: bytes) -> None:
        self.md5.update(data)
        if self.sha256 is not None:
            self.sha256.update(data)

    def verify(self) -> str:
        """The MD5 (hex) of what was seen. :raises ChecksumMismatch: naming the checksum that differs."""
        md5 = self.md5.hexdigest()
        if self.expected.md5 is not None and md5 != self.expected.md5:
            raise ChecksumMismatch(f"the MD5 of the bytes received is {b64_digest(md5)}, "
                                   f"not {b64_digest(self.expected.md5)}: nothing was stored")
        if self.sha256 is not None and self.sha256.hexdigest() != self.expected.sha256:
            raise ChecksumMismatch(f"the SHA-256 of the bytes received is {self.sha256.hexdigest()}, "
                                   f"not {self.expected.sha256}: nothing was stored")
        return md5


def b64_digest(hex_digest: str) -> str:
    """A hex digest as Cloud Storage and ``Content-MD5`` write it: base64 of the raw bytes."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def read_exactly(source: BinaryIO, length: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The next ``length`` bytes of ``source`` in chunks. :raises IncompleteBody: if it ends sooner."""
    left = length
    while left:
        try:
            data = source.read(min(chunk, left))
        except OSError as exc:  # werkzeug's ClientDisconnected is an OSError too (BadRequest + OSError)
            raise IncompleteBody(f"the body ended after {length - left} of {length} bytes") from exc
        if not data:
            raise IncompleteBody(f"the body ended after {length - left} of {length} bytes")
        left -= len(data)
        yield data


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

    # -- the objects API (streamed, ranged, listed, resumable) --------------------------------------

    def write_object(self, project: str, key: str, source: BinaryIO, size: int, expected: Expected) -> ObjectInfo:
        """Stream exactly ``size`` bytes into the object and make it visible only if they match ``expected``.

        :raises IncompleteBody: the source ended early. :raises ChecksumMismatch: nothing was stored.
        """

    def stat(self, uri: str) -> ObjectInfo | None:
        """The object's metadata; None when no object has this exact name."""

    def read_range(self, uri: str, first: int, length: int) -> Iterator[bytes]:
        """``length`` bytes from offset ``first``, in chunks; the caller checked the range against ``stat``."""

    def open_object(self, uri: str) -> BinaryIO | None:
        """The object as an open local file (the caller closes it), which a server can send with ``sendfile``;
        None when the backend has no local file (Swift streams through :meth:`read_range`) or no such object."""

    def list_objects(self, project: str, prefix: str, after: str, limit: int) -> list[ObjectInfo]:
        """Up to ``limit`` objects whose key starts with ``prefix`` and sorts after ``after``, in key order."""

    def delete_object(self, uri: str) -> bool:
        """Delete one object; False when there was none."""

    def upload_received(self, project: str, upload_id: str, size: int, chunk: int) -> int:
        """How many bytes of a resumable upload of ``size`` bytes are kept (0 for one not begun)."""

    def upload_write(self, project: str, upload_id: str, offset: int, source: BinaryIO, length: int, size: int,
                     chunk: int, hashes: Hashes | None) -> int:
        """Append ``length`` bytes at ``offset`` (= what is kept) to a resumable upload of ``size`` bytes;
        return what is kept now. Bytes are kept in whole ``chunk`` units and the last bytes of the object (or
        to the byte where the backend can); a source that ends early keeps what arrived whole and raises
        :class:`IncompleteBody`."""

    def upload_commit(self, project: str, upload_id: str, key: str, size: int, chunk: int,
                      hashes: Hashes | None, expected: Expected) -> ObjectInfo:
        """Make a complete upload the object ``key``, checking ``expected`` (with ``hashes`` when they saw
        every byte, else by reading the bytes back). The upload's bytes are gone afterwards, whatever happens."""

    def upload_abort(self, project: str, upload_id: str) -> None:
        """Drop a resumable upload's bytes (no-op for an unknown one)."""


def pattern_regex(key: str) -> re.Pattern[str]:
    """A key pattern (batch prediction's ``inputPaths``): ``*`` matches any characters but ``/``, the rest itself."""
    return re.compile("[^/]*".join(re.escape(part) for part in key.split("*")) + r"\Z")


def matching_objects(store: ArtifactStore, uri: str, page: int = 1000) -> Iterator[ObjectInfo]:
    """The objects a ``store://PROJECT/KEY`` pattern names (``*`` within one folder), in key order.

    :raises ArtifactError: a malformed URI.
    """
    project, key = parse_uri(uri)
    matcher, prefix, after = pattern_regex(key), key.split("*", 1)[0], ""
    while True:
        found = store.list_objects(project, prefix, after, page)
        yield from (info for info in found if matcher.match(info.key))
        if len(found) < page:
            return
        after = found[-1].key


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

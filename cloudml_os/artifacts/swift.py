"""The Swift artifact store: packages, logs and exported models in OpenStack object storage.

One container per project (``swift_container_prefix + PROJECT``) in the platform's service account, so
a URI ``store://PROJECT/KEY`` maps to object KEY of that project's container and nothing else. Files
larger than ``swift_segment_size`` are uploaded as Static Large Objects whose segments live in a
companion ``…_segments`` container (as python-swiftclient does), so listings of a tree show only real
files; replacing or deleting an object also deletes the segments it used. Uploads and downloads are
streamed, never held in memory. Only this module and ``cloud/openstack.py`` import openstacksdk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlencode

import requests
from keystoneauth1 import exceptions as ksa_exceptions
from openstack import exceptions as os_exceptions

from cloudml_os.artifacts import (
    ArtifactError,
    Expected,
    Hashes,
    IncompleteBody,
    ObjectInfo,
    files_of,
    make_uri,
    parse_uri,
    read_exactly,
)

if TYPE_CHECKING:
    from cloudml_os.config import Settings

CHUNK = 1 << 20
# Not "-segments": project ids are [a-z][a-z0-9-]*, so project "team-a-segments" would own team-a's segments.
SEGMENTS_SUFFIX = "_segments"
# Swift's default max_manifest_segments: a larger file gets larger segments rather than a refused manifest.
MAX_SEGMENTS = 1000
MD5_HEADER = "X-Object-Meta-Cloudml-Md5"  # an SLO's ETag is not its bytes' MD5: the true one is kept here
UPLOADS = ".uploads"  # resumable uploads' segments, in the project's segments container


class SwiftArtifactStore:
    """:class:`cloudml_os.artifacts.ArtifactStore` on Swift.

    :param connection: an openstacksdk Connection of the platform's service account.
    :param container_prefix: prefix of every project's container name.
    :param segment_size: files above this many bytes become SLOs of segments of this size.
    """

    def __init__(self, connection: Any, *, container_prefix: str = "cloudml-os-",
                 segment_size: int = 100 * 1024 * 1024) -> None:
        self._swift = connection.object_store
        self._prefix = container_prefix
        self._segment_size = segment_size
        self._containers: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> SwiftArtifactStore:
        import openstack

        return cls(openstack.connect(cloud=settings.openstack_cloud),
                   container_prefix=settings.swift_container_prefix, segment_size=settings.swift_segment_size)

    # -- the ArtifactStore interface ------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        container, key = self._locate(uri)
        if self._request("HEAD", container, key, missing_ok=True) is not None:
            return True
        return bool(self._names(container, key + "/", limit=1))

    def put_file(self, project: str, key: str, source: BinaryIO) -> str:
        uri = make_uri(project, key)
        container, name = self._locate(uri)
        with tempfile.TemporaryDirectory(prefix="cloudml-os-swift-") as staging:
            path = Path(staging) / "object"
            with path.open("wb") as spool:
                shutil.copyfileobj(source, spool, CHUNK)
            self._upload(container, name, path)
        return uri

    def put_tree(self, project: str, key: str, source: Path) -> str:
        uri = make_uri(project, key)
        container, prefix = self._locate(uri)
        uploaded = set()
        for relative, path in files_of(source):
            name = f"{prefix}/{relative}"
            self._upload(container, name, path)
            uploaded.add(name)
        for stale in set(self._names(container, prefix + "/")) - uploaded:
            self._delete(container, stale)
        return uri

    @contextlib.contextmanager
    def local_file(self, uri: str) -> Iterator[Path]:
        container, key = self._locate(uri)
        with tempfile.TemporaryDirectory(prefix="cloudml-os-swift-") as staging:
            path = Path(staging) / PurePosixPath(key).name
            if not self._download(container, key, path):
                raise ArtifactError(f"{uri} does not exist")
            yield path

    @contextlib.contextmanager
    def local_tree(self, uri: str) -> Iterator[Path]:
        container, prefix = self._locate(uri)
        names = self._names(container, prefix + "/")
        if not names:
            raise ArtifactError(f"{uri} does not exist or is not a directory")
        with tempfile.TemporaryDirectory(prefix="cloudml-os-swift-") as staging:
            root = Path(staging)
            for name in names:
                relative = PurePosixPath(name[len(prefix) + 1:])
                if not relative.parts or any(part in ("", ".", "..") for part in relative.parts):
                    continue  # an object name no local file may take
                self._download(container, name, root.joinpath(*relative.parts))
            yield root

    # -- the objects API ------------------------------------------------------------------------

    def write_object(self, project: str, key: str, source: BinaryIO, size: int, expected: Expected) -> ObjectInfo:
        container, name = self._locate(make_uri(project, key))
        hashes = Hashes(expected)
        if size <= self._segment_size and expected.sha256 is None:
            # One PUT; Swift itself refuses (422) bytes that do not match the ETag, so a mismatch stores nothing.
            self._ensure_container(container)
            old_segments = self._segments_of(container, name)
            headers = {"ETag": expected.md5} if expected.md5 else {}
            body = _Stream(read_exactly(source, size, CHUNK), size, hashes)
            response = self._request("PUT", container, name, data=body, headers=headers, allow_reauth=False,
                                     allowed=(422,))
            response.close()
            if body.incomplete is not None:
                raise body.incomplete
            hashes.verify()  # raises for a 422
            self._delete_segments(old_segments)
            return self._stat(container, name, key)
        upload_id = f"put{uuid.uuid4().hex}"
        try:
            self.upload_write(project, upload_id, 0, source, size, size, self._segment_size, hashes)
            return self.upload_commit(project, upload_id, key, size, self._segment_size, hashes, expected)
        except BaseException:
            self.upload_abort(project, upload_id)
            raise

    def stat(self, uri: str) -> ObjectInfo | None:
        container, name = self._locate(uri)
        return self._stat(container, name, name)

    def open_object(self, uri: str) -> BinaryIO | None:
        return None  # bytes come from Swift: read_range streams them

    def read_range(self, uri: str, first: int, length: int) -> Iterator[bytes]:
        container, name = self._locate(uri)
        response = self._request("GET", container, name, stream=True,
                                 headers={"Range": f"bytes={first}-{first + length - 1}"})
        with response, _failures(f"GET {container}/{name}"):
            yield from response.iter_content(CHUNK)

    def list_objects(self, project: str, prefix: str, after: str, limit: int) -> list[ObjectInfo]:
        container = self._prefix + project
        query = urlencode({"format": "json", "prefix": prefix, "marker": after, "limit": min(limit, 10000)})
        with _failures(f"list {container}"):
            response = self._swift.request(f"{quote(container, safe='')}?{query}", "GET", raise_exc=False)
        if response.status_code == 404:
            return []
        if response.status_code >= 400:
            raise ArtifactError(f"object storage refused listing {container}: HTTP {response.status_code}")
        found = []
        for entry in response.json():
            # A large object's listed hash is the MD5 of its segments' ETags, not of its bytes.
            md5 = None if "slo_etag" in entry or entry["bytes"] > self._segment_size else entry["hash"]
            found.append(ObjectInfo(key=entry["name"], size=entry["bytes"], md5=md5,
                                    updated=dt.datetime.fromisoformat(entry["last_modified"])))
        return found

    def delete_object(self, uri: str) -> bool:
        container, name = self._locate(uri)
        head = self._request("HEAD", container, name, missing_ok=True)
        if head is None:
            return False
        head.close()
        self._delete(container, name)
        return True

    def upload_received(self, project: str, upload_id: str, size: int, chunk: int) -> int:
        return sum(length for _, length in self._upload_segments(project, upload_id, size, chunk))

    def upload_write(self, project: str, upload_id: str, offset: int, source: BinaryIO, length: int, size: int,
                     chunk: int, hashes: Hashes | None) -> int:
        if offset % chunk:
            raise ArtifactError(f"an upload to object storage resumes at a multiple of {chunk} bytes")
        container = self._prefix + project + SEGMENTS_SUFFIX
        self._ensure_container(container)
        kept, end = offset, offset + length
        stream = read_exactly(source, length, CHUNK)
        while kept < end:
            segment = min(chunk, size - kept)
            if kept + segment > end:  # the body ends inside a segment: only whole segments are kept
                for _ in stream:
                    pass
                break
            body = _Stream(stream, segment, hashes)
            try:
                self._put(container, _segment_name(upload_id, kept // chunk), body, segment)
            except ArtifactError:
                if body.incomplete is not None:
                    raise body.incomplete from None
                raise
            if body.incomplete is not None:
                raise body.incomplete
            kept += segment
        return kept

    def upload_commit(self, project: str, upload_id: str, key: str, size: int, chunk: int,
                      hashes: Hashes | None, expected: Expected) -> ObjectInfo:
        container, name = self._locate(make_uri(project, key))
        segments_container = container + SEGMENTS_SUFFIX
        segments = self._upload_segments(project, upload_id, size, chunk)
        if sum(length for _, length in segments) != size:
            raise ArtifactError("the upload is not complete")
        try:
            if hashes is None:  # the bytes came in several requests: read them back once
                hashes = Hashes(expected)
                for segment, _ in segments:
                    response = self._request("GET", segments_container, segment, stream=True)
                    with response, _failures(f"GET {segments_container}/{segment}"):
                        for block in response.iter_content(CHUNK):
                            hashes.update(block)
            headers = {MD5_HEADER: hashes.verify()}
        except BaseException:
            self.upload_abort(project, upload_id)
            raise
        self._ensure_container(container)
        old_segments = self._segments_of(container, name)
        if len(segments) > 1:  # the manifest takes the segments over: they stay where they are
            manifest = [{"path": f"/{segments_container}/{segment}", "size_bytes": length}
                        for segment, length in segments]
            self._request("PUT", container, name, "multipart-manifest=put", data=json.dumps(manifest).encode(),
                          headers=headers).close()
        else:  # a server-side copy of the one segment (or an empty object); the upload's bytes then go
            copy = {"X-Copy-From": f"/{quote(segments_container, safe='')}/{quote(segments[0][0])}"} if segments else {}
            self._request("PUT", container, name, data=b"", headers={**headers, **copy}).close()
            self.upload_abort(project, upload_id)
        self._delete_segments(old_segments)
        return self._stat(container, name, key)

    def upload_abort(self, project: str, upload_id: str) -> None:
        container = self._prefix + project + SEGMENTS_SUFFIX
        for segment in self._names(container, f"{UPLOADS}/{upload_id}/"):
            response = self._request("DELETE", container, segment, missing_ok=True)
            if response is not None:
                response.close()

    def _upload_segments(self, project: str, upload_id: str, size: int, chunk: int) -> list[tuple[str, int]]:
        """(name, length) of an upload's segments kept in order from the first: each a whole chunk, or the last
        bytes of the object."""
        container = self._prefix + project + SEGMENTS_SUFFIX
        query = urlencode({"format": "json", "prefix": f"{UPLOADS}/{upload_id}/"})
        with _failures(f"list {container}"):
            response = self._swift.request(f"{quote(container, safe='')}?{query}", "GET", raise_exc=False)
        if response.status_code == 404:
            return []
        if response.status_code >= 400:
            raise ArtifactError(f"object storage refused listing {container}: HTTP {response.status_code}")
        listed = {entry["name"]: entry["bytes"] for entry in response.json()}
        kept: list[tuple[str, int]] = []
        while (name := _segment_name(upload_id, len(kept))) in listed:
            wanted = min(chunk, size - len(kept) * chunk)
            if listed[name] != wanted:
                break
            kept.append((name, wanted))
        return kept

    def _stat(self, container: str, name: str, key: str) -> ObjectInfo | None:
        head = self._request("HEAD", container, name, missing_ok=True)
        if head is None:
            return None
        head.close()
        headers = head.headers
        md5 = headers.get(MD5_HEADER)
        if md5 is None and headers.get("X-Static-Large-Object", "").lower() != "true":
            md5 = headers.get("ETag", "").strip('"') or None
        return ObjectInfo(key=key, size=int(headers.get("Content-Length", 0)), md5=md5,
                          updated=parsedate_to_datetime(headers["Last-Modified"]).astimezone(dt.UTC)
                          .replace(tzinfo=None))

    # -- Swift ----------------------------------------------------------------------------------

    def _locate(self, uri: str) -> tuple[str, str]:
        project, key = parse_uri(uri)
        if project.endswith(SEGMENTS_SUFFIX):
            raise ArtifactError(f"{uri!r} is not a valid artifact URI")
        return self._prefix + project, key

    def _request(self, method: str, container: str, name: str, query: str = "", *, missing_ok: bool = False,
                 allowed: tuple[int, ...] = (), **kwargs: Any) -> requests.Response | None:
        """One call on an object; None for a 404 when ``missing_ok``.

        ``log=False``: keystoneauth's debug log would read a text object's whole body into memory.
        """
        path = f"{quote(container, safe='')}/{quote(name)}" + (f"?{query}" if query else "")
        with _failures(f"{method} {container}/{name}"):
            response = self._swift.request(path, method, raise_exc=False, log=False, **kwargs)
        if response.status_code == 404 and missing_ok:
            response.close()
            return None
        if response.status_code >= 400 and response.status_code not in allowed:
            response.close()
            raise ArtifactError(f"object storage refused {method} {container}/{name}: HTTP {response.status_code}")
        return response

    def _ensure_container(self, container: str) -> None:
        if container not in self._containers:
            with _failures(f"create container {container}"):
                self._swift.create_container(name=container)
            self._containers.add(container)

    def _names(self, container: str, prefix: str, limit: int | None = None) -> list[str]:
        """Object names under a prefix (all pages, or the first ``limit``); none for a missing container."""
        names: list[str] = []
        with _failures(f"list {container}/{prefix}"):
            try:
                for obj in self._swift.objects(container, prefix=prefix, **({"limit": limit} if limit else {})):
                    names.append(obj.name)
                    if limit and len(names) >= limit:
                        break
            except os_exceptions.NotFoundException:
                return []
        return names

    def _upload(self, container: str, name: str, path: Path) -> None:
        """PUT one file, as an SLO when it is large; then delete the segments of what it replaced."""
        self._ensure_container(container)
        old_segments = self._segments_of(container, name)
        size = path.stat().st_size
        with path.open("rb") as data:
            if size <= self._segment_size:
                self._put(container, name, data, size)
            else:
                self._upload_slo(container, name, data, size)
        self._delete_segments(old_segments)

    def _upload_slo(self, container: str, name: str, data: BinaryIO, size: int) -> None:
        segments_container = container + SEGMENTS_SUFFIX
        self._ensure_container(segments_container)
        segment_size = max(self._segment_size, -(-size // MAX_SEGMENTS))
        upload = f"{name}/{uuid.uuid4().hex}"
        manifest = []
        for index in range(-(-size // segment_size)):
            segment = f"{upload}/{index:08d}"
            length = min(segment_size, size - index * segment_size)
            manifest.append({"path": f"/{segments_container}/{segment}", "size_bytes": length,
                             "etag": self._put(segments_container, segment, data, length)})
        self._request("PUT", container, name, "multipart-manifest=put", data=json.dumps(manifest).encode()).close()

    def _put(self, container: str, name: str, data: BinaryIO, length: int) -> str:
        """Stream the next ``length`` bytes of ``data`` into one object; return their MD5 (Swift's ETag)."""
        body = _Slice(data, length)
        # A re-authenticated retry would send the spent body again: an empty object in place of the old one.
        response = self._request("PUT", container, name, data=body, allow_reauth=False)
        response.close()
        if response.headers.get("ETag", "").strip('"') != body.md5.hexdigest():
            raise ArtifactError(f"object storage stored other bytes than sent for {container}/{name}")
        return body.md5.hexdigest()

    def _segments_of(self, container: str, name: str) -> list[str]:
        """Paths ("/container/segment") of the segments an existing SLO at ``name`` uses."""
        head = self._request("HEAD", container, name, missing_ok=True)
        if head is None or head.headers.get("X-Static-Large-Object", "").lower() != "true":
            return []
        response = self._request("GET", container, name, "multipart-manifest=get&format=raw", missing_ok=True)
        if response is None:
            return []
        with _failures(f"GET manifest {container}/{name}"):
            return [entry["path"] for entry in response.json()]

    def _download(self, container: str, name: str, target: Path) -> bool:
        """Stream one object to a local file; False when it does not exist."""
        response = self._request("GET", container, name, missing_ok=True, stream=True)
        if response is None:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        with response, target.open("wb") as out, _failures(f"GET {container}/{name}"):
            for chunk in response.iter_content(CHUNK):
                out.write(chunk)
        return True

    def _delete(self, container: str, name: str) -> None:
        """Delete an object and, for an SLO, its segments (``multipart-manifest=delete`` ignores plain objects)."""
        segments = self._segments_of(container, name)
        response = self._request("DELETE", container, name, missing_ok=True)
        if response is not None:
            response.close()
        self._delete_segments(segments)

    def _delete_segments(self, paths: list[str]) -> None:
        for path in paths:
            container, _, name = path.lstrip("/").partition("/")
            response = self._request("DELETE", container, name, missing_ok=True)
            if response is not None:
                response.close()


def _segment_name(upload_id: str, index: int) -> str:
    return f"{UPLOADS}/{upload_id}/{index:08d}"


class _Stream:
    """The next ``length`` bytes of a chunk iterator as a request body (``__len__`` + ``read``), hashed on the
    way. A source that ends early ends the body short (the store then refuses the PUT) and is kept in
    ``incomplete`` for the caller to raise: requests would otherwise report only a failed connection."""

    def __init__(self, chunks: Iterator[bytes], length: int, hashes: Hashes | None) -> None:
        self._chunks = chunks
        self._left = length
        self._buffer = b""
        self._hashes = hashes
        self.incomplete: IncompleteBody | None = None

    def __len__(self) -> int:
        return self._left

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        if not self._buffer:
            try:
                self._buffer = next(self._chunks, b"")
            except IncompleteBody as exc:
                self.incomplete = exc
                raise
        want = self._left if size < 0 else min(size, self._left)
        data, self._buffer = self._buffer[:want], self._buffer[want:]
        self._left -= len(data)
        if self._hashes is not None:
            self._hashes.update(data)
        return data


class _Slice:
    """The next ``length`` bytes of a file, read as they are sent and hashed on the way (python-swiftclient's
    LengthWrapper): requests sends an object with ``__len__`` and ``read`` as a body of that Content-Length."""

    def __init__(self, data: BinaryIO, length: int) -> None:
        self._data = data
        self._left = length
        self.md5 = hashlib.md5(usedforsecurity=False)

    def __len__(self) -> int:
        return self._left

    def read(self, size: int = -1) -> bytes:
        chunk = self._data.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(chunk)
        self.md5.update(chunk)
        return chunk


@contextlib.contextmanager
def _failures(what: str) -> Iterator[None]:
    """Turn a failed call into an ArtifactError naming only the operation: the clients' messages carry URLs."""
    try:
        yield
    except (os_exceptions.SDKException, ksa_exceptions.ClientException, requests.RequestException) as exc:
        raise ArtifactError(f"object storage failed {what}: {type(exc).__name__}") from exc

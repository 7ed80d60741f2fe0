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
import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote

import requests
from keystoneauth1 import exceptions as ksa_exceptions
from openstack import exceptions as os_exceptions

from cloudml_os.artifacts import ArtifactError, files_of, make_uri, parse_uri

if TYPE_CHECKING:
    from cloudml_os.config import Settings

CHUNK = 1 << 20
# Not "-segments": project ids are [a-z][a-z0-9-]*, so project "team-a-segments" would own team-a's segments.
SEGMENTS_SUFFIX = "_segments"
# Swift's default max_manifest_segments: a larger file gets larger segments rather than a refused manifest.
MAX_SEGMENTS = 1000


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

    # -- Swift ----------------------------------------------------------------------------------

    def _locate(self, uri: str) -> tuple[str, str]:
        project, key = parse_uri(uri)
        if project.endswith(SEGMENTS_SUFFIX):
            raise ArtifactError(f"{uri!r} is not a valid artifact URI")
        return self._prefix + project, key

    def _request(self, method: str, container: str, name: str, query: str = "", *, missing_ok: bool = False,
                 **kwargs: Any) -> requests.Response | None:
        """One call on an object; None for a 404 when ``missing_ok``.

        ``log=False``: keystoneauth's debug log would read a text object's whole body into memory.
        """
        path = f"{quote(container, safe='')}/{quote(name)}" + (f"?{query}" if query else "")
        with _failures(f"{method} {container}/{name}"):
            response = self._swift.request(path, method, raise_exc=False, log=False, **kwargs)
        if response.status_code == 404 and missing_ok:
            response.close()
            return None
        if response.status_code >= 400:
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

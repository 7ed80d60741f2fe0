"""The Swift artifact store: packages, logs and exported models in OpenStack object storage.

One container per project (``swift_container_prefix + PROJECT``) in the platform's service account, so
a URI ``store://PROJECT/KEY`` maps to object KEY of that project's container and nothing else. Files
larger than ``swift_segment_size`` are uploaded as Static Large Objects whose segments live in a
companion ``…-segments`` container (as python-swiftclient does), so listings of a tree show only real
files and deleting a manifest with ``multipart-manifest=delete`` removes its segments. Downloads are
streamed to disk, never held in memory. Only this module and ``cloud/openstack.py`` import openstacksdk.
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

from openstack import exceptions as os_exceptions

from cloudml_os.artifacts import ArtifactError, files_of, make_uri, parse_uri

if TYPE_CHECKING:
    from cloudml_os.config import Settings

CHUNK = 1 << 20
SEGMENTS_SUFFIX = "-segments"


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
        if self._head(container, key) is not None:
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
        return self._prefix + project, key

    def _path(self, container: str, name: str) -> str:
        return f"{quote(container, safe='')}/{quote(name)}"

    def _ensure_container(self, container: str) -> None:
        if container not in self._containers:
            self._swift.create_container(name=container)
            self._containers.add(container)

    def _head(self, container: str, name: str) -> dict[str, str] | None:
        response = self._swift.head(self._path(container, name), raise_exc=False)
        if response.status_code == 404:
            return None
        _check(response, f"HEAD {container}/{name}")
        return dict(response.headers)

    def _names(self, container: str, prefix: str, limit: int | None = None) -> list[str]:
        """Object names under a prefix (all pages, or the first ``limit``); none for a missing container."""
        names: list[str] = []
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
        if size <= self._segment_size:
            with path.open("rb") as data:
                _check(self._swift.put(self._path(container, name), data=data,
                                       headers={"Content-Length": str(size)}), f"PUT {container}/{name}")
        else:
            self._upload_slo(container, name, path, size)
        for segment in old_segments:
            self._delete_path(segment)

    def _upload_slo(self, container: str, name: str, path: Path, size: int) -> None:
        segments_container = container + SEGMENTS_SUFFIX
        self._ensure_container(segments_container)
        upload = f"{name}/{uuid.uuid4().hex}"
        manifest = []
        with path.open("rb") as data:
            for index in range(-(-size // self._segment_size)):
                chunk = data.read(self._segment_size)
                segment = f"{upload}/{index:08d}"
                _check(self._swift.put(self._path(segments_container, segment), data=chunk),
                       f"PUT {segments_container}/{segment}")
                manifest.append({"path": f"/{segments_container}/{segment}",
                                 "etag": hashlib.md5(chunk, usedforsecurity=False).hexdigest(),
                                 "size_bytes": len(chunk)})
        _check(self._swift.put(self._path(container, name) + "?multipart-manifest=put",
                               data=json.dumps(manifest).encode()), f"PUT manifest {container}/{name}")

    def _segments_of(self, container: str, name: str) -> list[str]:
        """Paths ("/container/segment") of the segments an existing SLO at ``name`` uses."""
        headers = self._head(container, name)
        if not headers or headers.get("X-Static-Large-Object", "").lower() != "true":
            return []
        response = self._swift.get(self._path(container, name) + "?multipart-manifest=get&format=raw",
                                   raise_exc=False)
        if response.status_code == 404:
            return []
        _check(response, f"GET manifest {container}/{name}")
        return [entry["path"] for entry in response.json()]

    def _download(self, container: str, name: str, target: Path) -> bool:
        """Stream one object to a local file; False when it does not exist."""
        response = self._swift.get(self._path(container, name), stream=True, raise_exc=False)
        try:
            if response.status_code == 404:
                return False
            _check(response, f"GET {container}/{name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
        finally:
            response.close()
        return True

    def _delete(self, container: str, name: str) -> None:
        response = self._swift.delete(self._path(container, name) + "?multipart-manifest=delete",
                                      raise_exc=False)
        if response.status_code != 404:
            _check(response, f"DELETE {container}/{name}")

    def _delete_path(self, path: str) -> None:
        container, _, name = path.lstrip("/").partition("/")
        response = self._swift.delete(self._path(container, name), raise_exc=False)
        if response.status_code != 404:
            _check(response, f"DELETE {path}")


def _check(response: Any, what: str) -> None:
    if response.status_code >= 400:
        raise ArtifactError(f"object storage refused {what}: HTTP {response.status_code}")

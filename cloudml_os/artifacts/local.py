"""The local artifact store: trainer packages and exported models in a directory of this host.

Objects are named by URIs ``store://PROJECT/KEY`` (the embedded default's equivalent of ``gs://``);
a URI never names a host path, so a request can only reach its own project's objects. Keys are
checked so that no ``..`` or absolute part escapes the project's folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

SCHEME = "store://"


class ArtifactError(ValueError):
    """A URI is malformed, points outside its project, or names nothing."""


def parse_uri(uri: str) -> tuple[str, str]:
    """Split ``store://PROJECT/KEY`` into (project, key). :raises ArtifactError: on any other shape."""
    if not uri.startswith(SCHEME):
        raise ArtifactError(f"{uri!r} is not an artifact URI (expected {SCHEME}PROJECT/PATH)")
    project, _, key = uri[len(SCHEME):].partition("/")
    parts = PurePosixPath(key).parts
    if not project or not key or key.startswith("/") or any(p in ("..", ".") for p in parts):
        raise ArtifactError(f"{uri!r} is not a valid artifact URI")
    return project, key


def make_uri(project: str, key: str) -> str:
    return f"{SCHEME}{project}/{key}"


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, uri: str) -> Path:
        project, key = parse_uri(uri)
        return self.root / project / key

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def put_file(self, project: str, key: str, source: BinaryIO) -> str:
        """Store a stream under the key, atomically (readers never see half an object)."""
        uri = make_uri(project, key)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(source, tmp, 1 << 20)
        os.replace(tmp.name, target)
        return uri

    def put_tree(self, project: str, key: str, source: Path) -> str:
        """Copy a local directory under the key, replacing whatever was there (a repeated export is a no-op)."""
        uri = make_uri(project, key)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return uri

    def open(self, uri: str) -> BinaryIO:
        try:
            return self.path(uri).open("rb")
        except FileNotFoundError:
            raise ArtifactError(f"{uri} does not exist") from None

    def walk(self, uri: str) -> Iterator[tuple[str, Path]]:
        """(relative name, local path) of every file under a tree URI."""
        base = self.path(uri)
        for path in sorted(base.rglob("*")):
            if path.is_file():
                yield path.relative_to(base).as_posix(), path

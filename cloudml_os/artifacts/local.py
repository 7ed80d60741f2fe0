"""The local artifact store: trainer packages and exported models in a directory of this host.

The embedded default's backend of :class:`cloudml_os.artifacts.ArtifactStore`. Keys are checked (in
:func:`cloudml_os.artifacts.parse_uri`) so that no ``..`` or absolute part escapes the project's folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cloudml_os.artifacts import ArtifactError, make_uri, parse_uri


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, uri: str) -> Path:
        project, key = parse_uri(uri)
        return self.root / project / key

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def put_file(self, project: str, key: str, source: BinaryIO) -> str:
        uri = make_uri(project, key)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(source, tmp, 1 << 20)
        os.replace(tmp.name, target)
        return uri

    def put_tree(self, project: str, key: str, source: Path) -> str:
        uri = make_uri(project, key)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return uri

    @contextlib.contextmanager
    def local_file(self, uri: str) -> Iterator[Path]:
        path = self.path(uri)
        if not path.is_file():
            raise ArtifactError(f"{uri} does not exist")
        yield path

    @contextlib.contextmanager
    def local_tree(self, uri: str) -> Iterator[Path]:
        path = self.path(uri)
        if not path.is_dir():
            raise ArtifactError(f"{uri} does not exist or is not a directory")
        yield path

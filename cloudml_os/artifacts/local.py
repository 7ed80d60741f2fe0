"""The local artifact store: every project's objects in a directory of this host.

The embedded default's backend of :class:`cloudml_os.artifacts.ArtifactStore`: ``store://PROJECT/KEY`` is the
file ``ROOT/PROJECT/KEY``. Keys are checked (in :func:`cloudml_os.artifacts.parse_uri`) so that no ``..`` or
absolute part escapes the project's folder. Bytes being written (uploads, staged trees) live under
``ROOT/.uploads`` (not a valid project id, so never listed or mounted on a node) on the same filesystem, and
become objects by one ``rename``: readers see the old bytes or the new ones, never a part. An object's MD5 is
kept in its extended attribute ``user.cloudml.md5``, written before the rename.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cloudml_os.artifacts import ArtifactError, Expected, Hashes, ObjectInfo, make_uri, parse_uri, read_exactly

CHUNK = 1 << 20
MD5_ATTRIBUTE = "user.cloudml.md5"
UPLOADS = ".uploads"


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
        staged = self._staging_path()
        md5 = hashlib.md5(usedforsecurity=False)
        with staged.open("wb") as out:
            while chunk := source.read(CHUNK):
                md5.update(chunk)
                out.write(chunk)
        self._commit(staged, target, md5.hexdigest())
        return uri

    def put_tree(self, project: str, key: str, source: Path) -> str:
        uri = make_uri(project, key)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = self._staging_path()
        shutil.copytree(source, staging)
        if target.exists():
            # Moved aside first, so that the rename below never meets a non-empty folder.
            old = self._staging_path()
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
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

    # -- the objects API --------------------------------------------------------------------------

    def write_object(self, project: str, key: str, source: BinaryIO, size: int, expected: Expected) -> ObjectInfo:
        target = self.path(make_uri(project, key))
        staged = self._staging_path()
        hashes = Hashes(expected)
        try:
            with staged.open("wb") as out:
                for chunk in read_exactly(source, size, CHUNK):
                    hashes.update(chunk)
                    out.write(chunk)
            md5 = hashes.verify()
            self._commit(staged, target, md5)
        finally:
            staged.unlink(missing_ok=True)
        return self._info(key, target)

    def stat(self, uri: str) -> ObjectInfo | None:
        path = self.path(uri)
        return self._info(parse_uri(uri)[1], path) if path.is_file() else None

    def read_range(self, uri: str, first: int, length: int) -> Iterator[bytes]:
        with self.path(uri).open("rb") as data:
            data.seek(first)
            left = length
            while left and (chunk := data.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk

    def open_object(self, uri: str) -> BinaryIO | None:
        try:
            return self.path(uri).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def list_objects(self, project: str, prefix: str, after: str, limit: int) -> list[ObjectInfo]:
        root = self.root / project
        # Start in the deepest folder the prefix names whole: "data/2026/tr" lists data/2026.
        folder = prefix.rpartition("/")[0]
        if folder and any(part in ("", ".", "..") for part in folder.split("/")):
            return []
        found: list[ObjectInfo] = []
        for key, path in _walk(root / folder if folder else root, folder + "/" if folder else "", after):
            if not key.startswith(prefix):
                if key > prefix:
                    break
                continue
            found.append(self._info(key, path))
            if len(found) >= limit:
                break
        return found

    def delete_object(self, uri: str) -> bool:
        path = self.path(uri)
        if not path.is_file():
            return False
        path.unlink(missing_ok=True)
        _remove_empty_parents(path.parent, self.root / parse_uri(uri)[0])
        return True

    def upload_received(self, project: str, upload_id: str, size: int, chunk: int) -> int:
        part = self._upload_path(upload_id)
        return part.stat().st_size if part.exists() else 0

    def upload_write(self, project: str, upload_id: str, offset: int, source: BinaryIO, length: int, size: int,
                     chunk: int, hashes: Hashes | None) -> int:
        part = self._upload_path(upload_id)
        part.parent.mkdir(parents=True, exist_ok=True)
        with part.open("ab") as out:
            try:
                fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ArtifactError("another request is writing to this upload") from None
            out.truncate(offset)  # bytes past what the caller saw kept (there are none but after a crash)
            try:
                for data in read_exactly(source, length, CHUNK):
                    if hashes is not None:
                        hashes.update(data)
                    out.write(data)
            finally:
                out.flush()
                os.fsync(out.fileno())
            return out.tell()

    def upload_commit(self, project: str, upload_id: str, key: str, size: int, chunk: int,
                      hashes: Hashes | None, expected: Expected) -> ObjectInfo:
        part = self._upload_path(upload_id)
        target = self.path(make_uri(project, key))
        if size == 0:  # an empty object: no request wrote a byte
            part.parent.mkdir(parents=True, exist_ok=True)
            part.touch()
        try:
            if hashes is None:  # the bytes came in several requests: read them back once
                hashes = Hashes(expected)
                with part.open("rb") as data:
                    while block := data.read(CHUNK):
                        hashes.update(block)
            self._commit(part, target, hashes.verify())
        finally:
            part.unlink(missing_ok=True)
        return self._info(key, target)

    def upload_abort(self, project: str, upload_id: str) -> None:
        self._upload_path(upload_id).unlink(missing_ok=True)

    # -- helpers ------------------------------------------------------------------------------------

    def _staging_path(self) -> Path:
        folder = self.root / UPLOADS
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"staged-{uuid.uuid4().hex}"

    def _upload_path(self, upload_id: str) -> Path:
        if not upload_id.isalnum():
            raise ArtifactError(f"{upload_id!r} is not an upload id")
        return self.root / UPLOADS / f"upload-{upload_id}"

    def _commit(self, staged: Path, target: Path, md5: str) -> None:
        """Make the staged file the object at ``target``. In a folder, "a" and "a/b" cannot both be objects
        (Swift and Cloud Storage allow it): the second one is refused."""
        os.setxattr(staged, MD5_ATTRIBUTE, md5.encode())
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ArtifactError(f"an object named like a folder above {target.name!r} exists; on this store an "
                                "object cannot also be a folder") from None
        if target.is_dir():
            raise ArtifactError(f"{target.name!r} is a folder of objects; on this store an object cannot have "
                                "its name")
        os.replace(staged, target)

    @staticmethod
    def _info(key: str, path: Path) -> ObjectInfo:
        stat = path.stat()
        try:
            md5: str | None = os.getxattr(path, MD5_ATTRIBUTE).decode()
        except OSError:  # written by something other than this store (a tree copied in place)
            md5 = None
        return ObjectInfo(key=key, size=stat.st_size, md5=md5,
                          updated=dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC).replace(tzinfo=None))


def _walk(folder: Path, base: str, after: str) -> Iterator[tuple[str, Path]]:
    """(key, path) of the files under ``folder`` in key order (a folder sorts as its name + "/", as its keys
    do), skipping keys up to ``after`` without descending into folders that hold only such keys."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    keyed = sorted((base + entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""), entry)
                   for entry in entries)
    for key, entry in keyed:
        if key.endswith("/"):
            if after and not after.startswith(key) and key < after:
                continue  # every key in this folder sorts before ``after``
            yield from _walk(Path(entry.path), key, after)
        elif entry.is_file(follow_symlinks=False) and key > after:
            yield key, Path(entry.path)


def _remove_empty_parents(folder: Path, project_root: Path) -> None:
    """Remove folders left empty by a delete, up to the project's folder (as object stores have no folders)."""
    while folder != project_root and project_root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


"""Inspection of uploaded trainer packages before anything is stored: safe to unpack, and what kind.

A package is later unpacked or pip-installed on training nodes, so an archive whose members could
land outside the folder it is unpacked in (absolute paths, ``..``, links pointing out), create devices,
or unpack to far more than it weighs is refused here, at upload, with a message naming the member.
The functions only read the archive; they never extract it, and they never touch the artifact store.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion

MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 4 << 30  # sum of member sizes (and of the decompressed tar stream)
MAX_LINK_TARGET = 4096

FORMATS = {".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar": "tar", ".zip": "zip", ".whl": "zip"}
_DRIVE = re.compile(r"[A-Za-z]:")


class ArchiveError(ValueError):
    """The archive is unreadable, of the wrong type, too big, or has an unsafe member (named)."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One archive entry: ``kind`` is file, dir, symlink or hardlink; ``target`` is a link's target."""

    name: str
    kind: str
    size: int = 0
    target: str | None = None


@dataclasses.dataclass(frozen=True)
class ArchiveInfo:
    format: str  # "tar.gz", "tar" or "zip"
    kind: str  # "sdist", "wheel" or "archive"
    members: int
    unpacked_bytes: int


def archive_format(filename: str) -> str:
    """The format a file name announces. :raises ArchiveError: for any other extension."""
    lowered = filename.lower()
    for suffix, name in FORMATS.items():
        if lowered.endswith(suffix) and len(lowered) > len(suffix):
            return name
    raise ArchiveError(f"{filename!r}: a package must be a .tar.gz, .tgz, .tar, .zip or .whl file")


def member_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, with ``.`` and empty parts dropped.

    :raises ArchiveError: the name is empty, absolute (``/x``, ``C:x``) or has a ``..`` component.
    Backslashes count as separators, so ``..\\x`` from a Windows zip tool is caught too.
    """
    if not name or "\x00" in name:
        raise ArchiveError(f"member {name!r}: empty or invalid name")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise ArchiveError(f"member {name!r}: absolute path")
    parts = tuple(p for p in posix.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"member {name!r}: path has a '..' component")
    return parts


def check_member(member: Member) -> None:
    """Refuse a member that would escape the unpack folder.

    A link target must be relative and free of ``..``: such a target can only point at or below the
    link's own folder, so no chain of links can leave the root (checking resolved paths lexically
    could be fooled by a link that is itself a parent of later members).

    :raises ArchiveError: naming the member.
    """
    member_parts(member.name)
    if member.kind in ("symlink", "hardlink"):
        target = member.target or ""
        try:
            member_parts(target)
        except ArchiveError:
            raise ArchiveError(f"member {member.name!r}: {member.kind} to {target!r} points outside the "
                               "package") from None
    elif member.kind not in ("file", "dir"):
        raise ArchiveError(f"member {member.name!r}: {member.kind} entries are not allowed")


def package_kind(members: Iterable[Member]) -> str:
    """``sdist`` for a Python source distribution (one top folder with PKG-INFO and setup.py or
    pyproject.toml), else ``archive``: the nodes install the two kinds differently."""
    files = set()
    tops = set()
    nested = False
    for member in members:
        parts = member_parts(member.name)
        if not parts:
            continue
        tops.add(parts[0])
        nested = nested or len(parts) > 1 or member.kind == "dir"
        if member.kind == "file" and len(parts) == 2:
            files.add(parts[1])
    if len(tops) != 1 or not nested:
        return "archive"
    if "PKG-INFO" in files and ({"setup.py", "pyproject.toml"} & files):
        return "sdist"
    return "archive"


def wheel_kind(filename: str, members: Iterable[Member]) -> str:
    """``wheel`` for a Python wheel (PEP 427): named ``NAME-VERSION[-BUILD]-PYTHON-ABI-PLATFORM.whl`` and
    holding ``NAME-VERSION.dist-info/`` with ``METADATA`` and ``WHEEL``, as pip needs to install it.

    :raises ArchiveError: the name or the contents are not a wheel's.
    """
    try:
        name, version, _build, _tags = parse_wheel_filename(filename)
    except (InvalidWheelFilename, InvalidVersion) as exc:
        raise ArchiveError(f"{filename!r} is not a wheel's file name: {exc}") from None
    info_files: dict[str, set[str]] = {}
    for member in members:
        parts = member_parts(member.name)
        if len(parts) == 2 and parts[0].endswith(".dist-info") and member.kind == "file":
            info_files.setdefault(parts[0], set()).add(parts[1])
    for folder, files in info_files.items():
        folder_name = folder.removesuffix(".dist-info").rpartition("-")[0]
        if canonicalize_name(folder_name) == name and {"METADATA", "WHEEL"} <= files:
            return "wheel"
    raise ArchiveError(f"{filename!r}: a wheel must hold {name}-{version}.dist-info/ with METADATA and WHEEL")


def _gzip_length(path: Path, limit: int) -> int:
    """Decompress the whole stream once: proves it intact (CRC) and bounds it before tar reads it."""
    length = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                length += len(chunk)
                if length > limit:
                    raise ArchiveError(f"archive unpacks to more than {limit} bytes")
    except (OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"not a readable gzip file: {exc}") from None
    return length


def _check_tar_end(archive: tarfile.TarFile) -> None:
    """Refuse bytes other than zero padding after the last header tarfile could read.

    tarfile stops quietly at a damaged header after the first, while GNU tar skips to the next good
    one and unpacks it: a member hidden behind junk would escape inspection.
    """
    stream = archive.fileobj
    stream.seek(archive.offset)
    while chunk := stream.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise ArchiveError("archive has unreadable data after its last valid member")


def _tar_members(path: Path, compressed: bool, max_members: int, max_unpacked: int) -> list[Member]:
    stream_length = _gzip_length(path, max_unpacked + (64 << 20)) if compressed else path.stat().st_size
    members = []
    try:
        with tarfile.open(path, mode="r:gz" if compressed else "r:") as archive:
            for info in archive:
                if len(members) >= max_members:
                    raise ArchiveError(f"archive has more than {max_members} members")
                if info.isreg():
                    kind = "file"
                    if info.sparse is None and info.offset_data + info.size > stream_length:
                        raise ArchiveError(f"member {info.name!r}: archive is truncated")
                elif info.isdir():
                    kind = "dir"
                elif info.issym():
                    kind = "symlink"
                elif info.islnk():
                    kind = "hardlink"
                elif info.isfifo():
                    kind = "fifo"
                else:
                    kind = "device"
                members.append(Member(info.name, kind, info.size if kind == "file" else 0,
                                      info.linkname if kind in ("symlink", "hardlink") else None))
            _check_tar_end(archive)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"not a readable tar archive: {exc}") from None
    return members


def _zip_members(path: Path, max_members: int, max_unpacked: int) -> list[Member]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > max_members:
                raise ArchiveError(f"archive has more than {max_members} members")
            members = []
            for info in infos:
                mode = info.external_attr >> 16
                target = None
                if info.is_dir() or stat.S_ISDIR(mode):
                    kind = "dir"
                elif stat.S_ISLNK(mode):
                    kind = "symlink"
                    if info.file_size > MAX_LINK_TARGET:
                        raise ArchiveError(f"member {info.filename!r}: symlink target too long")
                    target = archive.read(info).decode("utf-8", errors="replace")
                elif stat.S_ISFIFO(mode):
                    kind = "fifo"
                elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
                    kind = "device"
                else:
                    kind = "file"
                members.append(Member(info.filename, kind, info.file_size if kind == "file" else 0, target))
            if sum(m.size for m in members) > max_unpacked:
                raise ArchiveError(f"archive unpacks to more than {max_unpacked} bytes")
            corrupt = archive.testzip()  # reads every member: CRC and declared sizes must hold
            if corrupt is not None:
                raise ArchiveError(f"member {corrupt!r}: corrupt data")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error,
            NotImplementedError, RuntimeError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}") from None
    return members


def read_members(path: Path, fmt: str, *, max_members: int = MAX_MEMBERS,
                 max_unpacked: int = MAX_UNPACKED_BYTES) -> list[Member]:
    """Every member of the archive at ``path`` in format ``fmt`` (see :func:`archive_format`).

    :raises ArchiveError: unreadable or corrupt, too many members, or unpacking to too much.
    """
    if fmt == "zip":
        return _zip_members(path, max_members, max_unpacked)
    if fmt in ("tar", "tar.gz"):
        members = _tar_members(path, fmt == "tar.gz", max_members, max_unpacked)
        if sum(m.size for m in members) > max_unpacked:
            raise ArchiveError(f"archive unpacks to more than {max_unpacked} bytes")
        return members
    raise ArchiveError(f"unknown archive format {fmt!r}")


def inspect_archive(path: Path, filename: str, *, max_members: int = MAX_MEMBERS,
                    max_unpacked: int = MAX_UNPACKED_BYTES) -> ArchiveInfo:
    """Check an uploaded package named ``filename`` stored at ``path``; say what kind it is.

    :raises ArchiveError: with a message naming the problem (and the member, when one is at fault).
    """
    fmt = archive_format(filename)
    members = read_members(Path(path), fmt, max_members=max_members, max_unpacked=max_unpacked)
    if not members:
        raise ArchiveError("archive is empty")
    for member in members:
        check_member(member)
    kind = wheel_kind(filename, members) if filename.lower().endswith(".whl") else package_kind(members)
    return ArchiveInfo(format=fmt, kind=kind, members=len(members),
                       unpacked_bytes=sum(m.size for m in members))


def safe_filename(filename: str) -> str:
    """The upload's base name if it is a plain, portable file name. :raises ArchiveError: otherwise."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    if name != filename or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}", name):
        raise ArchiveError(f"file name {filename!r} must be a plain name of letters, digits and ._+-")
    return name

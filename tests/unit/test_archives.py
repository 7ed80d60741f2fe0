"""Package inspection: safe archives pass with the right kind; every way out of the unpack folder is refused."""

from __future__ import annotations

import gzip
import io
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from cloudml_os.archives import (
    ArchiveError,
    Member,
    archive_format,
    check_member,
    inspect_archive,
    member_parts,
    package_kind,
    safe_filename,
)

# ---- builders (also used by test_api) ---------------------------------------------------------------


def tar_bytes(entries: list[tuple], compressed: bool = True) -> bytes:
    """Entries: (name, bytes) for files, (name, "dir"), (name, "symlink"|"hardlink", target), (name, "fifo"|"chr")."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compressed else "w") as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry[0])
            data = None
            if isinstance(entry[1], bytes):
                data = entry[1]
                info.size = len(data)
            elif entry[1] == "dir":
                info.type = tarfile.DIRTYPE
            elif entry[1] == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry[2]
            elif entry[1] == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry[2]
            elif entry[1] == "fifo":
                info.type = tarfile.FIFOTYPE
            elif entry[1] == "chr":
                info.type = tarfile.CHRTYPE
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def zip_bytes(entries: list[tuple]) -> bytes:
    """Entries: (name, bytes) for files, (name, "symlink", target), (name, "fifo")."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in entries:
            info = zipfile.ZipInfo(entry[0])
            info.create_system = 3
            if isinstance(entry[1], bytes):
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                archive.writestr(info, entry[1])
            elif entry[1] == "symlink":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, entry[2])
            elif entry[1] == "fifo":
                info.external_attr = (stat.S_IFIFO | 0o644) << 16
                archive.writestr(info, b"")
    return buffer.getvalue()


SDIST = [("trainer-0.1", "dir"), ("trainer-0.1/PKG-INFO", b"Metadata-Version: 2.1\nName: trainer\n"),
         ("trainer-0.1/setup.py", b"from setuptools import setup\nsetup()\n"),
         ("trainer-0.1/trainer/__init__.py", b""), ("trainer-0.1/trainer/task.py", b"print('hi')\n")]
PLAIN = [("trainer/__init__.py", b""), ("trainer/task.py", b"print('hi')\n"), ("README", b"x")]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---- happy paths ------------------------------------------------------------------------------------


def test_sdist_tar_gz_is_recognised(tmp_path):
    info = inspect_archive(write(tmp_path, "t.tar.gz", tar_bytes(SDIST)), "trainer-0.1.tar.gz")
    assert (info.format, info.kind, info.members) == ("tar.gz", "sdist", 5)


def test_sdist_with_only_pyproject_and_dot_slash_names_is_recognised(tmp_path):
    entries = [("./trainer-0.1/PKG-INFO", b"x"), ("./trainer-0.1/pyproject.toml", b"[project]\n")]
    assert inspect_archive(write(tmp_path, "t.tgz", tar_bytes(entries)), "t.tgz").kind == "sdist"


def test_sdist_zip_is_recognised(tmp_path):
    entries = [(name, data) for name, data in SDIST if isinstance(data, bytes)]
    assert inspect_archive(write(tmp_path, "t.zip", zip_bytes(entries)), "trainer-0.1.zip").kind == "sdist"


def test_plain_archives_are_archive_kind(tmp_path):
    assert inspect_archive(write(tmp_path, "a.tar", tar_bytes(PLAIN, compressed=False)), "a.tar").kind == "archive"
    assert inspect_archive(write(tmp_path, "a.zip", zip_bytes(PLAIN)), "a.zip").kind == "archive"


@pytest.mark.parametrize("names", [
    ["pkg/setup.py", "pkg/trainer.py"],  # no PKG-INFO
    ["PKG-INFO", "setup.py"],  # not inside one top folder
    ["a/PKG-INFO", "a/setup.py", "b/x"],  # two top folders
    ["a/sub/PKG-INFO", "a/sub/setup.py"],  # PKG-INFO not directly under the top folder
])
def test_package_kind_needs_one_top_folder_with_pkg_info_and_build_file(names):
    assert package_kind([Member(name, "file") for name in names]) == "archive"


def test_links_inside_the_package_are_allowed(tmp_path):
    entries = [*PLAIN, ("trainer/alias.py", "symlink", "task.py"), ("trainer/copy.py", "hardlink", "trainer/task.py"),
               ("trainer/data", "symlink", "sub/dir")]
    assert inspect_archive(write(tmp_path, "a.tar.gz", tar_bytes(entries)), "a.tar.gz").kind == "archive"


# ---- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("entries, reason", [
    ([("../evil.py", b"x")], "'..'"),
    ([("trainer/../../evil.py", b"x")], "'..'"),
    ([("/etc/cron.d/evil", b"x")], "absolute"),
    ([("trainer/link", "symlink", "../../etc/passwd")], "points outside"),
    ([("trainer/link", "symlink", "/etc/passwd")], "points outside"),
    ([("trainer/link", "hardlink", "../outside")], "points outside"),
    ([("trainer/link", "hardlink", "/etc/shadow")], "points outside"),
    ([("trainer/fifo", "fifo")], "fifo"),
    ([("trainer/tty", "chr")], "device"),
])
def test_unsafe_tar_members_are_refused(tmp_path, entries, reason):
    path = write(tmp_path, "bad.tar.gz", tar_bytes([*PLAIN, *entries]))
    with pytest.raises(ArchiveError, match=reason):
        inspect_archive(path, "bad.tar.gz")


@pytest.mark.parametrize("entries, reason", [
    ([("../evil.py", b"x")], "'..'"),
    ([("..\\..\\evil.py", b"x")], "'..'"),
    ([("/tmp/evil.py", b"x")], "absolute"),
    ([("C:/evil.py", b"x")], "absolute"),
    ([("trainer/link", "symlink", "../../../etc")], "points outside"),
    ([("trainer/link", "symlink", "/etc")], "points outside"),
    ([("trainer/fifo", "fifo")], "fifo"),
])
def test_unsafe_zip_members_are_refused(tmp_path, entries, reason):
    path = write(tmp_path, "bad.zip", zip_bytes([*PLAIN, *entries]))
    with pytest.raises(ArchiveError, match=reason):
        inspect_archive(path, "bad.zip")


@pytest.mark.parametrize("name, data", [
    ("junk.tar.gz", b"this is not an archive at all" * 10),
    ("junk.zip", b"PK\x03\x04 not really a zip" * 10),
    ("junk.tar", b"\x01" * 2048),
    ("empty.tar.gz", b""),
])
def test_unreadable_archives_are_refused(tmp_path, name, data):
    with pytest.raises(ArchiveError, match="not a readable"):
        inspect_archive(write(tmp_path, name, data), name)


def test_archive_of_the_wrong_type_for_its_name_is_refused(tmp_path):
    with pytest.raises(ArchiveError, match="not a readable"):
        inspect_archive(write(tmp_path, "a.tar.gz", zip_bytes(PLAIN)), "a.tar.gz")
    with pytest.raises(ArchiveError, match="not a readable"):
        inspect_archive(write(tmp_path, "a.zip", tar_bytes(PLAIN)), "a.zip")


def test_truncated_gzip_is_refused(tmp_path):
    data = tar_bytes([("big.bin", bytes(range(256)) * 400)])
    with pytest.raises(ArchiveError, match="not a readable"):
        inspect_archive(write(tmp_path, "t.tar.gz", data[: len(data) // 2]), "t.tar.gz")


def test_truncated_plain_tar_is_refused(tmp_path):
    data = tar_bytes([("big.bin", b"x" * 10_000)], compressed=False)
    with pytest.raises(ArchiveError):
        inspect_archive(write(tmp_path, "t.tar", data[:3000]), "t.tar")


def test_zip_with_corrupt_member_data_is_refused(tmp_path):
    data = bytearray(zip_bytes([("a.txt", b"hello world" * 100)]))
    data[40] ^= 0xFF  # inside the first member's compressed data
    with pytest.raises(ArchiveError):
        inspect_archive(write(tmp_path, "c.zip", bytes(data)), "c.zip")


def test_member_hidden_behind_a_damaged_header_is_refused(tmp_path):
    good = tar_bytes([("a.txt", b"x")], compressed=False)
    hidden = tar_bytes([("../../evil", b"y")], compressed=False)
    # first member, then junk where the next header belongs, then a member GNU tar would still find
    data = good[:1024] + b"\xff" * 512 + hidden
    with pytest.raises(ArchiveError, match="after its last valid member"):
        inspect_archive(write(tmp_path, "h.tar.gz", gzip.compress(data)), "h.tar.gz")


def test_member_count_and_unpacked_size_are_capped(tmp_path):
    path = write(tmp_path, "m.tar.gz", tar_bytes([(f"f{i}", b"") for i in range(20)]))
    with pytest.raises(ArchiveError, match="more than 10 members"):
        inspect_archive(path, "m.tar.gz", max_members=10)
    bomb = write(tmp_path, "b.tar.gz", tar_bytes([("zeros", bytes(1 << 20))]))
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        inspect_archive(bomb, "b.tar.gz", max_unpacked=1 << 16)
    zip_bomb = write(tmp_path, "b.zip", zip_bytes([("zeros", bytes(1 << 20))]))
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        inspect_archive(zip_bomb, "b.zip", max_unpacked=1 << 16)


WHEEL = [("helper/__init__.py", b"VALUE = 1\n"), ("cmlos_helper-1.0.dist-info/METADATA", b"Name: cmlos-helper\n"),
         ("cmlos_helper-1.0.dist-info/WHEEL", b"Wheel-Version: 1.0\n"), ("cmlos_helper-1.0.dist-info/RECORD", b"")]


def test_a_wheel_is_wheel_kind(tmp_path):
    info = inspect_archive(write(tmp_path, "w.whl", zip_bytes(WHEEL)), "cmlos_helper-1.0-py3-none-any.whl")
    assert (info.format, info.kind, info.members) == ("zip", "wheel", 4)


@pytest.mark.parametrize("filename, entries, reason", [
    ("cmlos_helper-1.0.whl", WHEEL, "not a wheel's file name"),
    ("cmlos_helper-x.y-py3-none-any.whl", WHEEL, "not a wheel's file name"),
    ("cmlos_helper-1.0-py3-none-any.whl", WHEEL[:1], "must hold cmlos-helper-1.0.dist-info/ with METADATA and WHEEL"),
    ("cmlos_helper-1.0-py3-none-any.whl", WHEEL[:2], "with METADATA and WHEEL"),
    ("other-1.0-py3-none-any.whl", WHEEL, "must hold other-1.0.dist-info/"),
    ("cmlos_helper-1.0-py3-none-any.whl", [*WHEEL, ("../evil.py", b"")], "'..' component"),
])
def test_what_is_not_a_safe_wheel_is_refused(tmp_path, filename, entries, reason):
    with pytest.raises(ArchiveError, match=re.escape(reason)):
        inspect_archive(write(tmp_path, "w.whl", zip_bytes(entries)), filename)


def test_empty_archive_is_refused(tmp_path):
    with pytest.raises(ArchiveError, match="empty"):
        inspect_archive(write(tmp_path, "e.tar.gz", tar_bytes([])), "e.tar.gz")


# ---- small pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, fmt", [("a.tar.gz", "tar.gz"), ("A.TGZ", "tar.gz"), ("a.tar", "tar"),
                                       ("a-1.0.zip", "zip"), ("a-1.0-py3-none-any.whl", "zip")])
def test_archive_format_from_name(name, fmt):
    assert archive_format(name) == fmt


@pytest.mark.parametrize("name", ["a.egg", "a.gz", "a", ".zip", ".whl", "a.tar.bz2"])
def test_other_extensions_are_refused(name):
    with pytest.raises(ArchiveError, match="must be a"):
        archive_format(name)


def test_member_parts_normalises_and_refuses():
    assert member_parts("./a//b/./c") == ("a", "b", "c")
    assert member_parts("./") == ()
    for bad in ["", "/a", "a/../b", "..", "C:\\x", "a\x00b"]:
        with pytest.raises(ArchiveError):
            member_parts(bad)


def test_link_targets_must_stay_below_the_link():
    check_member(Member("a/b", "symlink", target="c/d"))
    for target in ["..", "../a", "/x", "a/../../b", ""]:
        with pytest.raises(ArchiveError, match="points outside"):
            check_member(Member("a/b", "symlink", target=target))


@pytest.mark.parametrize("name", ["../x.tar.gz", "a/b.tar.gz", "a b.tar.gz", "-x.zip", "..", "C:\\x.zip", ""])
def test_safe_filename_refuses_paths_and_odd_names(name):
    with pytest.raises(ArchiveError):
        safe_filename(name)


def test_safe_filename_keeps_ordinary_names():
    assert safe_filename("trainer-0.1+local_2.tar.gz") == "trainer-0.1+local_2.tar.gz"

"""``cloudml objects cp|ls|rm`` against a real platform: bytes that go up come down the same, small files in
one request and large ones in a resumable session, folders both ways, listings a page at a time, and
connections that break mid-upload and mid-download resume where they broke.

Broken connections come from the test's own transport adapter in the command's HTTP session (given as
Click's context object), so the platform and the command run as they do for a user.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProtocolError

from cloudml_os.client.context import Invocation
from tests.client.cli_helpers import cli_env, process_env, run, run_installed
from tests.harness import Client

pytestmark = pytest.mark.integration

PROJECT = "cli-objects"
MiB = 1 << 20
CHUNK = 8 * MiB  # the session's chunkBytes with the platform's default upload_chunk_bytes
LARGE = 20 * MiB + 12345  # over the resumable threshold: three chunks, the last one short


@dataclasses.dataclass
class Sent:
    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    answer_headers: dict[str, str] = dataclasses.field(default_factory=dict)


class CutBody:
    """A request body that breaks the connection after ``limit`` bytes, as a dropped link does."""

    def __init__(self, body, limit: int):
        self._body, self._left = body, limit

    def __len__(self) -> int:
        return len(self._body)

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise ConnectionResetError("the test cut the connection")  # no errno: urllib3 gives up on it
        piece = self._body.read(min(size, self._left) if size and size > 0 else self._left)
        self._left -= len(piece)
        return piece


class CutStream:
    """An answer's body that breaks after ``limit`` bytes."""

    def __init__(self, raw, limit: int):
        self._raw, self._left = raw, limit

    def stream(self, amount: int, decode_content: bool = True):
        for piece in self._raw.stream(amount, decode_content=decode_content):
            if len(piece) >= self._left:
                yield piece[:self._left]
                self._raw.close()
                raise ProtocolError("the test cut the connection")
            self._left -= len(piece)
            yield piece

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


class FlakyLink(HTTPAdapter):
    """Records every request; breaks the Nth chunk of a resumable upload after some bytes (``cut_chunks``:
    N -> bytes), breaks the Nth object download after some bytes (``cut_downloads``), flips a byte of every
    plain object upload when ``corrupt`` is set."""

    def __init__(self, cut_chunks: dict[int, int] | None = None, cut_downloads: dict[int, int] | None = None,
                 corrupt: bool = False):
        super().__init__()
        self.cut_chunks, self.cut_downloads, self.corrupt = cut_chunks or {}, cut_downloads or {}, corrupt
        self.sent: list[Sent] = []

    def send(self, request, **kwargs):
        path = urlsplit(request.url).path
        sent = Sent(request.method, path, dict(request.headers))
        self.sent.append(sent)
        if request.method == "PUT" and "/uploads/" in path:
            index = len(self.chunk_puts()) - 1
            if index in self.cut_chunks:
                request.body = CutBody(request.body, self.cut_chunks[index])
        if request.method == "PUT" and "/objects/" in path and self.corrupt:
            request.body = Corrupted(request.body)
        response = super().send(request, **kwargs)
        sent.status, sent.answer_headers = response.status_code, dict(response.headers)
        if request.method == "GET" and "/objects/" in path:
            index = len(self.downloads()) - 1
            if index in self.cut_downloads:
                response.raw = CutStream(response.raw, self.cut_downloads[index])
        return response

    def chunk_puts(self) -> list[Sent]:
        return [sent for sent in self.sent if sent.method == "PUT" and "/uploads/" in sent.path]

    def downloads(self) -> list[Sent]:
        return [sent for sent in self.sent if sent.method == "GET" and "/objects/" in sent.path]


class Corrupted:
    """A request body with its first byte flipped (what the MD5 is there to catch)."""

    def __init__(self, body):
        self._body, self._first = body, True

    def __len__(self) -> int:
        return len(self._body)

    def read(self, size: int = -1) -> bytes:
        piece = self._body.read(size)
        if self._first and piece:
            self._first = False
            piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
        return piece


def over(link: FlakyLink) -> Invocation:
    """The command's state, with an HTTP session that goes through ``link``."""
    session = requests.Session()
    session.mount("http://", link)
    return Invocation(session=session)


def write_random(path: Path, size: int) -> str:
    """Fill ``path`` with ``size`` random bytes; their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        while size:
            piece = os.urandom(min(size, MiB))
            out.write(piece)
            digest.update(piece)
            size -= len(piece)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while piece := source.read(MiB):
            digest.update(piece)
    return digest.hexdigest()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def uri(name: str) -> str:
    return f"store://{PROJECT}/{name}"


@pytest.fixture(scope="module")
def token(platform) -> str:
    return platform.token(PROJECT, "member")


@pytest.fixture(scope="module")
def api(platform, token) -> Client:
    """The test's own look at the project, straight over HTTP (not through the CLI)."""
    return Client(platform.base_url, PROJECT, token)


@pytest.fixture
def env(platform, token, tmp_path):
    return cli_env(tmp_path / "config.json", endpoint=platform.base_url, project=PROJECT, token=token)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("large") / "large.bin"
    return path, write_random(path, LARGE)


def test_a_small_file_goes_up_in_one_put_with_its_md5_and_comes_back_the_same(env, api, tmp_path):
    data = b"x,y\n1,5.0\n2,8.0\n"
    (tmp_path / "train.csv").write_bytes(data)
    link = FlakyLink()
    up = run(env, "objects", "cp", str(tmp_path / "train.csv"), uri("small/train.csv"), "--format", "json",
             obj=over(link))
    assert up.exit_code == 0, up.output
    stored = json.loads(up.stdout)
    assert stored["uri"] == uri("small/train.csv") and stored["name"] == "small/train.csv"
    assert int(stored["size"]) == len(data) and stored["md5Hash"] == md5_b64(data)
    assert up.stderr == f"Copied {tmp_path / 'train.csv'} to {uri('small/train.csv')} ({len(data)} bytes)\n"
    [put] = link.sent
    assert (put.method, put.path) == ("PUT", f"/v1/projects/{PROJECT}/objects/small/train.csv")
    assert put.headers["Content-MD5"] == md5_b64(data) and put.headers["Content-Length"] == str(len(data))

    down = run(env, "objects", "cp", uri("small/train.csv"), str(tmp_path / "back.csv"))
    assert down.exit_code == 0, down.output
    assert (tmp_path / "back.csv").read_bytes() == data
    into_folder = run(env, "objects", "cp", uri("small/train.csv"), str(tmp_path))
    assert into_folder.exit_code == 0 and (tmp_path / "train.csv").read_bytes() == data
    to_stdout = run(env, "objects", "cp", uri("small/train.csv"), "-")
    assert to_stdout.exit_code == 0 and to_stdout.stdout_bytes == data
    assert sorted(path.name for path in tmp_path.iterdir()) == ["back.csv", "train.csv"]  # no .part left

    from_stdin = run(env, "objects", "cp", "-", uri("small/stdin.bin"), input=b"\x00\xffpiped", obj=over(link))
    assert from_stdin.exit_code == 0, from_stdin.output
    assert api.request("GET", "/objects/small/stdin.bin").content == b"\x00\xffpiped"
    assert link.sent[-1].headers["Content-MD5"] == md5_b64(b"\x00\xffpiped")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert run(env, "objects", "cp", str(empty), uri("small/")).exit_code == 0
    assert api.request("GET", "/objects/small/empty").content == b""


def test_a_large_file_goes_up_in_chunks_of_a_resumable_session(env, api, tmp_path, large):
    path, sha256 = large
    link = FlakyLink()
    up = run(env, "objects", "cp", str(path), uri("large/one.bin"), "--chunk-size", str(MiB), obj=over(link))
    assert up.exit_code == 0, up.output
    start = link.sent[0]
    assert (start.method, start.path) == ("POST", f"/v1/projects/{PROJECT}/uploads")
    # 1 MiB asked for; the session keeps whole chunkBytes (8 MiB), so that is what goes per request.
    assert [sent.headers["Content-Range"] for sent in link.chunk_puts()] == [
        f"bytes 0-{CHUNK - 1}/{LARGE}", f"bytes {CHUNK}-{2 * CHUNK - 1}/{LARGE}",
        f"bytes {2 * CHUNK}-{LARGE - 1}/{LARGE}"]
    assert all(sent.status == 200 for sent in link.sent)

    down = run(env, "objects", "cp", uri("large/one.bin"), str(tmp_path / "back.bin"))
    assert down.exit_code == 0, down.output
    assert sha256_of(tmp_path / "back.bin") == sha256


def test_an_upload_cut_mid_chunk_resumes_from_what_the_session_kept(env, api, tmp_path, large):
    path, sha256 = large
    cut = 3 * MiB + 4321
    link = FlakyLink(cut_chunks={1: cut})  # the second chunk's connection breaks 3 MiB in
    up = run(env, "objects", "cp", str(path), uri("resume/up.bin"), obj=over(link))
    assert up.exit_code == 0, up.output
    assert "WARNING: uploading resume/up.bin: the connection broke; trying again in 0.5 s (1/4)" in up.stderr
    puts = link.chunk_puts()
    assert puts[1].headers["Content-Range"] == f"bytes {CHUNK}-{2 * CHUNK - 1}/{LARGE}" and puts[1].status is None
    asked = link.sent[link.sent.index(puts[1]) + 1]  # after the break: how much did the session keep?
    assert asked.method == "GET" and asked.path == puts[1].path
    kept = int(asked.answer_headers["X-Upload-Received"])
    assert CHUNK < kept <= CHUNK + cut  # part of the broken chunk survived, and is not sent again
    assert puts[2].headers["Content-Range"].startswith(f"bytes {kept}-")
    assert puts[-1].status == 200 and puts[-1].headers["Content-Range"].endswith(f"-{LARGE - 1}/{LARGE}")

    down = run(env, "objects", "cp", uri("resume/up.bin"), str(tmp_path / "back.bin"))
    assert down.exit_code == 0 and sha256_of(tmp_path / "back.bin") == sha256


def test_a_download_cut_midway_asks_for_the_rest_with_range(env, api, tmp_path, large):
    path, sha256 = large
    assert run(env, "objects", "cp", str(path), uri("resume/down.bin")).exit_code == 0
    cut = 5 * MiB + 7
    link = FlakyLink(cut_downloads={0: cut})
    down = run(env, "objects", "cp", uri("resume/down.bin"), str(tmp_path / "back.bin"), obj=over(link))
    assert down.exit_code == 0, down.output
    assert "WARNING: downloading resume/down.bin: the connection broke during the answer" in down.stderr
    first, second = link.downloads()
    assert "Range" not in first.headers and second.headers["Range"] == f"bytes={cut}-"
    assert second.status == 206
    assert sha256_of(tmp_path / "back.bin") == sha256
    assert sorted(path.name for path in tmp_path.iterdir()) == ["back.bin"]


def test_a_body_changed_on_the_way_is_refused_by_its_md5_and_nothing_is_stored(env, api, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"the right bytes")
    result = run(env, "objects", "cp", str(tmp_path / "a.txt"), uri("corrupt/a.txt"),
                 obj=over(FlakyLink(corrupt=True)))
    assert result.exit_code == 1
    assert result.stderr.startswith("ERROR: INVALID_ARGUMENT: Content-MD5") and result.stderr.count("\n") == 1
    assert api.request("GET", "/objects/corrupt/a.txt").status_code == 404


def _tree(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file()}


def test_folders_are_copied_up_and_down_with_r_as_cp_r_does(env, api, tmp_path):
    source = tmp_path / "src"
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "empty").mkdir()
    (source / "a.txt").write_bytes(b"a")
    (source / "sub" / "b.txt").write_bytes(b"bb")
    (source / "sub" / "deeper" / "c.bin").write_bytes(os.urandom(3000))
    files = _tree(source)

    without_r = run(env, "objects", "cp", str(source), uri("tree"))
    assert without_r.exit_code == 1 and without_r.stderr == f"ERROR: {source} is a folder: copy it with -r\n"
    first = run(env, "objects", "cp", "-r", str(source), uri("tree"), "--format", "value(name)")
    assert first.exit_code == 0, first.output
    assert first.stdout.split() == ["tree/a.txt", "tree/sub/b.txt", "tree/sub/deeper/c.bin"]  # became tree
    assert first.stderr.endswith("Copied 3 files (3003 bytes).\n")
    again = run(env, "objects", "cp", "-r", str(source), uri("tree"), "--format", "value(name)")
    assert again.stdout.split() == ["tree/src/a.txt", "tree/src/sub/b.txt", "tree/src/sub/deeper/c.bin"]  # into

    fresh = tmp_path / "fresh"
    down = run(env, "objects", "cp", "-r", uri("tree"), str(fresh))
    assert down.exit_code == 0, down.output
    assert _tree(fresh) == {**files, **{f"src/{name}": data for name, data in files.items()}}
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run(env, "objects", "cp", "-r", uri("tree/src/"), str(existing)).exit_code == 0
    assert _tree(existing) == {f"src/{name}": data for name, data in files.items()}


def test_ls_lists_one_level_or_all_a_page_at_a_time(env, api, tmp_path):
    folder = tmp_path / "listed"
    for name in ("a.csv", "b.csv", "c.csv", "2026/d.csv", "2026/x/e.csv", "2027/f.csv"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    assert run(env, "objects", "cp", "-r", str(folder), uri("listing")).exit_code == 0

    link = FlakyLink()
    level = run(env, "objects", "ls", uri("listing"), "--page-size", "2", obj=over(link))
    assert level.exit_code == 0, level.output
    assert level.stdout.split() == [uri("listing/2026/"), uri("listing/2027/"), uri("listing/a.csv"),
                                    uri("listing/b.csv"), uri("listing/c.csv")]
    assert len(link.sent) == 3  # five entries, two a page
    everything = run(env, "objects", "ls", "-r", uri("listing/"), "--page-size", "1", "--format", "json")
    objects = json.loads(everything.stdout)
    assert [entry["name"] for entry in objects] == [
        "listing/2026/d.csv", "listing/2026/x/e.csv", "listing/2027/f.csv", "listing/a.csv", "listing/b.csv",
        "listing/c.csv"]
    assert int(objects[0]["size"]) == len("2026/d.csv") and objects[0]["md5Hash"] == md5_b64(b"2026/d.csv")
    long = run(env, "objects", "ls", "-l", uri("listing/2026"))
    lines = long.stdout.splitlines()
    assert lines[0].split()[0] == "10" and lines[0].split()[2:] == [md5_b64(b"2026/d.csv"), uri("listing/2026/d.csv")]
    assert lines[1].split() == [uri("listing/2026/x/")]
    assert lines[2] == "TOTAL: 1 objects, 10 bytes"
    one = run(env, "objects", "ls", uri("listing/a.csv"), "--format", "value(uri,size)")
    assert one.stdout == f"{uri('listing/a.csv')}\t5\n"
    top = run(env, "objects", "ls")  # the configured project's top level
    assert uri("listing/") in top.stdout.split()
    installed_env = process_env(tmp_path / "config.json", endpoint=env["CLOUDML_ENDPOINT"], project=PROJECT,
                                token=env["CLOUDML_TOKEN"])
    installed = run_installed(installed_env, "objects", "ls", uri("listing/2027/"))
    assert installed.returncode == 0 and installed.stdout == f"{uri('listing/2027/f.csv')}\n", installed.stderr


def test_rm_removes_an_object_or_with_r_a_folder(env, api, tmp_path):
    folder = tmp_path / "gone"
    (folder / "in").mkdir(parents=True)
    for name in ("one", "two", "in/three"):
        (folder / name).write_bytes(b"bytes")
    assert run(env, "objects", "cp", "-r", str(folder), uri("gone")).exit_code == 0

    single = run(env, "objects", "rm", uri("gone/one"))
    assert single.exit_code == 0 and single.stderr == f"Removed {uri('gone/one')} (1 object).\n"
    folder_without_r = run(env, "objects", "rm", uri("gone/"))
    assert folder_without_r.exit_code == 2 and "is a folder: remove it with -r" in folder_without_r.stderr
    everything = run(env, "objects", "rm", "-r", uri("gone"), "--format", "json")
    assert everything.exit_code == 0, everything.output
    assert json.loads(everything.stdout) == {"uri": uri("gone"), "deleted": 2}
    listed = run(env, "objects", "ls", uri("gone"))
    assert listed.exit_code == 1 and listed.stderr == f"ERROR: NOT_FOUND: {uri('gone')} matched no objects\n"
    again = run(env, "objects", "rm", uri("gone/one"))
    assert again.exit_code == 1 and again.stderr.startswith("ERROR: NOT_FOUND: store://cli-objects/gone/one ")


def test_mistakes_exit_non_zero_with_one_line_and_leave_nothing_behind(env, api, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a")
    link = FlakyLink()
    cases = [  # arguments, exit status, the one line on stderr
        (["cp", str(tmp_path / "missing.txt"), uri("x")], 1,
         f"ERROR: {tmp_path / 'missing.txt'}: no such file or folder"),
        (["cp", str(tmp_path / "a.txt"), uri("data/../x")], 2, f"ERROR: {uri('data/../x')}: not a valid object name"),
        (["cp", str(tmp_path / "a.txt"), "store://No_Such/x"], 2, "ERROR: store://No_Such/x: No_Such is not a project"),
        (["cp", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], 2, "ERROR: one side of a copy is a store://"),
        (["cp", uri("a"), uri("b")], 2, "ERROR: one side of a copy is a store://"),
        (["cp", "--project", "another", str(tmp_path / "a.txt"), uri("x")], 2,
         f"ERROR: the URI names project {PROJECT}, but --project says another"),
        (["rm", "-r", uri("")], 2, f"ERROR: {uri('')}: name an object or a folder"),
    ]
    for args, status, first in cases:
        result = run(env, "objects", *args, obj=over(link))
        assert result.exit_code == status, (args, result.output)
        assert result.stdout == "" and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith(first), (args, result.stderr)
    assert link.sent == []  # refused before anything was sent

    missing = run(env, "objects", "cp", uri("no/such.csv"), str(tmp_path / "such.csv"))
    assert missing.exit_code == 1
    assert missing.stderr == f"ERROR: NOT_FOUND: {uri('no/such.csv')} does not exist\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt"]  # no file, no .part
    no_folder = run(env, "objects", "cp", "-r", uri("no/such/"), str(tmp_path / "such"))
    assert no_folder.exit_code == 1 and no_folder.stderr == f"ERROR: NOT_FOUND: {uri('no/such/')} holds no objects\n"
    wrong_token = run({**env, "CLOUDML_TOKEN": "cmlos_not_a_token"}, "objects", "ls")
    assert wrong_token.exit_code == 1 and wrong_token.stderr.startswith("ERROR: UNAUTHENTICATED: ")

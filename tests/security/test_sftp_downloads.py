"""A node's SFTP server cannot make the worker write outside the folder it copies into, nor fill its disk.

A trainer owns its node, sshd and SFTP server included, so :meth:`NodeSession.get_tree` (the export of a
model, the restart policy's save of a job directory) must treat every name, size and byte the node sends as
hostile. The node here is a real SSH server speaking the real wire protocol: paramiko's server side on
127.0.0.1 with its own host key, which the client pins exactly as it pins a cluster node's (never learned),
and an SFTP server whose listings and files a test chooses. Each test then checks what :meth:`get_tree`
raised and that nothing exists outside the destination folder.

The server refuses to open a file that the client should have refused from its listing (and records every
open), so a test also proves that such a copy stopped before downloading anything.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import os
import posixpath
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from cloudml_os.keys import generate_keypair
from cloudml_os.remote import NodeSession, RemoteError
from cloudml_os.remote import ssh as remote_ssh

NODE = "evil-node"
FILE = stat.S_IFREG | 0o644
FOLDER = stat.S_IFDIR | 0o755
LINK = stat.S_IFLNK | 0o777
MIB = 1 << 20


@dataclasses.dataclass
class Entry:
    """One name in a listing: what the server claims about it (mode, size) and what reading it returns."""

    name: str | bytes
    mode: int
    size: int = 0
    read: Callable[[int, int], bytes] | None = None  # (offset, length) -> bytes; None: opening it is refused

    def attributes(self) -> paramiko.SFTPAttributes:
        attributes = _Attributes()
        attributes.filename = self.name
        attributes.st_mode, attributes.st_size = self.mode, self.size
        attributes.st_uid = attributes.st_gid = 1000
        attributes.st_atime = attributes.st_mtime = 1_700_000_000
        return attributes


class _Attributes(paramiko.SFTPAttributes):
    def __str__(self) -> str:
        """The ``ls -l`` line sent beside each name, made cheaply (paramiko's formats a date per name)."""
        return f"?rw-r--r-- 1 1000 1000 {self.st_size} Nov 14 2023 {self.filename!s}"


def regular(name: str | bytes, data: bytes = b"", size: int | None = None) -> Entry:
    """A file holding ``data``, whose listed size is ``size`` (its real length unless told otherwise)."""
    return Entry(name, FILE, len(data) if size is None else size, lambda offset, length: data[offset:offset + length])


def unopenable(name: str | bytes, size: int = 0) -> Entry:
    """A file the client must refuse from the listing: the server refuses to open it."""
    return Entry(name, FILE, size, None)


def folder(name: str | bytes) -> Entry:
    return Entry(name, FOLDER)


Listing = list[Entry] | Callable[[int], Entry | None]  # the entries, or the i-th one (None past the end)


class MaliciousNode:
    """What the node serves: ``listing(path)`` gives a folder's entries (None: no such folder)."""

    def __init__(self) -> None:
        self.listing: Callable[[str], Listing | None] = lambda path: None
        self.entries: dict[str, Entry] = {}  # every name served, joined to its folder as the client joins it
        self.opened: list[str] = []
        self.pages_served = 0

    def serve(self, folders: dict[str, Listing]) -> None:
        self.listing = folders.get

    def served(self, folder: str, entry: Entry) -> paramiko.SFTPAttributes:
        name = entry.name.decode(errors="replace") if isinstance(entry.name, bytes) else entry.name
        self.entries[posixpath.join(folder, name)] = entry
        return entry.attributes()


class _Pages(list):
    """A listing as paramiko's server reads it: ``files[:16]`` is the next page, ``files[16:]`` the rest.
    Made on demand, so a listing of 10**5 names costs no more than its pages, and one may never end."""

    def __init__(self, node: MaliciousNode, folder: str, entry: Callable[[int], Entry | None], start: int = 0):
        super().__init__()
        self.node, self.folder, self.entry, self.start = node, folder, entry, start

    def __getitem__(self, index: slice) -> list:
        if index.start:
            return _Pages(self.node, self.folder, self.entry, self.start + index.start)
        self.node.pages_served += 1
        page = []
        for i in range(self.start, self.start + index.stop):
            entry = self.entry(i)
            if entry is None:
                break
            page.append(self.node.served(self.folder, entry))
        return page


class _Handle(paramiko.SFTPHandle):
    def __init__(self, read: Callable[[int, int], bytes]) -> None:
        super().__init__()
        self._read = read

    def read(self, offset: int, length: int) -> bytes:
        return self._read(offset, length)


class _SFTP(paramiko.SFTPServerInterface):
    def __init__(self, server: paramiko.ServerInterface, node: MaliciousNode) -> None:
        super().__init__(server)
        self.node = node

    def list_folder(self, path: str):
        entries = self.node.listing(path)
        if entries is None:
            return paramiko.SFTP_NO_SUCH_FILE
        if isinstance(entries, list):
            return _Pages(self.node, path, lambda i: entries[i] if i < len(entries) else None)
        return _Pages(self.node, path, entries)

    def stat(self, path: str):
        entry = self.node.entries.get(path)
        if entry is None:
            return paramiko.SFTP_NO_SUCH_FILE if self.node.listing(path) is None else folder(path).attributes()
        return entry.attributes()

    lstat = stat

    def open(self, path: str, flags: int, attr: paramiko.SFTPAttributes):
        self.node.opened.append(path)
        entry = self.node.entries.get(path)
        if entry is None or entry.read is None:
            return paramiko.SFTP_PERMISSION_DENIED
        return _Handle(entry.read)


class _Server(paramiko.ServerInterface):
    def __init__(self, client_key: str) -> None:
        self.client_key = client_key

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL if key.get_base64() == self.client_key else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


@dataclasses.dataclass
class Listening:
    node: MaliciousNode
    port: int
    host_key_line: str
    client_private_key: str


@pytest.fixture(scope="module")
def listening() -> Iterator[Listening]:
    """An SSH server on 127.0.0.1 with its own Ed25519 host key, accepting one client key."""
    host_private, host_public = generate_keypair()
    client_private, client_public = generate_keypair()
    host_key = paramiko.Ed25519Key.from_private_key(io.StringIO(host_private))
    node = MaliciousNode()
    listener = socket.create_server(("127.0.0.1", 0))
    transports: list[paramiko.Transport] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            # Without it each page of a listing waits ~40 ms for the client's delayed ACK.
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = paramiko.Transport(connection)
            transports.append(transport)
            transport.add_server_key(host_key)
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _SFTP, node)
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                transport.start_server(server=_Server(client_public.split()[1]))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield Listening(node, listener.getsockname()[1], " ".join(host_public.split()[:2]), client_private)
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        listener.close()
        for transport in transports:
            transport.close()
        thread.join(5)


@pytest.fixture
def node(listening) -> MaliciousNode:
    listening.node.entries.clear()
    listening.node.opened.clear()
    listening.node.pages_served = 0
    listening.node.serve({})
    return listening.node


@pytest.fixture
def session(listening, node) -> Iterator[NodeSession]:
    """A session to the malicious node, its host key pinned as the driver's would be."""
    with NodeSession.connect(name=NODE, address="127.0.0.1", port=listening.port, username="trainer",
                             host_keys=[listening.host_key_line], private_key=listening.client_private_key,
                             timeout=5, retries=0, unreachable_after=30) as opened:
        yield opened


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "dest"


def outside(tmp_path: Path, dest: Path) -> list[Path]:
    """What exists under tmp_path but not under dest (nor dest itself)."""
    return sorted(p for p in tmp_path.rglob("*") if p != dest and dest not in p.parents)


def files_in(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def test_a_well_behaved_tree_is_copied_whole_and_links_are_skipped(node, session, tmp_path, dest):
    node.serve({
        "/export": [regular("saved_model.pb", b"graph" * 1000), folder("variables"), Entry("link", LINK),
                    folder("empty")],
        "/export/variables": [regular("variables.data-00000-of-00001", os.urandom(300_000)),
                              regular("variables.index", b"")],
        "/export/empty": [],
    })
    session.get_tree("/export", dest)

    copied = files_in(dest)
    assert copied == {"saved_model.pb": b"graph" * 1000,
                      "variables/variables.data-00000-of-00001": node.entries[
                          "/export/variables/variables.data-00000-of-00001"].read(0, 1 << 30),
                      "variables/variables.index": b""}
    assert (dest / "empty").is_dir() and not (dest / "link").exists()
    assert "/export/link" not in node.opened
    assert outside(tmp_path, dest) == []


def test_dot_and_dot_dot_entries_every_sftp_server_sends_are_skipped_never_followed(node, session, tmp_path, dest):
    node.serve({
        "/export": [folder("."), folder(".."), regular("model.bin", b"m")],
        "/export/.": [regular("again.bin", b"loop")],
        "/export/..": [regular("escape", b"pwned")],
    })
    session.get_tree("/export", dest)

    assert files_in(dest) == {"model.bin": b"m"}
    assert outside(tmp_path, dest) == []


ABSOLUTE = "<absolute path into tmp_path>"


@pytest.mark.parametrize("name", [
    "../escape", "../../escape", ABSOLUTE, "a/b", "", "a\x00b", "x" * 256,
], ids=["parent", "grandparent", "absolute", "slash", "empty", "nul", "too-long"])
def test_names_that_are_not_plain_file_names_are_refused_before_anything_is_copied(
        node, session, tmp_path, dest, name):
    if name == ABSOLUTE:
        name = str(tmp_path / "absolute-escape")
    node.serve({"/export": [folder("a"), regular("good.bin", b"g"), regular(name, b"pwned")], "/export/a": []})

    with pytest.raises(RemoteError, match=f"^node {NODE}: .*{re.escape(repr(name))}.*refusing"):
        session.get_tree("/export", dest)

    assert node.opened == []
    assert files_in(dest) == {}
    assert outside(tmp_path, dest) == []


def test_a_bad_name_in_a_subfolder_is_refused_too(node, session, tmp_path, dest):
    node.serve({"/export": [regular("good.bin", b"g"), folder("sub")], "/export/sub": [regular("../../escape", b"x")]})

    with pytest.raises(RemoteError, match=f"^node {NODE}: /export/sub .*'../../escape'"):
        session.get_tree("/export", dest)

    assert node.opened == [] and files_in(dest) == {}
    assert outside(tmp_path, dest) == []


def test_a_name_that_is_not_utf8_is_refused(node, session, tmp_path, dest):
    node.serve({"/export": [regular(b"bad\xff", b"x")]})

    with pytest.raises(RemoteError, match=f"^node {NODE}: .*not UTF-8"):
        session.get_tree("/export", dest)

    assert outside(tmp_path, dest) == []


def test_a_local_symlink_in_the_destination_is_never_written_through(node, session, tmp_path, dest):
    """Names are plain, yet ``dest/sub`` already is a link to a folder outside: resolved paths are checked."""
    (tmp_path / "elsewhere").mkdir()
    dest.mkdir()
    (dest / "sub").symlink_to(tmp_path / "elsewhere")
    node.serve({"/export": [folder("sub")], "/export/sub": [regular("planted", b"pwned")]})

    with pytest.raises(RemoteError, match=f"^node {NODE}: .*'sub'.*outside"):
        session.get_tree("/export", dest)

    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_listing_of_more_names_than_the_file_cap_is_refused_before_any_download(node, session, tmp_path, dest):
    """The default cap (100,000) itself, against one listing of 10**5 + 1 names."""
    names = remote_ssh.MAX_COPY_FILES + 1
    node.serve({"/export": lambda i: unopenable(f"part-{i:06d}") if i < names else None})

    started = time.monotonic()
    with pytest.raises(RemoteError, match=f"^node {NODE}: copying /export exceeds the copy limit of "
                                          f"{remote_ssh.MAX_COPY_FILES} files"):
        session.get_tree("/export", dest)

    assert time.monotonic() - started < 60
    assert node.opened == [] and files_in(dest) == {}
    assert outside(tmp_path, dest) == []


def test_a_listing_that_never_ends_is_read_no_further_than_the_file_cap(node, session, tmp_path, dest):
    """A node can answer every request for the next page with more names: the copy stops reading at the cap
    (names come 16 a page here, and a few pages are asked for ahead) instead of until the worker's memory is
    full."""
    node.serve({"/export": lambda i: unopenable(f"part-{i:09d}")})

    with pytest.raises(RemoteError, match=f"^node {NODE}: copying /export exceeds the copy limit of 1000 files"):
        session.get_tree("/export", dest, max_files=1000)

    assert node.pages_served <= 1001 // 16 + 1 + 50
    assert node.opened == [] and files_in(dest) == {}


def test_files_across_subfolders_count_against_one_cap(node, session, tmp_path, dest):
    node.serve({"/export": [folder("a"), folder("b")],
                "/export/a": [unopenable(f"a{i}") for i in range(6)],
                "/export/b": [unopenable(f"b{i}") for i in range(6)]})

    with pytest.raises(RemoteError, match="exceeds the copy limit of 10 files"):
        session.get_tree("/export", dest, max_files=10)

    assert node.opened == [] and files_in(dest) == {}


def test_listed_sizes_over_the_byte_cap_are_refused_before_any_download(node, session, tmp_path, dest):
    node.serve({"/export": [unopenable("a.bin", 600 * 1024), folder("sub")],
                "/export/sub": [unopenable("b.bin", 600 * 1024)]})

    with pytest.raises(RemoteError, match=f"^node {NODE}: copying /export exceeds the copy limit of {MIB} bytes"):
        session.get_tree("/export", dest, max_bytes=MIB)

    assert node.opened == [] and files_in(dest) == {}


def test_a_file_listed_with_a_huge_size_is_refused_under_the_default_cap(node, session, tmp_path, dest):
    node.serve({"/export": [regular("small.bin", b"s"), unopenable("huge.bin", 1 << 50)]})

    with pytest.raises(RemoteError, match=f"exceeds the copy limit of {remote_ssh.MAX_COPY_BYTES} bytes"):
        session.get_tree("/export", dest)

    assert node.opened == [] and files_in(dest) == {}
    assert outside(tmp_path, dest) == []


def test_a_file_that_sends_more_bytes_than_listed_is_cut_off_at_the_cap(node, session, tmp_path, dest):
    """Listed as 10 bytes, it never ends: the copy stops once more bytes arrived than the cap allows, and
    never writes more than the cap."""
    endless = Entry("endless.bin", FILE, 10, lambda offset, length: b"x" * length)
    node.serve({"/export": [regular("first.bin", b"1" * 1000), endless]})

    with pytest.raises(RemoteError, match=f"^node {NODE}: copying /export exceeds the copy limit of {MIB} bytes"):
        session.get_tree("/export", dest, max_bytes=MIB)

    assert sum(len(data) for data in files_in(dest).values()) <= MIB
    assert outside(tmp_path, dest) == []


def test_folders_nested_deeper_than_the_cap_are_refused(node, session, tmp_path, dest):
    """Every folder holds a folder ``d``, forever (a node can serve a loop)."""
    node.listing = lambda path: [folder("d")] if path == "/loop" or path.startswith("/loop/") else None

    with pytest.raises(RemoteError, match=f"^node {NODE}: copying /loop exceeds the copy limit of "
                                          f"{remote_ssh.MAX_COPY_DEPTH} levels of folders"):
        session.get_tree("/loop", dest)

    assert files_in(dest) == {}
    assert outside(tmp_path, dest) == []


def test_the_host_key_is_pinned_for_the_malicious_node_too(listening, node):
    """The tests' node is reached the way a cluster node is: another key than the pinned one is refused."""
    _, other = generate_keypair()
    with pytest.raises(RemoteError, match="not the pinned key"):
        NodeSession.connect(name=NODE, address="127.0.0.1", port=listening.port, username="trainer",
                            host_keys=[" ".join(other.split()[:2])], private_key=listening.client_private_key,
                            timeout=5, retries=0)
    assert base64.b64decode(listening.host_key_line.split()[1])

"""Run commands and move files on one node over SSH (paramiko), with the node's host keys pinned.

A :class:`NodeSession` is one SSH connection to one node, opened once per workflow step and reused for
all of that step's commands, uploads and log reads. Host keys come from the driver (known before the
first connection) and are pinned: an unknown or different key is refused, never learned. Every command
reaches the remote shell built by :func:`build_command` from an argv, so nothing unquoted does.

Long-running work (trainers, model servers) is started detached by :meth:`NodeSession.start_process`
under a process folder that records its pid and, when it ends, its exit code; a later session (from a
redelivered task, after a worker crash) finds it there. Remote scripts are POSIX ``/bin/sh`` (dash on
Debian) and get their values as positional parameters, never pasted into the script text.

This is the only package that imports paramiko. Messages never contain private keys.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import math
import os
import posixpath
import re
import secrets
import select
import shlex
import socket
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import paramiko
import tenacity

if TYPE_CHECKING:
    from cloudml_os.cloud.base import NodeInfo
    from cloudml_os.config import Settings

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_READ_CHUNK = 65536
SFTP_REPLY_TIMEOUT = 60.0  # seconds an SFTP request may wait for its reply (a hung node's sshd sends none)
# What one get_tree (an exported model, a job directory saved for a restart) may bring to the worker's disk.
MAX_COPY_BYTES = 20 << 30  # bytes written in all
MAX_COPY_FILES = 100_000  # names read from the node's listings: files, folders and the links and others skipped
MAX_COPY_DEPTH = 64  # levels of folders below the copied one
_MAX_NAME_BYTES = 255  # the longest file name Linux file systems take (NAME_MAX)
# Pages of a listing asked for before the first reply: a small folder (one page) costs one round trip, a big
# one streams. paramiko's default (50) sends 49 requests too many for every small folder of a job directory.
_LISTING_READ_AHEAD = 8


class RemoteError(RuntimeError):
    """Something failed on or on the way to a node; the message names the node and what failed."""


class HostKeyMismatch(RemoteError):
    """The node presented a host key other than the pinned one: never retried, never accepted."""


class CommandFailed(RemoteError):
    """A checked command exited non-zero; ``result`` holds its exit code and output."""

    def __init__(self, message: str, result: CommandResult) -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


@dataclasses.dataclass(frozen=True)
class ProcessStatus:
    """A detached process's state. ``lost``: no exit code was recorded and the process is gone
    (its node rebooted, or it never started)."""

    running: bool
    exit_code: int | None
    lost: bool
    ended_at: float | None = None  # when the exit code was recorded (node clock, epoch seconds), if known


# -- command building (pure) --------------------------------------------------------------------


def quote_argv(argv: Sequence[str]) -> str:
    """Quote an argv for a POSIX shell so that each element arrives as one literal argument.

    The first word is always single-quoted, so that ``X=1`` is run as a program name instead of being
    taken as a variable assignment, and a reserved word (``if``) as a command.
    """
    if not argv:
        raise ValueError("argv must not be empty")
    first = "'" + argv[0].replace("'", "'\"'\"'") + "'"
    return " ".join([first, *(shlex.quote(arg) for arg in argv[1:])])


def build_command(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """The shell command line that runs ``argv`` with ``env`` added to the environment, in ``cwd``.

    Names in ``env`` must be shell variable names; values, the directory and every argument are quoted.

    :raises ValueError: on an empty argv or an invalid variable name.
    """
    parts = []
    if cwd is not None:
        parts.append(f"cd {shlex.quote(cwd)}")
    if env:
        for name in env:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"invalid environment variable name {name!r}")
        parts.append("export " + " ".join(shlex.quote(f"{name}={value}") for name, value in env.items()))
    parts.append(quote_argv(argv))
    return " && ".join(parts)


def script_argv(script: str, *args: str) -> list[str]:
    """argv running a POSIX ``script`` with ``args`` as ``$1``, ``$2``…, so values never enter its text."""
    return ["/bin/sh", "-c", script, "sh", *args]


# The detached process machinery. PROC_DIR holds: output.log (combined stdout and stderr), wrapper_pid
# (the shell that waits for the process), pid (the process, leader of its own session and process group)
# and, once it ended, exit_code. Files are written to a temporary name and renamed, so readers never see
# half a number.

# $1 wrapper script, $2 proc dir, $3 cwd, $4… argv. `mkdir` of the proc dir is the lock that makes a
# redelivered start a no-op. Waits until the pid is recorded so stop_process can always find it.
_START_SCRIPT = r"""
w=$1; d=$2
mkdir -p -- "$(dirname -- "$d")" || exit 1
if ! mkdir -- "$d" 2>/dev/null; then
  [ -d "$d" ] && exit 0
  echo "cannot create $d" >&2; exit 1
fi
: > "$d/output.log" || exit 1
shift
# The wrapper closes its stdout once it has recorded the pid (or when it exits): reading that pipe to
# its end waits exactly that long, with no polling. The subshell returns at once; only the pipe is waited on.
: "$( (setsid /bin/sh -c "$w" sh "$@" </dev/null 2>/dev/null &) )"
[ -e "$d/pid" ] || [ -e "$d/exit_code" ] || { echo "process did not start" >&2; exit 1; }
"""

# $1 proc dir, $2 cwd, $3… argv. The process gets its own session (setsid) so that stop_process can
# signal its whole process group without hitting this wrapper, which must live on to record the exit code.
_WRAPPER_SCRIPT = r"""
d=$1; cwd=$2; shift 2
record() { echo "$2" > "$d/.$1.tmp" && mv -f "$d/.$1.tmp" "$d/$1"; }
record wrapper_pid $$
if ! cd "$cwd" 2>>"$d/output.log"; then record exit_code 126; exit 0; fi
setsid -- "$@" </dev/null >>"$d/output.log" 2>&1 &
child=$!
record pid "$child"
exec >/dev/null
wait "$child"
record exit_code $?
"""

# A wrapper is alive if the pid recorded is a live process whose argv holds this proc dir: after a node
# reboot the same pid may belong to something else.
_ALIVE_FUNCTION = r"""
alive() {
  [ -s "$d/wrapper_pid" ] || return 1
  w=$(cat "$d/wrapper_pid")
  { tr '\0' '\n' < "/proc/$w/cmdline"; } 2>/dev/null | grep -qxF -e "$d"
}
"""

# $1 proc dir. Prints "exited CODE WHEN" (WHEN: the exit code's mtime, epoch seconds), "running" or "lost".
_STATUS_SCRIPT = "d=$1\n" + _ALIVE_FUNCTION + r"""
exited() { echo "exited $(cat "$d/exit_code") $(date -r "$d/exit_code" +%s.%N)"; }
if [ -s "$d/exit_code" ]; then exited
elif alive; then echo running
elif [ -s "$d/exit_code" ]; then exited
else echo lost
fi
"""

# $1 proc dir, $2 first byte of output.log to send (1-based), $3 seconds between looks at the wrapper.
# Streams the log as it grows until the wrapper has exited (then to the file's end; at once when it is
# gone already); nothing runs on the node between log lines. tail also exits when the reader goes away
# (its stdout pipe closes).
_FOLLOW_SCRIPT = "d=$1\n" + _ALIVE_FUNCTION + r"""
alive || exec tail -c "+$2" -- "$d/output.log"
exec tail -c "+$2" -s "$3" --pid="$w" -f -- "$d/output.log"  # alive set $w, the wrapper's pid
"""

# $1 proc dir, $2 grace in tenths of a second. TERM to the process group, KILL after the grace, then
# wait for the wrapper to record the exit code.
_STOP_SCRIPT = "d=$1; ticks=$2\n" + _ALIVE_FUNCTION + r"""
alive || exit 0
pg=$(cat "$d/pid" 2>/dev/null)
[ -n "$pg" ] || exit 0
kill -s TERM -- "-$pg" 2>/dev/null
i=0
while alive && [ "$i" -lt "$ticks" ]; do sleep 0.1; i=$((i + 1)); done
alive && kill -s KILL -- "-$pg" 2>/dev/null
i=0
while alive && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
"""


def start_process_argv(proc_dir: str, argv: Sequence[str], cwd: str) -> list[str]:
    """argv of the remote command that starts ``argv`` detached under ``proc_dir`` (see start_process)."""
    if not argv:
        raise ValueError("argv must not be empty")
    if not proc_dir.startswith("/") or not cwd.startswith("/"):
        raise ValueError("proc_dir and cwd must be absolute paths")
    return script_argv(_START_SCRIPT, _WRAPPER_SCRIPT, proc_dir.rstrip("/") or "/", cwd, *argv)


def parse_process_status(output: str) -> ProcessStatus:
    """Turn the status script's one line into a :class:`ProcessStatus`."""
    words = output.split()
    if words == ["running"]:
        return ProcessStatus(running=True, exit_code=None, lost=False)
    if len(words) in (2, 3) and words[0] == "exited" and words[1].lstrip("-").isdigit():
        try:
            ended_at = float(words[2]) if len(words) == 3 else None
        except ValueError:
            ended_at = None
        return ProcessStatus(running=False, exit_code=int(words[1]), lost=False, ended_at=ended_at)
    return ProcessStatus(running=False, exit_code=None, lost=True)


# -- the session --------------------------------------------------------------------------------


class NodeSession:
    """One SSH connection to one node. Not thread-safe: use one session per node per thread.

    Build with :meth:`connect` (or :func:`connect_node`); use as a context manager to close it.
    """

    def __init__(self, name: str, client: paramiko.SSHClient) -> None:
        self.name = name
        self._client = client
        self._sftp_client: paramiko.SFTPClient | None = None

    @classmethod
    def connect(cls, *, name: str, address: str, port: int, username: str, host_keys: Sequence[str],
                private_key: str, timeout: float, retries: int,
                unreachable_after: float | None = None) -> NodeSession:
        """Connect with the node's host keys pinned, retrying while the node boots.

        A node whose network is cut answers nothing: TCP neither fails nor succeeds on its own, and every
        read would wait forever. ``unreachable_after`` bounds that. Connecting gives up after that many
        seconds of attempts, and on the connection, data the node's kernel does not acknowledge for that
        long (``TCP_USER_TIMEOUT``, with keepalives so an idle connection has data in flight) breaks it, so
        a waiting command or SFTP request fails with :class:`RemoteError` instead of hanging. A node that
        acknowledges but is slow to reply (busy, not cut off) is not judged by this bound.

        :param host_keys: OpenSSH public key lines the node's sshd must present one of.
        :param private_key: the cluster's OpenSSH-format private key text (loaded from memory).
        :param timeout: seconds for each TCP connect, banner and authentication.
        :param retries: further attempts after the first on refused or timed-out connections.
        :param unreachable_after: seconds of silence after which the node counts as unreachable; None: no bound.
        :raises HostKeyMismatch: the node presented another key (no retry).
        :raises RemoteError: no connection after the retries, authentication refused, bad key text.
        """
        if not host_keys:
            raise RemoteError(f"node {name}: no host key to pin; refusing to connect unverified")
        pkey = _load_private_key(name, private_key)
        known_name = address if port == 22 else f"[{address}]:{port}"
        pinned = [_parse_host_key(name, line) for line in host_keys]

        def attempt() -> paramiko.SSHClient:
            client = paramiko.SSHClient()
            for key in pinned:
                client.get_host_keys().add(known_name, key.get_name(), key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            # Our own socket, to switch Nagle off before the handshake: paramiko leaves it on, and SSH's
            # small request/reply messages then wait for the peer's delayed ACK (~40 ms each time).
            sock = socket.create_connection((address, port), timeout=timeout)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if unreachable_after is not None:
                    _bound_silence(sock, unreachable_after)
                client.connect(address, port=port, username=username, pkey=pkey, timeout=timeout,
                               banner_timeout=timeout, auth_timeout=timeout, allow_agent=False,
                               look_for_keys=False, sock=sock, transport_factory=_QuietTransport)
            except BaseException:
                client.close()
                sock.close()
                raise
            return client

        stop = tenacity.stop_after_attempt(max(0, retries) + 1)
        if unreachable_after is not None:
            stop = stop | tenacity.stop_after_delay(unreachable_after)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_transient),
            stop=stop,
            wait=tenacity.wait_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )
        try:
            client = retrying(attempt)
        except paramiko.BadHostKeyException as exc:
            raise HostKeyMismatch(
                f"node {name}: {address}:{port} presented host key {exc.key.get_name()} "
                f"{exc.key.fingerprint}, which is not the pinned key; refusing to connect") from None
        except paramiko.AuthenticationException as exc:
            if _connection_lost(exc):
                raise RemoteError(f"node {name}: the connection to {address}:{port} was lost while logging in "
                                  f"({retries + 1} attempt(s) at most)") from None
            raise RemoteError(f"node {name}: {username}@{address}:{port} refused the cluster's key") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"node {name}: cannot connect to {address}:{port} after {retries + 1} "
                              f"attempt(s): {exc}") from None
        transport = client.get_transport()
        if transport is not None:
            # A step may hold the session for hours while watching; keepalives keep data in flight, so a cut
            # link is noticed within unreachable_after even when no command runs.
            interval = 30 if unreachable_after is None else max(1, min(30, int(unreachable_after / 3)))
            transport.set_keepalive(interval)
        return cls(name, client)

    def __enter__(self) -> NodeSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the SFTP channel and the connection; a connection the node already lost (powered off, link
        cut) closes without raising, so cleanup never hides the error that matters."""
        if self._sftp_client is not None:
            with contextlib.suppress(EOFError, OSError, paramiko.SSHException):
                self._sftp_client.close()
            self._sftp_client = None
        self._client.close()

    # -- commands --

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, check: bool = True) -> CommandResult:
        """Run ``argv`` and wait for it; stdout and stderr are decoded as UTF-8 (invalid bytes replaced).

        :param timeout: seconds to wait; on expiry the channel is closed (the remote command may go on).
        :raises CommandFailed: ``check`` and a non-zero exit code.
        :raises RemoteError: timeout or a lost connection.
        """
        command = build_command(argv, env, cwd)
        exit_code, stdout, stderr = self._exec(command, timeout, describe=_describe(argv))
        result = CommandResult(exit_code, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
        if check and exit_code != 0:
            raise CommandFailed(f"node {self.name}: {_describe(argv)} exited with {exit_code}: "
                                f"{result.stderr.strip()[-2000:]}", result)
        return result

    def start_process(self, proc_dir: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: str) -> None:
        """Start ``argv`` detached from this session, recording its life under ``proc_dir``.

        It runs in its own session with stdin from /dev/null; stdout and stderr go to
        ``proc_dir/output.log``, its pid to ``proc_dir/pid`` and, when it ends, its exit code to
        ``proc_dir/exit_code``. Idempotent: if ``proc_dir`` exists (a redelivered task), nothing starts.
        """
        self.run(start_process_argv(proc_dir, argv, cwd), env=env, timeout=60)

    def process_status(self, proc_dir: str) -> ProcessStatus:
        """Whether the process runs, ended (with its exit code) or was lost (gone without one)."""
        result = self.run(script_argv(_STATUS_SCRIPT, proc_dir.rstrip("/")), timeout=60)
        return parse_process_status(result.stdout)

    def exit_status(self, proc_dir: str) -> ProcessStatus:
        """Running, or ended with the recorded exit code and its time: SFTP only, no process on the node.

        Cheap enough to poll often beside a training process, but it cannot tell a lost process from a
        running one; :meth:`process_status` can, at the cost of a shell and a few forks on the node.
        """
        path = f"{proc_dir.rstrip('/')}/exit_code"
        try:
            ended_at = self._sftp().stat(path).st_mtime  # one round trip while the process runs
        except FileNotFoundError:
            return ProcessStatus(running=True, exit_code=None, lost=False)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"node {self.name}: cannot read {path}: {exc or type(exc).__name__}") from None
        text = self.read_file(path, 0, 64).strip()
        if not text.lstrip(b"-").isdigit():  # renamed into place, so never half-written; be safe anyway
            return ProcessStatus(running=True, exit_code=None, lost=False)
        return ProcessStatus(running=False, exit_code=int(text), lost=False, ended_at=ended_at)

    def stop_process(self, proc_dir: str, grace: float) -> None:
        """SIGTERM the process's group, SIGKILL it after ``grace`` seconds (TensorFlow workers may ignore
        SIGTERM), and wait until its exit code is recorded. Does nothing to a finished or absent process."""
        ticks = max(0, math.ceil(grace * 10))
        self.run(script_argv(_STOP_SCRIPT, proc_dir.rstrip("/"), str(ticks)), timeout=grace + 30)

    def follow(self, proc_dir: str, offset: int, check_every: float) -> LogFollower:
        """Stream ``proc_dir/output.log`` from byte ``offset`` until the process's wrapper exits.

        One long-lived command on the node (``tail -f``) sends each new log line as it is written and looks
        every ``check_every`` seconds whether the wrapper still lives: a running process costs the node
        nothing else. The stream ends, after the log's last bytes, when the wrapper has exited (or at once
        when it is gone already: ask :meth:`process_status` how it ended), or when the connection breaks.
        """
        argv = script_argv(_FOLLOW_SCRIPT, proc_dir.rstrip("/"), str(offset + 1), f"{check_every:g}")
        return LogFollower(self._open_channel(build_command(argv), 60.0))

    # -- files --

    def put(self, data: bytes | Path, remote_path: str, mode: int = 0o644) -> None:
        """Upload bytes or a local file, creating parent folders; the file appears whole or not at all."""
        sftp = self._sftp()
        folder, base = posixpath.split(remote_path)
        tmp = posixpath.join(folder, f".{base}.{secrets.token_hex(4)}.part")
        try:
            self._makedirs(folder)
            if isinstance(data, Path):
                sftp.put(str(data), tmp)
            else:
                sftp.putfo(io.BytesIO(data), tmp)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, remote_path)
        except OSError as exc:
            try:
                sftp.remove(tmp)
            except OSError:
                pass
            raise RemoteError(f"node {self.name}: cannot upload to {remote_path}: {exc}") from None

    def read_file(self, remote_path: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes from ``offset`` (for following logs); a missing file reads as ``b""``."""
        try:
            with self._sftp().open(remote_path, "rb") as remote:
                remote.seek(offset)
                return remote.read(limit)
        except FileNotFoundError:
            return b""
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"node {self.name}: cannot read {remote_path}: {exc or type(exc).__name__}") from None

    def get_file(self, remote_path: str, target: BinaryIO, size: int) -> int | None:
        """Copy one file of ``size`` bytes (as a listing said) into ``target``, its reads sent ahead in parallel.

        At most ``size + 1`` bytes are copied, so a file that grew since it was listed shows as a count other
        than ``size`` (the caller discards the copy) without ever being read to its end. The node is not
        trusted, so ``size`` bounds the bytes, not the file's own claim.

        :returns: the bytes copied, or None when the file no longer exists.
        :raises RemoteError: the file cannot be opened or read.
        """
        try:
            with self._sftp().open(remote_path, "rb") as source:
                if size > _READ_CHUNK:  # prefetching starts a thread: worth it only beyond one read
                    source.prefetch(size)
                copied = 0
                while copied <= size and (chunk := source.read(min(_READ_CHUNK, size + 1 - copied))):
                    target.write(chunk)
                    copied += len(chunk)
                return copied
        except FileNotFoundError:
            return None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"node {self.name}: cannot read {remote_path}: {exc or type(exc).__name__}") from None

    def get_tree(self, remote_dir: str, local_dir: Path, *, max_bytes: int = MAX_COPY_BYTES,
                 max_files: int = MAX_COPY_FILES, max_depth: int = MAX_COPY_DEPTH) -> None:
        """Download a folder recursively (an exported model, a job directory) into ``local_dir``.

        The node is not trusted: its trainer can replace its SFTP server, which then chooses every name,
        size and byte. So the whole tree is listed first and every name checked before a byte is written:
        one plain file name (not empty, no ``/`` or NUL, at most 255 bytes; the ``.`` and ``..`` entries
        every server lists are skipped), and the copy stays within the caps. Each local path is checked
        again, resolved, just before it is created, and files are never opened through a link: nothing is
        ever written outside ``local_dir``. Symbolic links (and devices, sockets…) on the node are skipped:
        one could point outside the folder.

        :param max_bytes: most bytes written in all, checked against the listed sizes before any download
            and against the bytes as they arrive (a file may grow, or lie about its size): the copy stops
            before writing the first byte over the cap.
        :param max_files: most names read from the listings (files, folders and skipped entries).
        :param max_depth: most levels of folders below ``remote_dir``.
        :raises RemoteError: a name that is not a plain file name, a cap exceeded, or a failed listing or
            download; what was copied until then stays in ``local_dir``, for the caller to discard.
        """
        limits = _CopyLimits(max_bytes, max_files, max_depth)
        try:
            local_dir.mkdir(parents=True, exist_ok=True)
            root = local_dir.resolve(strict=True)
            written = 0
            for item in self._list_tree(remote_dir, limits):
                target = self._local_target(root, item)
                if item.is_folder:
                    target.mkdir(exist_ok=True)
                else:
                    written = self._download(item, target, remote_dir, limits, written)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"node {self.name}: cannot download {remote_dir}: {exc or type(exc).__name__}") from None

    def _list_tree(self, remote_dir: str, limits: _CopyLimits) -> list[_CopyItem]:
        """Every folder and regular file under ``remote_dir``, parents before children, all names checked
        and the caps on names, depth and listed bytes enforced; nothing is downloaded."""
        sftp = self._sftp()
        items: list[_CopyItem] = []
        names = listed_bytes = 0
        pending: list[tuple[str, tuple[str, ...]]] = [(remote_dir, ())]
        while pending:
            folder, parts = pending.pop()
            if len(parts) > limits.max_depth:
                raise RemoteError(f"node {self.name}: copying {remote_dir} exceeds the copy limit of "
                                  f"{limits.max_depth} levels of folders (at {folder})")
            # One listing at a time, read to its end (or abandoned with an error) before the next request:
            # listdir_iter reads its replies itself. Its pages are counted as they come, so a listing that
            # never ends stops at the cap instead of filling the worker's memory.
            try:
                for entry in sftp.listdir_iter(folder, read_aheads=_LISTING_READ_AHEAD):
                    name = entry.filename
                    if name in (".", ".."):
                        continue  # the folder itself and its parent, which every SFTP server lists
                    names += 1
                    if names > limits.max_files:
                        raise RemoteError(f"node {self.name}: copying {remote_dir} exceeds the copy limit of "
                                          f"{limits.max_files} files")
                    if not _is_plain_name(name):
                        raise RemoteError(f"node {self.name}: {folder} holds an entry named {name!r}, which is "
                                          f"not a plain file name; refusing to copy it")
                    mode = entry.st_mode or 0
                    remote = posixpath.join(folder, name)
                    if stat.S_ISDIR(mode):
                        items.append(_CopyItem(remote, (*parts, name), is_folder=True, size=0))
                        pending.append((remote, (*parts, name)))
                    elif stat.S_ISREG(mode):
                        size = entry.st_size or 0
                        listed_bytes += size
                        if listed_bytes > limits.max_bytes:
                            raise RemoteError(f"node {self.name}: copying {remote_dir} exceeds the copy limit of "
                                              f"{limits.max_bytes} bytes (the files listed hold more)")
                        items.append(_CopyItem(remote, (*parts, name), is_folder=False, size=size))
            except UnicodeDecodeError:
                raise RemoteError(f"node {self.name}: {folder} holds an entry whose name is not UTF-8; "
                                  f"refusing to copy it") from None
            except paramiko.SFTPError as exc:
                raise RemoteError(f"node {self.name}: cannot list {folder}: {exc}") from None
        return items

    def _local_target(self, root: Path, item: _CopyItem) -> Path:
        """Where ``item`` goes under ``root``, once its resolved path (through any link already in the
        folder) is known to be inside ``root``."""
        target = root.joinpath(*item.parts)
        resolved = target.resolve()
        if resolved == root or not resolved.is_relative_to(root):
            raise RemoteError(f"node {self.name}: the entry {item.parts[-1]!r} of {posixpath.dirname(item.remote)} "
                              f"would be written to {resolved}, outside {root}; refusing to copy it")
        return target

    def _download(self, item: _CopyItem, target: Path, remote_dir: str, limits: _CopyLimits, written: int) -> int:
        """Copy one file, counting its bytes as they arrive against the cap; the new total of bytes written."""
        with self._sftp().open(item.remote, "rb") as source:
            if item.size:
                source.prefetch(item.size)  # the listed size: no stat, no read-ahead past what was counted
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            with open(descriptor, "wb") as local:
                while chunk := source.read(_READ_CHUNK):
                    if written + len(chunk) > limits.max_bytes:
                        raise RemoteError(f"node {self.name}: copying {remote_dir} exceeds the copy limit of "
                                          f"{limits.max_bytes} bytes ({item.remote} sent more than it listed)")
                    local.write(chunk)
                    written += len(chunk)
        return written

    def put_tree(self, local_dir: Path, remote_dir: str) -> None:
        """Upload a local folder's files under ``remote_dir`` (created), each file whole or not at all;
        files already there and not in ``local_dir`` are kept. Symbolic links are skipped."""
        for path in sorted(local_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                self.put(path, posixpath.join(remote_dir, path.relative_to(local_dir).as_posix()),
                         mode=path.stat().st_mode & 0o777)

    def find(self, remote_dir: str, file_name: str) -> list[str]:
        """Folders under ``remote_dir`` (itself included) that hold a file named ``file_name``, sorted.
        Used to detect exported models; a missing ``remote_dir`` holds none."""
        sftp = self._sftp()
        found = []
        pending = [remote_dir.rstrip("/") or "/"]
        while pending:
            folder = pending.pop()
            try:
                entries = sftp.listdir_attr(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise RemoteError(f"node {self.name}: cannot list {folder}: {exc}") from None
            for entry in entries:
                mode = entry.st_mode or 0
                if stat.S_ISDIR(mode):
                    pending.append(posixpath.join(folder, entry.filename))
                elif entry.filename == file_name and stat.S_ISREG(mode):
                    found.append(folder)
        return sorted(found)

    # -- internals --

    def _sftp(self) -> paramiko.SFTPClient:
        if self._sftp_client is None:
            try:
                self._sftp_client = self._client.open_sftp()
            except (OSError, paramiko.SSHException) as exc:
                raise RemoteError(f"node {self.name}: cannot open SFTP: {exc}") from None
            # A reply that never comes fails the request instead of blocking it forever. Not the (shorter)
            # unreachable bound: a node whose kernel acknowledges our packets is reachable, only busy, and
            # TCP_USER_TIMEOUT already catches one that acknowledges nothing.
            self._sftp_client.get_channel().settimeout(SFTP_REPLY_TIMEOUT)
        return self._sftp_client

    def _makedirs(self, folder: str) -> None:
        sftp = self._sftp()
        path = ""
        for part in folder.split("/"):
            path = f"{path}/{part}" if path or folder.startswith("/") else part
            if not part:
                continue
            try:
                sftp.stat(path)
            except FileNotFoundError:
                try:
                    sftp.mkdir(path)
                except OSError:
                    sftp.stat(path)  # created meanwhile by someone else, or raise the real error

    def _open_channel(self, command: str, timeout: float | None) -> paramiko.Channel:
        """A channel running ``command`` (its stdin closed): the one place a command line reaches SSH."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise RemoteError(f"node {self.name}: the SSH connection is closed")
        try:
            channel = transport.open_session(timeout=timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:  # EOFError: the connection broke
            raise RemoteError(f"node {self.name}: cannot open a channel: {exc or 'connection lost'}") from None
        try:
            channel.exec_command(command)
            channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            channel.close()
            raise RemoteError(f"node {self.name}: cannot run a command: {exc or 'connection lost'}") from None
        return channel

    def _exec(self, command: str, timeout: float | None, describe: str) -> tuple[int, bytes, bytes]:
        """Run a command line; read stdout and stderr together so neither can fill up and block."""
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._open_channel(command, timeout)
        stdout, stderr = bytearray(), bytearray()
        try:
            while True:
                while channel.recv_ready():
                    stdout += channel.recv(_READ_CHUNK)
                while channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(_READ_CHUNK)
                if channel.eof_received or channel.closed:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RemoteError(f"node {self.name}: {describe} did not finish within {timeout:g}s")
                select.select([channel], [], [], 1.0 if remaining is None else min(remaining, 1.0))
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not channel.status_event.wait(remaining):
                raise RemoteError(f"node {self.name}: {describe} did not finish within {timeout:g}s")
            while channel.recv_ready():
                stdout += channel.recv(_READ_CHUNK)
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(_READ_CHUNK)
            if not channel.get_transport().is_active() and channel.exit_status == -1:
                raise RemoteError(f"node {self.name}: connection lost while running {describe}")
            return channel.exit_status, bytes(stdout), bytes(stderr)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"node {self.name}: {describe} failed: {exc or 'connection lost'}") from None
        finally:
            channel.close()


class _QuietTransport(paramiko.Transport):
    """A transport whose reader thread wakes once a second, not ten times, when nothing arrives.

    paramiko's thread times its socket reads out every ``_active_check_timeout`` only to see whether it
    was closed (``close()`` does not wait for it). A watch holds one connection per node for as long as
    training runs, on hosts whose cores synchronous training shares: each wakeup can delay a step.
    """

    _active_check_timeout = 1.0


class LogFollower:
    """The bytes a node streams from :meth:`NodeSession.follow`, read without blocking."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel

    def fileno(self) -> int:
        """A descriptor that is readable once bytes arrived or the stream ended (for :func:`wait_for_streams`)."""
        return self._channel.fileno()

    def poll(self) -> tuple[bytes, bool]:
        """The bytes that arrived since the last poll, and whether the stream has ended (then they are
        its last bytes: the exit status follows all data on an SSH channel)."""
        ended = self._channel.exit_status_ready()
        data = bytearray()
        try:
            while self._channel.recv_ready():
                data += self._channel.recv(_READ_CHUNK)
            while self._channel.recv_stderr_ready():  # tail's complaints: drained so they never block it
                self._channel.recv_stderr(_READ_CHUNK)
        except (OSError, EOFError, paramiko.SSHException):
            ended = True  # the connection broke: the caller asks the node (and finds it unreachable)
        return bytes(data), ended

    def close(self) -> None:
        """Stop following; the node's tail exits as its output closes."""
        self._channel.close()


def wait_for_streams(followers: Iterable[LogFollower], timeout: float) -> None:
    """Sleep until one of ``followers`` has bytes or has ended, or ``timeout`` seconds have passed."""
    streams = list(followers)
    if streams:
        select.select(streams, [], [], max(0.0, timeout))
    else:
        time.sleep(max(0.0, timeout))


@dataclasses.dataclass(frozen=True)
class _CopyLimits:
    max_bytes: int
    max_files: int
    max_depth: int


@dataclasses.dataclass(frozen=True)
class _CopyItem:
    """A folder or regular file found by :meth:`NodeSession.get_tree`: its node path and its checked names
    below the copied folder."""

    remote: str
    parts: tuple[str, ...]
    is_folder: bool
    size: int


def _is_plain_name(name: str) -> bool:
    """Whether a node's listing may name a file so: one path component that stays where it is put."""
    return (name not in ("", ".", "..") and "/" not in name and "\x00" not in name
            and len(name.encode()) <= _MAX_NAME_BYTES)


def connect_node(node: NodeInfo, private_key: str, settings: Settings) -> NodeSession:
    """Connect to a node a driver returned, with the timeouts and retries from settings.

    Attempts end after ``ssh_boot_retries`` retries or ``node_unreachable_seconds``, whichever comes
    first; the connection breaks after ``node_unreachable_seconds`` without an answer from the node.
    """
    return NodeSession.connect(name=node.name, address=node.address, port=node.ssh_port,
                               username=node.username, host_keys=node.host_keys, private_key=private_key,
                               timeout=min(settings.ssh_connect_timeout, settings.node_unreachable_seconds),
                               retries=settings.ssh_boot_retries,
                               unreachable_after=settings.node_unreachable_seconds)


def _bound_silence(sock: socket.socket, seconds: float) -> None:
    """Make the kernel break the connection once the peer has acknowledged nothing for ``seconds``.

    TCP_USER_TIMEOUT covers data that goes unacknowledged; TCP keepalives put data in flight on an idle
    connection, so silence is noticed whether or not the client is sending.
    """
    probe_interval = max(1, int(seconds / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe_interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe_interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))


def _describe(argv: Sequence[str]) -> str:
    text = shlex.join(argv)
    return f"`{text[:200]}…`" if len(text) > 200 else f"`{text}`"


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying while a node boots: refused, reset, timed out, no banner yet, lost while logging in."""
    if isinstance(exc, paramiko.AuthenticationException):
        return _connection_lost(exc)
    if isinstance(exc, paramiko.BadHostKeyException):
        return False
    return isinstance(exc, OSError | EOFError | paramiko.SSHException)


def _connection_lost(exc: paramiko.AuthenticationException) -> bool:
    """paramiko reports a connection that ended during authentication as an authentication failure."""
    return "transport shut down or saw EOF" in str(exc)


def _parse_host_key(name: str, line: str) -> paramiko.PKey:
    fields = line.split()
    try:
        key_type, blob = fields[0], fields[1]
        return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob, validate=True))
    except (IndexError, binascii.Error, ValueError, paramiko.SSHException, paramiko.UnknownKeyType):
        raise RemoteError(f"node {name}: host key {line[:80]!r} is not an OpenSSH public key line") from None


def _load_private_key(name: str, text: str) -> paramiko.PKey:
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise RemoteError(f"node {name}: the cluster's private key is not a readable OpenSSH private key")

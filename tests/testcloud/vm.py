"""The emulated Nova's "VMs": an sshd in namespaces of its own, plus what cloud-init would do at first boot.

A server is a folder and a network namespace. The namespace holds one veth per port, its other end plugged
into the tenant bridge on this host, carrying the port's MAC and addresses and a default route via the
subnet's gateway. The server's sshd (0.0.0.0:22) runs as PID 1 of its own PID namespace, so killing that
PID 1 powers the server off: every process it ever started ends at once, as in a VM. Its own mount
namespace binds the folder's ``disk/`` at /var/lib/cloudml-os and ``etc/`` at /etc/cloudml-os, so every
server has a disk of its own at the path a real image has, and an empty tmpfs at /store of its own (where the
platform's nodes mount their project's objects; nothing a server makes there reaches this host's /store, the
local driver's mount point); everything else is this host's file system.

From the user data, as cloud-init does: authorized keys; ``bootcmd`` (every boot) and ``write_files``
(first boot, only under the two mapped folders) before sshd starts; ``runcmd`` and shell-script parts
inside the server after sshd is up; then the host key printed to the console as ``cc_keys_to_console``
prints it, so clients pin it instead of trusting on first use. This module knows nothing of OpenStack
and must not talk to any service (``nova.py`` does).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import email
import email.policy
import gzip
import io
import os
import posixpath
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from cloudml_os.cloud.local import (
    NODE_ENVIRONMENT,
    RUN_SSHD,
    SSHD,
    UNSHARE,
    accepts_tcp,
    alive,
    namespace_init,
    sigkill,
    sshd_config,
    tail,
    write_host_key,
)

# Folders of a server's own disk: path inside the server -> sub-folder of the server's folder.
MAPPED_FOLDERS = {"/var/lib/cloudml-os": "disk", "/etc/cloudml-os": "etc"}
STORE_MOUNT_POINT = "/store"  # a tmpfs of each server's own (see _INIT_SCRIPT)
HOST_KEY = "ssh_host_ed25519_key"
CLOUD_INIT_VERSION = "24.4"
SSH_PORT = 22
# PID 1 of the server: sets the hostname, binds the server's folders, runs cloud-init's init stage (bootcmd,
# write_files) with its output on the console, then becomes sshd; so sshd accepts nobody before that stage ends,
# as cloud-init.service runs before sshd.service in an image.
_INIT_SCRIPT = """hostname "$1" && mount --bind "$2" /var/lib/cloudml-os && mount --bind "$3" /etc/cloudml-os &&
mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev cmlos-vm-store /store || exit 1
/bin/sh "$7" 2>&1 | while IFS= read -r line; do printf 'cloud-init[1]: %s\\n' "$line"; done >> "$8"
exec "$4" -D -f "$5" -E "$6"
"""
# cloud-config keys this emulation acts on, and keys whose wish the emulated server already fulfils (no
# password logins, fresh host keys); the console names any other key as ignored.
_SUPPORTED_KEYS = {"ssh_authorized_keys", "write_files", "runcmd", "bootcmd", "ssh_genkeytypes",
                   "ssh_key_console_blacklist", "ssh_fp_console_blacklist", "ssh", "ssh_pwauth", "ssh_deletekeys"}
_WRITE_FILE_ENCODINGS = {
    "b64": ("base64",), "base64": ("base64",), "gz": ("gzip",), "gzip": ("gzip",),
    "gz+b64": ("base64", "gzip"), "gz+base64": ("base64", "gzip"), "gzip+b64": ("base64", "gzip"),
    "gzip+base64": ("base64", "gzip"), "text/plain": (),
}


class BootError(RuntimeError):
    """The server could not be started; the message says why (Nova shows it as the server's fault)."""


@dataclasses.dataclass(frozen=True)
class Interface:
    """One NIC of a server: its MAC, its addresses in CIDR form (``10.231.2.5/24``) and its gateway."""

    mac: str
    addresses: tuple[str, ...]
    gateway: str | None = None


@dataclasses.dataclass
class UserData:
    """What this emulation does with a server's user data (the parts of cloud-config it supports)."""

    authorized_keys: list[str] = dataclasses.field(default_factory=list)
    bootcmd: list[str] = dataclasses.field(default_factory=list)
    write_files: list[dict] = dataclasses.field(default_factory=list)
    runcmd: list[str] = dataclasses.field(default_factory=list)
    scripts: list[str] = dataclasses.field(default_factory=list)
    # Key types whose keys (fingerprints) the console must not show; emit_keys False shows none.
    key_console_blacklist: list[str] = dataclasses.field(default_factory=list)
    fingerprint_console_blacklist: list[str] = dataclasses.field(default_factory=list)
    emit_keys: bool = True
    warnings: list[str] = dataclasses.field(default_factory=list)


def parse_user_data(raw: bytes | None) -> UserData:
    """Read user data as cloud-init does: gzip, MIME multipart, ``#cloud-config`` and ``#!`` scripts."""
    parsed = UserData()
    if not raw:
        return parsed
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            parsed.warnings.append(f"Failed decompressing user data: {exc}")
            return parsed
    text = raw.decode("utf-8", errors="replace")
    head = text.lstrip()[:200].lower()
    if head.startswith(("content-type:", "mime-version:")):
        message = email.message_from_string(text, policy=email.policy.compat32)
        parts = [part for part in message.walk() if not part.is_multipart()]
        for part in parts:
            payload = part.get_payload(decode=True) or b""
            _add_part(parsed, part.get_content_type(), payload.decode("utf-8", errors="replace"))
    elif text.startswith("#cloud-config"):
        _add_part(parsed, "text/cloud-config", text)
    elif text.startswith("#!"):
        _add_part(parsed, "text/x-shellscript", text)
    else:
        parsed.warnings.append(f"Unhandled non-multipart (text/x-not-multipart) userdata: {raw[:40]!r}...")
    return parsed


def _add_part(parsed: UserData, content_type: str, text: str) -> None:
    if content_type == "text/x-shellscript":
        parsed.scripts.append(text)
        return
    if content_type != "text/cloud-config":
        parsed.warnings.append(f"Unhandled user data part of type {content_type}")
        return
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        parsed.warnings.append(f"Failed loading yaml blob: {exc}")
        return
    if not isinstance(config, dict):
        parsed.warnings.append("cloud-config is not a mapping; ignored")
        return
    keys = config.get("ssh_authorized_keys") or []
    parsed.authorized_keys.extend(str(key).strip() for key in keys if str(key).strip())
    parsed.write_files.extend(entry for entry in config.get("write_files") or [] if isinstance(entry, dict))
    parsed.bootcmd.extend(_commands(parsed, "bootcmd", config.get("bootcmd")))
    parsed.runcmd.extend(_commands(parsed, "runcmd", config.get("runcmd")))
    parsed.key_console_blacklist.extend(str(t) for t in config.get("ssh_key_console_blacklist") or [])
    parsed.fingerprint_console_blacklist.extend(str(t) for t in config.get("ssh_fp_console_blacklist") or [])
    ssh = config.get("ssh")
    if isinstance(ssh, dict) and ssh.get("emit_keys_to_console") is False:
        parsed.emit_keys = False
    key_types = config.get("ssh_genkeytypes")
    if key_types is not None and list(key_types) != ["ed25519"]:
        parsed.warnings.append(f"ssh_genkeytypes {key_types}: the emulated Nova makes one ed25519 host key")
    if config.get("ssh_pwauth") is True:
        parsed.warnings.append("ssh_pwauth: the emulated Nova's sshd takes keys only")
    ignored = sorted(set(config) - _SUPPORTED_KEYS)
    if ignored:
        parsed.warnings.append(f"the emulated Nova ignores cloud-config keys: {', '.join(ignored)}")


def _commands(parsed: UserData, module: str, commands: object) -> list[str]:
    """Shell lines of a bootcmd/runcmd list, as cloud-init's shellify makes them (a list is quoted word by word)."""
    lines = []
    for command in commands if isinstance(commands, list) else []:
        if isinstance(command, str):
            lines.append(command)
        elif isinstance(command, list):
            lines.append(shlex.join(str(word) for word in command))
        else:
            parsed.warnings.append(f"{module} entry {command!r} is neither a string nor a list; skipped")
    return lines


# -- host setup ------------------------------------------------------------------------------------


def ensure_bridge(name: str, address: str) -> None:
    """Create the Linux bridge ``name`` holding ``address`` (CIDR) unless it exists; bring it up."""
    if not Path(f"/sys/class/net/{name}").exists():
        _ip("link", "add", name, "type", "bridge")
    addresses = _ip("-o", "addr", "show", "dev", name).split()
    if address not in addresses:
        _ip("addr", "add", address, "dev", name)
    _ip("link", "set", name, "up")


def remove_bridge(name: str) -> None:
    if Path(f"/sys/class/net/{name}").exists():
        _ip("link", "del", name, check=False)


def ensure_mount_points() -> None:
    """Empty folders on this host where every server binds its own disk (mount points need a folder)."""
    for path in (*MAPPED_FOLDERS, STORE_MOUNT_POINT):
        Path(path).mkdir(parents=True, exist_ok=True)
    RUN_SSHD.mkdir(mode=0o755, parents=True, exist_ok=True)


def remove_leftovers(netns_prefix: str, link_prefix: str) -> list[str]:
    """Kill the processes of, and delete, every network namespace and host link named with these prefixes.

    What a crashed earlier run of the same emulator left; returns the names removed.
    """
    removed = []
    for name in list_netns():
        if name.startswith(netns_prefix):
            _kill_netns_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for link in os.listdir("/sys/class/net"):
        if link.startswith(link_prefix):
            _ip("link", "del", link, check=False)
            removed.append(link)
    return removed


def list_netns() -> list[str]:
    listed = _ip("netns", "list")
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


# -- one server --------------------------------------------------------------------------------------


class Node:
    """One emulated server: its folder, network namespace and sshd; see the module docstring.

    :param folder: the server's own folder (created; removed by :meth:`destroy`).
    :param netns: the network namespace's name.
    :param link_prefix: host-side veth names are this plus the NIC's index (at most 14 characters).
    :param bridge: the Linux bridge every NIC is plugged into.
    :param hostname: the server's hostname (also the host key's ``root@HOSTNAME`` comment).
    """

    def __init__(self, folder: Path, *, netns: str, link_prefix: str, bridge: str, hostname: str) -> None:
        if len(link_prefix) > 14:
            raise ValueError(f"link prefix {link_prefix!r} leaves no room for a NIC index in 15 characters")
        self.folder = folder
        self.netns = netns
        self.link_prefix = link_prefix
        self.bridge = bridge
        self.hostname = hostname
        self._process: subprocess.Popen[bytes] | None = None
        self._powered_on_at = time.monotonic()
        self._console_lock = threading.Lock()
        self.host_key = ""

    @property
    def console_path(self) -> Path:
        return self.folder / "console.log"

    @property
    def ssh_folder(self) -> Path:
        return self.folder / "ssh"

    def init_pid(self) -> int | None:
        """Host pid of the server's PID 1 (its sshd), if it runs."""
        return None if self._process is None else namespace_init(self._process.pid)

    # -- network --------------------------------------------------------------------------------

    def plug(self, interfaces: Sequence[Interface]) -> None:
        """Create the network namespace with one veth per interface, addressed and routed as the port says."""
        _ip("netns", "add", self.netns)
        _ip("-n", self.netns, "link", "set", "lo", "up")
        default_route = None
        for index, interface in enumerate(interfaces):
            host_end, nic = f"{self.link_prefix}{index}", f"eth{index}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", nic, "address", interface.mac,
                "netns", self.netns)
            _ip("link", "set", host_end, "master", self.bridge, "up")
            for address in interface.addresses:
                _ip("-n", self.netns, "addr", "add", address, "dev", nic)
            _ip("-n", self.netns, "link", "set", nic, "up")
            if default_route is None and interface.gateway:
                default_route = (interface.gateway, nic)
        if default_route is not None:
            _ip("-n", self.netns, "route", "add", "default", "via", default_route[0], "dev", default_route[1])

    def unplug(self) -> None:
        """Delete the network namespace (which deletes its veths) after killing whatever still runs in it."""
        if self.netns in list_netns():
            _kill_netns_processes(self.netns)
            _ip("netns", "del", self.netns, check=False)
        for link in os.listdir("/sys/class/net"):
            if link.startswith(self.link_prefix) and link[len(self.link_prefix):].isdigit():
                _ip("link", "del", link, check=False)

    # -- disk and first boot --------------------------------------------------------------------

    def prepare(self, authorized_keys: Sequence[str], user_data: UserData) -> None:
        """Make the server's disk, host key, authorized keys and sshd_config (once, like an image's first boot)."""
        for sub in (*MAPPED_FOLDERS.values(), "ssh", "cloud/scripts"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        if not (self.ssh_folder / HOST_KEY).exists():
            self.host_key = write_host_key(self.ssh_folder, HOST_KEY, f"root@{self.hostname}")
        else:
            self.host_key = (self.ssh_folder / f"{HOST_KEY}.pub").read_text().strip()
        keys = [key.strip() for key in (*authorized_keys, *user_data.authorized_keys) if key.strip()]
        (self.ssh_folder / "authorized_keys").write_text("".join(f"{key}\n" for key in keys))
        (self.ssh_folder / "sshd_config").write_text(sshd_config(
            listen_address="0.0.0.0", port=SSH_PORT, host_key=self.ssh_folder / HOST_KEY,
            authorized_keys=self.ssh_folder / "authorized_keys", pid_file=self.ssh_folder / "sshd.pid",
            environment={}))

    @property
    def first_boot_done(self) -> bool:
        return (self.folder / "cloud" / "instance-done").exists()

    # -- power ----------------------------------------------------------------------------------

    def power_on(self, user_data: UserData, interfaces: Sequence[Interface]) -> None:
        """Boot: PID 1 of new PID, mount, UTS and IPC namespaces in the netns runs cloud-init's init stage, then sshd.

        The init stage runs ``bootcmd`` at every boot and ``write_files`` (those not deferred) at the first.
        """
        self._powered_on_at = time.monotonic()
        self._console_kernel("Linux version (cloudml-os test cloud: emulated Nova server)")
        self._console_kernel(f"Booting {self.hostname}: network namespace {self.netns}")
        self._console_cloud_init(f"Cloud-init v. {CLOUD_INIT_VERSION} running 'init' at {_rfc2822()}. "
                                 f"Up {self._uptime():.2f} seconds.")
        for index, interface in enumerate(interfaces):
            for address in interface.addresses:
                self._console_cloud_init(f"ci-info: | eth{index} | True | {address} | global | {interface.mac} |")
        stage = ["set -u"]
        if user_data.bootcmd:
            bootcmd = self.folder / "cloud" / "bootcmd"
            bootcmd.write_text("#!/bin/sh\n" + "\n".join(user_data.bootcmd) + "\n")
            stage.append(f"INSTANCE_ID={shlex.quote(self.hostname)} /bin/sh {shlex.quote(str(bootcmd))} || "
                         "echo 'cc_bootcmd.py[WARNING]: Failed to run bootcmd module bootcmd'")
        if not self.first_boot_done:
            for warning in user_data.warnings:
                self._console_log("util.py", "WARNING", warning)
            stage.extend(self._write_file_commands(entry) for entry in user_data.write_files
                         if not entry.get("defer"))
        (self.folder / "cloud" / "init-stage").write_text("\n".join(stage) + "\n")
        argv = ["ip", "netns", "exec", self.netns, UNSHARE, "--pid", "--fork", "--kill-child", "--mount-proc",
                "--uts", "--ipc", "/bin/sh", "-c", _INIT_SCRIPT, "cmlos-node-init", self.hostname,
                str(self.folder / MAPPED_FOLDERS["/var/lib/cloudml-os"]),
                str(self.folder / MAPPED_FOLDERS["/etc/cloudml-os"]), SSHD, str(self.ssh_folder / "sshd_config"),
                str(self.folder / "sshd.log"), str(self.folder / "cloud" / "init-stage"), str(self.console_path)]
        with open(self.folder / "boot.log", "ab") as log:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=NODE_ENVIRONMENT, cwd="/")

    def wait_ready(self, address: str | None, timeout: float) -> None:
        """Wait until sshd accepts TCP on ``address`` (or, without one this host routes, says it listens).

        :raises BootError: PID 1 died, or ``timeout`` seconds passed.
        """
        assert self._process is not None, "power_on first"
        deadline = time.monotonic() + timeout
        while True:
            init_pid = namespace_init(self._process.pid)
            if init_pid is not None:
                if address is not None and accepts_tcp(address, SSH_PORT):
                    break
                if address is None and b"Server listening on" in _read(self.folder / "sshd.log"):
                    break
            if self._process.poll() is not None:
                raise BootError(f"the server's init exited with {self._process.returncode}: "
                                f"{tail(self.folder / 'boot.log', 500)} {tail(self.folder / 'sshd.log', 500)}")
            if time.monotonic() > deadline:
                raise BootError(f"sshd did not accept connections on {address}:{SSH_PORT} within {timeout:g}s")
            time.sleep(0.02)
        self._console_kernel(f"sshd listening on 0.0.0.0 port {SSH_PORT} (PID 1, host pid {init_pid})")

    def power_off(self) -> None:
        """Kill PID 1 of the server (which ends every process in it) and whatever else runs in its netns."""
        init_pid = self.init_pid()
        if init_pid is not None:
            sigkill(init_pid)
        # unshare reaps PID 1 and exits by itself; killed before that, it would leave PID 1 a zombie.
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                sigkill(self._process.pid)
                self._process.wait(timeout=10)
        if init_pid is not None:
            deadline = time.monotonic() + 10
            while alive(init_pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.netns in list_netns():
            _kill_netns_processes(self.netns)
        self._process = None

    def destroy(self) -> None:
        """Power off, unplug and remove the server's folder."""
        self.power_off()
        self.unplug()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- cloud-init ----------------------------------------------------------------------------

    def cloud_init_final(self, user_data: UserData, still_wanted: Callable[[], bool]) -> None:
        """cloud-init's final stage, inside the running server: scripts and runcmd, host keys, final message.

        Runs only at first boot (per instance) except for the final message; stops early once
        ``still_wanted()`` turns false (the server was deleted or powered off meanwhile).
        """
        self._console_cloud_init(f"Cloud-init v. {CLOUD_INIT_VERSION} running 'modules:final' at {_rfc2822()}. "
                                 f"Up {self._uptime():.2f} seconds.")
        if not self.first_boot_done:
            scripts = self.folder / "cloud" / "scripts"
            paths = []
            deferred = [self._write_file_commands(entry) for entry in user_data.write_files if entry.get("defer")]
            if deferred:
                paths.append(scripts / "deferred-write-files")
                paths[-1].write_text("#!/bin/sh\n" + "\n".join(deferred) + "\n")
            for number, text in enumerate(user_data.scripts, 1):
                paths.append(scripts / f"part-{number:03d}")
                paths[-1].write_text(text)
            if user_data.runcmd:
                paths.append(scripts / "runcmd")
                paths[-1].write_text("#!/bin/sh\n" + "\n".join(user_data.runcmd) + "\n")
            failed = False
            for path in paths:
                path.chmod(0o700)
                if not still_wanted():
                    return
                failed |= not self._run_inside(path)
            if failed:
                self._console_log("cc_scripts_user.py", "WARNING",
                                  "Failed to run module scripts_user (scripts in /var/lib/cloud/instance/scripts)")
            if not still_wanted():
                return
            self._keys_to_console(user_data)
            (self.folder / "cloud" / "instance-done").write_text(f"{time.time()}\n")
        self._console_cloud_init(f"Cloud-init v. {CLOUD_INIT_VERSION} finished at {_rfc2822()}. Datasource "
                                 f"DataSourceOpenStackLocal [net,ver=2].  Up {self._uptime():.2f} seconds")

    def _write_file_commands(self, entry: dict) -> str:
        """Shell commands writing one ``write_files`` entry inside the server (a refusal goes to the console)."""
        path = str(entry.get("path") or "")
        if self.map_path(path) is None:
            self._console_log("cc_write_files.py", "ERROR",
                              f"refusing to write {path!r}: the emulated Nova maps only "
                              f"{' and '.join(MAPPED_FOLDERS)} into a server")
            return ":"
        try:
            content = _decode_content(entry.get("content", ""), str(entry.get("encoding") or "text/plain"))
            permissions = f"{int(str(entry.get('permissions') or '0644'), 8):o}"
        except (ValueError, binascii.Error, OSError) as exc:
            self._console_log("cc_write_files.py", "ERROR", f"cannot write {path}: {exc}")
            return ":"
        target = shlex.quote(posixpath.normpath(path))
        redirect = ">>" if entry.get("append") else ">"
        return (f"mkdir -p {shlex.quote(posixpath.dirname(posixpath.normpath(path)))} && "
                f"printf %s {shlex.quote(base64.b64encode(content).decode())} | base64 -d {redirect} {target} && "
                f"chmod {permissions} {target}")

    def map_path(self, path: str) -> Path | None:
        """This host's path of ``path`` inside the server, if it lies on the server's own disk."""
        normal = posixpath.normpath(path)
        for inside, sub in MAPPED_FOLDERS.items():
            if normal.startswith(inside + "/"):
                return self.folder / sub / normal[len(inside) + 1:]
        return None

    def _run_inside(self, script: Path) -> bool:
        """Run ``script`` in the server's namespaces (as root, cwd /), its output going to the console."""
        init_pid = self.init_pid()
        if init_pid is None:
            return False
        argv = ["nsenter", "--target", str(init_pid), "--mount", "--uts", "--ipc", "--net", "--pid", "--",
                "/bin/sh", str(script)]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env={**NODE_ENVIRONMENT, "HOME": "/root"}, cwd="/", start_new_session=True)
        # A background process the script starts keeps the pipe open: the script's end, not the pipe's,
        # ends this step, and the reader goes on copying that process's output as a console would.
        reader = threading.Thread(target=self._copy_to_console, args=(process.stdout,), daemon=True)
        reader.start()
        status = process.wait()
        reader.join(timeout=0.5)
        return status == 0

    def _copy_to_console(self, stream: io.BufferedReader) -> None:
        with stream:
            for line in stream:
                self._console_cloud_init(line.decode(errors="replace").rstrip("\n"))

    def _keys_to_console(self, user_data: UserData) -> None:
        """The host key blocks as cloud-init's keys-to-console module prints them in released images.

        Its helper (write-ssh-key-fingerprints) logs the fingerprint block through ``logger -s -t ec2`` (hence
        the ``<14>DATE ec2:`` prefix) and prints the KEYS block as is; key types on the blacklists are left out.
        """
        if not user_data.emit_keys:
            return
        public = self.ssh_folder / f"{HOST_KEY}.pub"
        key_type = public.read_text().split()[0]
        fingerprints = []
        if key_type not in user_data.fingerprint_console_blacklist:
            fingerprints.append(subprocess.run(["ssh-keygen", "-l", "-f", str(public)], capture_output=True,
                                               text=True, check=True).stdout.strip())
        keys = [public.read_text().strip()] if key_type not in user_data.key_console_blacklist else []
        stamp = time.strftime("%b %e %H:%M:%S")
        logged = ["", "#" * 61, "-----BEGIN SSH HOST KEY FINGERPRINTS-----", *fingerprints,
                  "-----END SSH HOST KEY FINGERPRINTS-----", "#" * 61]
        self._console("\n".join([*(f"<14>{stamp} ec2: {line}" for line in logged),
                                 "-----BEGIN SSH HOST KEY KEYS-----", *keys, "-----END SSH HOST KEY KEYS-----"]))

    # -- console --------------------------------------------------------------------------------

    def console_output(self, length: int | None = None) -> str:
        """The console log, or its last ``length`` lines."""
        text = _read(self.console_path).decode(errors="replace")
        if length is None:
            return text
        if length <= 0:
            return ""
        lines = text.splitlines(keepends=True)
        return "".join(lines[-length:])

    def console_note(self, message: str) -> None:
        """A line from the "hypervisor" on the console (what the emulator itself wants the user to see)."""
        self._console_kernel(message)

    def _uptime(self) -> float:
        return time.monotonic() - self._powered_on_at

    def _console(self, text: str) -> None:
        with self._console_lock, open(self.console_path, "a") as console:
            console.write(text + "\n")

    def _console_kernel(self, message: str) -> None:
        self._console(f"[{self._uptime():12.6f}] {message}")

    def _console_cloud_init(self, message: str) -> None:
        self._console(f"[{self._uptime():12.6f}] cloud-init[{self.init_pid() or 1}]: {message}")

    def _console_log(self, module: str, level: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S,000")
        self._console_cloud_init(f"{stamp} - {module}[{level}]: {message}")


# -- helpers ---------------------------------------------------------------------------------------


def _decode_content(content: object, encoding: str) -> bytes:
    steps = _WRITE_FILE_ENCODINGS.get(encoding.lower())
    if steps is None:
        raise ValueError(f"unknown encoding {encoding!r}")
    data = content if isinstance(content, bytes) else str(content).encode()
    for step in steps:
        data = base64.b64decode(data) if step == "base64" else gzip.decompress(data)
    return data


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL every process in ``netns`` until none is left (a PID 1 first, so its namespace dies whole)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = [int(pid) for pid in _ip("netns", "pids", netns, check=False).split()]
        if not pids:
            return
        for pid in pids:
            sigkill(pid)
        time.sleep(0.02)
    raise BootError(f"processes in network namespace {netns} survived SIGKILL for 10s")


def _ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise BootError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def _read(path: Path) -> bytes:
    with contextlib.suppress(OSError):
        return path.read_bytes()
    return b""


def _rfc2822() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())

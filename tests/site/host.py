"""A Debian host for site.yml, made here: a debootstrap'ed root booted by systemd-nspawn (systemd as PID 1).

The root is made once and kept as a tarball under ``~/.cache/cloudml-os/site-host`` (debootstrap takes
minutes); each test host unpacks a fresh copy. The host has a network namespace of its own (a veth pair,
``10.233.N.1`` here and ``10.233.N.2`` there), so its PostgreSQL, RabbitMQ and nginx listen on their
standard ports without meeting this machine's own. It reaches Debian's mirror and PyPI through a
tinyproxy on this side of the pair (configured in the root's apt.conf and pip.conf, as a site behind a
proxy would be); downloaded .debs and pip's cache are bind-mounted from the cache folder so a second
test run downloads nothing. Ansible reaches the host over SSH with a generated client key, and the
host's key is pinned in a known_hosts file (never trusted on first use).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "cloudml-os" / "site-host"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What a freshly installed Debian server has that the playbooks rely on: systemd, sshd, Python, sudo.
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "openssh-server", "iproute2", "ca-certificates", "sudo")
PROXY_PORT = 3128
LOCAL_CA_FOLDER = Path("/usr/local/share/ca-certificates")


def base_root_tarball() -> Path:
    """The debootstrap'ed root as a tarball, made once per suite and package list."""
    digest = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(INCLUDE)}".encode()).hexdigest()[:12]
    tarball = CACHE / f"{SUITE}-{digest}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "debootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        root = CACHE / "debootstrap-root"
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(root),
                        MIRROR], check=True, capture_output=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
        shutil.rmtree(root)
    return tarball


@dataclasses.dataclass
class SiteHost:
    """A booted test host: where its root is, how Ansible reaches it."""

    name: str
    root: Path
    address: str
    private_key: Path
    known_hosts: Path
    workdir: Path
    netns: str
    processes: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    def inventory_vars(self) -> dict[str, str]:
        """Connection variables of the host in an inventory."""
        return {
            "ansible_host": self.address,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.private_key),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                                       f"-o IdentitiesOnly=yes",
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def stop(self) -> None:
        """Power the host off (SIGTERM makes nspawn shut systemd down), drop its network, remove its root."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", f"{self.netns}h"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_site_host(workdir: Path, instance: int) -> SiteHost:
    """Unpack a fresh root under ``workdir``, give it a network and boot it; return once sshd answers.

    :raises RuntimeError: the host did not boot; everything started so far is stopped first.
    """
    name = f"cmlsite{instance}"
    host_side, address = f"10.233.{instance}.1", f"10.233.{instance}.2"
    root = workdir / "root"
    host = SiteHost(name=name, root=root, address=address, private_key=workdir / "id_ed25519",
                    known_hosts=workdir / "known_hosts", workdir=workdir, netns=name)
    tarball = base_root_tarball()
    # A leftover of a run that was killed: its namespace and veth would block this one.
    host.stop()
    try:
        root.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tarball)], check=True)
        _prepare_root(host, host_side)
        _make_network(host, host_side)
        host.processes.append(_start_proxy(host, host_side))
        host.processes.append(_boot(host))
        _wait_for_ssh(host, timeout=180)
    except BaseException:
        host.stop()
        raise
    return host


def _prepare_root(host: SiteHost, proxy_address: str) -> None:
    root = host.root
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ansible@tests", "-f",
                    str(host.private_key)], check=True)
    host_key = host.workdir / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}", "-f", str(host_key)],
                   check=True)
    for old_key in (root / "etc" / "ssh").glob("ssh_host_*"):
        old_key.unlink()
    shutil.copy(host_key, root / "etc" / "ssh" / "ssh_host_ed25519_key")
    shutil.copy(host_key.with_suffix(".pub"), root / "etc" / "ssh" / "ssh_host_ed25519_key.pub")
    (root / "etc" / "ssh" / "ssh_host_ed25519_key").chmod(0o600)
    host.known_hosts.write_text(f"{host.address} {host_key.with_suffix('.pub').read_text().split(' ')[0]} "
                                f"{host_key.with_suffix('.pub').read_text().split(' ')[1]}\n")
    ssh_dir = root / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(host.private_key.with_suffix(".pub").read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    (root / "etc" / "machine-id").write_text("")  # a new one at every boot, as a cloned image should
    (root / "etc" / "hostname").write_text(f"{host.name}\n")
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host.name}\n")
    proxy = f"http://{proxy_address}:{PROXY_PORT}"
    (root / "etc" / "apt" / "apt.conf.d" / "90proxy").write_text(f'Acquire::http::Proxy "{proxy}";\n')
    # This machine's own trusted CAs (an egress proxy may intercept TLS), as a site installs its CA on hosts.
    for certificate in LOCAL_CA_FOLDER.glob("*.crt"):
        shutil.copy(certificate, root / "usr" / "local" / "share" / "ca-certificates" / certificate.name)
    subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, capture_output=True)
    (root / "etc" / "pip.conf").write_text(f"[global]\nproxy = {proxy}\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    # Only what sshd needs at boot: no getty on the (absent) console, no daily apt jobs mid-test.
    for unit in ("console-getty.service", "apt-daily.timer", "apt-daily-upgrade.timer"):
        (root / "etc" / "systemd" / "system" / unit).unlink(missing_ok=True)
        (root / "etc" / "systemd" / "system" / unit).symlink_to("/dev/null")


def _make_network(host: SiteHost, host_side: str) -> None:
    inside, outside = f"{host.netns}c", f"{host.netns}h"
    for command in (
        ["ip", "netns", "add", host.netns],
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
        ["ip", "link", "set", inside, "netns", host.netns],
        ["ip", "addr", "add", f"{host_side}/24", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", inside],
        ["ip", "-n", host.netns, "link", "set", inside, "up"],
        ["ip", "-n", host.netns, "link", "set", "lo", "up"],
        ["ip", "-n", host.netns, "route", "add", "default", "via", host_side],
    ):
        subprocess.run(command, check=True, capture_output=True)


def _start_proxy(host: SiteHost, listen: str) -> subprocess.Popen:
    config = host.workdir / "tinyproxy.conf"
    config.write_text(f"Port {PROXY_PORT}\nListen {listen}\nTimeout 600\nAllow {listen.rsplit('.', 1)[0]}.0/24\n"
                      "ConnectPort 443\nConnectPort 80\nLogLevel Warning\nMaxClients 50\n")
    with open(host.workdir / "tinyproxy.log", "ab") as log:
        process = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection((listen, PROXY_PORT), timeout=1):
            return process
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"tinyproxy did not start; see {host.workdir / 'tinyproxy.log'}")
        time.sleep(0.2)


def _boot(host: SiteHost) -> subprocess.Popen:
    caches = {"apt-archives": "/var/cache/apt/archives", "apt-lists": "/var/lib/apt/lists", "pip": "/root/.cache/pip"}
    binds = []
    for name, target in caches.items():
        (CACHE / name / "partial").mkdir(parents=True, exist_ok=True)
        binds.append(f"--bind={CACHE / name}:{target}")
    # --register=no --keep-unit: this machine's PID 1 is not systemd, so there is no machined to register with.
    command = ["systemd-nspawn", "--quiet", "-D", str(host.root), "-M", host.name, "--register=no", "--keep-unit",
               f"--network-namespace-path=/run/netns/{host.netns}", "--console=passive", *binds, "--boot"]
    with open(host.workdir / "console.log", "ab") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_ssh(host: SiteHost, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host.address, 22), timeout=2) as sock:
            if sock.recv(64).startswith(b"SSH-"):
                return
        if host.processes[-1].poll() is not None:
            raise RuntimeError(f"the host exited while booting; see {host.workdir / 'console.log'}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the host's sshd did not answer within {timeout:g}s; see {host.workdir}")
        time.sleep(1)

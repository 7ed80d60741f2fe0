"""What every part of the test cloud shares: where it lives, its ports, its passwords, how it spawns.

Each service module (``keystone``/``heat``/``glance`` in services.py, ``neutron.py``, ``swift.py``,
``nova.py``) takes a :class:`CloudContext` and starts its processes through :meth:`CloudContext.spawn`,
so that one teardown stops them all and every log lands in ``root/logs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

REGION = "RegionOne"

# Port offsets inside one cloud's block of 100 ports (35000 + 100 * instance), out of the way of the
# platform's own ports (API on free ports, nodes from 20000).
PORT_OFFSETS = {"keystone": 0, "heat": 1, "glance": 2, "neutron": 3, "swift": 4, "nova": 5,
                "swift-account": 6, "swift-container": 7, "swift-object": 8}


@dataclasses.dataclass
class CloudContext:
    """One test cloud's folder, virtualenv, addresses and credentials.

    :param root: folder holding every service's configuration, database files and ``logs/``.
    :param venv: the OpenStack services' virtualenv (built by ``services.ensure_services_venv``).
    :param instance: 0 for the test session's cloud; other numbers let several clouds run side by side
        (their own ports, RabbitMQ vhost, MariaDB databases, bridge and tenant subnet).
    """

    root: Path
    venv: Path
    instance: int = 0
    host: str = "127.0.0.1"
    admin_password: str = "admin-secret"
    service_password: str = "service-secret"
    processes: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    log_paths: dict[int, Path] = dataclasses.field(default_factory=dict)

    def port(self, service: str) -> int:
        return 35000 + 100 * self.instance + PORT_OFFSETS[service]

    def reserve_ports(self) -> None:
        """Keep the kernel from handing this cloud's ports to outgoing connections (they lie in the
        ephemeral range, 32768–60999 here): a service finding its port taken by one fails to start.
        Best effort: without the right to change the setting, the ports stay as they are."""
        first = self.port("keystone")
        block = f"{first}-{first + 99}"
        setting = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
        try:
            reserved = [r for r in setting.read_text().strip().split(",") if r]
            if block not in reserved:
                setting.write_text(",".join([*reserved, block]))
        except OSError:
            pass

    def ports_free(self) -> bool:
        """Whether every port of this cloud can be bound now (a connection that took one from the
        ephemeral range before :meth:`reserve_ports` keeps it until it closes)."""
        for service in PORT_OFFSETS:
            try:
                socket.create_server(("0.0.0.0", self.port(service))).close()
            except OSError:
                return False
        return True

    def url(self, service: str, path: str = "") -> str:
        return f"http://{self.host}:{self.port(service)}{path}"

    # The tenant network the emulated servers live on: a Linux bridge on this host holds the gateway
    # address, each server is a network namespace plugged into it with a veth pair.
    @property
    def tenant_cidr(self) -> str:
        return f"10.231.{self.instance}.0/24"

    @property
    def tenant_gateway(self) -> str:
        return f"10.231.{self.instance}.1"

    @property
    def tenant_bridge(self) -> str:
        return f"cmlos-br{self.instance}"

    def mariadb_url(self, database: str) -> str:
        """A MariaDB database of this cloud (root, no password, as the machine's MariaDB allows)."""
        return f"mysql+pymysql://root@127.0.0.1:3306/cmlos{self.instance}_{database}"

    def rabbit_url(self) -> str:
        """This cloud's own RabbitMQ vhost (created if missing), so two clouds' RPC never mix."""
        vhost = f"cmlos-testcloud-{self.instance}"
        listed = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, check=True)
        if vhost not in listed.stdout.split():
            subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
            subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                           check=True, capture_output=True)
        return f"rabbit://guest:guest@127.0.0.1:5672/{vhost}"

    @property
    def auth_url(self) -> str:
        return self.url("keystone", "/v3")

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start a service process in its own session, logging to ``root/logs/NAME.log``."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        self.processes.append(process)
        self.log_paths[process.pid] = logs / f"{name}.log"
        return process

    def log_tail(self, process: subprocess.Popen, lines: int = 8) -> str:
        """The last lines ``process`` logged: what a failed start says, kept in the error (CI keeps no logs)."""
        path = self.log_paths.get(process.pid)
        text = path.read_text(errors="replace") if path and path.exists() else ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def wait_http(self, url: str, process: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
        """Wait until ``url`` answers any HTTP status; fail early if ``process`` exits."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(url, timeout=2)
                return
            except requests.RequestException:
                pass
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered; "
                                   f"see {self.root / 'logs'}; it ended with:\n{self.log_tail(process)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:g}s; see {self.root / 'logs'}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM every process group, then SIGKILL what is left."""
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()



def free_instance(first: int) -> int:
    """The first instance from ``first`` on whose ports, once reserved, nothing holds: a cloud started
    beside the session's one must not find a long-lived outgoing connection sitting on its port."""
    for instance in range(first, 250):
        ctx = CloudContext(root=Path("."), venv=Path("."), instance=instance)
        ctx.reserve_ports()
        if ctx.ports_free():
            return instance
    raise RuntimeError(f"no test cloud instance from {first} on has all its ports free")

"""``cloudml-os``: the server-side command (up, api, worker, beat, monitor, db, token, runtime, nodes).

``up`` is the embedded default in one foreground command: it migrates the database, builds the node
runtime if missing, and supervises one API server, one Celery worker, Celery beat (the reconciler's
clock) and the health monitor until interrupted, restarting any of them that dies (the others keep
serving; the step leases let a restarted worker's steps resume). The local driver's nodes outlive it, as
VMs outlive their control plane: ``up`` says which when it stops, ``nodes stop`` stops them, and the next
``up`` on the same data directory adopts them.
Settings come from ``--config``/``CLOUDML_OS_CONFIG``, the environment, then these flags.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cloudml_os.config import ConfigError, Settings, load_settings

UP_LOCK = "up.lock"  # in the data directory: held by the `up` that runs there
STOP_GRACE_SECONDS = 20.0  # SIGTERM → SIGKILL when `up` stops its children
NODES_SHOWN = 20  # nodes named one by one in `up`'s parting message


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        getattr(args, "config", None),
        data_dir=getattr(args, "data_dir", None),
        api_port=getattr(args, "port", None),
        api_host=getattr(args, "host", None),
    )


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from cloudml_os.store import migrate

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from cloudml_os.auth.tokens import create_token
    from cloudml_os.store import Store, migrate

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    try:
        token = create_token(Store.from_settings(settings), args.project, args.role, args.description)
    except ValueError as exc:
        print(f"cloudml-os: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_runtime_build(args: argparse.Namespace) -> int:
    from cloudml_os.runtimes import available_runtimes, ensure_runtime

    settings = _settings(args)
    for name in args.names or available_runtimes():
        print(ensure_runtime(name, settings.runtimes_dir))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from cloudml_os.platform import worker_celery

    settings = _settings(args)
    app = worker_celery(settings)
    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={args.concurrency}", f"--queues={settings.task_queue}",
        f"--loglevel={args.loglevel}", "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--hostname=cloudml-os-{os.getpid()}@%h",
    ])
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from cloudml_os.tasks import make_celery, run_beat

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    run_beat(make_celery(settings), str(settings.data_dir / "celerybeat-schedule"), args.loglevel)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from cloudml_os.platform import run_monitor

    run_monitor(_settings(args))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from cloudml_os.platform import wsgi_app

    settings = _settings(args)
    application = wsgi_app(settings)

    class Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.api_host}:{settings.api_port}")
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("workers", 1)
            self.cfg.set("threads", args.threads)  # a follow=true stream or a waiting prediction holds one
            self.cfg.set("worker_connections", 2 * args.threads)
            self.cfg.set("timeout", 0)  # log following holds a request open
            # Clients such as the ml v1 library keep connections idle between calls for a while; a
            # short keep-alive closes them under the client, which then fails its next write.
            self.cfg.set("keepalive", 120)
            self.cfg.set("accesslog", "-")

        def load(self):
            return application

    Server().run()
    return 0


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How ``up`` restarts a child that ended while it runs: like systemd's ``Restart=always``, with a delay that
    doubles from ``first_delay`` to ``max_delay`` while the child keeps ending within ``reset_after`` seconds of
    its start. It never gives up (systemd's ``StartLimitBurst`` would): a platform that keeps trying comes back by
    itself once the cause is gone (a database back up, memory freed); from ``loop_warning`` quick exits in a row
    on, each restart says loudly that the child keeps crashing."""

    first_delay: float = 1.0
    max_delay: float = 30.0
    reset_after: float = 60.0
    loop_warning: int = 5

    def delay(self, crashes: int) -> float:
        """Seconds before restarting a child that has ended ``crashes`` times in a row (1, 2, 4 … 30)."""
        return min(self.first_delay * 2 ** max(crashes - 1, 0), self.max_delay)


@dataclasses.dataclass
class _Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    crashes: int = 0  # exits in a row, each within the policy's reset_after of its start
    restart_at: float = 0.0


class Supervisor:
    """Keeps ``up``'s children running: starts each, restarts any that ends (see :class:`RestartPolicy`),
    stops them all on :meth:`stop`. A child is the leader of a process group of its own, so what it forked
    (gunicorn's workers) goes with it, and it gets SIGTERM if ``up`` dies, even by SIGKILL. Nodes are not in
    those groups (the local driver starts each in a session of its own): they outlive every child.

    :param commands: each child's name and argv.
    :param say: where the supervisor's messages go (one line each).
    """

    def __init__(self, commands: dict[str, list[str]], env: dict[str, str], policy: RestartPolicy = RestartPolicy(),
                 say: Callable[[str], None] | None = None) -> None:
        self._children = [_Child(name, list(argv)) for name, argv in commands.items()]
        self._env = env
        self._policy = policy
        self._say = say or _say

    def pids(self) -> dict[str, int]:
        """The running children's pids by name."""
        return {child.name: child.process.pid for child in self._children if child.process is not None}

    def start(self) -> None:
        for child in self._children:
            self._start(child, restarted=False)

    def check(self) -> None:
        """Notice children that ended and schedule their restart; restart those whose delay is over."""
        now = time.monotonic()
        for child in self._children:
            if child.process is None:
                if now >= child.restart_at:
                    try:
                        self._start(child, restarted=True)
                    except OSError as exc:  # no memory or pids left to fork: the cause of the crash, likely
                        child.crashes += 1
                        delay = self._policy.delay(child.crashes)
                        self._say(f"{child.name} could not be restarted ({exc}); trying again in {delay:g} s")
                        child.restart_at = now + delay
                continue
            code = child.process.poll()
            if code is None:
                continue
            _kill_group(child.process.pid)  # what it forked (an orphaned gunicorn worker holds the port)
            ran = now - child.started
            child.crashes = 1 if ran >= self._policy.reset_after else child.crashes + 1
            delay = self._policy.delay(child.crashes)
            message = (f"{child.name} (pid {child.process.pid}) {_how_it_ended(code)} after {ran:.0f} s; "
                       f"restarting it in {delay:g} s (the others keep running)")
            if child.crashes >= self._policy.loop_warning:
                message += (f". It has now ended {child.crashes} times in a row, each within "
                            f"{self._policy.reset_after:g} s of its start: it keeps crashing (its output is "
                            f"above). cloudml-os up keeps restarting it, every {self._policy.max_delay:g} s at "
                            "most, until it stays up or you stop cloudml-os up")
            self._say(message)
            child.process = None
            child.restart_at = now + delay

    def stop(self, grace: float) -> None:
        """SIGTERM every child, SIGKILL (with its group) any still there after ``grace`` seconds."""
        running = [child for child in self._children if child.process is not None]
        for child in running:
            child.process.terminate()
        deadline = time.monotonic() + grace
        for child in running:
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                self._say(f"{child.name} (pid {child.process.pid}) did not stop within {grace:g} s: killed")
                _kill_group(child.process.pid)
                child.process.wait()
            _kill_group(child.process.pid)
            child.process = None

    def _start(self, child: _Child, restarted: bool) -> None:
        child.process = subprocess.Popen(child.argv, env=self._env, process_group=0, preexec_fn=_end_with_parent)
        child.started = time.monotonic()
        self._say(f"{child.name} {'restarted' if restarted else 'started'} (pid {child.process.pid})")


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} cloudml-os up: {message}", file=sys.stderr, flush=True)


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def _end_with_parent() -> None:
    """In a child, before exec: SIGTERM when ``up`` dies, however it dies (a SIGKILLed ``up`` leaves no API
    holding the port). Runs between fork and exec, so it only calls into the already loaded libc."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


@contextlib.contextmanager
def _up_lock(data_dir: Path) -> Iterator[bool]:
    """Hold ``DATA_DIR/up.lock`` (an flock; the holder's pid inside) while ``up`` runs; yields False when
    another ``up`` holds it. ``nodes stop`` refuses to run while it is held."""
    with open(data_dir / UP_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield True


def _up_running(data_dir: Path) -> str | None:
    """The pid of the ``up`` running on ``data_dir``, or None."""
    path = data_dir / UP_LOCK
    if not path.exists():
        return None
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "?"
    return None


def _port_taken(host: str, port: int) -> str | None:
    """Why the API could not listen on ``host:port``, or None when it can (checked before it starts, so
    ``up`` stops at once rather than restarting an API that cannot bind)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return str(exc)
    return None


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with _up_lock(settings.data_dir) as locked:
        if not locked:
            print(f"cloudml-os: cloudml-os up already runs on {settings.data_dir} (pid "
                  f"{_up_running(settings.data_dir)}); stop it first or give another --data-dir", file=sys.stderr)
            return 1
        if problem := _port_taken(settings.api_host, settings.api_port):
            print(f"cloudml-os: the API cannot listen on {settings.api_host}:{settings.api_port}: {problem}; "
                  "stop what holds it or give another --port", file=sys.stderr)
            return 1
        return _run_up(args, settings)


def _run_up(args: argparse.Namespace, settings: Settings) -> int:
    from cloudml_os.runtimes import available_runtimes, ensure_runtime
    from cloudml_os.store import migrate

    migrate(settings.database_url)
    for name in available_runtimes():
        ensure_runtime(name, settings.runtimes_dir)
    env = {**os.environ, "CLOUDML_OS_DATA_DIR": str(settings.data_dir),
           "CLOUDML_OS_API_PORT": str(settings.api_port), "CLOUDML_OS_API_HOST": settings.api_host}
    if getattr(args, "config", None):
        env["CLOUDML_OS_CONFIG"] = str(Path(args.config).absolute())
    command = [sys.executable, "-m", "cloudml_os.cli"]
    supervisor = Supervisor({name: [*command, name] for name in ("worker", "api", "monitor", "beat")}, env)
    base = f"http://{settings.api_host}:{settings.api_port}"
    data_flag = f" --data-dir {settings.data_dir}" if getattr(args, "data_dir", None) else ""
    print(f"\ncloudml-os is starting on {base} (data in {settings.data_dir})\n"
          f"Get a token:   .venv/bin/cloudml-os token create --project my-project --role admin{data_flag}\n"
          f"Then:          curl -H 'Authorization: Bearer TOKEN' {base}/v1/projects/my-project/jobs\n"
          f"Stop with Ctrl-C.\n", flush=True)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        supervisor.start()
        while not stopping:
            supervisor.check()
            time.sleep(0.2)
    finally:
        _say(f"stopping: SIGTERM to every process, SIGKILL to those still there after {STOP_GRACE_SECONDS:g} s")
        supervisor.stop(grace=STOP_GRACE_SECONDS)
    if settings.driver == "local":
        _say_nodes_left(args, settings)
    return 0


def _say_nodes_left(args: argparse.Namespace, settings: Settings) -> None:
    """Say which local nodes outlive ``up`` and how to stop them (the next ``up`` adopts them)."""
    try:
        running = [node for node in local_nodes(settings) if node.running]
    except Exception as exc:  # stopping must end cleanly whatever went wrong; the operator gets the reason
        _say(f"stopped; could not list the local nodes that keep running: {exc}")
        return
    if not running:
        _say("stopped; no local node keeps running")
        return
    shown = "".join(f"\n  {node.cluster}/{node.name} at {node.address}:{node.ssh_port}"
                    for node in running[:NODES_SHOWN])
    if len(running) > NODES_SHOWN:
        shown += f"\n  … and {len(running) - NODES_SHOWN} more (cloudml-os nodes list)"
    config = f" --config {Path(args.config).absolute()}" if getattr(args, "config", None) else ""
    _say(f"stopped; {len(running)} local node(s) keep running with what runs on them (model servers, trainers), "
         f"as VMs outlive their control plane; the next cloudml-os up on {settings.data_dir} adopts them:{shown}\n"
         f"Stop them all with:  .venv/bin/cloudml-os nodes stop --all{config} --data-dir {settings.data_dir}")


# ---- local nodes -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalNode:
    cluster: str
    name: str
    address: str
    ssh_port: int
    running: bool  # its sshd (the namespace's PID 1) is alive


def local_nodes(settings: Settings) -> list[LocalNode]:
    """Every node of the local driver's clusters of this installation under ``settings.data_dir``, from the
    driver's own records (cluster.json, node.json) and whether its sshd runs."""
    from cloudml_os.cloud.base import load_driver

    return [LocalNode(cluster, info.name, info.address, info.ssh_port, running)
            for cluster, info, running in load_driver(settings).recorded_nodes()]


def _local_driver_only(settings: Settings) -> str | None:
    if settings.driver != "local":
        return (f"cloudml-os: `nodes` is for the local driver's nodes; this installation's driver is "
                f"{settings.driver!r}, whose clusters the cloud holds")
    return None


def cmd_nodes_list(args: argparse.Namespace) -> int:
    from cloudml_os.store import migrate

    settings = _settings(args)
    if problem := _local_driver_only(settings):
        print(problem, file=sys.stderr)
        return 2
    if not (settings.data_dir / "nodes" / "clusters").is_dir():
        print(f"cloudml-os: no local node in {settings.data_dir}", file=sys.stderr)
        return 0
    migrate(settings.database_url)  # the driver reads the installation's id from the database
    nodes = local_nodes(settings)
    if not nodes:
        print(f"cloudml-os: no local node in {settings.data_dir}", file=sys.stderr)
        return 0
    rows = [("CLUSTER", "NODE", "ADDRESS", "STATE")] + [
        (node.cluster, node.name, f"{node.address}:{node.ssh_port}", "running" if node.running else "stopped")
        for node in nodes]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_nodes_stop(args: argparse.Namespace) -> int:
    from cloudml_os.cloud.base import DriverError, load_driver
    from cloudml_os.store import migrate

    settings = _settings(args)
    if problem := _local_driver_only(settings):
        print(problem, file=sys.stderr)
        return 2
    if bool(args.clusters) == args.all:
        print("cloudml-os: name the clusters to stop, or give --all (not both)", file=sys.stderr)
        return 2
    if pid := _up_running(settings.data_dir):
        print(f"cloudml-os: cloudml-os up (pid {pid}) runs on {settings.data_dir}: stop it first (it would "
              "replace serving replicas as they go, and running jobs would lose their nodes)", file=sys.stderr)
        return 1
    driver = None
    clusters: list[str] = []
    if (settings.data_dir / "nodes" / "clusters").is_dir():
        migrate(settings.database_url)  # the driver reads the installation's id from the database
        driver = load_driver(settings)
        clusters = driver.list_clusters()
    if unknown := sorted(set(args.clusters) - set(clusters)):
        print(f"cloudml-os: no cluster {', '.join(unknown)} in {settings.data_dir} (cloudml-os nodes list "
              "shows them)", file=sys.stderr)
        return 1
    if driver is None or not clusters:
        print(f"cloudml-os: no local node in {settings.data_dir}", file=sys.stderr)
        return 0
    failed = False
    for cluster in args.clusters or clusters:
        try:
            driver.delete_cluster(cluster)
        except DriverError as exc:
            print(f"cloudml-os: cluster {cluster}: {exc}", file=sys.stderr)
            failed = True
        else:
            print(f"cloudml-os: stopped the nodes of cluster {cluster} and deleted them", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="TOML settings file (default: $CLOUDML_OS_CONFIG)")
    common.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="where data lives (default: ./var or $CLOUDML_OS_DATA_DIR)")
    parser = argparse.ArgumentParser(prog="cloudml-os", description=__doc__.splitlines()[0], parents=[common])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", parents=[common], help="run the whole platform in the foreground (embedded default)")
    up.add_argument("--port", type=int)
    up.add_argument("--host")
    up.set_defaults(func=cmd_up)

    api = commands.add_parser("api", parents=[common], help="serve the REST API")
    api.add_argument("--port", type=int)
    api.add_argument("--host")
    api.add_argument("--threads", type=int, default=1024, help="requests served at once (threads are created "
                     "as needed; an idle one costs little memory)")
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", parents=[common], help="run a Celery worker")
    worker.add_argument("--concurrency", type=int, default=8)
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    beat = commands.add_parser("beat", parents=[common],
                               help="send the reconciler's task on schedule (Celery beat; one or more)")
    beat.add_argument("--loglevel", default="INFO")
    beat.set_defaults(func=cmd_beat)

    monitor = commands.add_parser("monitor", parents=[common], help="probe serving replicas; eject and replace")
    monitor.set_defaults(func=cmd_monitor)

    db = commands.add_parser("db", parents=[common], help="database maintenance")
    db = db.add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", parents=[common], help="apply migrations").set_defaults(func=cmd_db_upgrade)

    token = commands.add_parser("token", parents=[common], help="API tokens")
    token = token.add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", parents=[common], help="print a new API token")
    create.add_argument("--project", required=True)
    create.add_argument("--role", required=True, choices=["admin", "member", "viewer"])
    create.add_argument("--description", default="")
    create.set_defaults(func=cmd_token_create)

    nodes = commands.add_parser("nodes", parents=[common], help="the local driver's nodes under the data directory")
    nodes = nodes.add_subparsers(dest="nodes_command", required=True)
    nodes.add_parser("list", parents=[common], help="every node: cluster, name, address, running or stopped"
                     ).set_defaults(func=cmd_nodes_list)
    stop = nodes.add_parser("stop", parents=[common],
                            help="stop and delete the nodes of the named clusters, or of all (--all); "
                                 "refused while cloudml-os up runs on the data directory")
    stop.add_argument("clusters", nargs="*", metavar="CLUSTER")
    stop.add_argument("--all", action="store_true", help="every cluster of this installation")
    stop.set_defaults(func=cmd_nodes_stop)

    runtime = commands.add_parser("runtime", parents=[common], help="node runtimes")
    runtime = runtime.add_subparsers(dest="runtime_command", required=True)
    build = runtime.add_parser("build", parents=[common], help="build framework runtimes (once; reused)")
    build.add_argument("names", nargs="*")
    build.set_defaults(func=cmd_runtime_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"cloudml-os: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

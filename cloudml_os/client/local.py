"""``cloudml local train``: run a trainer on this machine, alone or as a whole cluster, before submitting it.

What ``gcloud ai-platform local train`` is for Cloud ML Engine: the trainer runs exactly as a job's nodes
would run it, so its mistakes show in seconds instead of after a cluster was made. Without
``--distributed`` one process runs (a master alone, as the ``BASIC`` tier); with it, one process per role
of a CUSTOM topology (a master, ``--worker-count`` workers, ``--parameter-server-count`` parameter
servers), all on 127.0.0.1, each on a block of free ports of its own. Roles, argv, environment
(``TF_CONFIG``, ``DMLC_*``, torchrun's variables) and the success rule come from the platform's own
framework plugins, so what a trainer sees here is what it sees on a node.

As on the platform, where every node has a job directory of its own and the export step copies the
model out of the right one, the first export role (the chief, the master, MXNet's worker 0) writes into
``--job-dir`` itself and every other process gets a private copy of it (its checkpoints too, so ranks
that resume agree), removed at the end; a model exported elsewhere (ps-lite picks MXNet's rank 0 at run
time) is copied into ``--job-dir`` as the platform's export step would. Processes that share one
directory would race on their checkpoint files.

This module must import nothing of the server side (Flask, SQLAlchemy, Celery, paramiko, the API, the
store, the workflows): only the framework plugins and the machine-type record, which are pure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import click

from cloudml_os.config import MachineType
from cloudml_os.frameworks.base import (
    Framework,
    Member,
    Outcome,
    ProcessStatus,
    TopologyError,
    load_frameworks,
    topology_from_training_input,
)

ADDRESS = "127.0.0.1"
JOB_ID = "local_train"
# Every role runs on this machine; the topology still needs a machine type to resolve.
MACHINE_TYPE = MachineType("local", "local")
MACHINE_TYPES = {MACHINE_TYPE.name: MACHINE_TYPE}
DEFAULT_WORKER_COUNT = 2
# ps-lite cannot run several workers without a server (the MXNet plugin adds the scheduler itself).
DEFAULT_PARAMETER_SERVER_COUNT = {"MXNET": 1}
# As many ports per process as the local driver gives a node (settings.local_ports_per_node).
PORTS_PER_PROCESS = 10
# Below Linux's default ephemeral range (32768-60999), where no outgoing connection takes them meanwhile.
PORT_SEARCH_RANGE = (20000, 32768)
EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
STOP_GRACE_SECONDS = 5.0
POLL_SECONDS = 0.05
# Topology errors name v1 fields; here the user typed options.
OPTION_OF_FIELD = {
    "trainingInput.workerCount": "--worker-count",
    "trainingInput.parameterServerCount": "--parameter-server-count",
}
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class Interrupted(Exception):
    """SIGTERM (or SIGINT) reached the command; every process is stopped before it exits."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclasses.dataclass(frozen=True)
class PlannedProcess:
    """One process of the local run: where it listens, its argv, the plugin's variables, its job directory."""

    member: Member
    argv: list[str]
    environment: dict[str, str]
    job_dir: Path | None


def training_input(module_name: str, user_args: Sequence[str], framework: str, job_dir: Path | None,
                   worker_count: int = 0, parameter_server_count: int = 0) -> dict[str, Any]:
    """The v1 ``trainingInput`` a job with this topology would have: what ``TF_CONFIG``'s ``job`` shows."""
    fields: dict[str, Any] = {"scaleTier": "CUSTOM", "masterType": MACHINE_TYPE.name}
    if worker_count:
        fields.update(workerType=MACHINE_TYPE.name, workerCount=worker_count)
    if parameter_server_count:
        fields.update(parameterServerType=MACHINE_TYPE.name, parameterServerCount=parameter_server_count)
    fields.update(pythonModule=module_name, args=list(user_args), framework=framework)
    if job_dir is not None:
        fields["jobDir"] = str(job_dir)
    return fields


def plan(framework: Framework, fields: Mapping[str, Any], python: str, job_dir: Path | None,
         scratch: Path | None, port_blocks: Callable[[int], list[int]]) -> list[PlannedProcess]:
    """Every process the framework runs for ``fields``, in the plugin's role order.

    :param job_dir: ``--job-dir`` (absolute), the first export role's; None: no ``--job-dir`` at all.
    :param scratch: where the other roles' job directories go (``scratch/ROLE``) when ``job_dir`` is set.
    :param port_blocks: gives the first port of each of N free blocks of :data:`PORTS_PER_PROCESS` ports.
    :raises TopologyError: the framework cannot run this topology.
    """
    roles = framework.roles(topology_from_training_input(fields, MACHINE_TYPES), fields)
    firsts = port_blocks(len(roles))
    members = [Member(role, ADDRESS, first, first + PORTS_PER_PROCESS - 1)
               for role, first in zip(roles, firsts, strict=True)]
    primary = framework.export_roles(roles)[0]
    body = {"jobId": JOB_ID, "trainingInput": dict(fields)}
    planned = []
    for member in members:
        own_dir = None
        if job_dir is not None:
            own_dir = job_dir if member.role == primary or scratch is None else scratch / member.role.node_name
        argv = framework.command(member.role, python, fields, str(own_dir) if own_dir else "")
        if own_dir is None:
            argv = _without_job_dir(argv)
        planned.append(PlannedProcess(member, argv, framework.environment(member, members, body), own_dir))
    return planned


def _without_job_dir(argv: list[str]) -> list[str]:
    """The plugin's argv less its ``--job-dir ''``: gcloud passes none when the user gave none."""
    for index in range(len(argv) - 2, -1, -1):
        if argv[index] == "--job-dir" and argv[index + 1] == "":
            return argv[:index] + argv[index + 2:]
    return argv


def free_port_blocks(count: int, size: int = PORTS_PER_PROCESS, search: tuple[int, int] | None = None,
                     rng: random.Random | None = None) -> list[int]:
    """The first ports of ``count`` disjoint blocks of ``size`` ports that nothing listens on now.

    Trainers bind all interfaces (TensorFlow's gRPC ``*:PORT``), so a port counts as free when it binds
    there. Another program may take one before the trainer does; the trainer then fails to listen and
    says so. :raises click.ClickException: when no such blocks are found.
    """
    rng = rng or random.Random()
    low, high = search or _search_range()
    blocks: list[int] = []
    candidates = list(range(low, high - size + 1, size))
    rng.shuffle(candidates)
    for first in candidates:
        if all(_port_is_free(port) for port in range(first, first + size)):
            blocks.append(first)
            if len(blocks) == count:
                return sorted(blocks)
    raise click.ClickException(f"found only {len(blocks)} of {count} free blocks of {size} ports in {low}-{high}")


def _search_range() -> tuple[int, int]:
    """:data:`PORT_SEARCH_RANGE`, ending where this host's ephemeral ports begin should they begin lower."""
    low, high = PORT_SEARCH_RANGE
    try:
        ephemeral_low = int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return low, high
    return (low, ephemeral_low) if low + 1000 <= ephemeral_low < high else (low, high)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def prepare_job_dirs(planned: Sequence[PlannedProcess], job_dir: Path) -> None:
    """Create ``job_dir``; give every other process a copy of it, as the platform does before a restart."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for process in planned:
        if process.job_dir is not None and process.job_dir != job_dir:
            shutil.copytree(job_dir, process.job_dir, symlinks=True)


def collect_export(framework: Framework, planned: Sequence[PlannedProcess], job_dir: Path,
                   since: float) -> Path | None:
    """The exported model of this run, in ``job_dir``: the platform's export step, done locally.

    The first export role whose job directory holds the framework's marker written since ``since`` wins;
    its folder is copied to the same place under ``job_dir`` unless it is there already.
    """
    by_role = {process.member.role: process for process in planned}
    for role in framework.export_roles([process.member.role for process in planned]):
        source = by_role[role].job_dir
        if source is None or not source.is_dir():
            continue
        markers = [path for path in source.rglob(framework.export_marker) if path.stat().st_mtime >= since]
        if not markers:
            continue
        folder = min(markers, key=lambda path: len(path.parts)).parent
        target = job_dir / folder.relative_to(source)
        if source != job_dir:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target, symlinks=True)
        return target
    return None


@dataclasses.dataclass
class _Running:
    planned: PlannedProcess
    popen: subprocess.Popen
    relay: threading.Thread
    ended_at: float | None = None

    @property
    def name(self) -> str:
        return self.planned.member.role.node_name

    def status(self) -> ProcessStatus:
        if self.ended_at is None and self.popen.poll() is not None:
            self.ended_at = time.time()
        return ProcessStatus(self.planned.member.role, _exit_code(self.popen.returncode), ended_at=self.ended_at)


def _exit_code(returncode: int | None) -> int | None:
    """The shell's convention, which the platform's nodes report: killed by signal N is 128 + N."""
    return 128 - returncode if returncode is not None and returncode < 0 else returncode


def run_processes(framework: Framework, planned: Sequence[PlannedProcess], cwd: Path, environ: Mapping[str, str],
                  echo: Callable[[str], None], note: Callable[[str], None],
                  grace: float = STOP_GRACE_SECONDS) -> Outcome:
    """Start every process, relay its output as ``ROLE: line``, wait for the framework's verdict.

    Whatever still runs when the verdict is in (a TensorFlow ps after the chief's success, the peers
    of a failed rank) or when an interrupt arrives is stopped: SIGTERM to its process group, SIGKILL
    after ``grace`` seconds. :raises Interrupted, KeyboardInterrupt: after the processes are stopped.
    """
    lock = threading.Lock()
    running: list[_Running] = []
    try:
        for process in planned:
            running.append(_start(process, cwd, environ, echo, lock))
        return _verdict(framework, running)
    finally:
        _stop(running, grace, note)
        for process in running:
            process.relay.join(timeout=grace)


def _start(process: PlannedProcess, cwd: Path, environ: Mapping[str, str], echo: Callable[[str], None],
           lock: threading.Lock) -> _Running:
    env = {**environ, **process.environment}
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), *filter(None, [environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    # A session of its own: the terminal's Ctrl-C reaches this command only, which stops the processes
    # in order; killing the group also ends whatever the trainer started.
    popen = subprocess.Popen(process.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    name = process.member.role.node_name
    relay = threading.Thread(target=_relay, args=(popen.stdout, name, echo, lock), name=f"relay-{name}",
                             daemon=True)
    relay.start()
    return _Running(process, popen, relay)


def _relay(stream: IO[bytes], name: str, echo: Callable[[str], None], lock: threading.Lock) -> None:
    with stream:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with lock:
                echo(f"{name}: {line}")


def _verdict(framework: Framework, running: list[_Running]) -> Outcome:
    while True:
        statuses = [process.status() for process in running]
        outcome = framework.outcome(statuses)
        if outcome.state != "RUNNING":
            return outcome
        if all(status.exit_code is not None for status in statuses):
            return Outcome("FAILED", f"every process ended but {framework.name} did not count the run a success")
        time.sleep(POLL_SECONDS)


def _stop(running: list[_Running], grace: float, note: Callable[[str], None]) -> None:
    alive = [process for process in running if process.popen.poll() is None]
    if not alive:
        return
    note(f"stopping {', '.join(process.name for process in alive)}")
    _signal_groups(alive, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        while any(process.popen.poll() is None for process in alive) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
    except (KeyboardInterrupt, Interrupted):
        pass  # a second interrupt: no more patience
    stubborn = [process for process in alive if process.popen.poll() is None]
    if stubborn:
        note(f"killing {', '.join(process.name for process in stubborn)} (still running {grace:g}s after SIGTERM)")
        _signal_groups(stubborn, signal.SIGKILL)
        for process in stubborn:
            process.popen.wait()


def _signal_groups(processes: list[_Running], signum: int) -> None:
    for process in processes:
        # Only while the leader is not reaped: then its pid, the group's id, cannot have been reused.
        if process.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signum)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` in the main thread meanwhile, so the processes are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def package_root(package_path: Path, module_name: str) -> Path:
    """The folder the module imports from: ``package_path`` itself, or its parent when it is the package
    (gcloud's ``--package-path trainer/``). :raises click.UsageError: the module's package is in neither."""
    path = package_path.resolve()
    top = module_name.split(".")[0]
    if (path / top).is_dir() or (path / f"{top}.py").is_file():
        return path
    if path.name == top:
        return path.parent
    raise click.UsageError(f"--module-name {module_name}: no package or module {top!r} in {path} "
                           f"(give --package-path the package folder, or the folder holding it)")


def _resolve_python(python: str | None) -> str:
    if python is None:
        return sys.executable
    found = shutil.which(python)
    if found is None:
        raise click.UsageError(f"--python {python}: no such executable")
    return str(Path(found).absolute())


def _usage_error(error: TopologyError) -> click.UsageError:
    message = str(error)
    for field, option in OPTION_OF_FIELD.items():
        message = message.replace(field, option)
    return click.UsageError(message)


def _note(message: str) -> None:
    click.echo(f"cloudml local train: {message}", err=True)


@click.group(name="local")
def local() -> None:
    """Run trainers on this machine, as a job's nodes would, before submitting them."""


@local.command("train")
@click.option("--package-path", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The trainer's package folder (e.g. trainer/), or the folder holding it.")
@click.option("--module-name", required=True, help="The module to run, e.g. trainer.task.")
@click.option("--job-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Passed to the trainer as --job-dir; its outputs and exported model land here.")
@click.option("--distributed", is_flag=True, help="Run one process per role of a cluster instead of one.")
@click.option("--worker-count", type=click.IntRange(min=0),
              help=f"Workers besides the master, with --distributed (default {DEFAULT_WORKER_COUNT}).")
@click.option("--parameter-server-count", type=click.IntRange(min=0),
              help="Parameter servers, with --distributed (default 0; MXNET 1, plus its scheduler).")
@click.option("--framework", default="TENSORFLOW", show_default=True,
              help="TENSORFLOW, MXNET or PYTORCH (any installed framework plugin).")
@click.option("--python", help="The interpreter that runs the trainer, with its framework installed "
                               "[default: this command's own].")
@click.argument("user_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- USER_ARGS...]")
def train(package_path: Path, module_name: str, job_dir: Path | None, distributed: bool, worker_count: int | None,
          parameter_server_count: int | None, framework: str, python: str | None, user_args: tuple[str, ...]) -> None:
    """Run the trainer here: python -m MODULE USER_ARGS --job-dir DIR, once or as a cluster on 127.0.0.1.

    Each process's output is printed prefixed with its role (chief-0: ...). The command ends when the
    framework's success rule decides, stopping what still runs, and exits 1 naming the failed role.
    """
    plugins = load_frameworks()
    name = framework.upper()
    if name not in plugins:
        raise click.UsageError(f"--framework {framework}: unknown; valid: {', '.join(sorted(plugins))}")
    plugin = plugins[name]
    if not _MODULE_NAME.fullmatch(module_name):
        raise click.UsageError(f"--module-name {module_name}: not a dotted Python module name")
    if not distributed and (worker_count is not None or parameter_server_count is not None):
        raise click.UsageError("--worker-count and --parameter-server-count need --distributed")
    if distributed:
        workers = DEFAULT_WORKER_COUNT if worker_count is None else worker_count
        servers = DEFAULT_PARAMETER_SERVER_COUNT.get(name, 0) if parameter_server_count is None \
            else parameter_server_count
    else:
        workers = servers = 0
    cwd = package_root(package_path, module_name)
    interpreter = _resolve_python(python)
    job_dir = job_dir.expanduser().absolute() if job_dir is not None else None
    fields = training_input(module_name, user_args, name, job_dir, workers, servers)

    with contextlib.ExitStack() as cleanup:
        scratch = None
        if job_dir is not None:
            scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="cloudml-local-train-")))
        try:
            planned = plan(plugin, fields, interpreter, job_dir, scratch, free_port_blocks)
        except TopologyError as error:
            raise _usage_error(error) from None
        started = time.time()
        if job_dir is not None:
            prepare_job_dirs(planned, job_dir)
        _note(f"{name}, {len(planned)} process(es) on {ADDRESS}, from {cwd}")
        for process in planned:
            member = process.member
            where = f", job dir {process.job_dir}" if process.job_dir else ""
            _note(f"starting {member.role.node_name} on {member.address} ports {member.port_first}-{member.port_last}"
                  f"{where}")
        try:
            with _sigterm_interrupts():
                outcome = run_processes(plugin, planned, cwd, os.environ, click.echo, _note)
        except (KeyboardInterrupt, Interrupted) as interrupt:
            signum = interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT
            _note(f"interrupted ({signal.Signals(signum).name}); every process stopped")
            raise click.exceptions.Exit(128 + signum) from None
        except OSError as error:  # the interpreter vanished or cannot run since it was checked
            raise click.ClickException(f"could not start the trainer with {interpreter}: {error}") from None
        if outcome.state != "SUCCEEDED":
            raise click.ClickException(outcome.message)
        exported = collect_export(plugin, planned, job_dir, started) if job_dir is not None else None
    _note("succeeded" + (f"; model exported to {exported}" if exported else ""))

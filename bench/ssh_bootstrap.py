"""SSH bootstrap of 1, 8 and 32 local nodes through our remote layer, against raw paramiko on this machine.

Per node, the bootstrap is: connect with the node's host key pinned, upload a 10 MiB package (random bytes,
generated once), start a detached process (``sleep 30``). Each measurement is the median of ``--runs`` runs,
with ``min(settings.ssh_parallelism, N)`` threads:

- (a) raw handshakes: ``paramiko.SSHClient`` connect (host key pinned via ``get_host_keys().add`` and
  ``RejectPolicy``, ed25519 user key from memory) + close, in a ``ThreadPoolExecutor``;
- ours, connect only: ``connect_node`` (``NodeSession.connect``) + close, through ``fan_out``;
- (b) raw bootstrap: a minimal hand-written loop in the same kind of pool: connect, ``SFTPClient.put`` of
  the package, one ``exec_command`` that starts ``sleep 30`` detached (``setsid … &``) and waits for its
  exit status;
- ours: ``connect_node`` + ``NodeSession.put`` + ``NodeSession.start_process`` through ``fan_out``, shaped as
  ``workflows/train.py`` ``_Sessions`` does it: connect every node in one fan-out, then run the work on
  every node in a second fan-out, then close;
- ours, per-node pipeline: the same calls in one fan-out, each node connecting, working and closing in one
  go (the shape of the former ``_each_node``).

Target: ours / (b) >= 90 % in nodes per second. The 32-node cluster (LocalDriver with its own addresses
127.6.x.x and ports) is created once before and deleted after the measurements (neither is timed); deleting
it kills the ``sleep`` processes. Every exec goes through the node user's shell (root's bash) on both
paths alike: the same sshd, the same shell, the same start-up files (the local driver gives each node its
own ``HOME``, so /root/.bashrc and its ``pyenv init`` are not read). "Raw" is stock paramiko, as it comes.

    .venv/bin/python -m bench.ssh_bootstrap [--runs 3] [--nodes 1 8 32] [--profile]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko

from cloudml_os.cloud.base import ClusterSpec, NodeInfo, NodeSpec
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import Settings, load_settings
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import NodeSession, connect_node, fan_out

PACKAGE_BYTES = 10 * 1024 * 1024
TARGET = 0.90
RAW_START = "setsid sleep 30 </dev/null >/dev/null 2>&1 &"
# Seconds of rest before each measurement, so the one before it (sshd session processes exiting, uploads
# being deleted) does not bill the next one: without it the first measurement of a group came out slower.
SETTLE = 0.3
MEASURES = {
    "raw_connect": "(a) raw paramiko handshake",
    "ours_connect": "ours connect-only",
    "raw_bootstrap": "(b) raw paramiko bootstrap",
    "ours_bootstrap": "ours bootstrap (_Sessions)",
    "ours_pipelined": "ours bootstrap, per-node",
}
BOOTSTRAPS = ("raw_bootstrap", "ours_bootstrap", "ours_pipelined")


class _Phases:
    """Seconds per phase, summed over the nodes of one measurement (added to from the pool's threads)."""

    def __init__(self) -> None:
        self.totals = {"connect": 0.0, "upload": 0.0, "start": 0.0}
        self._lock = threading.Lock()

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.totals[phase] += seconds


class Bench:
    """The cluster, its key, the package and the settings every measurement shares.

    Each measurement takes the nodes and a tag naming its uploads and process folders, and returns its
    phase totals (or None).
    """

    def __init__(self, settings: Settings, nodes: list[NodeInfo], private_key: str, package: Path) -> None:
        self.settings = settings
        self.nodes = nodes
        self.private_key = private_key
        self.package = package
        self.pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(private_key))

    # -- raw paramiko -------------------------------------------------------------------------------

    def raw_client(self, node: NodeInfo) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        key_type, blob = node.host_keys[0].split()[:2]
        host_key = paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
        client.get_host_keys().add(f"[{node.address}]:{node.ssh_port}", key_type, host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(node.address, port=node.ssh_port, username=node.username, pkey=self.pkey,
                       timeout=10, allow_agent=False, look_for_keys=False)
        return client

    def raw_connect(self, nodes: Sequence[NodeInfo], tag: str) -> None:
        _pool_map(lambda node: self.raw_client(node).close(), nodes, self._workers(nodes))

    def raw_bootstrap(self, nodes: Sequence[NodeInfo], tag: str) -> dict[str, float]:
        phases = _Phases()

        def one(node: NodeInfo) -> None:
            started = time.perf_counter()
            client = self.raw_client(node)
            try:
                started = _lap(phases, "connect", started)
                sftp = client.open_sftp()
                sftp.put(str(self.package), f"{node.workdir}/{tag}.bin")
                sftp.close()
                started = _lap(phases, "upload", started)
                _, stdout, _ = client.exec_command(RAW_START)
                if stdout.channel.recv_exit_status() != 0:
                    raise RuntimeError(f"{node.name}: raw start failed")
                _lap(phases, "start", started)
            finally:
                client.close()

        _pool_map(one, nodes, self._workers(nodes))
        return phases.totals

    # -- ours ---------------------------------------------------------------------------------------

    def ours_connect(self, nodes: Sequence[NodeInfo], tag: str) -> None:
        fan_out(nodes, lambda node: connect_node(node, self.private_key, self.settings).close(),
                self.settings.ssh_parallelism)

    def _work(self, node: NodeInfo, session: NodeSession, tag: str, phases: _Phases) -> None:
        """What every node gets: the package, then the detached process (as bootstrap and launch do)."""
        started = time.perf_counter()
        session.put(self.package, f"{node.workdir}/{tag}.bin")
        started = _lap(phases, "upload", started)
        session.start_process(f"{node.workdir}/proc-{tag}", ["sleep", "30"], env={}, cwd=node.workdir)
        _lap(phases, "start", started)

    def ours_bootstrap(self, nodes: Sequence[NodeInfo], tag: str) -> dict[str, float]:
        """The workflow's ``_Sessions``: connect all in one fan-out, work in a second, close all."""
        phases = _Phases()
        sessions: dict[str, NodeSession] = {}

        def connect(node: NodeInfo) -> None:
            started = time.perf_counter()
            sessions[node.name] = connect_node(node, self.private_key, self.settings)
            _lap(phases, "connect", started)

        try:
            fan_out(nodes, connect, self.settings.ssh_parallelism)
            fan_out(nodes, lambda node: self._work(node, sessions[node.name], tag, phases),
                    self.settings.ssh_parallelism)
        finally:
            for session in sessions.values():
                session.close()
        return phases.totals

    def ours_pipelined(self, nodes: Sequence[NodeInfo], tag: str) -> dict[str, float]:
        """One fan-out; each node connects, works and closes in one go."""
        phases = _Phases()

        def one(node: NodeInfo) -> None:
            started = time.perf_counter()
            with connect_node(node, self.private_key, self.settings) as session:
                _lap(phases, "connect", started)
                self._work(node, session, tag, phases)

        fan_out(nodes, one, self.settings.ssh_parallelism)
        return phases.totals

    # -- helpers ------------------------------------------------------------------------------------

    def _workers(self, nodes: Sequence[NodeInfo]) -> int:
        return max(1, min(self.settings.ssh_parallelism, len(nodes)))  # as fan_out sizes its pool

    def clean(self, nodes: Sequence[NodeInfo], tag: str) -> None:
        """Remove the uploaded copies (the nodes' disks are this host's disk), outside the timings."""
        for node in nodes:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{node.workdir}/{tag}.bin")


def _lap(phases: _Phases, phase: str, started: float) -> float:
    now = time.perf_counter()
    phases.add(phase, now - started)
    return now


def _pool_map(fn: Callable[[NodeInfo], None], nodes: Sequence[NodeInfo], workers: int) -> None:
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raw") as pool:
        for _ in pool.map(fn, nodes):
            pass


def _timed(bench: Bench, name: str, nodes: Sequence[NodeInfo]) -> tuple[float, dict[str, float] | None]:
    tag = f"{name.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    time.sleep(SETTLE)
    started = time.perf_counter()
    try:
        phases = getattr(bench, name)(nodes, tag)
        return time.perf_counter() - started, phases
    finally:
        bench.clean(nodes, tag)


def measure_all(bench: Bench, counts: Sequence[int], runs: int) -> dict[int, dict[str, list[float]]]:
    """Wall seconds of every measurement, ``runs`` times per node count; prints the phase split."""
    results: dict[int, dict[str, list[float]]] = {}
    for count in counts:
        nodes = bench.nodes[:count]
        results[count] = {name: [] for name in MEASURES}
        phases: dict[str, list[dict[str, float]]] = {name: [] for name in BOOTSTRAPS}
        for run in range(runs):
            # Each raw measurement sits next to ours; the order flips from run to run.
            for group in (("raw_connect", "ours_connect"), BOOTSTRAPS):
                for name in (group if run % 2 == 0 else reversed(group)):
                    seconds, split = _timed(bench, name, nodes)
                    results[count][name].append(seconds)
                    if split is not None:
                        phases[name].append(split)
        parts = []
        for name, splits in phases.items():
            per_node = {phase: statistics.median(s[phase] for s in splits) / count for phase in splits[0]}
            parts.append(f"    {MEASURES[name]:30s} " + "  ".join(f"{p} {v * 1000:4.0f} ms"
                                                                   for p, v in per_node.items()))
        print(f"N={count}: per node, median over runs of the phase times (a phase's threads overlap):\n"
              + "\n".join(parts), flush=True)
    return results


def print_table(results: dict[int, dict[str, list[float]]], runs: int) -> None:
    print(f"\nSSH bootstrap (connect + {PACKAGE_BYTES >> 20} MiB SFTP upload + detached start), "
          f"median of {runs} runs, {os.cpu_count()} CPU cores, load average now "
          + " ".join(f"{load:.1f}" for load in os.getloadavg()))
    print(f"{'N':>3}  {'measurement':30s} {'wall s':>8} {'nodes/s':>8}  ours vs raw (nodes/s)")
    for count, by_measure in results.items():
        medians = {name: statistics.median(values) for name, values in by_measure.items()}
        for name, label in MEASURES.items():
            ratio = ""
            if name == "ours_connect":
                ratio = f"{medians['raw_connect'] / medians[name]:6.1%} of (a)"
            elif name.startswith("ours_"):
                value = medians["raw_bootstrap"] / medians[name]
                ratio = f"{value:6.1%} of (b)  {'ok' if value >= TARGET else 'BELOW target'}"
            print(f"{count:>3}  {label:30s} {medians[name]:8.3f} {count / medians[name]:8.1f}  {ratio}")
    print(f"target: ours bootstrap >= {TARGET:.0%} of (b)")


def profile_ours(bench: Bench) -> None:
    """cProfile one node's bootstrap through our layer, run in this thread, to count SFTP round trips."""
    node = bench.nodes[0]
    tag = f"profile-{uuid.uuid4().hex[:8]}"
    profiler = cProfile.Profile()
    try:
        profiler.enable()
        with connect_node(node, bench.private_key, bench.settings) as session:
            session.put(bench.package, f"{node.workdir}/{tag}.bin")
            session.start_process(f"{node.workdir}/proc-{tag}", ["sleep", "30"], env={}, cwd=node.workdir)
        profiler.disable()
    finally:
        bench.clean([node], tag)
    print("\nprofile of one node through our layer (wall time is mostly waiting on the transport thread):")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(r"remote/ssh\.py|sftp_client\.py:\d+\((stat|chmod|posix_rename|"
                                               r"mkdir|put|putfo|_request|from_transport)\)|client\.py.*connect",
                                               30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--profile", action="store_true", help="also cProfile one node's bootstrap (ours)")
    args = parser.parse_args()
    cluster_size = max(args.nodes)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ssh-bootstrap-") as tmp:
        data_dir = Path(tmp)
        settings = load_settings(environ={}, data_dir=data_dir, local_address_prefix="127.6",
                                 local_port_base=24000, local_ssh_port=2422)
        driver = LocalDriver(settings)
        private_key, public_key = generate_keypair("ssh-bootstrap-bench")
        package = data_dir / "package.bin"
        package.write_bytes(os.urandom(PACKAGE_BYTES))
        name = f"sshbench-{uuid.uuid4().hex[:6]}"
        spec = ClusterSpec(name=name, public_key=public_key, nodes=tuple(
            NodeSpec(f"node-{i}", "worker", i, "local") for i in range(cluster_size)))
        try:
            created = time.perf_counter()
            nodes = driver.create_cluster(spec)
            print(f"{cluster_size}-node cluster created in {time.perf_counter() - created:.2f} s (not timed); "
                  f"ssh_parallelism={settings.ssh_parallelism}; load average "
                  + " ".join(f"{load:.1f}" for load in os.getloadavg()), flush=True)
            bench = Bench(settings, nodes, private_key, package)
            # Warm-up, not timed: one connection to every node by both paths (imports, first sshd forks).
            bench.raw_connect(nodes, "warmup")
            bench.ours_connect(nodes, "warmup")
            results = measure_all(bench, args.nodes, args.runs)
            print_table(results, args.runs)
            if args.profile:
                profile_ours(bench)
        finally:
            driver.delete_cluster(name)
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()

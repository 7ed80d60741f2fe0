"""Distributed training throughput: orchestrated by the platform versus started by hand, per framework.

For each framework one small distributed job runs twice per round, in alternating order:
- orchestrated: submitted to a running platform (API → Celery → nodes), as users do;
- by hand: on a cluster of the same local driver, the same package installed the same way, each process
  started over SSH with exactly the environment and command the framework plugin computes.
Each example trainer logs ``THROUGHPUT samples_per_second=…`` for its own training loop; the figure is
the sum over the processes that train. The loops last 20–30 s on this 2-core machine: long enough that a
second of start-up noise does not decide the figure. Before the rounds, one run of each side is a warm-up
and not counted: the first runs after a start were measured to be the slowest, and would otherwise fall
on one side.

The figure is paired: each round's two runs go back to back, so the machine's drift over minutes, which
moves both alike, cancels in their ratio. The ratio printed is the geometric mean of the rounds' ratios,
with a 95 % bootstrap interval over the rounds. Target: ≥ 0.98.

Where a machine's speed moves too much for that ratio to tell 2 %, two figures that its speed hardly moves
say where time went while the loops ran: the CPU the training processes got (each reports its loop's CPU
time), and the CPU everything else on the machine used (/proc/stat, less the trainers'), whose paired
difference is what the platform spends beyond the by-hand harness. Neither bounds the ratio: a wakeup of
the platform can delay a step that waits for every process by more than the CPU it uses.

    .venv/bin/python -m bench.framework_throughput [--rounds 8] [--frameworks TENSORFLOW MXNET PYTORCH]
"""

from __future__ import annotations

import argparse
import bisect
import functools
import math
import os
import random
import re
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from cloudml_os.cloud.base import ClusterSpec, NodeSpec
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import load_settings
from cloudml_os.frameworks.base import Member, ProcessStatus, load_frameworks, topology_from_training_input
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import connect_node, fan_out
from cloudml_os.runtimes import ensure_runtime, runtime_python
from tests.harness import build_sdist, start_platform

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = re.compile(
    r"THROUGHPUT samples_per_second=([0-9.]+) cpu_cores=([0-9.]+) started=([0-9.]+) ended=([0-9.]+)")

# A distributed topology per framework, and the arguments that make its training loop last 20–30 s here.
JOBS = {
    "TENSORFLOW": ("tensorflow", {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                                  "workerCount": 1}, ["--epochs", "30", "--samples", "16384"]),
    "MXNET": ("mxnet", {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                        "workerCount": 1, "parameterServerType": "standard", "parameterServerCount": 1},
              ["--epochs", "25", "--samples", "32768"]),
    "PYTORCH": ("pytorch", {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                            "workerCount": 1}, ["--epochs", "30", "--threads", "1"]),
}


class MachineCPU:
    """The machine's busy CPU-seconds (/proc/stat), sampled ten times a second by a thread of its own.

    Subtracting what the training processes report for their own loops leaves what everything else on the
    machine used meanwhile: the platform (or the by-hand harness), sshd, and whatever the machine runs
    anyway. Unlike throughput this barely moves with the machine's speed, so a small difference shows.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> MachineCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.is_set():
            with open("/proc/stat") as stat:
                user, nice, system, _idle, _iowait, irq, softirq = map(int, stat.readline().split()[1:8])
            self.samples.append((time.time(), (user + nice + system + irq + softirq) / tick))
            self._stop.wait(0.1)

    def cores_between(self, started: float, ended: float) -> float:
        """Busy CPU-seconds per second over [started, ended], interpolated between samples."""
        while self.samples[-1][0] < ended:  # the next sample is at most 0.1 s away
            time.sleep(0.05)
        times = [t for t, _ in self.samples]
        assert times and times[0] <= started < ended <= times[-1], "the window is outside the samples"

        def busy_at(moment: float) -> float:
            i = max(bisect.bisect_right(times, moment), 1)
            (t0, b0), (t1, b1) = self.samples[i - 1], self.samples[min(i, len(times) - 1)]
            return b0 if t1 == t0 else b0 + (b1 - b0) * (moment - t0) / (t1 - t0)

        return (busy_at(ended) - busy_at(started)) / (ended - started)


class Run(NamedTuple):
    """One run's figures while its training loops ran."""
    samples_per_second: float  # summed over the training processes
    cpu_cores: float  # CPU-seconds per second the training processes got
    other_cores: float  # CPU-seconds per second everything else on the machine used


def _figures(logs: dict[str, str], machine: MachineCPU) -> Run:
    found = [tuple(map(float, match)) for text in logs.values() for match in THROUGHPUT.findall(text)]
    # The span in which every training process was in its loop (they start and end together: each step is
    # a collective), and everything but them over it.
    started, ended = max(f[2] for f in found), min(f[3] for f in found)
    cpu_cores = sum(f[1] for f in found)
    return Run(sum(f[0] for f in found), cpu_cores, machine.cores_between(started, ended) - cpu_cores)


def _bootstrap_mean(values: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """The mean of values, and its 95 % bootstrap interval."""
    rng = random.Random(0)  # the same runs print the same interval
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.fmean(values), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def paired_ratio(ours: list[float], hand: list[float]) -> tuple[float, float, float]:
    """Geometric mean of the rounds' ratios ours[i] / hand[i], and its 95 % bootstrap interval over rounds."""
    mean, low, high = _bootstrap_mean([math.log(a / b) for a, b in zip(ours, hand, strict=True)])
    return math.exp(mean), math.exp(low), math.exp(high)


def paired_difference(ours: list[float], hand: list[float]) -> tuple[float, float, float]:
    """Mean of the rounds' differences ours[i] - hand[i], and its 95 % bootstrap interval over rounds."""
    return _bootstrap_mean([a - b for a, b in zip(ours, hand, strict=True)])


def orchestrated(client, package_uri: str, framework: str, training_input: dict, args: list[str]) -> dict[str, str]:
    job_id = f"tp_{framework.lower()}_{uuid.uuid4().hex[:6]}"
    body = {"jobId": job_id, "trainingInput": {**training_input, "framework": framework,
                                               "packageUris": [package_uri], "pythonModule": "trainer.task",
                                               "args": args}}
    response = client.request("POST", "/jobs", json=body)
    assert response.status_code == 200, response.text
    job = client.wait(job_id, timeout=600, interval=1.0)  # as by_hand looks at its processes: once a second
    logs = client.logs(job_id)
    assert job["state"] == "SUCCEEDED", f"{job}{_log_tails(logs)}"
    return logs


def _log_tails(logs: dict[str, str]) -> str:
    """The end of every node's log: what a failed run prints, so that it says why."""
    return "".join(f"\n--- {name}:\n{log[-2000:]}" for name, log in logs.items())


def by_hand(driver: LocalDriver, settings, framework, package: Path, training_input: dict,
            args: list[str]) -> dict[str, str]:
    """The same processes, environment and command, started over SSH without the platform."""
    training_input = {**training_input, "pythonModule": "trainer.task", "args": args}
    roles = framework.roles(topology_from_training_input(training_input, settings.machine_types), training_input)
    private_key, public_key = generate_keypair()
    name = f"by-hand-{uuid.uuid4().hex[:8]}"
    nodes = driver.create_cluster(ClusterSpec(name, tuple(
        NodeSpec(r.node_name, r.task_type, r.task_index, r.machine_type.flavor) for r in roles), public_key))
    try:
        by_name = {n.name: n for n in nodes}
        members = [Member(r, by_name[r.node_name].address, by_name[r.node_name].port_first,
                          by_name[r.node_name].port_last) for r in roles]
        body = {"jobId": name, "trainingInput": training_input}
        python = runtime_python(str(settings.runtimes_dir), framework.runtime(None))

        def start(member: Member) -> None:
            node = by_name[member.role.node_name]
            site, job_dir = f"{node.workdir}/site", f"{node.workdir}/out"
            with connect_node(node, private_key, settings) as session:
                session.put(package, f"{node.workdir}/{package.name}")
                session.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                             "--target", site, f"{node.workdir}/{package.name}"])
                env = {**node.environment, **framework.environment(member, members, body),
                       "PYTHONPATH": site, "PYTHONUNBUFFERED": "1"}
                session.start_process(f"{node.workdir}/proc", framework.command(member.role, python, training_input,
                                                                                 job_dir), env=env, cwd=node.workdir)

        fan_out(members, start, settings.ssh_parallelism, describe=lambda m: m.role.node_name)
        # Wait as a person would: one connection per node, a look at the exit codes every second.
        sessions = {n.name: connect_node(n, private_key, settings) for n in nodes}
        try:
            while True:
                statuses = []
                for member in members:
                    node = by_name[member.role.node_name]
                    state = sessions[node.name].exit_status(f"{node.workdir}/proc")
                    statuses.append(ProcessStatus(member.role, state.exit_code, state.lost))
                outcome = framework.outcome(statuses)
                if outcome.state != "RUNNING":
                    break
                time.sleep(1.0)
            logs = {name: session.read_file(f"{by_name[name].workdir}/proc/output.log", 0, 1 << 24).decode()
                    for name, session in sessions.items()}
            assert outcome.state == "SUCCEEDED", f"{outcome.message}{_log_tails(logs)}"
        finally:
            for session in sessions.values():
                session.close()
        return logs
    finally:
        driver.delete_cluster(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--frameworks", nargs="*", default=list(JOBS))
    args = parser.parse_args()
    frameworks = load_frameworks()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = load_settings(environ={}, data_dir=tmp / "by-hand", local_address_prefix="127.8",
                                 local_port_base=23000, local_ssh_port=2622)
        driver = LocalDriver(settings)
        with (start_platform(tmp / "platform", local_address_prefix="127.4", local_port_base=22000) as platform,
              MachineCPU() as machine):
            client = platform.client("bench")
            for name in args.frameworks:
                example, training_input, trainer_args = JOBS[name]
                framework = frameworks[name]
                runtime = ensure_runtime(framework.runtime(None), settings.runtimes_dir)
                package = build_sdist(ROOT / "examples" / example, tmp / f"sdist-{example}", runtime / "bin" / "python")
                uri = client.upload(package)
                sides = {True: functools.partial(orchestrated, client, uri, name, training_input, trainer_args),
                         False: functools.partial(by_hand, driver, settings, framework, package, training_input,
                                                  trainer_args)}
                for orchestrated_turn in (True, False):
                    run = _figures(sides[orchestrated_turn](), machine)
                    print(f"  {name} warm-up (not counted): {_describe(orchestrated_turn, run)}", flush=True)
                ours, hand = [], []
                for round_ in range(args.rounds):  # alternate which goes first
                    for orchestrated_turn in ((True, False) if round_ % 2 == 0 else (False, True)):
                        run = _figures(sides[orchestrated_turn](), machine)
                        (ours if orchestrated_turn else hand).append(run)
                        print(f"  {name} round {round_ + 1}: {_describe(orchestrated_turn, run)}", flush=True)
                results[name] = (ours, hand)
    print(f"\nDistributed training throughput (samples/s summed over training processes), {args.rounds} rounds, "
          f"{os.cpu_count()} CPU cores")
    print(f"  {'framework':12s} {'orchestrated':>14s} {'by hand':>10s} {'ratio':>7s} {'95% interval':>14s}  "
          f"target >= 0.98")
    for name, (ours, hand) in results.items():
        ours_t, hand_t = [r.samples_per_second for r in ours], [r.samples_per_second for r in hand]
        ratio, low, high = paired_ratio(ours_t, hand_t)
        per_round = sorted(a / b for a, b in zip(ours_t, hand_t, strict=True))
        print(f"  {name:12s} {statistics.median(ours_t):14.1f} {statistics.median(hand_t):10.1f} {ratio:7.3f} "
              f"{low:6.3f}–{high:.3f}  {'ok' if ratio >= 0.98 else 'below'}"
              f"   (runs: ours {', '.join(f'{v:.0f}' for v in ours_t)};"
              f" by hand {', '.join(f'{v:.0f}' for v in hand_t)};"
              f" per-round ratios {per_round[0]:.3f}–{per_round[-1]:.3f};"
              f" medians' ratio {statistics.median(ours_t) / statistics.median(hand_t):.3f})")
    print("\nCPU while the training loops ran (CPU-seconds per second; medians, and paired over rounds with 95 % "
          "intervals)")
    print(f"  {'framework':12s} {'training: ours':>15s} {'by hand':>8s} {'ratio':>7s} {'95% interval':>14s}   "
          f"{'the rest: ours':>14s} {'by hand':>8s} {'extra':>7s} {'95% interval':>16s}")
    for name, (ours, hand) in results.items():
        cores, cores_low, cores_high = paired_ratio([r.cpu_cores for r in ours], [r.cpu_cores for r in hand])
        extra, extra_low, extra_high = paired_difference([r.other_cores for r in ours], [r.other_cores for r in hand])
        print(f"  {name:12s} {statistics.median(r.cpu_cores for r in ours):15.3f} "
              f"{statistics.median(r.cpu_cores for r in hand):8.3f} {cores:7.3f} {cores_low:6.3f}–{cores_high:.3f}   "
              f"{statistics.median(r.other_cores for r in ours):14.3f} "
              f"{statistics.median(r.other_cores for r in hand):8.3f} {extra:+7.3f} {extra_low:+.3f}–{extra_high:+.3f}")


def _describe(orchestrated_turn: bool, run: Run) -> str:
    return (f"{'orchestrated' if orchestrated_turn else 'by hand'} {run.samples_per_second:.0f} samples/s "
            f"on {run.cpu_cores:.3f} CPU cores, the rest of the machine {run.other_cores:.3f}")


if __name__ == "__main__":
    main()

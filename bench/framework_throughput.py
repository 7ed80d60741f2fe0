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

    .venv/bin/python -m bench.framework_throughput [--rounds 8] [--frameworks TENSORFLOW MXNET PYTORCH]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import re
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from cloudml_os.cloud.base import ClusterSpec, NodeSpec
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import load_settings
from cloudml_os.frameworks.base import Member, ProcessStatus, load_frameworks, topology_from_training_input
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import connect_node, fan_out
from cloudml_os.runtimes import ensure_runtime, runtime_python
from tests.harness import build_sdist, start_platform

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = re.compile(r"THROUGHPUT samples_per_second=([0-9.]+)")

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


def _throughput(logs: dict[str, str]) -> float:
    return sum(float(v) for text in logs.values() for v in THROUGHPUT.findall(text))


def paired_ratio(ours: list[float], hand: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """Geometric mean of the rounds' ratios ours[i] / hand[i], and its 95 % bootstrap interval over rounds."""
    logs = [math.log(a / b) for a, b in zip(ours, hand, strict=True)]
    rng = random.Random(0)  # the same runs print the same interval
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    return (math.exp(statistics.fmean(logs)), math.exp(means[int(0.025 * resamples)]),
            math.exp(means[int(0.975 * resamples) - 1]))


def orchestrated(client, package_uri: str, framework: str, training_input: dict, args: list[str]) -> float:
    job_id = f"tp_{framework.lower()}_{uuid.uuid4().hex[:6]}"
    body = {"jobId": job_id, "trainingInput": {**training_input, "framework": framework,
                                               "packageUris": [package_uri], "pythonModule": "trainer.task",
                                               "args": args}}
    response = client.request("POST", "/jobs", json=body)
    assert response.status_code == 200, response.text
    job = client.wait(job_id, timeout=600, interval=1.0)  # as by_hand looks at its processes: once a second
    assert job["state"] == "SUCCEEDED", job
    return _throughput(client.logs(job_id))


def by_hand(driver: LocalDriver, settings, framework, package: Path, training_input: dict, args: list[str]) -> float:
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
                    assert outcome.state == "SUCCEEDED", outcome.message
                    break
                time.sleep(1.0)
            logs = {name: session.read_file(f"{by_name[name].workdir}/proc/output.log", 0, 1 << 24).decode()
                    for name, session in sessions.items()}
        finally:
            for session in sessions.values():
                session.close()
        return _throughput(logs)
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
                                 local_port_base=50000, local_ssh_port=2622)
        driver = LocalDriver(settings)
        with start_platform(tmp / "platform", local_address_prefix="127.4", local_port_base=40000) as platform:
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
                    print(f"  {name} warm-up (not counted): {'orchestrated' if orchestrated_turn else 'by hand'} "
                          f"{sides[orchestrated_turn]():.0f} samples/s", flush=True)
                ours, hand = [], []
                for round_ in range(args.rounds):  # alternate which goes first
                    for orchestrated_turn in ((True, False) if round_ % 2 == 0 else (False, True)):
                        (ours if orchestrated_turn else hand).append(sides[orchestrated_turn]())
                        print(f"  {name} round {round_ + 1}: {'orchestrated' if orchestrated_turn else 'by hand'} "
                              f"{(ours if orchestrated_turn else hand)[-1]:.0f} samples/s", flush=True)
                results[name] = (ours, hand)
    print(f"\nDistributed training throughput (samples/s summed over training processes), {args.rounds} rounds, "
          f"{os.cpu_count()} CPU cores")
    print(f"  {'framework':12s} {'orchestrated':>14s} {'by hand':>10s} {'ratio':>7s} {'95% interval':>14s}  "
          f"target >= 0.98")
    for name, (ours, hand) in results.items():
        ratio, low, high = paired_ratio(ours, hand)
        per_round = sorted(a / b for a, b in zip(ours, hand, strict=True))
        print(f"  {name:12s} {statistics.median(ours):14.1f} {statistics.median(hand):10.1f} {ratio:7.3f} "
              f"{low:6.3f}–{high:.3f}  {'ok' if ratio >= 0.98 else 'below'}"
              f"   (runs: ours {', '.join(f'{v:.0f}' for v in ours)}; by hand {', '.join(f'{v:.0f}' for v in hand)};"
              f" per-round ratios {per_round[0]:.3f}–{per_round[-1]:.3f};"
              f" medians' ratio {statistics.median(ours) / statistics.median(hand):.3f})")

if __name__ == "__main__":
    main()

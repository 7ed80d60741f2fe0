"""Outputs while the job runs (issue #19): how soon a file a trainer closed is listed in the store, and what
copying outputs while trainers run costs them and the worker.

1. Latency at the default setting (``output_sync_seconds`` = 2): the trainer in bench/trainers/outputs writes
   a 1 MiB file every 0.5–1.5 s (renamed into place, as TensorFlow's checkpoints are) and logs when it closed
   each; a thread of the benchmark looks at the job's folder in the local store every 10 ms and notes when
   each file is there. Median, 90th percentile and maximum over ``--samples`` files. Target ≤ 5 s.
2. Throughput with the copy on (2 s) and off (0: copied only when training ends), in pairs whose order
   alternates: the TensorFlow example trainer, chief + 1 worker (MultiWorkerMirroredStrategy), 30 epochs of
   about a second, each ending with a checkpoint and a summary, so that nearly every copy round has a new
   checkpoint to copy (``max_to_keep`` 2: and old ones to delete). The worker process is restarted with the
   setting before each run. Each trainer logs its loop's ``THROUGHPUT samples_per_second=…``; a run's figure
   is the sum over chief and worker. The ratio is the geometric mean of the pairs' ratios with a 95 %
   bootstrap interval over the pairs (as bench/framework_throughput.py). Target ≥ 0.98. One warm-up run
   of each setting first, not counted.
3. The copy's CPU, over the span in which both training loops ran: the worker's (its process group's
   CPU-seconds from /proc, sampled every 0.25 s) and the rest of the machine's (/proc/stat less the
   trainers' own; the nodes' sshd and ``find`` are there), each as CPU-seconds per minute, on minus off,
   paired with its interval.

    .venv/bin/python -m bench.output_sync [--samples 30] [--pairs 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from bench.framework_throughput import MachineCPU, _figures, paired_difference, paired_ratio
from cloudml_os.config import load_settings
from cloudml_os.runtimes import ensure_runtime
from tests.harness import Client, Platform, build_sdist, start_platform

ROOT = Path(__file__).resolve().parents[1]
TARGET_LATENCY, TARGET_RATIO = 5.0, 0.98
THROUGHPUT_JOB = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard", "workerCount": 1}
THROUGHPUT_ARGS = ["--epochs", "30", "--samples", "16384"]


class GroupCPU(MachineCPU):
    """CPU-seconds of one process group (the worker and its pool), sampled every 0.25 s from /proc; the group
    is looked up at each sample, so it may be restarted. Children reaped by a member count too."""

    def __init__(self, group: Callable[[], int]) -> None:
        super().__init__()
        self.group = group

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        base, seconds, seen = 0.0, 0.0, None
        while not self._stop.is_set():
            pgid = self.group()
            if pgid != seen:  # a restarted worker counts from zero: go on from where the last one ended
                base, seconds, seen = base + seconds, 0.0, pgid
            seconds = 0.0
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/stat") as stat:
                        fields = stat.read().rpartition(")")[2].split()
                except OSError:
                    continue
                if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp … utime(11) stime cutime cstime
                    seconds += sum(int(value) for value in fields[11:15]) / tick
            self.samples.append((time.time(), base + seconds))
            self._stop.wait(0.25)


class StoreWatcher:
    """Notes when each file first appears in a folder of the local store, looking every 10 ms."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> StoreWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            try:
                names = os.listdir(self.folder)
            except FileNotFoundError:
                continue
            now = time.time()
            for name in names:
                self.seen.setdefault(name, now)


def latency(client: Client, platform: Platform, package_uri: str, samples: int) -> list[float]:
    job_id = f"latency_{uuid.uuid4().hex[:6]}"
    folder = platform.data_dir / "artifacts" / client.project / "jobs" / job_id / "ckpt"
    with StoreWatcher(folder) as watcher:
        client.submit(job_id, package_uri, args=["--files", str(samples)], pythonModule="outputs_trainer.task")
        job = client.wait(job_id, timeout=600)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    closed = {name: float(at) for name, at in
              (line.split()[1:3] for line in client.logs(job_id)["chief-0"].splitlines() if line.startswith("CLOSED "))}
    assert len(closed) == samples and set(closed) <= set(watcher.seen), (sorted(closed), sorted(watcher.seen))
    return [watcher.seen[name] - at for name, at in sorted(closed.items())]


class Run(NamedTuple):
    samples_per_second: float
    trainer_cores: float
    worker_cores: float
    other_cores: float  # the rest of the machine: neither the trainers nor the worker


def set_sync(platform: Platform, seconds: float) -> None:
    """Restart the worker with ``output_sync_seconds`` = ``seconds``."""
    if platform.env.get("CLOUDML_OS_OUTPUT_SYNC_SECONDS") == str(seconds):
        return
    worker = platform.processes["worker"]
    worker.terminate()  # a warm shutdown: its pool ends with it
    worker.wait(timeout=120)
    while any(_group_of(pid) == worker.pid for pid in _pids()):
        time.sleep(0.1)
    platform.env["CLOUDML_OS_OUTPUT_SYNC_SECONDS"] = str(seconds)
    platform.start("worker")


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _group_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[2])
    except OSError:
        return None


def train(client: Client, package_uri: str, machine: MachineCPU, worker: GroupCPU) -> Run:
    job_id = f"sync_tp_{uuid.uuid4().hex[:6]}"
    client.submit(job_id, package_uri, args=THROUGHPUT_ARGS, **THROUGHPUT_JOB)
    job = client.wait(job_id, timeout=900, interval=1.0)
    logs = client.logs(job_id)
    assert job["state"] == "SUCCEEDED", (job.get("errorMessage"), {n: t[-2000:] for n, t in logs.items()})
    run = _figures(logs, machine)
    started, ended = _loop_span(logs)
    worker_cores = worker.cores_between(started, ended)
    return Run(run.samples_per_second, run.cpu_cores, worker_cores, run.other_cores - worker_cores)


def _loop_span(logs: dict[str, str]) -> tuple[float, float]:
    from bench.framework_throughput import THROUGHPUT

    found = [tuple(map(float, match)) for text in logs.values() for match in THROUGHPUT.findall(text)]
    return max(f[2] for f in found), min(f[3] for f in found)


def _describe(sync: float, run: Run) -> str:
    return (f"sync {'on ' if sync else 'off'} {run.samples_per_second:8.0f} samples/s; trainers "
            f"{run.trainer_cores:.3f} cores, worker {run.worker_cores * 60:6.2f} CPU-s/min, rest of the machine "
            f"{run.other_cores * 60:6.2f} CPU-s/min")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    runtime = ensure_runtime("tensorflow-2.21", load_settings(environ={}).runtimes_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        example = build_sdist(ROOT / "examples" / "tensorflow", tmp / "sdist", runtime / "bin" / "python")
        writer = tmp / "outputs-trainer.tar.gz"
        with tarfile.open(writer, "w:gz") as archive:
            archive.add(ROOT / "bench" / "trainers" / "outputs" / "outputs_trainer", arcname="outputs_trainer")
        with start_platform(tmp / "platform", local_address_prefix="127.21", local_port_base=21000) as platform:
            client = platform.client("bench")
            delays = latency(client, platform, client.upload(writer), args.samples)
            ordered = sorted(delays)
            print(f"\nClosed on the node → listed in the store, output_sync_seconds = 2, {len(delays)} files of "
                  f"1 MiB: median {statistics.median(delays):.2f} s, 90th percentile "
                  f"{ordered[int(0.9 * len(ordered)) - 1]:.2f} s, max {ordered[-1]:.2f} s, min {ordered[0]:.2f} s "
                  f"(target ≤ {TARGET_LATENCY:g} s)", flush=True)

            uri = client.upload(example)
            with MachineCPU() as machine, GroupCPU(lambda: platform.processes["worker"].pid) as worker:
                for sync in (2.0, 0.0):
                    set_sync(platform, sync)
                    print(f"  warm-up (not counted): {_describe(sync, train(client, uri, machine, worker))}",
                          flush=True)
                on, off = [], []
                for pair in range(args.pairs):
                    for sync in ((2.0, 0.0) if pair % 2 == 0 else (0.0, 2.0)):
                        set_sync(platform, sync)
                        run = train(client, uri, machine, worker)
                        (on if sync else off).append(run)
                        print(f"  pair {pair + 1}: {_describe(sync, run)}", flush=True)

    ratio, low, high = paired_ratio([r.samples_per_second for r in on], [r.samples_per_second for r in off])
    per_pair = sorted(a.samples_per_second / b.samples_per_second for a, b in zip(on, off, strict=True))
    print(f"\nTensorFlow chief + 1 worker, {args.pairs} pairs, {os.cpu_count()} CPU cores: samples/s with the copy "
          f"on (median {statistics.median(r.samples_per_second for r in on):.0f}) over off (median "
          f"{statistics.median(r.samples_per_second for r in off):.0f}): {ratio:.3f} (95 % interval "
          f"{low:.3f}–{high:.3f}; pairs {per_pair[0]:.3f}–{per_pair[-1]:.3f}; target ≥ {TARGET_RATIO})")
    for label, field in (("worker", "worker_cores"), ("rest of the machine", "other_cores"),
                         ("trainers", "trainer_cores")):
        extra, extra_low, extra_high = paired_difference([getattr(r, field) * 60 for r in on],
                                                         [getattr(r, field) * 60 for r in off])
        print(f"  CPU-seconds per minute, {label}: on {statistics.median(getattr(r, field) * 60 for r in on):.2f}, "
              f"off {statistics.median(getattr(r, field) * 60 for r in off):.2f}, the copy's share {extra:+.2f} "
              f"(95 % interval {extra_low:+.2f}–{extra_high:+.2f})")


if __name__ == "__main__":
    main()

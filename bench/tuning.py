"""Hyperparameter tuning on a real running platform (embedded default: SQLite + SQLAlchemy broker, sshd nodes).

The trainer is the tuning tests' (``tests/trainers/tuning``): its metric is a known function of its four
hyperparameters, reported with the real ``cloudml-hypertune`` package. Three measurements:

1. **Per-trial platform overhead** (target ≤ 1 s): one tuning job, a 4-node TensorFlow topology per trial
   (master + 3 workers), ``maxParallelTrials`` 1, ``--trials`` 12, trainer ``--steps 1 --step_seconds 0``
   (the workers exit at once). The cluster is made once and reused by every trial, so node creation is not
   in the figure. For each consecutive pair of trials, gap = the next trial's trainers all running − the
   previous trial's chief exited, both read from the nodes' process folders
   (``…/work/job/process-TRIAL/{exit_code,pid}``, mtimes written by the node's wrapper on this host's
   clock), which a watcher thread stats while the job runs (teardown deletes them). The gap is split by the
   job's events into: *detect* (→ the chief's "Trainer exited" event: the worker read its exit code), *end*
   (→ "Trial N succeeded": trainers stopped, metric read, study told), *choose* (→ "Trial N+1 started":
   asked and recorded), *start* (→ its trainers' pids written). The worker's SSH commands and SFTP
   requests per gap are counted by a ``sitecustomize`` that wraps paramiko's ``Channel.exec_command`` and
   ``SFTPClient._async_request`` in the worker process only (a line appended to a file per call;
   ``--no-count`` leaves it out).
2. **Study efficiency**: the best value after ``--study-trials`` 20 trials of the default search (Optuna's
   TPE) (a) through the platform (1-node topology, one trial at a time) and (b) by Optuna in this process,
   with the platform's own distributions and sampler and the trainer's formula computed here, over
   ``--seeds`` 100 seeds. The platform reseeds its sampler for every trial (seed = job id × 7919 + trials
   so far); (c) does the same in this process: with the platform job's id it must give the platform's
   exact sequence, with other ids the spread; (d) random search, the baseline TPE should beat.
3. **Early stopping on and off**: ``--es-pairs`` 2 pairs of jobs of the same spec (``--es-trials`` 8,
   trainer ``--steps 5 --step_seconds 0.5``, 1-node topology) with ``enableTrialEarlyStopping`` true and
   false: trainer-seconds (Σ endTime − startTime of ``trainingOutput.trials``), trials stopped early, best
   value. The two jobs of a pair search different sequences (their job ids seed them).
4. **Early stopping at equal best value** (``--only grid``): the same pairs over a full 10-point grid, which
   both jobs of a pair run whole (in orders of their own), so they search the same points and the best is
   never stopped: trainer steps run (noise-free), trainer-seconds, best values (equal).

About 6 minutes on the 2-core development machine:

    .venv/bin/python -m bench.tuning [--trials 12] [--study-trials 20] [--seeds 100] [--es-pairs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from cloudml_os.config import load_settings
from cloudml_os.runtimes import ensure_runtime
from cloudml_os.workflows import tune
from tests.harness import Client, build_sdist, hypertune_sdist, start_platform

ROOT = Path(__file__).resolve().parents[1]
TARGET_GAP = 1.0
SEED_FACTOR = 7919  # as cloudml_os.workflows.tune.load_study seeds its sampler
FOUR_NODES = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard", "workerCount": 3}
ONE_NODE = {"scaleTier": "BASIC"}
PARAMS = [  # the integration test's space: every parameter type
    {"parameterName": "learning_rate", "type": "DOUBLE", "minValue": 0.0001, "maxValue": 1,
     "scaleType": "UNIT_LOG_SCALE"},
    {"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 5, "scaleType": "UNIT_LINEAR_SCALE"},
    {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]},
    {"parameterName": "batch_size", "type": "DISCRETE", "discreteValues": [16, 32, 64]},
]
BEST_POSSIBLE = 1 + 0.3 + 64 / 640  # learning_rate 0.01, layers 3, adam, batch 64

# Loaded by the worker process only (PYTHONPATH): one line per SSH connection, command and SFTP request.
SITECUSTOMIZE = '''
import os, sys, time
_path = os.environ.get("CLOUDML_BENCH_SSH_LOG")
if _path and "cloudml_os.cli" in sys.orig_argv and "worker" in sys.orig_argv:
    import paramiko
    from paramiko.sftp_client import SFTPClient

    _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _note(kind, peer):
        os.write(_fd, f"{time.time():.6f} {kind} {peer}\\n".encode())

    def _peer(transport):
        try:
            return transport.getpeername()[0]
        except Exception:
            return "?"

    _connect, _exec, _request = paramiko.SSHClient.connect, paramiko.Channel.exec_command, SFTPClient._async_request

    def connect(self, hostname, *args, **kwargs):
        _note("connect", hostname)
        return _connect(self, hostname, *args, **kwargs)

    def exec_command(self, command):
        _note("exec", _peer(self.get_transport()))
        return _exec(self, command)

    def _async_request(self, fileobj, t, *args):
        _note("sftp", _peer(self.sock.get_transport()))
        return _request(self, fileobj, t, *args)

    paramiko.SSHClient.connect, paramiko.Channel.exec_command = connect, exec_command
    SFTPClient._async_request = _async_request
'''


def objective(values: dict[str, str]) -> float:
    """The tuning trainer's final metric, from the values the platform passes it (``--name=value``)."""
    return (1 - (math.log10(float(values["learning_rate"])) + 2) ** 2 / 4 - 0.1 * (int(values["layers"]) - 3) ** 2
            + (0.3 if values["optimizer"] == "adam" else 0.0) + float(values["batch_size"]) / 640)


def spec(max_trials: int, *, early_stopping: bool = False) -> dict:
    return {"goal": "MAXIMIZE", "hyperparameterMetricTag": "objective", "maxTrials": max_trials,
            "maxParallelTrials": 1, "enableTrialEarlyStopping": early_stopping, "params": PARAMS}


def _time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the order statistics (k, n + 1 − k) with the largest k
    whose coverage, 1 − 2·P(Binomial(n, ½) < k), is at least ``confidence``."""
    ordered, n = sorted(values), len(values)
    interval = (ordered[0], ordered[-1])
    for k in range(2, n // 2 + 1):
        if 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n < confidence:
            break
        interval = (ordered[k - 1], ordered[n - k])
    return interval


class ProcessClock:
    """Stats the local nodes' trial process folders every ``interval`` seconds while jobs run, keeping the
    mtimes of ``pid`` (trainer started) and ``exit_code`` (trainer exited) before teardown deletes them."""

    def __init__(self, data_dir: Path, interval: float = 0.2) -> None:
        self.clusters = data_dir / "nodes" / "clusters"
        self.interval = interval
        self.started: dict[tuple[str, str, int], float] = {}  # (cluster, node, trial) → pid mtime
        self.exited: dict[tuple[str, str, int], float] = {}
        self.addresses: dict[str, tuple[str, str]] = {}  # node address → (cluster, node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(FileNotFoundError):
                for cluster in os.scandir(self.clusters):
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        for node in os.scandir(Path(cluster.path) / "nodes"):
                            self._look(cluster.name, node.name, Path(node.path))

    def _look(self, cluster: str, node: str, node_dir: Path) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, ValueError, KeyError):
            if not any(where == (cluster, node) for where in self.addresses.values()):
                self.addresses[json.loads((node_dir / "node.json").read_text())["address"]] = (cluster, node)
            for folder in os.scandir(node_dir / "work" / "job"):
                if not folder.name.startswith("process-"):
                    continue
                key = (cluster, node, int(folder.name.removeprefix("process-")))
                for name, seen in (("pid", self.started), ("exit_code", self.exited)):
                    if key not in seen:
                        with contextlib.suppress(FileNotFoundError):
                            seen[key] = os.stat(Path(folder.path) / name).st_mtime


def _ssh_calls(path: Path | None) -> list[tuple[float, str, str]]:
    if path is None or not path.exists():
        return []
    return [(float(t), kind, peer) for t, kind, peer in (line.split() for line in path.read_text().splitlines())]


def run_job(client: Client, job_id: str, uris: list[str], hyperparameters: dict, args: list[str],
            topology: dict) -> dict:
    client.submit(job_id, uris[0], args=args, packageUris=uris, hyperparameters=hyperparameters, **topology)
    job = client.wait(job_id, timeout=1200)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    return job


# ---- 1. per-trial overhead -------------------------------------------------------------------------------

def overhead(client: Client, uris: list[str], clock: ProcessClock, ssh_log: Path | None, trials: int) -> None:
    job_id = f"bench_gap_{uuid.uuid4().hex[:6]}"
    submitted = time.time()
    job = run_job(client, job_id, uris, spec(trials), ["--steps", "1", "--step_seconds", "0"], FOUR_NODES)
    clusters = {c for (c, _, _), t in clock.started.items() if t >= submitted}
    assert len(clusters) == 1, clusters
    cluster = clusters.pop()
    started: dict[int, list[float]] = {}
    exited: dict[int, float] = {}
    for (c, _node, trial), when in clock.started.items():
        if c == cluster:
            started.setdefault(trial, []).append(when)
    for (c, node, trial), when in clock.exited.items():
        if c == cluster and node.endswith("-chief-0"):
            exited[trial] = when
    events = client.events(job_id)
    ended_event = {int(e["node"].split("-")[1]): _time(e["time"]) for e in events
                   if e["kind"] == "TRIAL" and " succeeded " in e["message"]}
    started_event = {int(e["node"].split("-")[1]): _time(e["time"]) for e in events
                     if e["kind"] == "TRIAL" and " started " in e["message"]}
    chief_seen = sorted(_time(e["time"]) for e in events  # the worker read the chief's exit code
                        if e["kind"] == "PROCESS" and e.get("node", "").endswith("-chief-0"))
    ours = {address for address, (c, _) in clock.addresses.items() if c == cluster}
    calls = [(t, kind) for t, kind, peer in _ssh_calls(ssh_log) if peer in ours]

    rows = []
    for trial in range(1, trials):
        nxt = trial + 1
        if trial not in exited or len(started.get(nxt, [])) != 4:
            print(f"  trial {trial} → {nxt}: process folders not all seen (exited {trial in exited}, "
                  f"started {len(started.get(nxt, []))}/4); skipped")
            continue
        end, begin = exited[trial], max(started[nxt])
        seen = next(t for t in chief_seen if t >= end)
        inside = [kind for t, kind in calls if end < t <= begin]
        rows.append({
            "trial": trial,
            "gap": begin - end,
            "detect": seen - end,                          # chief exit → the worker read its exit code
            "end": ended_event[trial] - seen,              # → trainers stopped, metric read, trial SUCCEEDED
            "choose": started_event[nxt] - ended_event[trial],  # → next trial asked and recorded
            "start": begin - started_event[nxt],           # → all its trainers running
            "exec": inside.count("exec"), "sftp": inside.count("sftp"), "connect": inside.count("connect"),
            "run": exited[trial] - min(started[trial]),    # the chief's own run (python + hypertune, no work)
        })
    print(f"\n1. Per-trial platform overhead: {job_id}, 4 nodes per trial (master + 3 workers), "
          f"{trials} trials one at a time, cluster reused")
    print(f"  {'trials':>7} {'gap':>7} {'detect':>7} {'end':>7} {'choose':>7} {'start':>7} {'exec':>5} {'sftp':>5} "
          f"{'conn':>5} {'chief run':>10}")
    for row in rows:
        print(f"  {row['trial']:>3}→{row['trial'] + 1:<3} {row['gap']:7.3f} {row['detect']:7.3f} {row['end']:7.3f} "
              f"{row['choose']:7.3f} {row['start']:7.3f} {row['exec']:5d} {row['sftp']:5d} {row['connect']:5d} "
              f"{row['run']:10.3f}")
    gaps = [row["gap"] for row in rows]
    if not gaps:
        return
    median = statistics.median(gaps)
    low, high = _median_interval(gaps)
    verdict = "met" if high <= TARGET_GAP else "not met" if low > TARGET_GAP else "not decided by this run"
    print(f"  gap (chief exit → next trial's 4 trainers running): median {median:.3f} s (95 % interval "
          f"{low:.3f}–{high:.3f} s)  p90 {_quantile(gaps, 0.9):.3f} s  max {max(gaps):.3f} s  n {len(gaps)}")
    print(f"  target ≤ {TARGET_GAP:.1f} s: median/target {median / TARGET_GAP:.2f}, {verdict}")
    for part in ("detect", "end", "choose", "start"):
        values = [row[part] for row in rows]
        print(f"    {part:6s} median {statistics.median(values):.3f} s  max {max(values):.3f} s")
    if ssh_log is not None:
        print(f"  per gap: SSH commands median {statistics.median(r['exec'] for r in rows):g}, SFTP requests "
              f"median {statistics.median(r['sftp'] for r in rows):g}, new connections "
              f"{sum(r['connect'] for r in rows)} in all")
    total = _time(job["endTime"]) - _time(job["createTime"])
    print(f"  job: createTime → endTime {total:.1f} s")


# ---- 2. study efficiency ---------------------------------------------------------------------------------

def in_process(hyperparameters: dict, trials: int, seed: int, reseed_base: int | None = None,
               storage: str | None = None) -> tuple[list[dict[str, str]], list[float], float]:
    """The same search in this process: values passed, objectives, seconds."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = tune.distributions(hyperparameters)
    began = time.perf_counter()
    study = optuna.create_study(direction="maximize", sampler=tune.sampler(hyperparameters, seed, 0),
                                storage=storage)
    values, objectives = [], []
    for number in range(trials):
        if reseed_base is not None:
            study.sampler = tune.sampler(hyperparameters, reseed_base, number)
        trial = study.ask(distributions)
        passed = tune.trial_values(hyperparameters, trial.params)
        values.append(passed)
        objectives.append(objective(passed))
        study.tell(trial, objectives[-1])
    return values, objectives, time.perf_counter() - began


def _job_pk(data_dir: Path, job_id: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'cloudml-os.db'}?mode=ro", uri=True)) as db:
        return db.execute("SELECT id FROM jobs WHERE job_id = ?", (job_id,)).fetchone()[0]


def _spread(values: list[float]) -> str:
    return (f"mean {statistics.fmean(values):.4f}, median {statistics.median(values):.4f}, "
            f"p10–p90 {_quantile(values, 0.1):.4f}–{_quantile(values, 0.9):.4f}")


def study_efficiency(client: Client, uris: list[str], data_dir: Path, trials: int, seeds: int) -> None:
    hyperparameters = spec(trials)
    job_id = f"bench_study_{uuid.uuid4().hex[:6]}"
    job = run_job(client, job_id, uris, hyperparameters, ["--steps", "1", "--step_seconds", "0"], ONE_NODE)
    output = sorted(job["trainingOutput"]["trials"], key=lambda t: int(t["trialId"]))
    platform_best = max(t["finalMetric"]["objectiveValue"] for t in output)
    platform_wall = _time(output[-1]["endTime"]) - _time(output[0]["startTime"])
    job_wall = _time(job["endTime"]) - _time(job["createTime"])

    fixed = [in_process(hyperparameters, trials, seed) for seed in range(seeds)]
    bests = [max(objectives) for _, objectives, _ in fixed]
    memory_wall = statistics.median(seconds for _, _, seconds in fixed)
    with tempfile.TemporaryDirectory() as tmp:
        _, _, sqlite_wall = in_process(hyperparameters, trials, 0, storage=f"sqlite:///{tmp}/optuna.db")
    base = _job_pk(data_dir, job_id) * SEED_FACTOR
    replay, replay_objectives, _ = in_process(hyperparameters, trials, base, reseed_base=base)
    same = sum(r == t["hyperparameters"] for r, t in zip(replay, output, strict=True))
    # Job ids far from this platform's, so that none repeats the platform job's own sequence.
    reseeded = [max(in_process(hyperparameters, trials, s * SEED_FACTOR, reseed_base=s * SEED_FACTOR)[1])
                for s in range(1001, 1001 + seeds)]
    random_search = {**hyperparameters, "algorithm": "RANDOM_SEARCH"}
    random_bests = [max(in_process(random_search, trials, seed)[1]) for seed in range(seeds)]
    rank = sum(b < platform_best for b in reseeded) + sum(b == platform_best for b in reseeded) / 2

    print(f"\n2. Study efficiency: best value after {trials} trials of TPE (the default algorithm); the best "
          f"possible is {BEST_POSSIBLE:.3f}")
    print(f"  (a) platform {job_id}: best {platform_best:.4f}; first trial start → last trial end "
          f"{platform_wall:.1f} s ({platform_wall / trials:.2f} s a trial), createTime → endTime {job_wall:.1f} s")
    print(f"  (b) Optuna in this process, TPESampler(seed), seeds 0–{seeds - 1}: {_spread(bests)}; seeds 0–4: "
          f"{', '.join(f'{b:.4f}' for b in bests[:5])}; {memory_wall * 1000:.0f} ms a study in memory "
          f"({sqlite_wall * 1000:.0f} ms with SQLite storage)")
    print(f"  (c) in this process, reseeded every trial as the platform does (seed = job id × {SEED_FACTOR} + n): "
          f"with the platform job's id, {same}/{trials} trials identical to the platform's (best "
          f"{max(replay_objectives):.4f}); job ids 1001–{1000 + seeds}: {_spread(reseeded)}; the platform's best "
          f"ranks at {100 * rank / seeds:.0f} % of them")
    print(f"  (d) random search in this process, seeds 0–{seeds - 1}: {_spread(random_bests)}")
    print(f"  wall time platform / in process: {platform_wall / memory_wall:,.0f}× (in memory), "
          f"{platform_wall / sqlite_wall:,.0f}× (SQLite storage)")
    values = [t["finalMetric"]["objectiveValue"] for t in output]
    print("  platform's best so far by trial: " + " ".join(f"{max(values[:k]):.3f}" for k in range(1, trials + 1)))


# ---- 3. early stopping -----------------------------------------------------------------------------------

def early_stopping(client: Client, uris: list[str], trials: int, pairs: int, steps: int, step_seconds: float) -> None:
    print(f"\n3. Early stopping: {trials} trials, trainer --steps {steps} --step_seconds {step_seconds:g}, 1 node")
    print(f"  {'enableTrialEarlyStopping':26s} {'trainer-s':>10} {'stopped':>8} {'best':>8} {'job wall':>9}")
    totals: dict[bool, list[float]] = {True: [], False: []}
    for pair in range(pairs):
        for enabled in ((True, False) if pair % 2 == 0 else (False, True)):
            job_id = f"bench_es_{'on' if enabled else 'off'}_{uuid.uuid4().hex[:6]}"
            job = run_job(client, job_id, uris, spec(trials, early_stopping=enabled),
                          ["--steps", str(steps), "--step_seconds", str(step_seconds)], ONE_NODE)
            output = job["trainingOutput"]["trials"]
            seconds = sum(_time(t["endTime"]) - _time(t["startTime"]) for t in output)
            stopped = sum(t["isTrialStoppedEarly"] for t in output)
            best = max(t["finalMetric"]["objectiveValue"] for t in output
                       if "finalMetric" in t and not t["isTrialStoppedEarly"])
            wall = _time(job["endTime"]) - _time(job["createTime"])
            totals[enabled].append(seconds)
            print(f"  {str(enabled):26s} {seconds:10.1f} {stopped:8d} {best:8.4f} {wall:8.1f}s  {job_id}")
            for trial in output:  # a trial without a value that was not stopped early: say what it was
                if "finalMetric" not in trial or trial["state"] != "SUCCEEDED":
                    print(f"    trial {trial['trialId']}: {trial['state']}, stopped early "
                          f"{trial['isTrialStoppedEarly']}, finalMetric {trial.get('finalMetric')}, error "
                          f"{trial.get('errorMessage', '')[:600]!r}; its events:")
                    for event in client.request("GET", f"/jobs/{job_id}/events",
                                                params={"trial": trial["trialId"]}).json()["events"]:
                        print(f"      {event['time']} {event['kind']} {event.get('node', '')} {event['message'][:300]}")
    on, off = statistics.median(totals[True]), statistics.median(totals[False])
    print(f"  trainer-seconds on / off: {on / off:.2f} (median {on:.1f} s / {off:.1f} s)")


GRID = {"goal": "MAXIMIZE", "hyperparameterMetricTag": "objective", "algorithm": "GRID_SEARCH", "maxTrials": 10,
        "maxParallelTrials": 1, "params": [
            {"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 5},
            {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]}]}


def early_stopping_on_a_grid(client: Client, uris: list[str], pairs: int, steps: int, step_seconds: float) -> None:
    """Early stopping at equal best value: both jobs run every point of a 10-point grid (in orders of their
    own), so they search the same points; the best point's curve is above every median, so it is never
    stopped. Trainer steps run (the last reported step of each trial) are the noise-free figure."""
    print(f"\n4. Early stopping at equal best value: a full grid of {GRID['maxTrials']} points, trainer --steps "
          f"{steps} --step_seconds {step_seconds:g}, 1 node")
    print(f"  {'enableTrialEarlyStopping':26s} {'steps run':>10} {'trainer-s':>10} {'stopped':>8} {'best':>8}")
    runs: dict[bool, list[tuple[int, float, float]]] = {True: [], False: []}
    for pair in range(pairs):
        for enabled in ((True, False) if pair % 2 == 0 else (False, True)):
            job_id = f"bench_grid_{'on' if enabled else 'off'}_{uuid.uuid4().hex[:6]}"
            job = run_job(client, job_id, uris, {**GRID, "enableTrialEarlyStopping": enabled},
                          ["--steps", str(steps), "--step_seconds", str(step_seconds)], ONE_NODE)
            output = job["trainingOutput"]["trials"]
            steps_run = sum(int(t["finalMetric"]["trainingStep"]) for t in output if "finalMetric" in t)
            seconds = sum(_time(t["endTime"]) - _time(t["startTime"]) for t in output)
            best = max(t["finalMetric"]["objectiveValue"] for t in output
                       if "finalMetric" in t and not t["isTrialStoppedEarly"])
            runs[enabled].append((steps_run, seconds, best))
            print(f"  {str(enabled):26s} {steps_run:10d} {seconds:10.1f} "
                  f"{sum(t['isTrialStoppedEarly'] for t in output):8d} {best:8.4f}  {job_id}")
    on_steps, off_steps = (statistics.median(r[0] for r in runs[k]) for k in (True, False))
    on_s, off_s = (statistics.median(r[1] for r in runs[k]) for k in (True, False))
    bests = {round(r[2], 9) for k in runs for r in runs[k]}
    print(f"  steps on / off {on_steps / off_steps:.2f}, trainer-seconds on / off {on_s / off_s:.2f}; "
          f"best values {'equal' if len(bests) == 1 else 'DIFFER'}: {sorted(bests)}")


# ---- the run -----------------------------------------------------------------------------------------------

def _packages(tmp: Path) -> list[Path]:
    runtime = ensure_runtime("tensorflow-2.21", load_settings(environ={}).runtimes_dir)
    return [build_sdist(ROOT / "tests" / "trainers" / "tuning", tmp, runtime / "bin" / "python"), hypertune_sdist()]


@contextlib.contextmanager
def _counting(tmp: Path, enabled: bool) -> Iterator[Path | None]:
    """The worker's SSH calls logged to a file (see SITECUSTOMIZE), by PYTHONPATH while the platform starts."""
    if not enabled:
        yield None
        return
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "CLOUDML_BENCH_SSH_LOG")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp / "site"), saved["PYTHONPATH"]]))
    os.environ["CLOUDML_BENCH_SSH_LOG"] = str(tmp / "ssh.log")
    try:
        yield tmp / "ssh.log"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="trials of the overhead job (4 nodes each)")
    parser.add_argument("--study-trials", type=int, default=20, help="trials of the study-efficiency job")
    parser.add_argument("--seeds", type=int, default=100, help="in-process studies of each kind (the spread)")
    parser.add_argument("--es-trials", type=int, default=8)
    parser.add_argument("--es-pairs", type=int, default=2, help="pairs of jobs (on, off) for early stopping")
    parser.add_argument("--steps", type=int, default=5, help="trainer steps in the early-stopping jobs")
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--only", choices=["overhead", "study", "early-stopping", "grid"], action="append")
    parser.add_argument("--no-count", action="store_true", help="do not count the worker's SSH calls")
    args = parser.parse_args()
    only = set(args.only or ["overhead", "study", "early-stopping", "grid"])
    print(f"{os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "sdist").mkdir()
        packages = _packages(tmp / "sdist")
        with (_counting(tmp, not args.no_count) as ssh_log,
              start_platform(tmp / "platform", local_address_prefix="127.9", local_port_base=24500) as platform,
              ProcessClock(platform.data_dir) as clock):
            client = platform.client("bench")
            uris = [client.upload(path) for path in packages]
            if "overhead" in only:
                overhead(client, uris, clock, ssh_log, args.trials)
            if "study" in only:
                study_efficiency(client, uris, platform.data_dir, args.study_trials, args.seeds)
            if "early-stopping" in only:
                early_stopping(client, uris, args.es_trials, args.es_pairs, args.steps, args.step_seconds)
            if "grid" in only:
                early_stopping_on_a_grid(client, uris, args.es_pairs, args.steps, args.step_seconds)
    print(f"\nload average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""Hyperparameter tuning: the TUNING step runs a job's trials, as Cloud ML Engine's HyperparameterSpec says.

A tuning job's cluster has one group of nodes per parallel trial (a *slot*, ``slotK-ROLE``; see
:func:`cloudml_os.workflows.train.cluster_spec`), provisioned and bootstrapped once like any job's. The
TUNING step then keeps every slot busy: it asks the job's Optuna study for the next trial's values
(``study.ask``), starts the trainer on the slot's nodes with them as ``--name=value`` arguments
(``TF_CONFIG``'s ``task.trial`` and ``CLOUD_ML_TRIAL_ID`` set, ``CLOUD_ML_HP_METRIC_FILE`` where
``cloudml-hypertune`` writes), follows the trainers' logs and exits as the TRAINING step does, and when the
slot's trainers are done reads the metric the trainer reported and tells the study (``study.tell``).
Optuna owns the search and keeps it in the platform's database (:func:`study_storage`); this module owns
the trials' lifetimes, recorded in ``job_trials`` (:class:`cloudml_os.store.JobTrial`).

Every action is idempotent, so a delivery that dies anywhere is simply repeated: a trial's row is written
after Optuna's ``ask`` (an asked trial without a row is adopted by the next delivery), a trial is started
with ``start_process``, which does nothing to a process folder that exists, and ended by telling the study
first (skipped when told already) and then a compare-and-set on the row. A finished trial is never run
again. Each trial writes its own process folder (``process-TRIAL``; the node's ``attempt`` is the trial's
id), its own ``--job-dir`` (``output/TRIAL``) and its own logs (``trial-N/ROLE``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from cloudml_os.frameworks.base import Member, Role
from cloudml_os.metrics import scalars_in
from cloudml_os.remote import FanOutError, NodeSession, RemoteError, wait_for_streams
from cloudml_os.remote import ProcessStatus as RemoteStatus
from cloudml_os.states import NODE_UNREACHABLE, JobState, Step
from cloudml_os.store import Cluster, Job, JobTrial, Node
from cloudml_os.tuning import DEFAULT_METRIC_TAG, goal, max_trials, trial_node
from cloudml_os.workflows import outputs
from cloudml_os.workflows import train as training
from cloudml_os.workflows.train import Handover, StepError, TrainingContext

log = logging.getLogger(__name__)

METRIC_FILE = "hypertune/output.metrics"  # under the trial's process folder on each node
METRIC_READ_INTERVAL = 1.0  # seconds between reads of running trials' intermediate metrics (early stopping)
# Early stopping: Optuna's median rule, once this many trials have completed (Cloud ML Engine's rule is
# unpublished; the median rule is what Vizier's "automated early stopping" is documented to resemble).
PRUNER_STARTUP_TRIALS = 2


# ---- the search: Optuna study, sampler, values -----------------------------------------------------

@functools.lru_cache(maxsize=4)
def study_storage(database_url: str) -> Any:
    """The Optuna storage of this installation, in the platform's own database.

    Optuna's tables have their own Alembic version table named like ours, so they live apart: in
    PostgreSQL's schema ``optuna`` (made by our migration 0009), in a sibling SQLite file
    (``NAME-optuna.sqlite``) or a sibling MySQL database (``NAME_optuna``). One storage per process.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = make_url(database_url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"options": "-csearch_path=optuna"}
    elif url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        url = url.set(database=str(path.with_name(f"{path.stem}-optuna{path.suffix or '.sqlite'}")))
        engine_kwargs = {"connect_args": {"timeout": 30}}
    elif url.get_backend_name() in ("mysql", "mariadb"):
        _create_mysql_database(url, f"{url.database}_optuna")
        url = url.set(database=f"{url.database}_optuna")
    return optuna.storages.RDBStorage(url.render_as_string(hide_password=False), engine_kwargs=engine_kwargs)


def _create_mysql_database(url: Any, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"CREATE DATABASE IF NOT EXISTS `{name}`"))
    finally:
        engine.dispose()


def study_name(job: Job) -> str:
    return f"cloudml-os-job-{job.id}"


def spec_of(job: Job) -> dict[str, Any]:
    return job.training_input["hyperparameters"]


def metric_tag(spec: Mapping[str, Any]) -> str:
    return spec.get("hyperparameterMetricTag") or DEFAULT_METRIC_TAG


def total_trials(spec: Mapping[str, Any]) -> int:
    """Trials to run: ``maxTrials`` (default 1), fewer when a grid has fewer points."""
    wanted = max_trials(spec)
    if spec.get("algorithm") == "GRID_SEARCH":
        return min(wanted, math.prod(len(values) for values in grid(spec).values()))
    return wanted


def grid(spec: Mapping[str, Any]) -> dict[str, list[Any]]:
    """GRID_SEARCH's points per parameter, as the study's (internal) values."""
    points: dict[str, list[Any]] = {}
    for param in spec["params"]:
        kind = param["type"]
        if kind == "INTEGER":
            points[param["parameterName"]] = list(range(int(param["minValue"]), int(param["maxValue"]) + 1))
        elif kind == "CATEGORICAL":
            points[param["parameterName"]] = list(param["categoricalValues"])
        elif kind == "DISCRETE":
            points[param["parameterName"]] = [float(v) for v in param["discreteValues"]]
    return points


def distributions(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna distributions of the parameters. UNIT_REVERSE_LOG_SCALE is sampled on a log scale and
    mirrored (``min + max - x``, see :func:`trial_values`), so values crowd towards the maximum."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    result: dict[str, Any] = {}
    for param in spec["params"]:
        name, kind = param["parameterName"], param["type"]
        log_scale = param.get("scaleType") in ("UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE")
        if kind == "DOUBLE":
            result[name] = FloatDistribution(float(param["minValue"]), float(param["maxValue"]), log=log_scale)
        elif kind == "INTEGER":
            result[name] = IntDistribution(int(param["minValue"]), int(param["maxValue"]), log=log_scale)
        elif kind == "CATEGORICAL":
            result[name] = CategoricalDistribution(list(param["categoricalValues"]))
        else:
            result[name] = CategoricalDistribution([float(v) for v in param["discreteValues"]])
    return result


def trial_values(spec: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, str]:
    """The values a trial passes to the trainer (``--name=value``), from the study's values, as strings."""
    values = {}
    for param in spec["params"]:
        name, kind = param["parameterName"], param["type"]
        value = params[name]
        if param.get("scaleType") == "UNIT_REVERSE_LOG_SCALE":
            value = param["minValue"] + param["maxValue"] - value
        if kind == "INTEGER":
            values[name] = str(int(round(value)))
        elif kind == "DOUBLE":
            values[name] = repr(float(value))
        elif kind == "DISCRETE":
            values[name] = str(int(value)) if float(value).is_integer() else repr(float(value))
        else:
            values[name] = str(value)
    return values


def sampler(spec: Mapping[str, Any], seed: int, asked: int) -> Any:
    """The search: TPE for ALGORITHM_UNSPECIFIED (Bayesian-style; ``constant_liar`` so that parallel trials
    do not all ask for the same point), grid or random as named.

    TPE and random search keep their random state in memory only: a sampler made for each ask with a
    fixed seed would repeat the same values after every worker restart, so their seed moves with ``asked``
    (the trials asked so far). The grid sampler shuffles its grid with its seed and gives trial N the Nth
    point, so its seed must stay the same for the whole study.
    """
    import optuna

    algorithm = spec.get("algorithm") or "ALGORITHM_UNSPECIFIED"
    if algorithm == "GRID_SEARCH":
        return optuna.samplers.GridSampler(grid(spec), seed=seed)
    seed += asked
    if algorithm == "RANDOM_SEARCH":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def pruner(spec: Mapping[str, Any]) -> Any:
    import optuna

    if spec.get("enableTrialEarlyStopping"):
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def load_study(ctx: TrainingContext, job: Job, asked: int | None = None) -> Any:
    """The job's study, made on first use (with a resumed job's finished trials as history).

    To ask for a trial, pass ``asked`` (the trials asked so far) to get the search's sampler
    (:func:`sampler`). Without it the study gets a plain random sampler, enough to tell and report (the grid
    sampler's hook would try to stop an optimize loop that does not exist here once the grid is done).
    """
    import optuna

    spec = spec_of(job)
    storage = study_storage(ctx.settings.database_url)
    direction = goal(spec).lower()
    search = optuna.samplers.RandomSampler() if asked is None else sampler(spec, job.id * 7919, asked)
    study = optuna.create_study(storage=storage, study_name=study_name(job), direction=direction,
                                load_if_exists=True, sampler=search, pruner=pruner(spec))
    previous = spec.get("resumePreviousJobId")
    if previous and not study.user_attrs.get("history_added"):
        earlier = ctx.store.find_job(job.project, previous)
        if earlier is not None:
            old = optuna.load_study(study_name=study_name(earlier), storage=storage)
            finished = [t for t in old.get_trials(deepcopy=False)
                        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
            study.add_trials(finished)
            ctx.store.add_event(job.id, "TUNING", f"Study resumed from job {previous} with its "
                                                  f"{len(finished)} finished trial(s) as history")
        study.set_user_attr("history_added", True)
    return study


# ---- the TUNING step ---------------------------------------------------------------------------------

def tune(ctx: TrainingContext, job: Job) -> Handover:
    """Keep every slot running a trial until the study's trials are done; then export the best trial's model.

    One delivery keeps its connections for ``watch_window`` seconds (less when the worker shuts down), then
    re-sends itself, like the TRAINING step.
    """
    if job.state == JobState.PREPARING.value:
        ctx.store.transition(job.id, [JobState.PREPARING], JobState.RUNNING)
    cluster = training._cluster(ctx, job)
    try:
        return _tune_window(ctx, job, cluster)
    except FanOutError as exc:
        _nodes_lost(ctx, job, cluster, exc.failures)
        return Handover(Step.TUNING)


def _slots(cluster: Cluster) -> dict[int, list[Node]]:
    slots: dict[int, list[Node]] = {}
    for node in cluster.nodes:
        slot = training.node_slot(node)
        if slot is not None:
            slots.setdefault(slot, []).append(node)
    return slots


def _tune_window(ctx: TrainingContext, job: Job, cluster: Cluster) -> Handover:
    spec = spec_of(job)
    framework = ctx.frameworks[job.framework]
    slots = _slots(cluster)
    window_ends = time.monotonic() + ctx.settings.watch_window
    max_running = training._seconds(job.training_input.get("scheduling", {}).get("maxRunningTime"))
    with training._Sessions(ctx, cluster) as sessions, contextlib.ExitStack() as open_streams:
        followers: dict[str, Any] = {}
        ended: dict[str, RemoteStatus] = {}
        unsent: dict[str, bytearray] = {}
        by_name = {node.name: node for node in cluster.nodes}

        def follow(node: Node, session: NodeSession) -> Any:
            stream = session.follow(training.process_dir(node), training._log_file_offset(node),
                                    ctx.settings.watch_interval)
            return open_streams.enter_context(contextlib.closing(stream))

        def flush() -> None:
            training._store_logs(ctx, job, [(by_name[n], bytes(d)) for n, d in unsent.items() if d])
            for data in unsent.values():
                data.clear()

        def watch_slot(nodes: list[Node]) -> None:
            for node, stream in zip(nodes, sessions.each(follow, nodes), strict=True):
                followers[node.name] = stream
                ended.pop(node.name, None)
                unsent[node.name] = bytearray()

        running = {t.slot: t for t in ctx.store.trials(job.id) if t.state == "RUNNING"}
        for slot, trial in running.items():  # started by an earlier delivery: make sure, then follow
            _start_on_slot(ctx, job, trial, slots[slot], sessions)
            watch_slot(slots[slot])
        # The running trials' outputs are copied to JOB_DIR/TRIAL by a thread of the window's own; a trial that
        # ends gets a last round at once (its slot's next trial writes another folder).
        copier = open_streams.enter_context(outputs.OutputSync(ctx, job, cluster, lambda: [
            source for slot, trial in list(running.items()) for source in trial_sources(ctx, job, trial, slots[slot])]))
        logs_due = metrics_due = time.monotonic()
        received = False  # whether the last look got log bytes
        while True:
            # Free slots get the next trials; none left to run and none running: the study is done.
            if not ctx.stopping.is_set():
                for slot in sorted(set(slots) - set(running)):
                    trial = _next_trial(ctx, job, slot)
                    if trial is None:
                        break
                    running[slot] = trial
                    _start_on_slot(ctx, job, trial, slots[slot], sessions)
                    watch_slot(slots[slot])
            if not running:
                # A worker shutting down starts no trial: the study is done only if none is left to start.
                return Handover(Step.TUNING) if ctx.stopping.is_set() else _conclude(ctx, job)
            finished, received_before, received = [], received, False
            for name, stream in list(followers.items()):
                data, done = stream.poll()
                unsent[name] += data
                received |= bool(data)
                if done:
                    stream.close()
                    del followers[name]
                    finished.append(by_name[name])
            now = time.monotonic()
            early_stopping_due = spec.get("enableTrialEarlyStopping") and now >= metrics_due
            if finished or now >= logs_due or early_stopping_due:
                flush()
            for node, status in zip(finished, sessions.each(functools.partial(training._fetch, ctx, job), finished)
                                    if finished else [], strict=True):
                if status.running:  # the stream ended, not the trainer: follow it again
                    followers[node.name] = sessions.each(follow, [node])[0]
                else:
                    ended[node.name] = status
            slots_freed = False
            for slot, trial in list(running.items()):
                outcome = framework.outcome([training._process_status(training._role(node, job, ctx),
                                                                      ended.get(node.name)) for node in slots[slot]])
                if outcome.state != "RUNNING":
                    _end_trial(ctx, job, trial, slots[slot], sessions, outcome, followers)
                    copier.run(trial_sources(ctx, job, trial, slots[slot]), final=True)
                    del running[slot]
                    slots_freed = True
            if early_stopping_due:
                metrics_due = now + METRIC_READ_INTERVAL
                for slot, trial in list(running.items()):
                    if _should_stop_early(ctx, job, trial, slots[slot], sessions):
                        _stop_slot(ctx, job, slots[slot], sessions, followers)
                        _finish(ctx, job, trial, "SUCCEEDED", stopped_early=True)
                        copier.run(trial_sources(ctx, job, trial, slots[slot]), final=True)
                        del running[slot]
                        slots_freed = True
            if now >= logs_due:
                logs_due = now + training.LOG_FETCH_INTERVAL
                if max_running and job.start_time and \
                        (ctx.store.now() - job.start_time).total_seconds() > max_running:
                    raise StepError(f"Job ran longer than scheduling.maxRunningTime ({max_running:g}s)")
                if now >= window_ends or ctx.stopping.is_set() or \
                        ctx.store.get_job(job.id).state != JobState.RUNNING.value:
                    return Handover(Step.TUNING)
            if slots_freed:
                continue  # a freed slot gets its next trial now, not after a sleep
            # Sleep until a stream has bytes or ends or something falls due; lines that kept coming two looks
            # in a row are taken every watch_interval, in batches (as the TRAINING step does).
            due = min(logs_due, metrics_due) if spec.get("enableTrialEarlyStopping") else logs_due
            pause = ctx.settings.watch_interval if received and received_before else 0.0
            if not ctx.stopping.wait(pause):
                wait_for_streams(followers.values(), due - time.monotonic())


def trial_sources(ctx: TrainingContext, job: Job, trial: JobTrial, nodes: list[Node],
                  reachable: set[str] | None = None) -> list[outputs.Source]:
    """The folders a trial's outputs are copied from: its job directory (``output/TRIAL``) on each of its
    slot's nodes (or the ``reachable`` ones) for event files (``tensorboard/trial-N/ROLE/…``), and the first
    output-owning node's 1:1 to ``JOB_DIR/TRIAL/…``."""
    owner = next((node.name for node in training._export_nodes(ctx, job, nodes)
                  if reachable is None or node.name in reachable), None)
    nodes = [node for node in nodes if reachable is None or node.name in reachable]
    return [outputs.Source(node, f"{training.node_job_dir(node)}/{trial.trial_id}",
                           f"{trial_node(trial.trial_id)}/{training.role_name(node)}/",
                           f"{trial.trial_id}/" if node.name == owner else None) for node in nodes]


def output_sources(ctx: TrainingContext, job: Job, cluster: Cluster, nodes: list[Node]) -> list[outputs.Source]:
    """The folders of the trials still running, on ``nodes`` (a job cancelled or failed while they ran)."""
    slots, names = _slots(cluster), {node.name for node in nodes}
    return [source for trial in ctx.store.trials(job.id) if trial.state == "RUNNING"
            for source in trial_sources(ctx, job, trial, slots.get(trial.slot, []), names)]


def _next_trial(ctx: TrainingContext, job: Job, slot: int) -> JobTrial | None:
    """The trial to start on ``slot``: one the study handed out whose row was never written (a delivery that
    died in between), else a new one; None when the study's trials are all started or too many failed."""
    import optuna

    spec = spec_of(job)
    trials = ctx.store.trials(job.id)
    _check_failures(job, trials)
    if len(trials) >= total_trials(spec):
        return None
    study = load_study(ctx, job, asked=len(trials))
    recorded = {t.optuna_number for t in trials}
    orphan = next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if t.number not in recorded), None)
    if orphan is not None:
        number, params = orphan.number, orphan.params
    else:
        asked = study.ask(distributions(spec))
        number, params = asked.number, asked.params
    trial = ctx.store.add_trial(JobTrial(job_id=job.id, trial_id=len(trials) + 1, optuna_number=number,
                                         slot=slot, state="RUNNING", hyperparameters=trial_values(spec, params),
                                         error_message="", reported_step=-1, stopped_early=False))
    values = " ".join(f"--{name}={value}" for name, value in trial.hyperparameters.items())
    ctx.store.add_event(job.id, "TRIAL", f"Trial {trial.trial_id} started on slot {slot}: {values}",
                        node=f"trial-{trial.trial_id}")
    publish(ctx, job)
    return trial


def _check_failures(job: Job, trials: list[JobTrial]) -> None:
    """:raises StepError: ``maxFailedTrials`` trials failed (0: every trial may fail), naming their errors."""
    spec = spec_of(job)
    failed = [t for t in trials if t.state == "FAILED"]
    limit = int(spec.get("maxFailedTrials") or 0)
    if failed and ((limit and len(failed) >= limit) or
                   (len(trials) >= total_trials(spec) and not any(t.state == "SUCCEEDED" for t in trials)
                    and all(t.state != "RUNNING" for t in trials))):
        errors = "\n".join(f"Trial {t.trial_id}: {t.error_message}" for t in failed[:5])
        reason = f"{len(failed)} trial(s) failed (maxFailedTrials {limit})" if limit else "Every trial failed"
        raise StepError(f"{reason}:\n{errors}")


def _start_on_slot(ctx: TrainingContext, job: Job, trial: JobTrial, nodes: list[Node],
                   sessions: training._Sessions) -> None:
    """Start the trial's trainers on the slot's nodes; a node running it already is left alone."""
    framework = ctx.frameworks[job.framework]
    for node in nodes:
        if node.attempt != trial.trial_id:  # this trial's process folder and log begin anew
            node.attempt, node.log_offset, node.log_base, node.process_state = trial.trial_id, 0, 0, "RUNNING"
            ctx.store.update_node(node.id, attempt=trial.trial_id, log_offset=0, log_base=0,
                                  process_state="RUNNING", exit_code=None)
    members = [Member(training._role(n, job, ctx), n.address, n.port_first, n.port_last) for n in nodes]
    arguments = [f"--{name}={value}" for name, value in trial.hyperparameters.items()]
    training_input = {**job.training_input, "args": [*training.trainer_args(ctx, job), *arguments]}
    body = {"jobId": job.job_id, "trainingInput": job.training_input, "trial": str(trial.trial_id)}

    def start(node: Node, session: NodeSession) -> None:
        if session.run(["test", "-e", f"{training.job_root(node)}/bootstrap.done"], check=False).exit_code != 0:
            _bootstrap_node(ctx, job, node, session)  # a node that replaced a lost one
        member = next(m for m in members if m.role.node_name == training._role(node, job, ctx).node_name)
        env = {
            **node.environment,
            **framework.environment(member, members, body),
            "CLOUD_ML_TRIAL_ID": str(trial.trial_id),
            "CLOUD_ML_HP_METRIC_FILE": f"{training.process_dir(node)}/{METRIC_FILE}",
            "PYTHONPATH": training.packages_dir(node),
            "PYTHONUNBUFFERED": "1",
        }
        argv = framework.command(member.role, training.node_python(node, job, framework), training_input,
                                 f"{training.node_job_dir(node)}/{trial.trial_id}")
        session.start_process(training.process_dir(node), argv, env=env, cwd=training.job_root(node))

    sessions.each(start, nodes)


def _bootstrap_node(ctx: TrainingContext, job: Job, node: Node, session: NodeSession) -> None:
    framework = ctx.frameworks[job.framework]
    with contextlib.ExitStack() as downloads:
        packages = [(uri, downloads.enter_context(ctx.artifacts.local_file(uri)))
                    for uri in job.training_input["packageUris"]]
        training._install_packages(ctx, job, framework, packages, node, session)


def _end_trial(ctx: TrainingContext, job: Job, trial: JobTrial, nodes: list[Node], sessions: training._Sessions,
               outcome: Any, followers: dict[str, Any]) -> None:
    """The slot's trainers are done (the framework's outcome): stop what still runs, read the final metric."""
    _stop_slot(ctx, job, nodes, sessions, followers)
    if outcome.state == "FAILED":
        _finish(ctx, job, trial, "FAILED", error=_with_log_tail(ctx, trial, outcome.message, outcome.failed_role))
        return
    reports = _reports(ctx, job, trial, nodes, sessions)
    if reports:
        step, value = reports[-1]
    else:
        found = _summary_metric(ctx, job, trial, nodes, sessions)
        if found is None:
            _finish(ctx, job, trial, "FAILED", error=(
                f"The trainer reported no value for the metric {metric_tag(spec_of(job))!r} (with cloudml-hypertune "
                f"or as a TensorFlow summary of that tag); check hyperparameterMetricTag"))
            return
        step, value = found
    _finish(ctx, job, trial, "SUCCEEDED", value=value, step=step)


def _stop_slot(ctx: TrainingContext, job: Job, nodes: list[Node], sessions: training._Sessions,
               followers: dict[str, Any]) -> None:
    """Stop the slot's trainers (parameter servers never exit; a pruned trial's trainers are still busy)
    and store their last log bytes."""
    for node in nodes:
        stream = followers.pop(node.name, None)
        if stream is not None:
            stream.close()

    def stop(node: Node, session: NodeSession) -> None:
        session.stop_process(training.process_dir(node), ctx.settings.stop_grace_seconds)
        training._fetch(ctx, job, node, session)

    sessions.each(stop, nodes)


def _finish(ctx: TrainingContext, job: Job, trial: JobTrial, state: str, *, value: float | None = None,
            step: int | None = None, stopped_early: bool = False, error: str = "") -> None:
    """Tell the study how the trial ended (once), then end its row (compare-and-set) and publish."""
    import optuna

    study = load_study(ctx, job)
    frozen = study_storage(ctx.settings.database_url).get_trial(_optuna_trial_id(ctx, job, trial))
    if not frozen.state.is_finished():
        if stopped_early:
            study.tell(trial.optuna_number, state=optuna.trial.TrialState.PRUNED)
        elif state == "SUCCEEDED":
            study.tell(trial.optuna_number, value)
        else:
            study.tell(trial.optuna_number, state=optuna.trial.TrialState.FAIL)
    if stopped_early and trial.reported_step >= 0:
        value, step = _last_intermediate(frozen)
    if ctx.store.finish_trial(trial.id, state, objective=value, training_step=step, stopped_early=stopped_early,
                              error_message=error[:4000]):
        how = {"SUCCEEDED": f"succeeded with {metric_tag(spec_of(job))} = {value} at step {step}",
               "FAILED": f"failed: {error.splitlines()[0] if error else ''}",
               "CANCELLED": "cancelled"}[state]
        if stopped_early:
            how = f"was stopped early (its metric trailed the median of earlier trials): {value} at step {step}"
        ctx.store.add_event(job.id, "TRIAL", f"Trial {trial.trial_id} {how}", node=f"trial-{trial.trial_id}")
        publish(ctx, job)


def _optuna_trial_id(ctx: TrainingContext, job: Job, trial: JobTrial) -> int:
    storage = study_storage(ctx.settings.database_url)
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name(job)),
                                                           trial.optuna_number)


def _last_intermediate(frozen: Any) -> tuple[float | None, int | None]:
    if not frozen.intermediate_values:
        return None, None
    step = max(frozen.intermediate_values)
    return frozen.intermediate_values[step], step


def _with_log_tail(ctx: TrainingContext, trial: JobTrial, message: str, role: Role | None) -> str:
    if role is None:
        return message
    key = f"trial-{trial.trial_id}/{role.node_name}"
    text, _ = ctx.store.read_log(trial.job_id, key, 0, 1 << 30)
    tail = "\n".join(text.decode("utf-8", "replace").rstrip().splitlines()[-training.ERROR_LOG_LINES:])
    return f"{message}\nLast log lines of {key}:\n{tail}"


# ---- the metric ----------------------------------------------------------------------------------------

def parse_metric_file(text: str, tag: str) -> list[tuple[int, float]]:
    """(global_step, value) of each line of a cloudml-hypertune metric file that reports ``tag``, in order.

    The file is JSON lines such as ``{"checkpoint_path": "", "global_step": "100", "my_tag": "0.93",
    "timestamp": 1700000000.0, "trial": "3"}``; lines that do not parse or lack the tag are skipped.
    """
    reports = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            reports.append((int(float(entry.get("global_step") or 0)), float(entry[tag])))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return reports


def _reports(ctx: TrainingContext, job: Job, trial: JobTrial, nodes: list[Node],
             sessions: training._Sessions) -> list[tuple[int, float]]:
    """The trial's metric reports, from the first output-owning node whose metric file has any."""
    tag = metric_tag(spec_of(job))
    for node in training._export_nodes(ctx, job, nodes):
        data = sessions.open[node.name].read_file(f"{training.process_dir(node)}/{METRIC_FILE}", 0, 1 << 20)
        reports = parse_metric_file(data.decode("utf-8", "replace"), tag)
        if reports:
            return reports
    return []


def _summary_metric(ctx: TrainingContext, job: Job, trial: JobTrial, nodes: list[Node],
                    sessions: training._Sessions) -> tuple[int, float] | None:
    """The last value of a TensorFlow summary with the metric's tag under the trial's job directory."""
    tag = metric_tag(spec_of(job))
    for node in training._export_nodes(ctx, job, nodes):
        session = sessions.open[node.name]
        root = f"{training.node_job_dir(node)}/{trial.trial_id}"
        found = session.run(["find", root, "-type", "f", "-name", "*tfevents*"], timeout=60, check=False)
        paths = [p for p in found.stdout.splitlines() if p.startswith(root + "/")]
        if not paths:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for path in paths:
                local = Path(tmp) / "node" / path[len(root) + 1:]
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(session.read_file(path, 0, 64 << 20))
            series = [points for name, points in scalars_in(Path(tmp)).items() if name.endswith(f": {tag}")]
        if series and series[0]:
            last = series[0][-1]
            return int(last["x"]), float(last["y"])
    return None


def _should_stop_early(ctx: TrainingContext, job: Job, trial: JobTrial, nodes: list[Node],
                       sessions: training._Sessions) -> bool:
    """Report the trial's new intermediate values to the study; whether its pruner stops the trial."""
    reports = [(step, value) for step, value in _reports(ctx, job, trial, nodes, sessions)
               if step > trial.reported_step]
    if not reports:
        return False
    import optuna

    handle = optuna.trial.Trial(load_study(ctx, job), _optuna_trial_id(ctx, job, trial))
    for step, value in reports:
        handle.report(value, step)
    trial.reported_step = reports[-1][0]
    ctx.store.update_trial(trial.id, reported_step=trial.reported_step)
    return handle.should_prune()


# ---- the end of the study ------------------------------------------------------------------------------

def _conclude(ctx: TrainingContext, job: Job) -> Handover:
    """Every trial has ended: fail the job when no trial gave a value, else export the best trial's model."""
    trials = ctx.store.trials(job.id)
    _check_failures(job, trials)
    if best_trial(spec_of(job), trials) is None:
        raise StepError("No trial reported a value for the metric " + repr(metric_tag(spec_of(job))))
    ctx.store.add_event(job.id, "OUTCOME", f"Tuning finished: {len(trials)} trial(s)")
    return Handover(Step.EXPORTING)


def best_trial(spec: Mapping[str, Any], trials: list[JobTrial]) -> JobTrial | None:
    """The completed trial with the best objective per ``goal``. Trials stopped early are not candidates:
    their models were not fully trained (and Optuna's best trial leaves them out too)."""
    scored = [t for t in trials if t.state == "SUCCEEDED" and t.objective is not None and not t.stopped_early]
    if not scored:
        return None
    sign = -1 if goal(spec) == "MINIMIZE" else 1
    return max(scored, key=lambda t: (sign * t.objective, -t.trial_id))


def export_sources(ctx: TrainingContext, job: Job, cluster: Cluster) -> list[tuple[Node, str]]:
    """Where the best trial's exported model may be: its slot's output-owning nodes, its own job directory."""
    best = best_trial(spec_of(job), ctx.store.trials(job.id))
    if best is None:
        return []
    ctx.store.add_event(job.id, "EXPORT", f"Trial {best.trial_id} is the best; its exported model is the job's",
                        node=f"trial-{best.trial_id}")
    nodes = [n for n in _slots(cluster).get(best.slot, []) if n.process_state != NODE_UNREACHABLE]
    return [(node, f"{training.node_job_dir(node)}/{best.trial_id}")
            for node in training._export_nodes(ctx, job, nodes)]


def close_trials(ctx: TrainingContext, job: Job) -> None:
    """At teardown: trials still running end CANCELLED (the job was cancelled or failed) and the output is
    written one last time, best trial first as Cloud ML Engine lists them."""
    for trial in ctx.store.trials(job.id):
        if trial.state == "RUNNING":
            _finish(ctx, job, trial, "CANCELLED")
    publish(ctx, job, final=True)


def publish(ctx: TrainingContext, job: Job, final: bool = False) -> None:
    """Write ``trainingOutput`` from the trial rows (v1 HyperparameterOutput; int64 fields as strings)."""
    spec = spec_of(job)
    trials = ctx.store.trials(job.id)
    if final:
        best = best_trial(spec, trials)
        sign = -1 if goal(spec) == "MINIMIZE" else 1
        trials.sort(key=lambda t: (t.objective is None, -sign * (t.objective or 0.0), t.trial_id))
        if best is not None:
            trials.remove(best)
            trials.insert(0, best)
    output = {
        **ctx.store.get_job(job.id).training_output,
        "isHyperparameterTuningJob": True,
        "hyperparameterMetricTag": metric_tag(spec),
        "completedTrialCount": str(sum(t.state == "SUCCEEDED" for t in trials)),
        "trials": [trial_output(t) for t in trials],
    }
    ctx.store.update_job(job.id, training_output=output)


def trial_output(trial: JobTrial) -> dict[str, Any]:
    output: dict[str, Any] = {
        "trialId": str(trial.trial_id),
        "hyperparameters": dict(trial.hyperparameters),
        "state": trial.state,
        "isTrialStoppedEarly": trial.stopped_early,
        "startTime": _timestamp(trial.start_time),
    }
    if trial.objective is not None:
        output["finalMetric"] = {"trainingStep": str(trial.training_step or 0), "objectiveValue": trial.objective}
    if trial.end_time is not None:
        output["endTime"] = _timestamp(trial.end_time)
    if trial.error_message:
        output["errorMessage"] = trial.error_message
    return output


def _timestamp(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- nodes that stopped answering -------------------------------------------------------------------------

def _nodes_lost(ctx: TrainingContext, job: Job, cluster: Cluster, failures: list[tuple[Node, BaseException]]) -> None:
    """A lost node fails the trial on its slot; the driver replaces it before the slot runs another trial."""
    from cloudml_os.workflows import restart

    lost_slots = set()
    for node, error in failures:
        ctx.store.update_node(node.id, process_state=NODE_UNREACHABLE)
        ctx.store.add_event(job.id, "NODE", f"Node {node.name} is unreachable: {error}", node=node.name)
        lost_slots.add(training.node_slot(node))
    for trial in ctx.store.trials(job.id):
        if trial.state == "RUNNING" and trial.slot in lost_slots:
            _finish(ctx, job, trial, "FAILED", error=f"A node of slot {trial.slot} stopped answering: "
                                                     f"{failures[0][1]}")
    try:
        restart._replace_lost_nodes(ctx, job, training._cluster(ctx, job))
    except RemoteError as exc:
        log.warning("job %s: replacing lost nodes failed: %s", job.id, exc)

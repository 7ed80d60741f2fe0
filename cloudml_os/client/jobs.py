"""``cloudml jobs``: submit a training job from a package folder or a batch prediction job; follow, describe,
list, cancel them.

``jobs submit training`` does what ``gcloud ai-platform jobs submit training`` does: it builds the
package folder's source distribution, uploads it (and any ``--packages``) to the project's packages,
and posts the v1 Job. A ``--config`` file (YAML or JSON, a v1 Job with ``trainingInput``, such as a
gcloud ``hptuning_config.yaml``) gives the body's starting point; flags win over it. Everything that can
be refused locally (flags, the config file, the package folder) is checked before anything is sent.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import IO, Any

import click
import yaml
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cloudml_os.client.context import command, invocation, parse_labels
from cloudml_os.client.logs import LogFollower
from cloudml_os.client.output import Column, emit, stderr
from cloudml_os.client.packaging import build_sdist, check_package_dir
from cloudml_os.client.rest import ApiClient, CliError

# Flags of `jobs submit training` and the trainingInput fields they set.
TRAINING_FLAGS = {
    "module_name": "pythonModule", "scale_tier": "scaleTier", "master_machine_type": "masterType",
    "worker_machine_type": "workerType", "parameter_server_machine_type": "parameterServerType",
    "worker_count": "workerCount", "parameter_server_count": "parameterServerCount",
    "runtime_version": "runtimeVersion", "python_version": "pythonVersion", "framework": "framework",
    "job_dir": "jobDir", "region": "region",
}
CONFIG_KEYS = {"trainingInput", "labels", "jobId"}  # a fetched Job's jobId is allowed, and ignored
MACHINE_TYPES = ("masterType", "workerType", "parameterServerType", "evaluatorType")
JOB_COLUMNS = [Column("JOB_ID", "jobId"), Column("STATUS", "state"), Column("STEP", "step"),
               Column("CREATED", "createTime")]


class StoppedFollowing(click.ClickException):
    """Ctrl-C while following a job: the job goes on; say how to follow it again (exit 130, as for SIGINT)."""

    exit_code = 130

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(self.format_message(), err=True)


def load_config(path: Path) -> dict[str, Any]:
    """A ``--config`` file: a YAML or JSON object with ``trainingInput`` (and optionally ``labels``).

    :raises CliError: (exit 2) unreadable, not an object, or with keys a job does not have.
    """
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"--config {path}: {exc}", 2) from None
    if not isinstance(document, dict):
        raise CliError(f"--config {path}: must hold an object with trainingInput (YAML or JSON)", 2)
    unknown = sorted(set(document) - CONFIG_KEYS)
    if unknown:
        raise CliError(f"--config {path}: unknown top-level key(s) {', '.join(unknown)}; "
                       f"expected trainingInput and labels", 2)
    for key in ("trainingInput", "labels"):
        if not isinstance(document.get(key, {}), dict):
            raise CliError(f"--config {path}: {key} must be an object", 2)
    return document


def training_body(job_id: str, document: dict[str, Any], flags: dict[str, Any], package_uris: list[str],
                  user_args: list[str], labels: dict[str, str]) -> dict[str, Any]:
    """The v1 Job to post: the ``--config`` document's ``trainingInput``, then every flag given over it.

    :param flags: flag values by the keys of :data:`TRAINING_FLAGS` (None: not given).
    :param package_uris: replace the document's ``packageUris`` when any; ``user_args`` replace its ``args``.
    """
    training = copy.deepcopy(document.get("trainingInput") or {})
    for flag, name in TRAINING_FLAGS.items():
        value = flags.get(flag)
        if value is None:
            continue
        if name == "scaleTier":
            value = value.upper().replace("-", "_")
        elif name == "framework":
            value = value.upper()
        elif name.endswith("Count"):
            value = str(value)  # v1 int64s travel as strings
        training[name] = value
    if package_uris:
        training["packageUris"] = package_uris
    if user_args:
        training["args"] = list(user_args)
    if "scaleTier" not in training and any(name in training for name in MACHINE_TYPES):
        training["scaleTier"] = "CUSTOM"  # machine types only mean something for a custom tier
    body: dict[str, Any] = {"jobId": job_id, "trainingInput": training}
    merged = {**(document.get("labels") or {}), **labels}
    if merged:
        body["labels"] = merged
    return body


def _package_entries(values: tuple[str, ...]) -> list[str]:
    """``--packages`` values (repeated or comma-separated): local files that exist, or ``store://`` URIs."""
    entries = [entry.strip() for value in values for entry in value.split(",") if entry.strip()]
    for entry in entries:
        if not entry.startswith("store://") and not Path(entry).is_file():
            raise CliError(f"--packages {entry}: no such file", 2)
    return entries


def upload(api: ApiClient, path: Path) -> str:
    """Upload one package with a progress bar on stderr (then one line saying where it went); its URI."""
    console = stderr()
    if console.is_terminal:
        columns = (TextColumn("Uploading [bold]{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn())
        # Transient: the bar gives way to the line below, and a refused upload leaves only the error.
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(path.name, total=path.stat().st_size)
            package = api.upload_package(path, lambda size: progress.advance(task, size))
    else:  # rich would still write a blank line for the bar
        package = api.upload_package(path)
    console.print(f"Uploaded {path.name} ({package.get('size', path.stat().st_size)} bytes): {package['uri']}")
    return package["uri"]


def follow(api: ApiClient, job_id: str, interval: float) -> None:
    """Print the job's logs until it ends. :raises CliError: it ended other than SUCCEEDED (exit 1)."""
    def write(line: str) -> None:
        click.echo(line, nl=False)

    try:
        job = LogFollower(api, job_id, write, interval=interval).run()
    except KeyboardInterrupt:
        raise StoppedFollowing(f"\nStopped following job {job_id}; it is still running. Follow it again with:\n"
                               f"  cloudml jobs stream-logs {job_id}\n"
                               f"or cancel it with:\n  cloudml jobs cancel {job_id}") from None
    if job["state"] != "SUCCEEDED":
        reason = f": {job['errorMessage']}" if job.get("errorMessage") else ""
        raise CliError(f"job {job_id} ended {job['state']}{reason}")
    stderr().print(f"Job {job_id} ended SUCCEEDED.")


@click.group("jobs")
def jobs_group() -> None:
    """Submit training and batch prediction jobs; follow, describe, list and cancel them."""


@jobs_group.group("submit")
def submit_group() -> None:
    """Submit a job."""


@command(submit_group, "training")
@click.argument("job")
@click.argument("user_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- USER_ARGS...]")
@click.option("--package-path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The trainer's package folder (with setup.py or pyproject.toml); its sdist is built and "
                   "uploaded.")
@click.option("--module-name", help="The module to run, e.g. trainer.task (python -m MODULE USER_ARGS).")
@click.option("--packages", multiple=True, metavar="FILE",
              help="More packages to install: a .tar.gz/.zip/.whl file (uploaded) or a store:// URI. Repeat it, or "
                   "separate them with commas.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A YAML or JSON file with trainingInput (and labels), e.g. an hptuning_config.yaml; the "
                   "flags win over it.")
@click.option("--scale-tier", help="BASIC, STANDARD_1, PREMIUM_1, BASIC_GPU or CUSTOM.")
@click.option("--master-machine-type", help="The master's machine type (CUSTOM tier), e.g. standard.")
@click.option("--worker-machine-type", help="The workers' machine type.")
@click.option("--parameter-server-machine-type", help="The parameter servers' machine type.")
@click.option("--worker-count", type=click.IntRange(min=0), help="How many workers.")
@click.option("--parameter-server-count", type=click.IntRange(min=0), help="How many parameter servers.")
@click.option("--runtime-version", help="The framework's runtime, e.g. 2.21 (see the project's getConfig).")
@click.option("--python-version", help="Accepted as in v1; the runtime decides.")
@click.option("--framework", help="TENSORFLOW (default), MXNET or PYTORCH.")
@click.option("--job-dir", help="Where the trainer writes (--job-dir), a store:// URI of the project.")
@click.option("--region", help="Kept with the job, as in v1.")
@click.option("--labels", help="Labels KEY=VALUE,KEY2=VALUE2.")
@click.option("--stream-logs", is_flag=True, help="Follow every node's log until the job ends; exit 0 if it "
              "succeeded, 1 otherwise.")
@click.option("--polling-interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between log reads with --stream-logs.")
def submit_training(job: str, user_args: tuple[str, ...], package_path: Path | None, module_name: str | None,
                    packages: tuple[str, ...], config_file: Path | None, labels: str | None, stream_logs: bool,
                    polling_interval: float, **flags: Any) -> None:
    """Submit training job JOB: build and upload the package, then start it.

    Arguments after -- go to the trainer as they are.

    \b
    cloudml jobs submit training census_1 --package-path trainer/ --module-name trainer.task \\
        --scale-tier custom --master-machine-type standard --worker-machine-type standard \\
        --worker-count 2 --stream-logs -- --epochs 3
    cloudml jobs submit training tune_1 --package-path trainer/ --module-name trainer.task \\
        --config hptuning_config.yaml --packages cloudml-hypertune-0.1.0.dev6.tar.gz
    """
    api = invocation().api()
    api.url("/jobs")  # a missing project is refused before anything is built
    document = load_config(config_file) if config_file else {}
    if package_path is not None:
        check_package_dir(package_path)
    extra = _package_entries(packages)
    label_values = parse_labels(labels)
    training = document.get("trainingInput") or {}
    if not (module_name or training.get("pythonModule")):
        raise click.UsageError("give --module-name (e.g. trainer.task)")
    if package_path is None and not extra and not training.get("packageUris"):
        raise click.UsageError("give --package-path (a folder with setup.py) or --packages")
    uris = []
    if package_path is not None:
        with tempfile.TemporaryDirectory(prefix="cloudml-") as work:
            with stderr().status(f"Building the source distribution of {package_path}…"):
                sdist = build_sdist(package_path, Path(work))
            uris.append(upload(api, sdist))
    uris += [entry if entry.startswith("store://") else upload(api, Path(entry)) for entry in extra]
    body = training_body(job, document, {**flags, "module_name": module_name}, uris, list(user_args),
                         label_values)
    created = api.create_job(body)
    console = stderr()
    console.print(f"Job [{job}] submitted successfully.")
    if stream_logs:
        follow(api, job, polling_interval)
        return
    console.print(f"Your job is still active. Follow it with\n  cloudml jobs describe {job}\nor\n"
                  f"  cloudml jobs stream-logs {job}")
    emit({"jobId": created["jobId"], "state": created["state"]} if invocation().format is None else created,
         invocation().format)


DATA_FORMATS = ("JSON", "TEXT", "CSV", "TF_RECORD", "TF_RECORD_GZIP")


def _format_name(value: str | None) -> str | None:
    """gcloud's spellings (``tf-record-gzip``) and the API's (``TF_RECORD_GZIP``) alike."""
    return value.upper().replace("-", "_") if value else value


@command(submit_group, "prediction")
@click.argument("job")
@click.option("--input-paths", required=True, metavar="URIS",
              help="store:// URIs of the input files, comma-separated; * matches within one folder.")
@click.option("--output-path", required=True, metavar="URI",
              help="The store:// folder the prediction.results-* and prediction.errors_stats-* files go to.")
@click.option("--data-format", required=True, type=click.Choice(DATA_FORMATS, case_sensitive=False),
              callback=lambda ctx, param, value: _format_name(value),
              help="JSON or TEXT (one instance per line), CSV (numbers), TF_RECORD, TF_RECORD_GZIP.")
@click.option("--output-data-format", type=click.Choice(("JSON", "CSV"), case_sensitive=False),
              callback=lambda ctx, param, value: _format_name(value), help="JSON (default) or CSV.")
@click.option("--model", help="A model of the project: its default version predicts.")
@click.option("--version", help="A version of --model.")
@click.option("--model-dir", metavar="URI", help="The store:// folder of an exported model, instead of --model.")
@click.option("--framework", help="With --model-dir: TENSORFLOW, MXNET or PYTORCH (default: told by its files).")
@click.option("--runtime-version", help="The framework's runtime (default: the version's, or the newest).")
@click.option("--max-worker-count", type=click.IntRange(min=1), help="Most nodes at once (default 10).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Instances per model call (default 64).")
@click.option("--signature-name", help="Accepted as in v1: only serving_default is served.")
@click.option("--region", help="Kept with the job, as in v1.")
@click.option("--labels", help="Labels KEY=VALUE,KEY2=VALUE2.")
@click.option("--stream-logs", is_flag=True, help="Follow every node's log until the job ends; exit 0 if it "
              "succeeded, 1 otherwise.")
@click.option("--polling-interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between log reads with --stream-logs.")
def submit_prediction(job: str, input_paths: str, output_path: str, model: str | None, version: str | None,
                      model_dir: str | None, labels: str | None, stream_logs: bool, polling_interval: float,
                      **flags: Any) -> None:
    """Submit batch prediction job JOB: a model over files in the store (like gcloud's jobs submit prediction).

    \b
    cloudml jobs submit prediction census_batch --model census --data-format json \\
        --input-paths store://PROJECT/data/batch-*.json --output-path store://PROJECT/predictions/1
    """
    api = invocation().api()
    api.url("/jobs")  # a missing project is refused first
    prediction_input = prediction_body(input_paths, output_path, model, version, model_dir, flags, api.project)
    created = api.create_job({"jobId": job, "predictionInput": prediction_input, "labels": parse_labels(labels)})
    stderr().print(f"Job [{job}] submitted successfully.")
    if stream_logs:
        follow(api, job, polling_interval)
        return
    stderr().print(f"Your job is still active. Follow it with\n  cloudml jobs describe {job}\nor\n"
                   f"  cloudml jobs stream-logs {job}")
    emit({"jobId": created["jobId"], "state": created["state"]} if invocation().format is None else created,
         invocation().format)


def prediction_body(input_paths: str, output_path: str, model: str | None, version: str | None,
                    model_dir: str | None, flags: dict[str, Any], project: str) -> dict[str, Any]:
    """The v1 predictionInput the flags describe. :raises click.UsageError: not exactly one model named."""
    if bool(model) == bool(model_dir):
        raise click.UsageError("give exactly one of --model and --model-dir")
    if version and not model:
        raise click.UsageError("--version needs --model")
    if flags.get("framework") and not model_dir:
        raise click.UsageError("--framework goes with --model-dir (a version's framework is the version's)")
    body: dict[str, Any] = {"inputPaths": [path.strip() for path in input_paths.split(",") if path.strip()],
                            "outputPath": output_path}
    if model_dir:
        body["uri"] = model_dir
    elif version:
        body["versionName"] = f"projects/{project}/models/{model}/versions/{version}"
    else:
        body["modelName"] = f"projects/{project}/models/{model}"
    names = {"data_format": "dataFormat", "output_data_format": "outputDataFormat", "framework": "framework",
             "runtime_version": "runtimeVersion", "max_worker_count": "maxWorkerCount", "batch_size": "batchSize",
             "signature_name": "signatureName", "region": "region"}
    body.update({field: flags[flag] for flag, field in names.items() if flags.get(flag) is not None})
    return body


@command(jobs_group, "describe")
@click.argument("job")
def describe(job: str) -> None:
    """Show job JOB: state, step, errorMessage, trainingOutput (the exported model, trials) or predictionOutput…"""
    emit(invocation().api().job(job), invocation().format, "yaml")


@command(jobs_group, "list")
@click.option("--filter", "filter_", metavar="EXPRESSION",
              help='The API\'s filter: state=S, state!=S, labels.KEY=V joined by AND, e.g. "state=RUNNING".')
@click.option("--limit", type=click.IntRange(min=1), help="At most this many jobs.")
@click.option("--page-size", type=click.IntRange(min=1, max=1000), help="Jobs per request.")
def list_jobs(filter_: str | None, limit: int | None, page_size: int | None) -> None:
    """List the project's jobs, newest first."""
    api = invocation().api()
    jobs = list(api.pages("/jobs", "jobs", {"filter": filter_, "pageSize": page_size}, limit))
    emit(jobs, invocation().format, "table", JOB_COLUMNS)


@command(jobs_group, "cancel")
@click.argument("job")
def cancel(job: str) -> None:
    """Cancel job JOB: its trainers are stopped and its nodes deleted (CANCELLING, then CANCELLED)."""
    invocation().api().cancel_job(job)
    stderr().print(f"Cancelled job [{job}].")


@command(jobs_group, "stream-logs")
@click.argument("job")
@click.option("--polling-interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between log reads.")
def stream_logs(job: str, polling_interval: float) -> None:
    """Print every node's log of job JOB (NODE: line) until it ends; exit 0 if it succeeded, 1 otherwise.

    A tuning job's nodes are named trial-N/NODE. Ctrl-C stops following; the job goes on.
    """
    follow(invocation().api(), job, polling_interval)

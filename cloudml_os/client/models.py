"""``cloudml models``, ``versions``, ``predict`` and ``operations``: deploy exported models and use them.

Creating, changing and deleting a version answer a v1 long-running operation; the commands wait for it
with a spinner on stderr (``--async`` prints the operation instead), then show the operation's result
or its error. ``versions create --origin-job JOB`` deploys what a finished training job exported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cloudml_os.client.context import command, global_options, invocation, parse_labels
from cloudml_os.client.output import Column, basename, emit, scalar, stderr
from cloudml_os.client.rest import ApiClient, CliError

MODEL_COLUMNS = [Column("NAME", "name", basename), Column("DEFAULT_VERSION", "defaultVersion.name", basename),
                 Column("TRAFFIC", "trafficSplit", lambda split: ",".join(f"{v}={p}" for v, p in (split or {}).items())
                        ),
                 Column("DESCRIPTION", "description")]
VERSION_COLUMNS = [Column("NAME", "name", basename), Column("STATE", "state"),
                   Column("DEPLOYMENT_URI", "deploymentUri"), Column("FRAMEWORK", "framework"),
                   Column("NODES", "manualScaling.nodes"),
                   Column("AUTOSCALING", "autoScaling", lambda a: f"{a['minNodes']}-{a['maxNodes']}" if a else ""),
                   Column("DEFAULT", "isDefault", lambda v: "*" if v else "")]
METRIC_NAMES = {"requests-in-flight": "REQUESTS_IN_FLIGHT", "cpu-usage": "CPU_USAGE",
                "gpu-duty-cycle": "GPU_DUTY_CYCLE"}  # gcloud's spellings
OPERATION_INTERVAL = 1.0


def wait(api: ApiClient, operation: dict[str, Any], what: str) -> dict[str, Any]:
    """Poll ``operation`` until done, with a spinner on stderr; the done operation.

    :raises CliError: it ended with an error (its message); Ctrl-C says how to wait again (exit 130).
    """
    name = operation["name"]
    try:
        with stderr().status(f"{what} (operation {basename(name)})…"):
            while not operation.get("done"):
                time.sleep(OPERATION_INTERVAL)
                operation = api.operation(name)
    except KeyboardInterrupt:
        raise CliError(f"stopped waiting; the operation goes on. Wait again with: cloudml operations wait "
                       f"{basename(name)}", 130) from None
    if "error" in operation:
        error = operation["error"]
        status = f"{error['status']}: " if error.get("status") else ""
        raise CliError(f"{what} failed: {status}{error.get('message', '')}")
    stderr().print(f"{what}: done.")
    return operation


def _result(operation: dict[str, Any]) -> dict[str, Any]:
    """An operation's response without its ``@type`` (the Version or the Model), or the operation."""
    response = dict(operation.get("response") or {})
    response.pop("@type", None)
    return response or operation


def _finish(api: ApiClient, operation: dict[str, Any], what: str, asynchronous: bool, default: str) -> None:
    fmt = invocation().format
    if asynchronous:
        stderr().print(f"{what}: started; wait for it with `cloudml operations wait {basename(operation['name'])}`.")
        emit(operation, fmt, "yaml")
        return
    emit(_result(wait(api, operation, what)), fmt, default)


ASYNC = click.option("--async", "asynchronous", is_flag=True,
                     help="Print the operation and return at once instead of waiting for it.")
MODEL = click.option("--model", required=True, help="The model.")
REQUEST_LOGGING = click.option(
    "--request-logging", type=click.FloatRange(0, 1), metavar="FRACTION",
    help="Log this fraction of the version's predictions to store://PROJECT/request-logs/MODEL/VERSION/ (0 stops).")



def autoscaling_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--min-nodes``, ``--max-nodes`` and ``--metric-targets``, gcloud's autoscaling flags."""
    for option in reversed((
            click.option("--min-nodes", type=click.IntRange(0, 32),
                         help="Autoscale from this many replicas (0: scale to zero when idle)."),
            click.option("--max-nodes", type=click.IntRange(1, 32), help="Autoscale up to this many replicas."),
            click.option("--metric-targets", metavar="METRIC=TARGET,…",
                         help="What autoscaling keeps near its target per replica: requests-in-flight=4 (default), "
                              "cpu-usage=PERCENT, gpu-duty-cycle=PERCENT (GPU machine types).")),
    ):
        function = option(function)
    return function


def parse_metric_targets(text: str) -> list[dict[str, Any]]:
    """``requests-in-flight=2,cpu-usage=60`` → the API's ``metrics`` list.

    :raises click.UsageError: a metric name that is not one, or a target that is not a number.
    """
    metrics = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        name, _, target = part.partition("=")
        if name.strip().lower() not in METRIC_NAMES:
            raise click.UsageError(f"--metric-targets: unknown metric {name.strip()!r}; give "
                                   f"{', '.join(METRIC_NAMES)}")
        try:
            value = float(target)
        except ValueError:
            raise click.UsageError(f"--metric-targets: {part!r}: the target must be a number") from None
        metrics.append({"name": METRIC_NAMES[name.strip().lower()], "target": value})
    if not metrics:
        raise click.UsageError("--metric-targets: give METRIC=TARGET, e.g. requests-in-flight=4")
    return metrics


def _autoscaling_fields(min_nodes: int | None, max_nodes: int | None, metric_targets: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"minNodes": min_nodes, "maxNodes": max_nodes,
                              "metrics": parse_metric_targets(metric_targets) if metric_targets else None}
    return {key: value for key, value in fields.items() if value is not None}


# ---- models ------------------------------------------------------------------------------------------

@click.group("models")
def models_group() -> None:
    """Create, list, describe and delete models (a model groups versions)."""


@command(models_group, "create")
@click.argument("model")
@click.option("--description", help="What the model is.")
@click.option("--labels", help="Labels KEY=VALUE,KEY2=VALUE2.")
@click.option("--regions", help="Accepted as in v1 (at most one).")
def create_model(model: str, description: str | None, labels: str | None, regions: str | None) -> None:
    """Create model MODEL.

    \b
    cloudml models create census --description "income from census data"
    """
    body: dict[str, Any] = {"name": model}
    if description:
        body["description"] = description
    if labels:
        body["labels"] = parse_labels(labels)
    if regions:
        body["regions"] = [region.strip() for region in regions.split(",") if region.strip()]
    created = invocation().api().call("POST", "/models", json=body)
    stderr().print(f"Created model [{model}].")
    emit(created, invocation().format, "none")


@command(models_group, "list")
@click.option("--filter", "filter_", metavar="EXPRESSION", help="The API's filter: labels.KEY=V joined by AND.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many models.")
def list_models(filter_: str | None, limit: int | None) -> None:
    """List the project's models."""
    models = list(invocation().api().pages("/models", "models", {"filter": filter_}, limit))
    emit(models, invocation().format, "table", MODEL_COLUMNS)


@command(models_group, "describe")
@click.argument("model")
def describe_model(model: str) -> None:
    """Show model MODEL and its default version."""
    emit(invocation().api().call("GET", f"/models/{model}"), invocation().format, "yaml")


@command(models_group, "update")
@click.argument("model")
@click.option("--traffic-split", metavar="VERSION=PERCENT,…",
              help="Share the model's predictions between versions, e.g. v1=90,v2=10 (percents summing to 100).")
@click.option("--description", help="A new description.")
@click.option("--labels", help="Replace the labels: KEY=VALUE,KEY2=VALUE2 ('' removes them all).")
def update_model(model: str, traffic_split: str | None, description: str | None, labels: str | None) -> None:
    """Change model MODEL's traffic split, description or labels.

    \b
    cloudml models update census --traffic-split v1=90,v2=10
    """
    body: dict[str, Any] = {}
    if traffic_split is not None:
        body["trafficSplit"] = _split(traffic_split)
    if description is not None:
        body["description"] = description
    if labels is not None:
        body["labels"] = parse_labels(labels)
    if not body:
        raise click.UsageError("give --traffic-split, --description or --labels")
    api = invocation().api()
    operation = api.call("PATCH", f"/models/{model}", params={"updateMask": ",".join(body)}, json=body)
    stderr().print(f"Updated model [{model}].")
    emit(_result(operation), invocation().format, "yaml")


def _split(text: str) -> dict[str, int]:
    """``v1=90,v2=10`` as ``{"v1": 90, "v2": 10}`` (the API checks the versions and the sum)."""
    split: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        version, equals, percent = item.partition("=")
        if not equals or not version.strip() or not percent.strip().isdigit():
            raise click.BadParameter(f"{item!r} is not VERSION=PERCENT", param_hint="--traffic-split")
        split[version.strip()] = int(percent)
    if not split:
        raise click.BadParameter("give VERSION=PERCENT,…", param_hint="--traffic-split")
    return split


@command(models_group, "delete")
@click.argument("model")
def delete_model(model: str) -> None:
    """Delete model MODEL (delete its versions first)."""
    api = invocation().api()
    _finish(api, api.call("DELETE", f"/models/{model}"), f"Deleting model [{model}]", False, "none")


# ---- versions ----------------------------------------------------------------------------------------

@click.group("versions")
def versions_group() -> None:
    """Deploy exported models as versions of a model; scale, list, describe, delete them."""


def _origin(api: ApiClient, origin: str | None, origin_job: str | None) -> str:
    if bool(origin) == bool(origin_job):
        raise click.UsageError("give one of --origin URI or --origin-job JOB")
    if origin:
        return origin
    job = api.call("GET", f"/jobs/{origin_job}")
    uri = (job.get("trainingOutput") or {}).get("exportedModelUri")
    if not uri:
        raise CliError(f"job {origin_job} exported no model (state {job.get('state')}); "
                       f"--origin-job needs a job that SUCCEEDED and exported one")
    return uri


@command(versions_group, "create")
@click.argument("version")
@MODEL
@click.option("--origin", help="The exported model's folder, a store:// URI of this project.")
@click.option("--origin-job", metavar="JOB", help="Deploy what training job JOB exported "
              "(its trainingOutput.exportedModelUri).")
@click.option("--framework", help="TENSORFLOW (default), MXNET or PYTORCH.")
@click.option("--runtime-version", help="The framework's runtime (default: its default runtime).")
@click.option("--machine-type", help="The replicas' machine type (default standard).")
@click.option("--nodes", type=click.IntRange(1, 32), help="How many replicas serve it (default 1).")
@click.option("--description", help="What the version is.")
@click.option("--labels", help="Labels KEY=VALUE,KEY2=VALUE2.")
@autoscaling_options
@REQUEST_LOGGING
@ASYNC
def create_version(version: str, model: str, origin: str | None, origin_job: str | None, framework: str | None,
                   runtime_version: str | None, machine_type: str | None, nodes: int | None,
                   min_nodes: int | None, max_nodes: int | None, metric_targets: str | None,
                   description: str | None, labels: str | None, request_logging: float | None,
                   asynchronous: bool) -> None:
    """Deploy version VERSION of model --model and wait until it serves.

    \b
    cloudml versions create v1 --model census --origin-job census_1 --nodes 2
    cloudml versions create v2 --model census --origin-job census_1 --min-nodes 1 --max-nodes 4
    cloudml versions create v3 --model census --origin store://demo/jobs/census_2/model --async
    """
    auto_scaling = _autoscaling_fields(min_nodes, max_nodes, metric_targets)
    if auto_scaling and nodes is not None:
        raise click.UsageError("give --nodes (a fixed pool) or --min-nodes/--max-nodes (autoscaling), not both")
    if auto_scaling and min_nodes is None:
        raise click.UsageError("autoscaling needs --min-nodes")
    api = invocation().api()
    label_values = parse_labels(labels)
    body: dict[str, Any] = {"name": version, "deploymentUri": _origin(api, origin, origin_job)}
    for key, value in (("framework", framework and framework.upper()), ("runtimeVersion", runtime_version),
                       ("machineType", machine_type), ("description", description)):
        if value:
            body[key] = value
    if nodes is not None:
        body["manualScaling"] = {"nodes": nodes}
    if auto_scaling:
        body["autoScaling"] = auto_scaling
    if label_values:
        body["labels"] = label_values
    if request_logging is not None:
        body["requestLoggingConfig"] = {"samplingPercentage": request_logging}
    operation = api.call("POST", f"/models/{model}/versions", json=body)
    _finish(api, operation, f"Creating version [{version}] of model [{model}]", asynchronous, "yaml")


@command(versions_group, "list")
@MODEL
@click.option("--filter", "filter_", metavar="EXPRESSION",
              help="The API's filter: state=S, labels.KEY=V joined by AND.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many versions.")
def list_versions(model: str, filter_: str | None, limit: int | None) -> None:
    """List the versions of model --model (the default one is starred)."""
    versions = list(invocation().api().pages(f"/models/{model}/versions", "versions", {"filter": filter_}, limit))
    emit(versions, invocation().format, "table", VERSION_COLUMNS)


@command(versions_group, "describe")
@click.argument("version")
@MODEL
def describe_version(version: str, model: str) -> None:
    """Show version VERSION: state, replicas, errorMessage…"""
    emit(invocation().api().call("GET", f"/models/{model}/versions/{version}"), invocation().format, "yaml")


@command(versions_group, "delete")
@click.argument("version")
@MODEL
@ASYNC
def delete_version(version: str, model: str, asynchronous: bool) -> None:
    """Delete version VERSION (its replicas' nodes are deleted) and wait until it is gone."""
    api = invocation().api()
    operation = api.call("DELETE", f"/models/{model}/versions/{version}")
    _finish(api, operation, f"Deleting version [{version}] of model [{model}]", asynchronous, "none")


@command(versions_group, "set-default")
@click.argument("version")
@MODEL
def set_default(version: str, model: str) -> None:
    """Make VERSION the version that `cloudml predict --model M` uses."""
    done = invocation().api().call("POST", f"/models/{model}/versions/{version}:setDefault", json={})
    stderr().print(f"Version [{version}] is now the default of model [{model}].")
    emit(done, invocation().format, "none")


@command(versions_group, "update")
@click.argument("version")
@MODEL
@click.option("--nodes", type=click.IntRange(1, 32), help="Scale to this many replicas (autoscaling off).")
@autoscaling_options
@click.option("--description", help="A new description.")
@click.option("--labels", help="Replace the labels: KEY=VALUE,KEY2=VALUE2 ('' removes them all).")
@REQUEST_LOGGING
@ASYNC
def update_version(version: str, model: str, nodes: int | None, min_nodes: int | None, max_nodes: int | None,
                   metric_targets: str | None, description: str | None, labels: str | None,
                   request_logging: float | None, asynchronous: bool) -> None:
    """Scale version VERSION, change how it autoscales, or change its description or labels.

    \b
    cloudml versions update v1 --model census --nodes 4
    cloudml versions update v1 --model census --min-nodes 0 --max-nodes 8 --metric-targets cpu-usage=60
    """
    auto_scaling = _autoscaling_fields(min_nodes, max_nodes, metric_targets)
    if auto_scaling and nodes is not None:
        raise click.UsageError("give --nodes (a fixed pool) or --min-nodes/--max-nodes (autoscaling), not both")
    body: dict[str, Any] = {}
    if nodes is not None:
        body["manualScaling"] = {"nodes": nodes}
    if auto_scaling:
        body["autoScaling"] = auto_scaling
    if description is not None:
        body["description"] = description
    if labels is not None:
        body["labels"] = parse_labels(labels)
    if request_logging is not None:
        body["requestLoggingConfig"] = {"samplingPercentage": request_logging}
    if not body:
        raise click.UsageError("give --nodes, --min-nodes/--max-nodes/--metric-targets, --description, --labels "
                               "or --request-logging")
    mask = ",".join([f"autoScaling.{field}" for field in auto_scaling]
                    + [{"manualScaling": "manualScaling.nodes"}.get(key, key) for key in body if key != "autoScaling"])
    api = invocation().api()
    operation = api.call("PATCH", f"/models/{model}/versions/{version}", params={"updateMask": mask}, json=body)
    _finish(api, operation, f"Updating version [{version}] of model [{model}]", asynchronous, "yaml")


# ---- predict -----------------------------------------------------------------------------------------

def _request_body(json_instances: Path | None, json_request: Path | None) -> dict[str, Any]:
    if bool(json_instances) == bool(json_request):
        raise click.UsageError("give one of --json-instances FILE or --json-request FILE")
    path = json_instances or json_request
    try:
        text = click.open_file(str(path), encoding="utf-8").read()
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}", 2) from None
    try:
        if json_instances:
            return {"instances": [json.loads(line) for line in text.splitlines() if line.strip()]}
        body = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{path}: not valid JSON: {exc}", 2) from None
    if not isinstance(body, dict) or "instances" not in body:
        raise CliError(f"{path}: a request is a JSON object with \"instances\"", 2)
    return body


@click.command("predict")
@global_options
@click.option("--model", required=True, help="The model.")
@click.option("--version", help="The version (default: the model's default version).")
@click.option("--json-instances", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="A file with one JSON instance per line ('-': stdin).")
@click.option("--json-request", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help='A file with the whole request, {"instances": [...], ...} (\'-\': stdin).')
def predict(model: str, version: str | None, json_instances: Path | None, json_request: Path | None) -> None:
    """Send instances to a model for online prediction; print the predictions.

    \b
    printf '[1.0]\\n[2.0]\\n' > instances.json
    cloudml predict --model census --json-instances instances.json
    """
    body = _request_body(json_instances, json_request)
    emit(invocation().api().predict(model, version, body), invocation().format, "json")


# ---- operations --------------------------------------------------------------------------------------

@click.group("operations")
def operations_group() -> None:
    """Describe and wait for long-running operations (version create, update, delete)."""


@command(operations_group, "describe")
@click.argument("operation")
def describe_operation(operation: str) -> None:
    """Show OPERATION (its id or projects/P/operations/ID)."""
    emit(invocation().api().operation(operation), invocation().format, "yaml")


@command(operations_group, "wait")
@click.argument("operation")
def wait_operation(operation: str) -> None:
    """Wait until OPERATION is done; print its result (exit 1 if it failed)."""
    api = invocation().api()
    current = api.operation(operation)
    kind = scalar((current.get("metadata") or {}).get("operationType")) or "Operation"
    emit(_result(wait(api, current, kind)), invocation().format, "yaml")

"""The dashboard's pages: Project panels (Jobs, Models, Packages, Objects) and Admin panels (Overview, all Jobs,
Clusters and Nodes, Projects and Quotas, Tokens, Events), in Horizon's shape.

Each view reads and acts through :class:`~cloudml_os.dashboard.v1client.V1Client` alone. Pages that change
while one looks at them (job and replica tables, a job's state, logs and events, a batch prediction job's
progress) are refreshed by htmx polling small fragments; actions are plain POST forms (CSRF-checked) that
redirect back with the API's answer as a message.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from cloudml_os.api import services
from cloudml_os.artifacts import ArtifactError, parse_uri
from cloudml_os.dashboard.sessions import DashboardSessionInterface
from cloudml_os.dashboard.v1client import V1Client, V1Error
from cloudml_os.states import FINAL_STATES, JobState

blp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder="templates",
                static_folder="static", static_url_path="/static")

JOB_STATES = tuple(state.value for state in JobState if state != JobState.STATE_UNSPECIFIED)
FINAL_JOB_STATES = tuple(state.value for state in FINAL_STATES)
# A job in these states has nothing left to cancel (the Cancel buttons are not shown).
UNCANCELLABLE_JOB_STATES = (*FINAL_JOB_STATES, JobState.CANCELLING.value)
POLL_SECONDS = 2
QUOTA_RESOURCES = ("gpus", "nodes", "jobs", "replicas")
RESOURCE_LABELS = {"gpus": "GPUs", "nodes": "Nodes", "jobs": "Jobs", "replicas": "Replicas"}
# Job events that are about the job as a whole make its state timeline; the rest are listed under Events.
TIMELINE_KINDS = ("STATE", "STEP")
# A hyperparameter tuning job's log keys: ``trial-N/NODE`` (e.g. ``trial-3/chief-0``), N its trialId.
TRIAL_LOG_KEY = re.compile(r"trial-(\d+)/(.+)")
NUMERIC_PARAMETER_TYPES = ("DOUBLE", "INTEGER", "DISCRETE")
# What a job is, by its v1 input (views.job_kind), as the jobs tables and a job's page name it.
JOB_KINDS = {"training": "Training", "tuning": "Tuning", "prediction": "Batch prediction"}
OUTPUT_FILES_PAGE = 200  # a batch prediction job's output files listed on its page (two per shard)


# ---- session, credential, current project ----------------------------------------------------------------


def api() -> V1Client:
    """The signed-in user's client of the /v1 API."""
    return g.v1


def _sessions() -> DashboardSessionInterface:
    return current_app.session_interface  # type: ignore[return-value]  (register_dashboard sets it)


def _background() -> bool:
    """A page's own request (htmx polling a table, following a log), not its user acting."""
    return request.headers.get("HX-Request") == "true"


@blp.before_request
def _load_user() -> Response | None:
    if request.endpoint in ("dashboard.login", "dashboard.static"):
        if request.method == "POST":
            current_app.extensions["csrf"].protect()
        return None
    if "credential" not in session:
        return _sign_in_again()
    if request.method == "POST":
        current_app.extensions["csrf"].protect()
    if not _background():  # a page left open refreshes itself, but is idle all the same
        _sessions().touch(session)
    g.v1 = V1Client(current_app, session["credential"], keystone=session.get("keystone", False),
                    remote_addr=request.remote_addr)
    g.project = session.get("view_project") or session["project"]
    g.platform_admin = session.get("platform_admin", False)
    return None


def _sign_in_again() -> Response:
    """To the sign-in page, back here afterwards: the whole page, also from a fragment htmx asked for."""
    if getattr(session, "ended", False):
        flash("Your session has ended (idle for too long, or signed out). Sign in again.", "warning")
    if _background():
        page = urlsplit(request.headers.get("HX-Current-URL", ""))
        target = _safe_next(f"{page.path}?{page.query}".rstrip("?")) if page.path else None
        response = Response(status=200)
        response.headers["HX-Redirect"] = url_for("dashboard.login", next=target)
        return response
    return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?") if request.method == "GET" else None))


@blp.context_processor
def _template_globals() -> dict[str, Any]:
    return {"caller_project": session.get("project"), "caller_role": session.get("role"),
            "platform_admin": session.get("platform_admin", False), "project": g.get("project"),
            "badge": badge_class, "age": age, "when": when, "POLL_SECONDS": POLL_SECONDS,
            "FINAL_JOB_STATES": FINAL_JOB_STATES, "UNCANCELLABLE_JOB_STATES": UNCANCELLABLE_JOB_STATES,
            "topology": topology, "quota_text": quota_text, "resource_label": RESOURCE_LABELS.get,
            "job_kind": job_kind, "JOB_KINDS": JOB_KINDS, "prediction_progress": prediction_progress,
            "switcher_projects": _switcher_projects()}


def _switcher_projects() -> list[str]:
    """The admin project switcher's choices (every project the platform knows)."""
    if not session.get("platform_admin") or "v1" not in g:
        return []
    try:
        names = [p["project"] for p in api().get("/admin/projects").get("projects", [])]
    except V1Error:
        names = []
    return sorted({*names, g.project})


def admin_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """Admin panels: 403 for anyone but a platform admin (whose /v1/admin calls would be refused anyway)."""
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not g.platform_admin:
            abort(403)
        return view(*args, **kwargs)
    return wrapper


def _safe_next(target: str | None) -> str:
    """Only a path of the dashboard itself: a login link must not send the user elsewhere."""
    if target and target.startswith("/dashboard/") and not urlsplit(target).netloc and "\\" not in target:
        return target
    return url_for("dashboard.home")


@blp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """Sign in with a local API token (or, in OpenStack mode, a Keystone token), checked by the API."""
    keystone = services().settings.auth == "keystone"
    error = None
    if request.method == "POST":
        credential = request.form.get("token", "").strip()
        if not credential:
            error = "Enter a token."
        else:
            try:
                caller = V1Client(current_app, credential, keystone=keystone,
                                  remote_addr=request.remote_addr).get("/caller")
            except V1Error as exc:
                error = f"Sign-in refused: {exc.message}"
            else:
                _sessions().renew(session)  # a new id, and the limits count from now
                session.update(credential=credential, keystone=keystone, project=caller["project"],
                               role=caller["role"], platform_admin=caller["platformAdmin"])
                return redirect(_safe_next(request.form.get("next")))
    return render_template("dashboard/login.html", keystone=keystone, error=error,
                           next=request.values.get("next", "")), (401 if error else 200)


@blp.route("/logout", methods=["POST"])
def logout() -> Response:
    """Sign out: the session is revoked, so a copy of its cookie is refused too."""
    _sessions().revoke(session)
    flash("You are signed out.", "info")
    return redirect(url_for("dashboard.login"))


@blp.route("/")
def home() -> Response:
    return redirect(url_for("dashboard.admin_overview" if g.platform_admin else "dashboard.jobs"))


@blp.route("/switch-project", methods=["POST"])
@admin_only
def switch_project() -> Response:
    """The admin project switcher: which project the Project panels show."""
    project = request.form.get("project", "").strip()
    try:
        api().get(f"/projects/{project}/quotas")  # the API checks the name (and the admin's access)
    except V1Error as exc:
        flash(f"Cannot switch to project {project!r}: {exc.message}", "danger")
    else:
        session["view_project"] = project
        flash(f"Now showing project {project}.", "info")
    return redirect(url_for("dashboard.jobs"))


# ---- error pages -------------------------------------------------------------------------------------------


@blp.errorhandler(V1Error)
def _api_error(error: V1Error) -> tuple[str, int]:
    return render_template("dashboard/error.html", status=error.status, title=error.code,
                           message=error.message), error.status


@blp.errorhandler(CSRFError)
def _csrf_error(error: CSRFError) -> tuple[str, int]:
    return render_template("dashboard/error.html", status=400, title="Form expired",
                           message=f"{error.description} Reload the page and try again."), 400


@blp.errorhandler(HTTPException)
def _http_error(error: HTTPException) -> tuple[str, int]:
    messages = {403: "This panel is for platform admins.", 404: "There is no such page."}
    code = error.code or 500
    return render_template("dashboard/error.html", status=code, title=error.name,
                           message=messages.get(code, error.description)), code


def _act(call: Callable[[], Any], success: str) -> bool:
    """Run an API action; flash its success or the API's error message. Returns whether it succeeded."""
    try:
        call()
    except V1Error as exc:
        flash(exc.message, "danger")
        return False
    flash(success, "success")
    return True


def _back(default: str) -> Response:
    return redirect(_safe_next(request.form.get("next")) if request.form.get("next") else default)


# ---- formatting helpers used by templates -------------------------------------------------------------------


def badge_class(state: str | None) -> str:
    """Bootstrap colour of a state badge (Horizon's: green for good, red for failed, blue while working)."""
    state = (state or "").upper()
    if state in ("SUCCEEDED", "READY", "RUNNING", "ACTIVE", "HEALTHY"):
        return "text-bg-success"
    if state in ("FAILED", "EJECTED", "UNHEALTHY", "ERROR"):
        return "text-bg-danger"
    if state in ("CANCELLED", "CANCELLING", "DELETING", "DELETED", "EXITED", "STOPPED"):
        return "text-bg-secondary"
    return "text-bg-info"


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def age(text: str | None) -> str:
    """``3m``, ``2h 5m``… since an RFC 3339 time."""
    then = _parse_time(text)
    if then is None:
        return ""
    seconds = max(0, int((dt.datetime.now(dt.UTC) - then).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def when(text: str | None) -> str:
    """An RFC 3339 time as ``2026-12-02 10:55:39`` (UTC, to the second)."""
    then = _parse_time(text)
    return then.strftime("%Y-%m-%d %H:%M:%S") if then else ""


def topology(training_input: dict[str, Any]) -> str:
    """A job's shape in a few words: ``BASIC`` or ``CUSTOM: master + 2 workers + 1 ps``."""
    tier = training_input.get("scaleTier", "BASIC")
    if tier != "CUSTOM":
        return tier
    parts = [f"master ({training_input.get('masterType', 'standard')})"]
    for field, word in (("workerCount", "worker"), ("parameterServerCount", "ps"), ("evaluatorCount", "evaluator")):
        count = int(training_input.get(field) or 0)
        if count:
            parts.append(f"{count} {word}{'s' if count > 1 and word != 'ps' else ''}")
    return "CUSTOM: " + " + ".join(parts)


def job_kind(job: dict[str, Any]) -> str:
    """``prediction`` (a batch prediction job: ``predictionInput``), ``tuning`` (a training job with
    ``trainingInput.hyperparameters``) or ``training``: the key of :data:`JOB_KINDS`."""
    if job.get("predictionInput"):
        return "prediction"
    if ((job.get("trainingInput") or {}).get("hyperparameters")
            or (job.get("trainingOutput") or {}).get("isHyperparameterTuningJob")):
        return "tuning"
    return "training"


def _whole(value: Any) -> int | None:
    """A count from a v1 value (int64 fields arrive as strings), else None."""
    number = _number(value)
    return int(number) if number is not None else None


def prediction_progress(job: dict[str, Any]) -> dict[str, Any] | None:
    """How far a batch prediction job is, from its ``predictionOutput``: records done of all records once every
    shard has been counted (``recordsTotal``), shards done of all shards before that; None before its shards
    are planned (or for a job of another kind)."""
    output = job.get("predictionOutput") or {}
    records_total, shards_total = _whole(output.get("recordsTotal")), _whole(output.get("shardsTotal"))
    if records_total:
        done, total, unit = _whole(output.get("recordsDone")) or 0, records_total, "records"
    elif shards_total:
        done, total, unit = _whole(output.get("shardsDone")) or 0, shards_total, "shards"
    else:
        return None
    done = min(done, total)
    return {"done": done, "total": total, "unit": unit, "percent": 100 * done // total}


def quota_text(value: int) -> str:
    return "unlimited" if value is None or value < 0 else str(value)


# ---- Project: jobs -----------------------------------------------------------------------------------------


def _job_filter(state: str) -> str:
    return f"state={state}" if state in JOB_STATES else ""


def _jobs_rows(project: str, state: str, text: str) -> list[dict[str, Any]]:
    jobs = api().get(f"/projects/{project}/jobs", filter=_job_filter(state), pageSize=200).get("jobs", [])
    return [job for job in jobs if text.lower() in job["jobId"].lower()]


@blp.route("/project/jobs")
def jobs() -> str:
    state, text = request.args.get("state", ""), request.args.get("q", "")
    return render_template("dashboard/project/jobs.html", jobs=_jobs_rows(g.project, state, text), state=state,
                           q=text, states=JOB_STATES)


@blp.route("/project/jobs/rows")
def jobs_rows() -> str:
    """The jobs table's body, polled by the page so states change without a reload."""
    state, text = request.args.get("state", ""), request.args.get("q", "")
    return render_template("dashboard/project/_jobs_rows.html", jobs=_jobs_rows(g.project, state, text))


@blp.route("/project/jobs/cancel", methods=["POST"])
def cancel_jobs() -> Response:
    """Row action (one job) and batch action (the checked ones): ``jobs.cancel`` each."""
    chosen = request.form.getlist("job")
    if not chosen:
        flash("Select at least one job to cancel.", "warning")
    for job in chosen:
        _act(lambda job=job: api().post(f"/projects/{g.project}/jobs/{job}:cancel"), f"Cancelling job {job}.")
    return _back(url_for("dashboard.jobs"))


def _job_view(job_id: str) -> dict[str, Any]:
    return api().get(f"/projects/{g.project}/jobs/{job_id}")


@blp.route("/project/jobs/<job_id>")
def job_detail(job_id: str) -> str:
    job = _job_view(job_id)
    events = api().get(f"/projects/{g.project}/jobs/{job_id}/events").get("events", [])
    logs = api().get(f"/projects/{g.project}/jobs/{job_id}/logs").get("logs", [])
    nodes = _nodes_of(events, logs)
    tuning = tuning_view(job)
    tab = request.args.get("tab") or ("trials" if tuning else "overview")
    # A batch prediction job trains nothing: no Metrics or Exported model tab, its predictions instead.
    prediction = job_kind(job) == "prediction"
    if prediction and tab in ("metrics", "model"):
        tab = "overview"
    metrics = {"series": {}, "source": ""} if prediction else _job_metrics(job_id)
    log_trial, log_nodes, log_node = _log_choice(nodes, request.args.get("trial", ""), request.args.get("node", ""))
    return render_template("dashboard/project/job_detail.html", job=job, events=events, nodes=nodes, tab=tab,
                           timeline=[e for e in events if e.get("kind") in TIMELINE_KINDS],
                           metrics=metrics["series"], metrics_source=metrics["source"], tuning=tuning,
                           log_trials=_log_trials(nodes, tuning), log_trial=log_trial, log_nodes=log_nodes,
                           log_node=log_node, **(_prediction_context(job) if prediction else {}))


@blp.route("/project/jobs/<job_id>/predictions")
def job_predictions(job_id: str) -> str:
    """A batch prediction job's progress, counts and output files, polled (the fragment replaces itself and
    stops polling once the job has ended)."""
    job = _job_view(job_id)
    if job_kind(job) != "prediction":
        abort(404)
    return render_template("dashboard/project/_job_predictions.html", job=job, **_prediction_context(job))


def _prediction_context(job: dict[str, Any]) -> dict[str, Any]:
    """What a batch prediction job's page shows beyond its v1 resource: its output folder (the Objects
    browser's prefix) and the ``prediction.results-*`` and ``prediction.errors_stats-*`` files in it so far
    (a shard's two appear once the shard is done)."""
    output_path = (job.get("predictionInput") or {}).get("outputPath", "")
    try:
        project, folder = parse_uri(output_path)
    except ArtifactError:
        project, folder = "", ""
    if project != g.project:  # not a folder of this project (the API refuses such a job): nothing to list
        return {"output_folder": None, "output_files": [], "more_output_files": False}
    listed = api().get(f"/projects/{g.project}/objects", prefix=f"{folder}/prediction.", pageSize=OUTPUT_FILES_PAGE)
    files = []
    for item in listed.get("objects", []):
        file = item["name"][len(folder) + 1:]
        files.append({**item, "file": file,
                      "kind": "errors" if file.startswith("prediction.errors_stats") else "results"})
    return {"output_folder": f"{folder}/", "output_files": files,
            "more_output_files": bool(listed.get("nextPageToken"))}


@blp.route("/project/jobs/<job_id>/metrics")
def job_metrics(job_id: str) -> Response:
    """The Metrics tab's data as JSON: the API's ``{"source": "tensorboard" | "logs", "series": {...}}``."""
    return jsonify(_job_metrics(job_id))


@blp.route("/project/jobs/<job_id>/metrics/pane")
def job_metrics_pane(job_id: str) -> str:
    """The Metrics tab's body, polled while the job runs: its curves are live (event files copied as written)."""
    metrics = _job_metrics(job_id)
    return render_template("dashboard/project/_job_metrics.html", job=_job_view(job_id), metrics=metrics["series"],
                           metrics_source=metrics["source"])


def _job_metrics(job_id: str) -> dict[str, Any]:
    return api().get(f"/projects/{g.project}/jobs/{job_id}/metrics")


def _nodes_of(events: list[dict[str, Any]], logs: list[dict[str, Any]]) -> list[str]:
    """The job's log keys as the API shows them: those with logs, then those only events name; a tuning job's
    ``trial-N/NODE`` keys in trial order (the API sorts them as text: trial-10 before trial-2)."""
    names = [entry["node"] for entry in logs]
    names += [e["node"] for e in events if e.get("node") and e["node"] not in names]
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda name: (int(found[1]), found[2]) if (found := TRIAL_LOG_KEY.fullmatch(name))
                  else (0, ""))


def _log_trials(nodes: list[str], tuning: dict[str, Any] | None) -> list[str]:
    """The log viewer's trial choices: the job's trials and any trial with logs (a tuning job's log keys are
    ``trial-N/NODE``), in trial order."""
    numbers = {found[1] for name in nodes if (found := TRIAL_LOG_KEY.fullmatch(name))}
    numbers |= {t["id"] for t in (tuning or {}).get("trials", []) if t["id"].isdigit()}
    return sorted(numbers, key=int)


def _log_choice(nodes: list[str], trial: str, node: str) -> tuple[str, list[str], str]:
    """The log viewer's trial filter, the log keys it lists and the one it shows.

    A chosen ``node`` shows as asked (it may have no log yet) and, as ``trial-N/NODE``, chooses its trial;
    a chosen ``trial`` lists that trial's keys only, the first of them shown unless ``node`` says otherwise.
    """
    found = TRIAL_LOG_KEY.fullmatch(node)
    if found:
        trial = found[1]
    listed = [name for name in nodes if (m := TRIAL_LOG_KEY.fullmatch(name)) and m[1] == trial] if trial else nodes
    return trial, listed, node or (listed[0] if listed else "")


@blp.route("/project/jobs/<job_id>/status")
def job_status(job_id: str) -> str:
    """The detail page's header (state badge, step, times, Cancel), polled while the job runs."""
    return render_template("dashboard/project/_job_status.html", job=_job_view(job_id))


@blp.route("/project/jobs/<job_id>/events/rows")
def job_events_rows(job_id: str) -> str:
    events = api().get(f"/projects/{g.project}/jobs/{job_id}/events").get("events", [])
    return render_template("dashboard/project/_events_rows.html", events=events)


@blp.route("/project/jobs/<job_id>/logs/<path:node>")
def job_log_chunk(job_id: str, node: str) -> str:
    """The next piece of one log after ``offset``, and a poller for the piece after it while the job can still
    write (live-following logs without holding a request open). ``node`` is a log key as the API lists it:
    ``chief-0``, or a tuning job's ``trial-3/chief-0`` (read as ``?trial=3&node=chief-0``)."""
    offset = request.args.get("offset", "0")
    offset = int(offset) if offset.isdigit() else 0
    found = TRIAL_LOG_KEY.fullmatch(node)
    which = {"trial": found[1], "node": found[2]} if found else {"node": node}
    [entry] = api().get(f"/projects/{g.project}/jobs/{job_id}/logs", offset=offset, **which)["logs"]
    job = _job_view(job_id)
    more = job["state"] not in FINAL_JOB_STATES or entry["nextOffset"] > offset
    return render_template("dashboard/project/_log_chunk.html", job=job, node=node, entry=entry, more=more)


@blp.route("/project/jobs/<job_id>/cancel", methods=["POST"])
def cancel_job(job_id: str) -> Response:
    _act(lambda: api().post(f"/projects/{g.project}/jobs/{job_id}:cancel"), f"Cancelling job {job_id}.")
    return redirect(url_for("dashboard.job_detail", job_id=job_id))


# ---- Project: a hyperparameter tuning job's trials ------------------------------------------------------


@blp.route("/project/jobs/<job_id>/trials")
def job_trials(job_id: str) -> str | Response:
    """The Trials tab (table and charts), polled while the job runs; ``204 No Content`` (htmx keeps what it shows)
    while it would draw what the page already has, whose digest it sends as ``seen``."""
    job = _job_view(job_id)
    tuning = tuning_view(job)
    if tuning is None:
        abort(404)
    if request.args.get("seen") == tuning["digest"]:
        return Response(status=204)
    return render_template("dashboard/project/_job_trials.html", job=job, tuning=tuning)


def _number(value: Any) -> float | None:
    """A finite number from a v1 value (hyperparameter values and int64 fields arrive as strings), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _cell(value: Any, kind: str) -> str:
    """A hyperparameter value as the table shows it: a DOUBLE to 4 significant digits, anything else as sent."""
    number = _number(value)
    return f"{number:.4g}" if kind == "DOUBLE" and number is not None else "" if value is None else str(value)


def _parameters(spec: dict[str, Any], trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The searched parameters: the spec's, in its order, then any a trial names that the spec does not (a
    number if every value is one); each with how its chart draws it (``axis``: Chart.js scale type)."""
    declared = {p["parameterName"]: p for p in spec.get("params") or [] if p.get("parameterName")}
    seen: dict[str, list[Any]] = {}
    for trial in trials:
        for name, value in trial["hyperparameters"].items():
            seen.setdefault(name, []).append(value)
    parameters = []
    for name in [*declared, *sorted(set(seen) - set(declared))]:
        param = declared.get(name) or {"type": "DOUBLE" if all(_number(v) is not None for v in seen[name])
                                       else "CATEGORICAL"}
        kind = param.get("type") or "DOUBLE"
        if kind in NUMERIC_PARAMETER_TYPES:
            log = param.get("scaleType") == "UNIT_LOG_SCALE"
            parameters.append({"name": name, "type": kind, "axis": "logarithmic" if log else "linear", "labels": []})
        else:
            labels = [str(v) for v in param.get("categoricalValues") or []]
            labels += sorted({str(v) for v in seen.get(name, [])} - set(labels))
            parameters.append({"name": name, "type": kind, "axis": "category", "labels": labels})
    return parameters


def _trial_order(trial: dict[str, Any]) -> tuple[int, str]:
    trial_id = str(trial.get("trialId", ""))
    return (int(trial_id), "") if trial_id.isdigit() else (1 << 62, trial_id)


def tuning_view(job: dict[str, Any]) -> dict[str, Any] | None:
    """What the Trials tab shows of a hyperparameter tuning job, from its v1 Job resource; None for other jobs.

    Trials come from ``trainingOutput.trials`` (values as strings, int64 fields as strings), parameters from
    ``trainingInput.hyperparameters``. The best trial is the one whose model the job exports: of the trials that
    succeeded and were not stopped early, the one whose ``finalMetric.objectiveValue`` is highest (goal
    MAXIMIZE, the default) or lowest (MINIMIZE), the earliest of equals. Trials without a final metric
    (running, failed) are in the table but in no chart. The charts' data: the objective per trial with the best
    value so far, and per parameter its value against the objective (numbers parsed for numeric parameters, a
    log axis for ``UNIT_LOG_SCALE``, categories in the spec's order). ``digest`` changes whenever any of it does.
    """
    spec = (job.get("trainingInput") or {}).get("hyperparameters") or {}
    output = job.get("trainingOutput") or {}
    if not spec and not output.get("isHyperparameterTuningJob"):
        return None
    goal = "MINIMIZE" if spec.get("goal") == "MINIMIZE" else "MAXIMIZE"  # v1: unset or unspecified maximizes
    metric = output.get("hyperparameterMetricTag") or spec.get("hyperparameterMetricTag") or "objective"
    raw = [{**t, "hyperparameters": t.get("hyperparameters") or {}} for t in output.get("trials") or []]
    raw.sort(key=_trial_order)
    parameters = _parameters(spec, raw)
    trials = []
    for position, trial in enumerate(raw, start=1):
        final = trial.get("finalMetric") or {}
        trial_id = str(trial.get("trialId", position))
        trials.append({
            "id": trial_id, "x": int(trial_id) if trial_id.isdigit() else position,
            "state": trial.get("state") or "STATE_UNSPECIFIED", "stoppedEarly": bool(trial.get("isTrialStoppedEarly")),
            "hyperparameters": trial["hyperparameters"],
            "cells": {p["name"]: _cell(trial["hyperparameters"].get(p["name"]), p["type"]) for p in parameters},
            "objective": _number(final.get("objectiveValue")), "step": str(final.get("trainingStep") or ""),
            "startTime": trial.get("startTime"), "endTime": trial.get("endTime"),
            "errorMessage": trial.get("errorMessage") or "", "best": False,
        })
    scored = [t for t in trials if t["objective"] is not None]
    better = max if goal == "MAXIMIZE" else min
    candidates = [t for t in scored if _is_candidate(t)]
    best = better(candidates, key=lambda t: t["objective"]) if candidates else None  # the first of equals
    if best is not None:
        best["best"] = True
    view = {
        "goal": goal, "metric": metric, "parameters": parameters, "trials": trials,
        "best": best["id"] if best else None, "bestObjective": best["objective"] if best else None,
        "maxTrials": _number(spec.get("maxTrials")), "maxParallelTrials": _number(spec.get("maxParallelTrials")),
        "completed": int(_number(output.get("completedTrialCount")) or 0),
        "charts": {"objective": _objective_chart(scored, metric, better),
                   "parameters": [_parameter_chart(p, scored, metric) for p in parameters]},
    }
    view["digest"] = hashlib.sha256(json.dumps([view, job.get("state")], sort_keys=True, default=str)
                                    .encode()).hexdigest()[:16]
    return view


def _is_candidate(trial: dict[str, Any]) -> bool:
    """Whether a trial can be the best one, as the tuning workflow chooses the trial whose model the job
    exports: it succeeded with a final metric and was not stopped early (its model was not fully trained)."""
    return trial["state"] == "SUCCEEDED" and trial["objective"] is not None and not trial["stoppedEarly"]


def _objective_chart(scored: list[dict[str, Any]], metric: str, better: Callable[..., Any]) -> dict[str, Any]:
    points, best_so_far, best = [], [], None
    for trial in scored:
        if _is_candidate(trial):
            best = trial["objective"] if best is None else better(best, trial["objective"])
        points.append({"x": trial["x"], "y": trial["objective"], "trial": trial["id"], "best": trial["best"],
                       "stoppedEarly": trial["stoppedEarly"]})
        if best is not None:
            best_so_far.append({"x": trial["x"], "y": best, "trial": trial["id"]})
    return {"type": "trials", "metric": metric, "points": points, "bestSoFar": best_so_far}


def _parameter_chart(parameter: dict[str, Any], scored: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    points = []
    for trial in scored:
        value = trial["hyperparameters"].get(parameter["name"])
        if parameter["axis"] == "category":
            x = None if value is None else str(value)
        else:
            x = _number(value)
            if parameter["axis"] == "logarithmic" and x is not None and x <= 0:
                x = None  # no place on a log axis
        if x is not None:
            points.append({"x": x, "y": trial["objective"], "trial": trial["id"], "best": trial["best"],
                           "stoppedEarly": trial["stoppedEarly"]})
    return {"type": "parameter", "name": parameter["name"], "axis": parameter["axis"],
            "labels": parameter["labels"], "metric": metric, "points": points}


# ---- Project: models and versions ----------------------------------------------------------------------


@blp.route("/project/models")
def models() -> str:
    listed = api().get(f"/projects/{g.project}/models").get("models", [])
    return render_template("dashboard/project/models.html", models=listed)


@blp.route("/project/models", methods=["POST"])
def create_model() -> Response:
    name = request.form.get("name", "").strip()
    body = {"name": name, "description": request.form.get("description", "")}
    if _act(lambda: api().post(f"/projects/{g.project}/models", body), f"Model {name} created."):
        return redirect(url_for("dashboard.model_detail", model=name))
    return redirect(url_for("dashboard.models"))


@blp.route("/project/models/<model>/delete", methods=["POST"])
def delete_model(model: str) -> Response:
    _act(lambda: api().call("DELETE", f"/projects/{g.project}/models/{model}"), f"Model {model} deleted.")
    return redirect(url_for("dashboard.models"))


def _exported_jobs() -> list[dict[str, Any]]:
    """The project's succeeded jobs that exported a model (what a new version can be created from)."""
    jobs = api().get(f"/projects/{g.project}/jobs", filter="state=SUCCEEDED", pageSize=200).get("jobs", [])
    return [job for job in jobs if job.get("trainingOutput", {}).get("exportedModelUri")]


@blp.route("/project/models/<model>")
def model_detail(model: str) -> str:
    found = api().get(f"/projects/{g.project}/models/{model}")
    config = api().get(f"/projects/{g.project}:getConfig")
    return render_template("dashboard/project/model_detail.html", model=found, name=model,
                           versions=_versions(model), exported=_exported_jobs(), config=config,
                           from_job=request.args.get("from_job", ""))


def _versions(model: str) -> list[dict[str, Any]]:
    return api().get(f"/projects/{g.project}/models/{model}/versions").get("versions", [])


@blp.route("/project/models/<model>/versions/rows")
def versions_rows(model: str) -> str:
    found = api().get(f"/projects/{g.project}/models/{model}")
    return render_template("dashboard/project/_versions_rows.html", name=model, model=found,
                           versions=_versions(model))


@blp.route("/project/models/<model>/traffic", methods=["POST"])
def split_traffic(model: str) -> Response:
    """The traffic form: one percent per version (empty is 0)."""
    prefix = "share-"
    split = {key[len(prefix):]: _int_field(key) if request.form[key].strip() else 0
             for key in request.form if key.startswith(prefix)}
    shown = ", ".join(f"{version} {percent} %" for version, percent in split.items() if percent)
    _act(lambda: api().call("PATCH", f"/projects/{g.project}/models/{model}", body={"trafficSplit": split},
                            query={"updateMask": "trafficSplit"}),
         f"Traffic of {model}: {shown}.")
    return _back(url_for("dashboard.model_detail", model=model))


def _int_field(name: str) -> int | str:
    """A number from the form, or the text as typed so that the API's validation names the field."""
    text = request.form.get(name, "").strip()
    return int(text) if text.lstrip("-").isdigit() else text


@blp.route("/project/models/<model>/versions", methods=["POST"])
def create_version(model: str) -> Response:
    """Create a version from a job's exported model (or a deployment URI typed in)."""
    form = request.form
    uri, framework = form.get("deploymentUri", "").strip(), form.get("framework", "").strip()
    if form.get("job"):
        job = _job_view(form["job"])
        uri = job.get("trainingOutput", {}).get("exportedModelUri", "")
        framework = framework or job.get("framework", "")
    body = {"name": form.get("name", "").strip(), "deploymentUri": uri, "framework": framework.upper(),
            "machineType": form.get("machineType", ""), "manualScaling": {"nodes": _int_field("nodes")}}
    if form.get("maxNodes", "").strip():  # autoscaling between the replicas asked for and this
        body["autoScaling"] = {"minNodes": _int_field("nodes"), "maxNodes": _int_field("maxNodes")}
        del body["manualScaling"]
    if form.get("runtimeVersion"):
        body["runtimeVersion"] = form["runtimeVersion"]
    if _act(lambda: api().post(f"/projects/{g.project}/models/{model}/versions", body),
            f"Version {body['name']} is being created."):
        return redirect(url_for("dashboard.version_detail", model=model, version=body["name"]))
    return redirect(url_for("dashboard.model_detail", model=model, from_job=form.get("job", "")))


@blp.route("/project/models/<model>/versions/<version>/default", methods=["POST"])
def set_default(model: str, version: str) -> Response:
    _act(lambda: api().post(f"/projects/{g.project}/models/{model}/versions/{version}:setDefault"),
         f"{version} is now the default version of {model}.")
    return _back(url_for("dashboard.model_detail", model=model))


@blp.route("/project/models/<model>/versions/<version>/scale", methods=["POST"])
def scale_version(model: str, version: str) -> Response:
    nodes = _int_field("nodes")
    _act(lambda: api().call("PATCH", f"/projects/{g.project}/models/{model}/versions/{version}",
                            body={"manualScaling": {"nodes": nodes}}, query={"updateMask": "manualScaling.nodes"}),
         f"Scaling {version} to {nodes} replicas.")
    return _back(url_for("dashboard.model_detail", model=model))


@blp.route("/project/models/<model>/versions/<version>/delete", methods=["POST"])
def delete_version(model: str, version: str) -> Response:
    _act(lambda: api().call("DELETE", f"/projects/{g.project}/models/{model}/versions/{version}"),
         f"Version {version} is being deleted.")
    return redirect(url_for("dashboard.model_detail", model=model))


@blp.route("/project/models/<model>/versions/<version>")
def version_detail(model: str, version: str) -> str:
    found = api().get(f"/projects/{g.project}/models/{model}/versions/{version}")
    return render_template("dashboard/project/version_detail.html", name=model, version=found,
                           version_name=version, tab=request.args.get("tab", "overview"))


@blp.route("/project/models/<model>/versions/<version>/live")
def version_live(model: str, version: str) -> str:
    """Replicas and events of a version, polled: a failed replica's ejection and its replacement appear."""
    found = api().get(f"/projects/{g.project}/models/{model}/versions/{version}")
    events = api().get(f"/projects/{g.project}/models/{model}/versions/{version}/events").get("events", [])
    samples = api().get(f"/projects/{g.project}/models/{model}/versions/{version}/replicaStats",
                        minutes=STATS_MINUTES).get("samples", [])
    return render_template("dashboard/project/_version_live.html", version=found, events=events,
                           health=_health_points(events), counts=_replica_counts(events),
                           probes=_probe_series(samples),
                           stats_minutes=STATS_MINUTES)


STATS_MINUTES = 60  # how far back the Version page's latency and health charts look


def _probe_series(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Chart data from the monitor's samples (``replicaStats``): per replica, the median and maximum probe
    latency (ms) and the share of probes answered (%) in each window, at minutes before now (0 = now)."""
    now = dt.datetime.now(dt.UTC)
    latency: dict[str, list[dict[str, float]]] = {}
    answered: dict[str, list[dict[str, float]]] = {}
    for sample in samples:
        when = _parse_time(sample.get("time"))
        if when is None or not sample.get("probes"):
            continue
        x = round((when - now).total_seconds() / 60, 2)
        replica = sample["replica"]
        for name, field in (("p50", "latencyP50Ms"), ("max", "latencyMaxMs")):
            if sample.get(field) is not None:
                latency.setdefault(f"{replica} {name}", []).append({"x": x, "y": sample[field]})
        share = 100 * (sample["probes"] - sample["failures"]) / sample["probes"]
        answered.setdefault(replica, []).append({"x": x, "y": round(share, 1), "healthy": sample["healthy"]})
    return {"latency": latency, "answered": answered, "count": len(samples)}


_CREATED = re.compile(r"Version creation requested: (\d+) ×")
_COUNT_CHANGE = re.compile(r"(\d+) → (\d+) replicas")


def _replica_counts(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Chart data for a version's replica count over time: the count asked for (at its creation, by a user's
    scaling, by the autoscaler) as a step line, and the autoscaler's decisions and quota stops as points
    whose label says why; seconds since the first event on the x axis."""
    times = [_parse_time(e.get("time")) for e in events]
    start = min((t for t in times if t), default=None)
    count: list[dict[str, Any]] = []
    marks: dict[str, list[dict[str, Any]]] = {}
    for event, when in zip(events, times, strict=True):
        if when is None or start is None:
            continue
        x, message = round((when - start).total_seconds(), 1), event.get("message", "")
        created, changed = _CREATED.search(message), _COUNT_CHANGE.search(message)
        if created or changed:
            count.append({"x": x, "y": int(created.group(1) if created else changed.group(2))})
        if event.get("kind") in ("AUTOSCALE", "QUOTA") and count:
            marks.setdefault(event["kind"], []).append({"x": x, "y": count[-1]["y"], "label": message})
    return {"count": count, "marks": marks}


def _health_points(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Chart data for a version's health over time: each replica's events as points on its own row
    (ready, ejected, replaced…), seconds since the first event on the x axis."""
    times = [_parse_time(e.get("time")) for e in events]
    start = min((t for t in times if t), default=None)
    rows: list[str] = []
    points: dict[str, list[dict[str, Any]]] = {}
    for event, when in zip(events, times, strict=True):
        replica = event.get("replica")
        if not replica or when is None or start is None:
            continue
        if replica not in rows:
            rows.append(replica)
        points.setdefault(event.get("kind", "EVENT"), []).append(
            {"x": round((when - start).total_seconds(), 1), "y": rows.index(replica), "label": event["message"]})
    return {"rows": rows, "series": points}


# ---- Project: packages -----------------------------------------------------------------------------------


@blp.route("/project/packages")
def packages() -> str:
    listed = api().get(f"/projects/{g.project}/packages").get("packages", [])
    return render_template("dashboard/project/packages.html", packages=listed)


@blp.route("/project/packages", methods=["POST"])
def upload_package() -> Response:
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        flash("file: choose a trainer package to upload.", "danger")
    else:
        _act(lambda: api().call("POST", f"/projects/{g.project}/packages", file=(upload.stream, upload.filename)),
             f"Package {upload.filename} uploaded.")
    return redirect(url_for("dashboard.packages"))


# ---- Project: objects ------------------------------------------------------------------------------------

OBJECTS_PAGE = 200


@blp.route("/project/objects")
def objects() -> str:
    """One "folder" of the project's objects (names up to the next ``/`` after ``prefix``), a page at a time."""
    prefix = request.args.get("prefix", "")
    listed = api().get(f"/projects/{g.project}/objects", prefix=prefix, delimiter="/", pageSize=OBJECTS_PAGE,
                       pageToken=request.args.get("pageToken"))
    parts = prefix.rstrip("/").split("/") if prefix else []
    crumbs = [(part, "/".join(parts[:index + 1]) + "/") for index, part in enumerate(parts)]
    return render_template("dashboard/project/objects.html", prefix=prefix, crumbs=crumbs,
                           folders=listed.get("prefixes", []), objects=listed.get("objects", []),
                           next_token=listed.get("nextPageToken"))


@blp.route("/project/objects/download/<path:name>")
def download_object(name: str) -> Response:
    """The object's bytes, streamed from the API as they come (never held whole)."""
    status, headers, body = api().stream(f"/projects/{g.project}/objects/{quote(name)}")
    response = Response(body, status=status, mimetype="application/octet-stream", direct_passthrough=True)
    for header in ("Content-Length", "ETag", "Last-Modified", "X-Content-MD5"):
        if header in headers:
            response.headers[header] = headers[header]
    response.headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(name.rsplit('/', 1)[-1])}"
    return response


@blp.route("/project/objects/delete", methods=["POST"])
def delete_object() -> Response:
    name = request.form.get("name", "")
    recursive = name.endswith("/")
    _act(lambda: api().call("DELETE", f"/projects/{g.project}/objects/{quote(name.rstrip('/'))}",
                            query={"recursive": "true"} if recursive else None),
         f"{'Folder' if recursive else 'Object'} {name} deleted.")
    parent = name.rstrip("/").rpartition("/")[0]
    return redirect(url_for("dashboard.objects", prefix=parent + "/" if parent else None))


# ---- Admin panels --------------------------------------------------------------------------------------------


@blp.route("/admin/overview")
@admin_only
def admin_overview() -> str:
    projects = api().get("/admin/projects").get("projects", [])
    running = api().get("/admin/jobs", filter="state=RUNNING").get("jobs", [])
    unhealthy = [r for r in api().get("/admin/replicas").get("replicas", []) if not r.get("healthy")]
    charts = {resource: {
        "labels": [p["project"] for p in projects],
        "usage": [p["usage"].get(resource, 0) for p in projects],
        "quota": [p["quotas"].get(resource, -1) if p["quotas"].get(resource, -1) >= 0 else None for p in projects],
    } for resource in QUOTA_RESOURCES}
    return render_template("dashboard/admin/overview.html", projects=projects, running=running,
                           unhealthy=unhealthy, charts=charts, resources=QUOTA_RESOURCES)


@blp.route("/admin/jobs")
@admin_only
def admin_jobs() -> str:
    return render_template("dashboard/admin/jobs.html", jobs=_admin_jobs(), state=request.args.get("state", ""),
                           only=request.args.get("project", ""), states=JOB_STATES)


def _admin_jobs() -> list[dict[str, Any]]:
    return api().get("/admin/jobs", project=request.args.get("project", ""),
                     filter=_job_filter(request.args.get("state", "")), pageSize=200).get("jobs", [])


@blp.route("/admin/jobs/rows")
@admin_only
def admin_jobs_rows() -> str:
    return render_template("dashboard/admin/_jobs_rows.html", jobs=_admin_jobs())


@blp.route("/admin/jobs/<project>/<job_id>", methods=["POST"])
@admin_only
def admin_open_job(project: str, job_id: str) -> Response:
    """Open another project's job: switch the Project panels to its project (a POST: it changes the session),
    then show it."""
    session["view_project"] = project
    return redirect(url_for("dashboard.job_detail", job_id=job_id))


@blp.route("/admin/clusters")
@admin_only
def admin_clusters() -> str:
    show_all = request.args.get("all") == "1"
    clusters = api().get("/admin/clusters", all="true" if show_all else "").get("clusters", [])
    return render_template("dashboard/admin/clusters.html", clusters=clusters, show_all=show_all)


@blp.route("/admin/clusters/<cluster>/nodes/<node>/replace", methods=["POST"])
@admin_only
def admin_replace_node(cluster: str, node: str) -> Response:
    _act(lambda: api().post(f"/admin/clusters/{cluster}/nodes/{node}:replace"),
         f"{node} of {cluster} is being replaced.")
    return redirect(url_for("dashboard.admin_clusters"))


@blp.route("/admin/projects")
@admin_only
def admin_projects() -> str:
    projects = api().get("/admin/projects").get("projects", [])
    return render_template("dashboard/admin/projects.html", projects=projects, resources=QUOTA_RESOURCES)


@blp.route("/admin/projects/<project>/quotas", methods=["POST"])
@admin_only
def admin_set_quotas(project: str) -> Response:
    """Edit a project's quotas; an empty field goes back to the installation's default."""
    quotas = {}
    for resource in QUOTA_RESOURCES:
        text = request.form.get(resource, "").strip()
        quotas[resource] = None if text == "" else int(text) if text.lstrip("-").isdigit() else text
    _act(lambda: api().call("PATCH", f"/projects/{project}/quotas", body={"quotas": quotas}),
         f"Quotas of {project} saved.")
    return redirect(url_for("dashboard.admin_projects"))


@blp.route("/admin/tokens")
@admin_only
def admin_tokens() -> str:
    tokens = api().get("/admin/tokens").get("tokens", [])
    return render_template("dashboard/admin/tokens.html", tokens=tokens, created=session.pop("created_token", None),
                           keystone=services().settings.auth == "keystone")


@blp.route("/admin/tokens", methods=["POST"])
@admin_only
def admin_create_token() -> Response:
    body = {key: request.form.get(key, "").strip() for key in ("project", "role", "description")}
    try:
        created = api().post("/admin/tokens", body)
    except V1Error as exc:
        flash(exc.message, "danger")
    else:
        # Shown once, on the next page only (the session cookie is encrypted and HttpOnly).
        session["created_token"] = {"token": created["token"], "project": created["project"],
                                    "role": created["role"]}
    return redirect(url_for("dashboard.admin_tokens"))


@blp.route("/admin/tokens/<token_id>/revoke", methods=["POST"])
@admin_only
def admin_revoke_token(token_id: str) -> Response:
    _act(lambda: api().call("DELETE", f"/admin/tokens/{token_id}"), f"Token {token_id} revoked.")
    return redirect(url_for("dashboard.admin_tokens"))


@blp.route("/admin/events")
@admin_only
def admin_events() -> str:
    only = request.args.get("project", "")
    events = api().get("/admin/events", project=only, pageSize=200).get("events", [])
    return render_template("dashboard/admin/events.html", events=events, only=only)

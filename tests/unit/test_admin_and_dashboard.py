"""The admin API (/v1/caller, /v1/admin/…) and the dashboard's server side, through Flask's test client.

The browser tests (tests/browser) prove the pages in Chromium against a real platform; these pin the rules
cheaply: who may call what, what the audit trail records, CSRF and cookie settings, and that the dashboard
shows exactly what the API lets its user see.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import html
import json
import re
import shutil
import zlib
from pathlib import Path

import jinja2
import pytest
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import select

from cloudml_os.auth.tokens import create_token
from cloudml_os.dashboard.views import _replica_counts, topology
from cloudml_os.store import Cluster, Job, Node
from cloudml_os.store.models import AuditEvent
from tests.unit.test_api import Env, assert_v1_error
from tests.unit.test_api import migrated_db as migrated_db  # a fixture, as is store
from tests.unit.test_api import store as store


@pytest.fixture
def env(tmp_path, store) -> Env:  # noqa: F811  (store is the fixture above)
    return Env(tmp_path, store)


def bearer(env, project: str, role: str) -> dict[str, str]:
    return env.headers(project, role)


def add_job(env, project: str, job_id: str, state: str = "RUNNING") -> Job:
    job = Job(project=project, job_id=job_id, state=state, step="TRAINING", framework="TENSORFLOW",
              training_input={"scaleTier": "BASIC", "pythonModule": "trainer.task", "packageUris": ["x"]}, labels={})
    return env.store.create_job(job)


# ---- /v1/caller and /v1/admin ----------------------------------------------------------------------------


def test_caller_tells_a_token_its_project_role_and_whether_it_is_platform_admin(env):
    member = env.client.get("/v1/caller", headers=bearer(env, "team-a", "member")).get_json()
    assert member == {"project": "team-a", "role": "member", "platformAdmin": False}
    admin = env.client.get("/v1/caller", headers=bearer(env, "admin", "admin")).get_json()
    assert admin == {"project": "admin", "role": "admin", "platformAdmin": True}
    assert_v1_error(env.client.get("/v1/caller"), 401, "UNAUTHENTICATED")


def test_admin_endpoints_refuse_everyone_but_platform_admins(env):
    for headers in (bearer(env, "team-a", "admin"), bearer(env, "admin", "member")):
        for method, path in (("GET", "/v1/admin/tokens"), ("POST", "/v1/admin/tokens"), ("GET", "/v1/admin/jobs"),
                             ("GET", "/v1/admin/clusters"), ("GET", "/v1/admin/events"),
                             ("DELETE", "/v1/admin/tokens/1"), ("GET", "/v1/admin/replicas")):
            response = env.client.open(path, method=method, headers=headers, json={})
            assert_v1_error(response, 403, "PERMISSION_DENIED")


def test_tokens_are_created_shown_once_listed_without_secrets_and_revoked(env):
    admin = bearer(env, "admin", "admin")
    created = env.client.post("/v1/admin/tokens", headers=admin,
                              json={"project": "team-c", "role": "viewer", "description": "ci"})
    assert created.status_code == 200, created.get_json()
    secret = created.get_json()["token"]
    assert secret.startswith("cmlos_")
    listed = env.client.get("/v1/admin/tokens", headers=admin).get_json()["tokens"]
    row = next(t for t in listed if t["description"] == "ci")
    assert row["project"] == "team-c" and row["role"] == "viewer" and "token" not in row
    assert secret not in str(listed)
    assert env.client.get("/v1/projects/team-c/jobs", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert env.client.delete(f"/v1/admin/tokens/{row['id']}", headers=admin).status_code == 200
    assert_v1_error(env.client.get("/v1/projects/team-c/jobs", headers={"Authorization": f"Bearer {secret}"}),
                    401, "UNAUTHENTICATED")
    assert_v1_error(env.client.delete(f"/v1/admin/tokens/{row['id']}", headers=admin), 404, "NOT_FOUND")
    message = assert_v1_error(env.client.post("/v1/admin/tokens", headers=admin,
                                              json={"project": "Bad Project", "role": "boss"}), 400, "INVALID_ARGUMENT")
    assert "project" in message and "role" in message


def test_a_token_cannot_revoke_itself(env):
    admin_token = create_token(env.store, "admin", "admin", "me")
    headers = {"Authorization": f"Bearer {admin_token}"}
    mine = next(t for t in env.client.get("/v1/admin/tokens", headers=headers).get_json()["tokens"]
                if t["description"] == "me")
    assert_v1_error(env.client.delete(f"/v1/admin/tokens/{mine['id']}", headers=headers), 400, "FAILED_PRECONDITION")


def test_admin_jobs_lists_every_project_and_filters(env):
    add_job(env, "team-a", "a1")
    add_job(env, "team-b", "b1", state="SUCCEEDED")
    admin = bearer(env, "admin", "admin")
    jobs = env.client.get("/v1/admin/jobs", headers=admin).get_json()["jobs"]
    assert {(j["project"], j["jobId"]) for j in jobs} == {("team-a", "a1"), ("team-b", "b1")}
    running = env.client.get("/v1/admin/jobs?filter=state%3DRUNNING", headers=admin).get_json()["jobs"]
    assert [j["jobId"] for j in running] == ["a1"]
    only_b = env.client.get("/v1/admin/jobs?project=team-b", headers=admin).get_json()["jobs"]
    assert [j["jobId"] for j in only_b] == ["b1"]


def test_clusters_show_their_project_owner_and_nodes_and_training_nodes_are_not_replaced(env):
    job = add_job(env, "team-a", "a1")
    with env.store.session() as session:
        cluster = Cluster(job_id=job.id, name="cml-job-1", driver="local", state="READY", private_key="k",
                          public_key="p")
        session.add(cluster)
        session.flush()
        session.add(Node(cluster_id=cluster.id, name="chief-0", task_type="chief", task_index=0, address="127.0.0.5",
                         ssh_port=2222, username="u", host_keys=[], port_first=1, port_last=2, environment={},
                         workdir="/w", runtime_root="/r"))
    admin = bearer(env, "admin", "admin")
    [listed] = env.client.get("/v1/admin/clusters", headers=admin).get_json()["clusters"]
    assert listed["project"] == "team-a" and listed["owner"] == "projects/team-a/jobs/a1"
    assert listed["nodes"] == [{"name": "chief-0", "role": "chief", "index": 0, "address": "127.0.0.5",
                                "sshPort": 2222, "state": "NONE"}]
    message = assert_v1_error(env.client.post("/v1/admin/clusters/cml-job-1/nodes/chief-0:replace", headers=admin),
                              400, "FAILED_PRECONDITION")
    assert "training node" in message
    assert_v1_error(env.client.post("/v1/admin/clusters/cml-job-1/nodes/nope:replace", headers=admin),
                    404, "NOT_FOUND")


def test_the_audit_trail_records_changes_and_refusals_but_no_bodies_or_reads(env):
    member = bearer(env, "team-a", "member")
    env.client.post("/v1/projects/team-a/models", headers=member, json={"name": "m1", "description": "secret-ish"})
    env.client.post("/v1/projects/team-b/models", headers=member, json={"name": "m2"})  # another project: 404
    env.client.get("/v1/projects/team-a/models", headers=member)
    env.client.post("/v1/projects/team-a/models/m1:predict", headers=member, json={"instances": [1]})
    with env.store.session() as session:
        rows = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    assert [(r.method, r.resource, r.status, r.project, r.caller_project) for r in rows] == [
        ("POST", "projects/team-a/models", 200, "team-a", "team-a"),
        ("POST", "projects/team-b/models", 404, "team-b", "team-a"),
    ]
    assert rows[0].caller.startswith("token ")
    events = env.client.get("/v1/admin/events?project=team-b", headers=bearer(env, "admin", "admin")).get_json()
    assert [e["resource"] for e in events["events"]] == ["projects/team-b/models"]
    assert "secret-ish" not in str(events)


# ---- the dashboard's server side ---------------------------------------------------------------------------


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


COOKIE = "cloudml_os_dashboard"


def sign_in(env, project: str, role: str, base_url: str = "http://localhost"):
    client = env.app.test_client()
    client.token = create_token(env.store, project, role)
    form = client.get("/dashboard/login", base_url=base_url).get_data(as_text=True)
    response = client.post("/dashboard/login", data={"token": client.token, "csrf_token": csrf_of(form)},
                           base_url=base_url, headers={"Referer": f"{base_url}/dashboard/login"})  # HTTPS checks it
    assert response.status_code == 302, response.get_data(as_text=True)
    client.sign_in_cookie = response.headers["Set-Cookie"]
    return client


def cookie_of(client) -> str:
    return client.get_cookie(COOKIE, path="/dashboard").value


class Clock:
    """The dashboard sessions' clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta).total_seconds()


def test_sign_in_needs_the_csrf_token_and_sets_a_signed_httponly_samesite_cookie(env):
    client = env.app.test_client()
    token = create_token(env.store, "team-a", "member")
    assert client.post("/dashboard/login", data={"token": token}).status_code == 400
    form = client.get("/dashboard/login").get_data(as_text=True)
    refused = client.post("/dashboard/login", data={"token": "cmlos_wrong", "csrf_token": csrf_of(form)})
    assert refused.status_code == 401 and "Sign-in refused" in refused.get_data(as_text=True)
    response = client.post("/dashboard/login", data={"token": token, "csrf_token": csrf_of(form),
                                                     "next": "//evil.example.org/"})
    assert response.headers["Location"] == "/dashboard/"  # no open redirect
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    # A session signed with any other key is no session: claiming platform admin in a forged cookie fails.
    forger = Flask("forger")
    forger.secret_key = "not-the-installation-key"
    forged = SecureCookieSessionInterface().get_signing_serializer(forger).dumps(
        {"credential": token, "project": "admin", "role": "admin", "platform_admin": True})
    other = env.app.test_client()
    other.set_cookie("cloudml_os_dashboard", forged, path="/dashboard")
    assert other.get("/dashboard/admin/tokens").status_code == 302
    page = client.get("/dashboard/project/jobs")
    assert page.status_code == 200
    assert client.post("/dashboard/logout", data={}).status_code == 400  # forms without the token are refused


def test_pages_redirect_to_sign_in_without_a_session(env):
    response = env.app.test_client().get("/dashboard/project/jobs?state=RUNNING")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/dashboard/login?next=/dashboard/project/jobs")


def test_a_member_sees_its_projects_rows_only_and_no_admin_panel(env):
    add_job(env, "team-a", "mine")
    add_job(env, "team-b", "theirs")
    client = sign_in(env, "team-a", "member")
    page = client.get("/dashboard/project/jobs").get_data(as_text=True)
    assert 'data-job="mine"' in page and "theirs" not in page and 'id="nav-admin"' not in page
    for panel in ("overview", "jobs", "clusters", "projects", "tokens", "events"):
        assert client.get(f"/dashboard/admin/{panel}").status_code == 403
    assert client.get("/dashboard/project/jobs/theirs").status_code == 404


def test_a_platform_admin_sees_every_panel_and_switches_projects(env):
    add_job(env, "team-b", "theirs")
    client = sign_in(env, "admin", "admin")
    for panel in ("overview", "jobs", "clusters", "projects", "tokens", "events"):
        page = client.get(f"/dashboard/admin/{panel}")
        assert page.status_code == 200, panel
    assert "theirs" in client.get("/dashboard/admin/jobs").get_data(as_text=True)
    form = client.get("/dashboard/project/jobs").get_data(as_text=True)
    client.post("/dashboard/switch-project", data={"project": "team-b", "csrf_token": csrf_of(form)})
    assert 'data-job="theirs"' in client.get("/dashboard/project/jobs/rows").get_data(as_text=True)


def test_a_refused_action_shows_the_apis_message_and_changes_nothing(env):
    client = sign_in(env, "team-a", "viewer")
    form = client.get("/dashboard/project/models").get_data(as_text=True)
    page = client.post("/dashboard/project/models", data={"name": "m1", "csrf_token": csrf_of(form)},
                       follow_redirects=True).get_data(as_text=True)
    assert "role &#39;viewer&#39; may not POST" in page
    listed = env.client.get("/v1/projects/team-a/models", headers=bearer(env, "team-a", "viewer")).get_json()
    assert listed.get("models", []) == []


def readable_forms(cookie: str) -> list[bytes]:
    """Everything a cookie thief can read without a key: each dot-separated part base64-decoded, and
    inflated where it is zlib-compressed (as itsdangerous compresses a signed session's payload)."""
    forms = [cookie.encode()]
    for part in (cookie, *cookie.split(".")):
        try:
            decoded = base64.urlsafe_b64decode(part.lstrip(".") + "=" * (-len(part.lstrip(".")) % 4))
        except (binascii.Error, ValueError):
            continue
        forms.append(decoded)
        try:
            forms.append(zlib.decompress(decoded))
        except zlib.error:
            pass
    return forms


def test_the_session_cookie_is_encrypted_so_the_token_cannot_be_read_from_it(env):
    client = sign_in(env, "admin", "admin")
    cookie = cookie_of(client)
    assert len(readable_forms(cookie)) > 1  # the decoding works on the cookie
    for form in readable_forms(cookie):
        assert client.token.encode() not in form and b"platform_admin" not in form and b"admin" not in form
    # A session made the way Flask signs sessions, even with the installation's own key, is no session.
    signed = SecureCookieSessionInterface().get_signing_serializer(env.app).dumps(
        {"credential": client.token, "project": "admin", "role": "admin", "platform_admin": True})
    other = env.app.test_client()
    other.set_cookie(COOKIE, signed, path="/dashboard")
    assert other.get("/dashboard/admin/tokens").status_code == 302


def test_signing_out_revokes_the_session_so_a_copied_cookie_is_refused_by_every_api_process(env, tmp_path, store):  # noqa: F811
    client = sign_in(env, "team-a", "member")
    copied = cookie_of(client)
    # An API process of the installation on another host (its own data directory, the installation's session
    # key, the same database) accepts the session while it lasts…
    other_host = tmp_path / "other-host"
    other_host.mkdir()
    shutil.copy2(tmp_path / "dashboard-session.key", other_host / "dashboard-session.key")
    other_process = Env(other_host, store).app
    replayed = other_process.test_client()
    replayed.set_cookie(COOKIE, copied, path="/dashboard")
    assert replayed.get("/dashboard/project/jobs").status_code == 200
    page = client.get("/dashboard/project/jobs").get_data(as_text=True)
    signed_out = client.post("/dashboard/logout", data={"csrf_token": csrf_of(page)}, follow_redirects=True)
    assert "You are signed out." in signed_out.get_data(as_text=True)
    assert client.get("/dashboard/project/jobs").status_code == 302
    # …and refuses it once signed out, as this one does: the copy leads to the sign-in page.
    for app in (env.app, other_process):
        thief = app.test_client()
        thief.set_cookie(COOKIE, copied, path="/dashboard")
        refused = thief.get("/dashboard/project/jobs")
        assert refused.status_code == 302 and refused.headers["Location"].startswith("/dashboard/login")
        form = thief.get("/dashboard/project/jobs")  # nor can it act
        assert form.status_code == 302


POLL = {"HX-Request": "true", "HX-Current-URL": "http://localhost/dashboard/project/jobs?state=RUNNING"}


def test_a_session_ends_after_30_idle_minutes_and_background_refreshes_do_not_keep_it_alive(env):
    clock = Clock()
    env.app.session_interface.clock = clock
    client = sign_in(env, "team-a", "member")
    clock.advance(minutes=29)
    assert client.get("/dashboard/project/jobs").status_code == 200  # the user acted: 30 more minutes
    clock.advance(minutes=29)
    assert client.get("/dashboard/project/jobs/rows", headers=POLL).status_code == 200  # a page's own refresh
    clock.advance(minutes=2)
    ended = client.get("/dashboard/project/jobs/rows", headers=POLL)  # 31 minutes since the user acted
    # htmx is told to take the whole page to the sign-in form (not to draw it inside the table).
    assert ended.status_code == 200 and ended.get_data() == b""
    assert ended.headers["HX-Redirect"] == "/dashboard/login?next=/dashboard/project/jobs?state%3DRUNNING"
    page = client.get("/dashboard/project/jobs", follow_redirects=True)
    assert page.request.path == "/dashboard/login"
    assert "Your session has ended" in page.get_data(as_text=True)


def test_a_session_ends_12_hours_after_sign_in_however_active_its_user(env):
    clock = Clock()
    env.app.session_interface.clock = clock
    client = sign_in(env, "team-a", "member")
    for _ in range(35):
        clock.advance(minutes=20)
        assert client.get("/dashboard/project/jobs").status_code == 200  # 11 h 40 min
    clock.advance(minutes=21)
    response = client.get("/dashboard/project/jobs")
    assert response.status_code == 302 and response.headers["Location"].startswith("/dashboard/login")


def test_the_session_cookie_is_httponly_samesite_and_secure_over_https(env):
    plain = sign_in(env, "team-a", "member").sign_in_cookie  # make run: http://127.0.0.1
    assert "HttpOnly" in plain and "SameSite=Strict" in plain and "Path=/dashboard" in plain
    assert "Secure" not in plain  # else the browser would not send it back over plain HTTP
    # Over HTTPS (or behind the TLS proxy, which gunicorn trusts for X-Forwarded-Proto): Secure as well.
    client = sign_in(env, "team-a", "member", base_url="https://localhost")
    assert "Secure" in client.sign_in_cookie and "HttpOnly" in client.sign_in_cookie
    assert "SameSite=Strict" in client.sign_in_cookie
    assert client.get("/dashboard/project/jobs", base_url="https://localhost").status_code == 200
    # dashboard_secure_cookie = true: Secure even when the request came as plain HTTP (a proxy that does not say).
    env.app.config["SESSION_COOKIE_SECURE"] = True
    assert "Secure" in sign_in(env, "team-a", "member").sign_in_cookie


def test_opening_another_projects_job_is_a_csrf_checked_post(env):
    add_job(env, "team-b", "theirs")
    client = sign_in(env, "admin", "admin")
    form = '<form method="post" action="/dashboard/admin/jobs/team-b/theirs"'
    for panel in ("jobs", "overview"):
        assert form in client.get(f"/dashboard/admin/{panel}").get_data(as_text=True), panel
    assert form in client.get("/dashboard/admin/jobs/rows").get_data(as_text=True)
    assert client.get("/dashboard/admin/jobs/team-b/theirs").status_code == 405
    assert client.post("/dashboard/admin/jobs/team-b/theirs", data={}).status_code == 400
    assert 'data-job="theirs"' not in client.get("/dashboard/project/jobs/rows").get_data(as_text=True)
    page = client.get("/dashboard/admin/jobs").get_data(as_text=True)
    opened = client.post("/dashboard/admin/jobs/team-b/theirs", data={"csrf_token": csrf_of(page)})
    assert opened.status_code == 302 and opened.headers["Location"] == "/dashboard/project/jobs/theirs"
    assert client.get("/dashboard/project/jobs/theirs").status_code == 200
    assert 'data-job="theirs"' in client.get("/dashboard/project/jobs/rows").get_data(as_text=True)


NGINX_SITE = Path(__file__).parents[2] / "ansible" / "roles" / "cloudml_os" / "templates" / "nginx-site.conf.j2"


def test_the_ansible_nginx_site_sends_hsts_from_its_tls_server():
    rendered = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(NGINX_SITE.read_text()).render(
        ansible_managed="managed", cloudml_os_server_name="cml.example.org", cloudml_os_https_port=443,
        cloudml_os_api_port=8080)
    redirect, tls = rendered.split("server {")[1:]
    assert "listen 443 ssl;" in tls and "return 301 https://" in redirect
    assert 'add_header Strict-Transport-Security "max-age=31536000; includeSubDomains" always;' in tls
    # A location's own add_header would drop the server's (nginx inherits add_header only when it has none).
    assert "add_header" not in tls[tls.index("location / {"):]
    assert "Strict-Transport-Security" not in redirect  # browsers ignore it over plain HTTP (RFC 6797 §8.1)


def test_topology_reads_like_the_training_input():
    assert topology({"scaleTier": "BASIC"}) == "BASIC"
    assert topology({"scaleTier": "CUSTOM", "masterType": "standard", "workerCount": 2,
                     "parameterServerCount": 1}) == "CUSTOM: master (standard) + 2 workers + 1 ps"


def test_admin_job_and_event_listings_page_newest_first(env):
    admin = bearer(env, "admin", "admin")
    ids = [add_job(env, project, f"paged_{n}").job_id for n, project in enumerate(("team-a", "team-b", "team-a"))]
    first = env.client.get("/v1/admin/jobs?pageSize=2", headers=admin).get_json()
    assert [job["jobId"] for job in first["jobs"]] == ids[:0:-1] and first["nextPageToken"]
    rest = env.client.get(f"/v1/admin/jobs?pageSize=2&pageToken={first['nextPageToken']}", headers=admin).get_json()
    assert [job["jobId"] for job in rest["jobs"]] == ids[:1] and "nextPageToken" not in rest
    for model in ("m1", "m2", "m3"):
        env.client.post("/v1/projects/team-a/models", json={"name": model}, headers=bearer(env, "team-a", "admin"))
    events = env.client.get("/v1/admin/events?pageSize=2&project=team-a", headers=admin).get_json()
    assert len(events["events"]) == 2 and events["nextPageToken"]
    older = env.client.get(f"/v1/admin/events?pageSize=2&project=team-a&pageToken={events['nextPageToken']}",
                           headers=admin).get_json()
    assert len(older["events"]) == 1 and "nextPageToken" not in older
    assert events["events"][0]["time"] >= events["events"][1]["time"] >= older["events"][0]["time"]


# ---- the dashboard: a hyperparameter tuning job's trials ---------------------------------------------------

TUNING_INPUT = {
    "scaleTier": "BASIC", "pythonModule": "trainer.task", "packageUris": ["x"],
    "hyperparameters": {
        "goal": "MAXIMIZE", "hyperparameterMetricTag": "accuracy", "maxTrials": 6, "maxParallelTrials": 2,
        "params": [
            {"parameterName": "learning_rate", "type": "DOUBLE", "minValue": 0.0001, "maxValue": 0.1,
             "scaleType": "UNIT_LOG_SCALE"},
            {"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 4},
            {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]},
            {"parameterName": "batch_size", "type": "DISCRETE", "discreteValues": [16, 32, 64]},
        ],
    },
}


def trial(trial_id: str, state: str, values: tuple[str, str, str, str], objective: float | None = None,
          **extra) -> dict:
    """A v1 HyperparameterOutput (values and int64 fields as strings, as v1 sends them)."""
    names = ("learning_rate", "layers", "optimizer", "batch_size")
    out = {"trialId": trial_id, "hyperparameters": dict(zip(names, values, strict=True)), "state": state,
           "isTrialStoppedEarly": False, "startTime": f"2026-12-07T03:0{trial_id}:00Z", **extra}
    if objective is not None:
        out["finalMetric"] = {"trainingStep": "100", "objectiveValue": objective}
    if state != "RUNNING":
        out["endTime"] = f"2026-12-07T03:0{trial_id}:05Z"
    return out


TUNING_TRIALS = [
    trial("1", "SUCCEEDED", ("0.0123", "2", "adam", "32"), 0.91),
    trial("2", "FAILED", ("0.0456", "3", "sgd", "16"), errorMessage="chief-0 exited with code 1: bad value"),
    trial("3", "RUNNING", ("0.00042", "1", "adam", "64")),
    trial("4", "SUCCEEDED", ("0.0811", "4", "sgd", "16"), 0.87, isTrialStoppedEarly=True),
    trial("5", "SUCCEEDED", ("0.00235", "2", "sgd", "64"), 0.95),
]


def tuning_output(trials: list[dict]) -> dict:
    return {"isHyperparameterTuningJob": True, "hyperparameterMetricTag": "accuracy",
            "completedTrialCount": str(sum(t["state"] != "RUNNING" for t in trials)), "trials": trials,
            "exportedModelUri": "store://team-a/jobs/tune_1/model"}


def add_tuning_job(env, job_id: str = "tune_1", state: str = "RUNNING", goal: str = "MAXIMIZE",
                   trials: list[dict] = TUNING_TRIALS) -> Job:
    training_input = {**TUNING_INPUT, "hyperparameters": {**TUNING_INPUT["hyperparameters"], "goal": goal}}
    job = Job(project="team-a", job_id=job_id, state=state, step="TUNING", framework="TENSORFLOW",
              training_input=training_input, training_output=tuning_output(trials), labels={})
    return env.store.create_job(job)


def charts_of(page: str) -> dict[str, dict]:
    """The page's Chart.js specs (``data-chart``) by canvas id."""
    return {canvas_id: json.loads(html.unescape(spec))
            for canvas_id, spec in re.findall(r'<canvas id="([^"]+)"[^>]*?data-chart="([^"]*)"', page, re.S)}


def trial_rows(page: str) -> dict[str, str]:
    """The trials table's rows (their HTML) by trial id."""
    table = page[page.index('id="trials-table"'):]
    table = table[:table.index("</table>")]
    return dict(re.findall(r'<tr data-trial="([^"]+)"(.*?)</tr>', table, re.S))


def test_a_tuning_jobs_page_lists_its_trials_highlights_the_best_and_charts_them(env):
    add_tuning_job(env)
    client = sign_in(env, "team-a", "viewer")
    page = client.get("/dashboard/project/jobs/tune_1").get_data(as_text=True)
    assert 'id="tab-trials"' in page and 'id="pane-trials" role="tabpanel"' in page
    assert re.search(r'tab-pane fade show active" id="pane-trials"', page)  # the tab a tuning job opens on
    assert "MAXIMIZE <code>accuracy</code>, up to 6 trials, 2 at a time" in page  # Overview
    header = page[page.index('id="trials-table"'):page.index("<tbody>", page.index('id="trials-table"'))]
    assert [name for name in re.findall(r'<th data-parameter="([^"]+)"', header)] == [
        "learning_rate", "layers", "optimizer", "batch_size"]
    rows = trial_rows(page)
    assert list(rows) == ["1", "2", "3", "4", "5"]
    assert [trial_id for trial_id, row in rows.items() if "best-trial" in row] == ["5"]
    assert 'class="table-success best-trial"' in rows["5"] and ">best</span>" in rows["5"]
    assert 'data-state="SUCCEEDED"' in rows["1"] and 'data-state="FAILED"' in rows["2"]
    assert 'data-state="RUNNING"' in rows["3"]
    assert [trial_id for trial_id, row in rows.items() if "stopped early" in row] == ["4"]
    cells = re.findall(r'<td data-parameter="[^"]+" title="([^"]*)">([^<]*)</td>', rows["1"])
    assert cells == [("0.0123", "0.0123"), ("2", "2"), ("adam", "adam"), ("32", "32")]
    assert '<td class="trial-objective">0.91</td>' in rows["1"] and '<td class="trial-step">100</td>' in rows["1"]
    assert '<td class="trial-objective"></td>' in rows["3"]
    assert "2026-12-07 03:01:00" in rows["1"] and "2026-12-07 03:01:05" in rows["1"]
    assert 'class="has-error"' in rows["2"]  # its error message on a line of its own, under it
    assert re.search(r'<tr class="trial-error-row" data-error-of="2">\s*<td></td>\s*<td colspan="10" '
                     r'class="trial-error text-danger">chief-0 exited with code 1: bad value</td>', page)
    assert page.count('class="trial-error-row"') == 1
    assert "/dashboard/project/jobs/tune_1?tab=logs&amp;trial=2" in rows["2"]
    assert 'id="best-trial">5</strong>, 0.95' in page and "<strong>4</strong> of 6 trials completed" in page
    # Polled like the job's header while it runs.
    assert re.search(r'id="job-trials" hx-get="/dashboard/project/jobs/tune_1/trials\?seen=\w+"\s+'
                     r'hx-swap="outerHTML" hx-trigger="every 2s"', page)

    charts = charts_of(page)
    objective = charts["trials-chart"]
    assert objective["type"] == "trials" and objective["metric"] == "accuracy"
    # Only the trials with a final metric (not the failed one, not the running one).
    assert [(p["x"], p["y"], p["best"]) for p in objective["points"]] == [(1, 0.91, False), (4, 0.87, False),
                                                                          (5, 0.95, True)]
    assert [(p["x"], p["y"]) for p in objective["bestSoFar"]] == [(1, 0.91), (4, 0.91), (5, 0.95)]
    parameters = {spec["name"]: spec for spec in charts.values() if spec["type"] == "parameter"}
    assert {name: spec["axis"] for name, spec in parameters.items()} == {
        "learning_rate": "logarithmic", "layers": "linear", "optimizer": "category", "batch_size": "linear"}
    assert [(p["x"], p["y"]) for p in parameters["learning_rate"]["points"]] == [(0.0123, 0.91), (0.0811, 0.87),
                                                                                 (0.00235, 0.95)]
    assert [p["x"] for p in parameters["batch_size"]["points"]] == [32.0, 16.0, 64.0]
    assert parameters["optimizer"]["labels"] == ["adam", "sgd"]
    assert [p["x"] for p in parameters["optimizer"]["points"]] == ["adam", "sgd", "sgd"]


def test_the_best_trial_follows_the_goal_and_trials_sort_by_number():
    from cloudml_os.dashboard.views import tuning_view

    job = {"state": "SUCCEEDED", "trainingInput": {**TUNING_INPUT, "hyperparameters": {
        **TUNING_INPUT["hyperparameters"], "goal": "MINIMIZE"}}, "trainingOutput": tuning_output(
        [trial("10", "SUCCEEDED", ("0.01", "1", "adam", "16"), 0.99), *TUNING_TRIALS])}
    view = tuning_view(job)
    assert [t["id"] for t in view["trials"]] == ["1", "2", "3", "4", "5", "10"]
    # Trial 4 has the lowest value but was stopped early: its model was not fully trained, and the job does
    # not export it (the tuning workflow's rule), so it is not the best.
    assert view["best"] == "1" and [t["id"] for t in view["trials"] if t["best"]] == ["1"]
    assert [(p["x"], p["y"]) for p in view["charts"]["objective"]["bestSoFar"]] == [
        (1, 0.91), (4, 0.91), (5, 0.91), (10, 0.91)]
    assert [p["x"] for p in view["charts"]["objective"]["points"] if p["stoppedEarly"]] == [4]
    # No goal: MAXIMIZE, as in v1. No trials yet: an empty table and no chart.
    del job["trainingInput"]["hyperparameters"]["goal"]
    assert tuning_view(job)["best"] == "10"
    job["trainingOutput"] = {}
    empty = tuning_view(job)
    assert empty["trials"] == [] and empty["best"] is None and empty["charts"]["objective"]["points"] == []
    # A parameter the spec does not name (values that are all numbers: a numeric axis) and a value a log
    # axis cannot show.
    odd = {"trainingInput": {"hyperparameters": {"params": [{"parameterName": "lr", "type": "DOUBLE",
                                                             "scaleType": "UNIT_LOG_SCALE"}]}},
           "trainingOutput": {"trials": [
               {"trialId": "1", "hyperparameters": {"lr": "0", "dropout": "0.5"},
                "finalMetric": {"trainingStep": "5", "objectiveValue": 1.0}, "state": "SUCCEEDED"},
               {"trialId": "2", "hyperparameters": {"lr": "1e-3", "dropout": "0.25"},
                "finalMetric": {"trainingStep": "5", "objectiveValue": 2.0}, "state": "SUCCEEDED"}]}}
    charts = {spec["name"]: spec for spec in tuning_view(odd)["charts"]["parameters"]}
    assert [p["x"] for p in charts["lr"]["points"]] == [0.001]
    assert charts["dropout"]["axis"] == "linear" and [p["x"] for p in charts["dropout"]["points"]] == [0.5, 0.25]
    # Other jobs have no Trials tab.
    assert tuning_view({"state": "RUNNING", "trainingInput": {"scaleTier": "BASIC"}, "trainingOutput": {}}) is None


def test_the_trials_fragment_answers_no_content_until_something_changed_and_stops_polling_at_the_end(env):
    job = add_tuning_job(env)
    client = sign_in(env, "team-a", "viewer")
    fragment = client.get("/dashboard/project/jobs/tune_1/trials").get_data(as_text=True)
    seen = re.search(r'/trials\?seen=(\w+)"', fragment).group(1)
    unchanged = client.get(f"/dashboard/project/jobs/tune_1/trials?seen={seen}")
    assert unchanged.status_code == 204 and unchanged.get_data() == b""
    finished = [*TUNING_TRIALS[:2], trial("3", "SUCCEEDED", ("0.00042", "1", "adam", "64"), 0.97),
                *TUNING_TRIALS[3:]]
    env.store.update_job(job.id, state="SUCCEEDED", training_output=tuning_output(finished))
    changed = client.get(f"/dashboard/project/jobs/tune_1/trials?seen={seen}").get_data(as_text=True)
    assert 'id="best-trial">3</strong>, 0.97' in changed
    assert [trial_id for trial_id, row in trial_rows(changed).items() if "best-trial" in row] == ["3"]
    assert "hx-trigger" not in changed  # the job has ended: nothing more to poll
    add_job(env, "team-a", "plain")
    assert client.get("/dashboard/project/jobs/plain/trials").status_code == 404


def test_a_plain_jobs_page_has_no_trials_and_its_log_viewer_lists_its_nodes(env):
    job = add_job(env, "team-a", "plain")
    env.store.append_logs(job.id, [(0, "worker-0", 0, b"worker says\n"), (0, "chief-0", 0, b"chief says\n")])
    client = sign_in(env, "team-a", "viewer")
    page = client.get("/dashboard/project/jobs/plain").get_data(as_text=True)
    assert 'id="tab-trials"' not in page and "trials-table" not in page and 'id="log-trial"' not in page
    assert re.search(r'tab-pane fade show active" id="pane-overview"', page)
    assert re.findall(r"<option (?:selected)?\s*>([^<]+)</option>", page) == ["chief-0", "worker-0"]
    assert 'hx-get="/dashboard/project/jobs/plain/logs/chief-0?offset=0"' in page
    page = client.get("/dashboard/project/jobs/plain?tab=logs&node=worker-0").get_data(as_text=True)
    assert 'hx-get="/dashboard/project/jobs/plain/logs/worker-0?offset=0"' in page
    chunk = client.get("/dashboard/project/jobs/plain/logs/worker-0?offset=0").get_data(as_text=True)
    assert chunk.startswith("worker says\n")


def test_the_log_viewer_lists_a_trials_logs_and_reads_a_trial_log_key(env):
    job = add_tuning_job(env)
    env.store.append_logs(job.id, [(0, key, 0, text.encode()) for key, text in (
        ("trial-1/chief-0", "trial one chief\n"), ("trial-1/worker-0", "trial one worker\n"),
        ("trial-2/chief-0", "trial two chief\n"), ("trial-10/chief-0", "trial ten chief\n"))])
    client = sign_in(env, "team-a", "viewer")

    def log_choice(query: str) -> tuple[list[str], list[str], str]:
        page = client.get(f"/dashboard/project/jobs/tune_1?{query}").get_data(as_text=True)
        form = page[page.index('id="log-choice"'):page.index("</form>", page.index('id="log-choice"'))]
        trials = re.findall(r'<option value="(\d+)"', form)
        keys = re.findall(r"<option (?:selected)?\s*>([^<]+)</option>", form)
        shown = re.search(r'hx-get="/dashboard/project/jobs/tune_1/logs/([^"?]+)\?offset=0"', page).group(1)
        return trials, keys, shown

    # The trial choices: the job's trials (1 to 5) and any other trial with logs (10).
    choices = ["1", "2", "3", "4", "5", "10"]
    assert log_choice("tab=logs") == (choices, ["trial-1/chief-0", "trial-1/worker-0", "trial-2/chief-0",
                                                "trial-10/chief-0"], "trial-1/chief-0")
    assert log_choice("tab=logs&trial=1") == (choices, ["trial-1/chief-0", "trial-1/worker-0"], "trial-1/chief-0")
    assert log_choice("tab=logs&trial=10")[1:] == (["trial-10/chief-0"], "trial-10/chief-0")
    # A key chosen (from the Nodes tab, or the node list) chooses its trial too.
    assert log_choice("tab=logs&node=trial-1/worker-0")[1:] == (["trial-1/chief-0", "trial-1/worker-0"],
                                                                "trial-1/worker-0")
    page = client.get("/dashboard/project/jobs/tune_1?tab=logs&trial=3").get_data(as_text=True)
    assert 'id="log-view-empty">No logs of trial 3 yet' in page
    assert '<option value="3" selected>trial 3</option>' in page
    chunk = client.get("/dashboard/project/jobs/tune_1/logs/trial-1/worker-0?offset=0")
    assert chunk.status_code == 200
    assert chunk.get_data(as_text=True).startswith("trial one worker\n")


def test_the_metrics_tab_draws_a_running_jobs_event_files_and_polls_until_the_job_ends(env):
    from tests.unit.test_metrics import tensor_value, write_events

    job = add_job(env, "team-a", "live")
    write_events(env.artifacts_root / "team-a" / "jobs" / "live" / "tensorboard" / "chief-0",
                 [(8, tensor_value("loss", 0.5))])
    client = sign_in(env, "team-a", "viewer")
    page = client.get("/dashboard/project/jobs/live").get_data(as_text=True)
    pane = page[page.index('id="pane-metrics"'):page.index('id="pane-model"')]
    assert 'data-source="tensorboard"' in pane and "while they run, a few seconds behind" in pane
    assert 'hx-get="/dashboard/project/jobs/live/metrics/pane"' in pane and 'hx-trigger="every 2s"' in pane
    assert "chief-0: loss" in pane
    env.store.update_job(job.id, state="SUCCEEDED")
    fragment = client.get("/dashboard/project/jobs/live/metrics/pane").get_data(as_text=True)
    assert fragment.lstrip().startswith("<div id=\"metrics-live\"") and "chief-0: loss" in fragment
    assert "hx-trigger" not in fragment  # the job has ended: nothing more to poll


def test_the_replica_chart_steps_with_each_count_asked_for_and_marks_the_autoscalers_decisions():
    events = [{"time": "2026-12-08T01:00:00Z", "kind": "STATE", "message": "Version creation requested: 1 × standard"},
              {"time": "2026-12-08T01:00:20Z", "kind": "AUTOSCALE",
               "message": "1 → 2 replicas: REQUESTS_IN_FLIGHT 7.50 in total over the last 6 s (panic)"},
              {"time": "2026-12-08T01:00:21Z", "kind": "QUOTA",
               "message": "autoscaling wants 4 replicas; the project's quota allows 2"},
              {"time": "2026-12-08T01:01:00Z", "kind": "REPLICA", "message": "replica-1 ready", "replica": "replica-1"},
              {"time": "2026-12-08T01:02:00Z", "kind": "STATE", "message": "Scaling requested: 2 → 5 replicas"}]
    chart = _replica_counts(events)
    assert chart["count"] == [{"x": 0.0, "y": 1}, {"x": 20.0, "y": 2}, {"x": 120.0, "y": 5}]
    assert [(m["x"], m["y"]) for m in chart["marks"]["AUTOSCALE"]] == [(20.0, 2)]
    assert chart["marks"]["QUOTA"][0]["label"].endswith("allows 2")

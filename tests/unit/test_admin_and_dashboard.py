"""The admin API (/v1/caller, /v1/admin/…) and the dashboard's server side, through Flask's test client.

The browser tests (tests/browser) prove the pages in Chromium against a real platform; these pin the rules
cheaply: who may call what, what the audit trail records, CSRF and cookie settings, and that the dashboard
shows exactly what the API lets its user see.
"""

from __future__ import annotations

import re

import pytest
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import select

from cloudml_os.auth.tokens import create_token
from cloudml_os.dashboard.views import topology
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


def sign_in(env, project: str, role: str):
    client = env.app.test_client()
    token = create_token(env.store, project, role)
    form = client.get("/dashboard/login").get_data(as_text=True)
    response = client.post("/dashboard/login", data={"token": token, "csrf_token": csrf_of(form)})
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


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

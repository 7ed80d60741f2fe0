"""The dashboard in real Chromium against a real platform: what the issue asks a user can see and do.

Work is made through the API (as a data scientist's client would) while the dashboard is open; the tests
assert what the page shows, without reloading it where the page promises to update itself. Screenshots
of the main pages land in docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from playwright.sync_api import Page, expect

from cloudml_os.store import Job, Store
from tests.browser.conftest import ADMIN_PROJECT, screenshot
from tests.harness import node_processes

pytestmark = pytest.mark.integration

LONG = 900_000  # ms: give-up bound for training and deployment on a loaded two-core machine


def job_row(page: Page, job_id: str):
    return page.locator(f"#jobs-rows tr[data-job='{job_id}']")


def open_modal(page: Page, button: str, modal: str) -> None:
    """Open a modal form once the page's scripts have run (Bootstrap's buttons work from then on)."""
    page.wait_for_load_state("load")
    page.click(button)
    expect(page.locator(modal)).to_be_visible()


@pytest.fixture(scope="module")
def package_uri(team_a, tf_package) -> str:
    return team_a.upload(tf_package)


@pytest.fixture(scope="module")
def member_page(browser, dashboard_platform) -> Page:
    return browser.signed_in(dashboard_platform.token("team-a", "member"))


@pytest.fixture(scope="module")
def admin_page(browser, dashboard_platform) -> Page:
    return browser.signed_in(dashboard_platform.token(ADMIN_PROJECT, "admin"))


def test_sign_in_refuses_a_wrong_token_and_accepts_a_project_token(browser, dashboard_platform):
    page = browser.new_page()
    page.goto("/dashboard/project/jobs")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    screenshot(page, "login")
    page.fill("#token", "cmlos_not-a-token")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("Sign-in refused")
    page.fill("#token", dashboard_platform.token("team-a", "viewer"))
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/dashboard/project/jobs$"))  # back where the user was going
    expect(page.locator("#signed-in-as")).to_contain_text("team-a / viewer")
    [cookie] = [c for c in page.context.cookies() if c["name"] == "cloudml_os_dashboard"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    page.click("text=Sign out")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    page.goto("/dashboard/project/jobs")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))  # the session is gone
    # A copy of the cookie taken while signed in is refused too: signing out revoked the session.
    page.context.add_cookies([cookie])
    page.goto("/dashboard/project/jobs")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    expect(page.locator(".alert-warning")).to_contain_text("Your session has ended")


def test_a_job_submitted_through_the_api_reaches_succeeded_in_its_row_without_a_reload(member_page, team_a,
                                                                                      package_uri):
    page = member_page
    page.goto("/dashboard/project/jobs")
    page.evaluate("window.notReloaded = true")
    team_a.submit("dash_train", package_uri, framework="TENSORFLOW", args=["--epochs", "3"])
    row = job_row(page, "dash_train")
    expect(row).to_be_visible(timeout=30_000)  # appears by polling
    expect(row.locator(".state-badge")).to_have_text("SUCCEEDED", timeout=LONG)
    assert page.evaluate("window.notReloaded") is True
    expect(row).to_contain_text("TENSORFLOW")
    expect(row).to_contain_text("BASIC")
    screenshot(page, "jobs")


def test_a_jobs_logs_open_from_its_row_with_the_trainers_output(member_page, team_a):
    page = member_page
    page.goto("/dashboard/project/jobs")
    job_row(page, "dash_train").locator("text=Logs").click()
    expect(page.locator("#pane-logs")).to_be_visible()
    log = page.locator("#log-view")
    expect(log.locator("#log-end")).to_contain_text("SUCCEEDED", timeout=60_000)
    api_text = next(iter(team_a.logs("dash_train").values()))
    assert "epoch 3/3" in api_text
    expect(log).to_contain_text("epoch 3/3")
    screenshot(page, "job-logs")
    page.wait_for_load_state("load")  # Bootstrap's tabs work once the page's scripts have run
    page.click("#tab-metrics")
    expect(page.locator("#pane-metrics")).to_have_class(re.compile(r"\bshow\b"))
    expect(page.locator("#metrics-chart")).to_be_visible()
    # The loss curve from the TensorBoard summaries the trainer wrote (copied to the store as written), drawn
    # by Chart.js: one point per epoch, the values the trainer logged.
    expect(page.locator("#metrics-source")).to_have_attribute("data-source", "tensorboard")
    expect(page.locator("#metrics-source")).to_contain_text("TensorBoard summaries")
    logged = [(float(step), float(loss))
              for step, loss in re.findall(r"epoch \d+/3 step (\d+) loss ([\d.]+)", api_text)]
    assert len(logged) == 3
    curve = page.evaluate("Chart.getChart(document.getElementById('metrics-chart')).data.datasets"
                          ".map(d => [d.label, d.data.map(p => [p.x, p.y])])")
    assert [name for name, _ in curve] == ["chief-0: loss"]
    assert [x for x, _ in curve[0][1]] == [step for step, _ in logged]
    assert [y for _, y in curve[0][1]] == pytest.approx([loss for _, loss in logged], abs=1e-6)
    # The JSON behind the chart says the same.
    answer = page.request.get("/dashboard/project/jobs/dash_train/metrics")
    assert answer.status == 200
    assert answer.json() == {"source": "tensorboard", "series": {"chief-0: loss": [
        {"x": x, "y": y} for x, y in curve[0][1]]}}
    page.wait_for_timeout(500)  # the tab's fade, for the picture only
    screenshot(page, "job-metrics")
    page.click("#tab-overview")
    expect(page.locator("#job-timeline")).to_contain_text("Job SUCCEEDED")


def test_the_trainers_event_files_are_copied_to_the_artifact_store(team_a, dashboard_platform):
    events = [e["message"] for e in team_a.events("dash_train") if e["kind"] == "OUTPUTS"]
    assert len(events) == 1 and re.fullmatch(
        r"Outputs copied to store://team-a/jobs/dash_train/: \d+ file\(s\) of chief-0's job directory, 1 TensorBoard "
        r"event file\(s\) in store://team-a/jobs/dash_train/tensorboard/", events[0]), events
    folder = dashboard_platform.data_dir / "artifacts" / "team-a" / "jobs" / "dash_train" / "tensorboard"
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 1 and re.fullmatch(r"chief-0/tensorboard/events\.out\.tfevents\.[^/]+", files[0]), files


def test_a_running_job_is_cancelled_from_the_ui(member_page, team_a, package_uri):
    page = member_page
    team_a.submit("dash_cancel", package_uri, framework="TENSORFLOW", args=["--sleep-before-training", "600"])
    page.goto("/dashboard/project/jobs/dash_cancel")
    expect(page.locator("#job-state .state-badge")).to_have_text("RUNNING", timeout=LONG)  # live header
    page.click("#cancel-job")
    expect(page.locator(".alert-success")).to_contain_text("Cancelling job dash_cancel")
    expect(page.locator("#job-state .state-badge")).to_have_text("CANCELLED", timeout=LONG)
    assert team_a.job("dash_cancel")["state"] == "CANCELLED"
    # It never trained: no summaries, so its Metrics tab falls back to the log lines (none with metrics).
    assert page.request.get("/dashboard/project/jobs/dash_cancel/metrics").json() == {"source": "logs",
                                                                                      "series": {}}


def test_a_version_deployed_from_the_ui_shows_a_replicas_failure_and_its_replacement(member_page, admin_page,
                                                                                     dashboard_platform, team_a):
    page = member_page
    page.goto("/dashboard/project/jobs/dash_train?tab=model")
    page.click("#deploy-from-job")
    open_modal(page, "#open-create-model", "#create-model")
    page.fill("#model-name", "regression")
    page.fill("#model-description", "y = 3x + 2")
    page.click("#create-model button[type=submit]")
    expect(page.locator(".alert-success")).to_contain_text("Model regression created")
    open_modal(page, "#open-create-version", "#create-version")
    page.fill("#version-name", "v1")
    page.select_option("#version-job", "dash_train")
    page.fill("#version-nodes", "2")
    page.click("#create-version button[type=submit]")
    expect(page.locator(".alert-success")).to_contain_text("Version v1 is being created")
    replicas = page.locator("#replicas-table")
    expect(replicas.locator(".state-badge", has_text="READY")).to_have_count(2, timeout=LONG)
    before = {r["name"] for r in team_a.request("GET", "/models/regression/versions/v1").json()["replicas"]}
    # The monitor's samples (every 10 s per replica) draw each replica's probe latency and health.
    expect(page.locator("#latency-chart")).to_be_visible(timeout=LONG)
    expect(page.locator("#request-logging")).to_have_text("off")
    stats = team_a.request("GET", "/models/regression/versions/v1/replicaStats").json()["samples"]
    assert stats and {s["replica"] for s in stats} <= before
    assert all(s["probes"] >= 1 and s["failures"] <= s["probes"] for s in stats)
    answered = [s for s in stats if s["latencyP50Ms"] is not None]
    assert answered and all(0 < s["latencyP50Ms"] <= s["latencyMaxMs"] for s in answered)
    # The chart (redrawn with each poll) has a median-latency line for each replica the API has samples of.
    page.wait_for_function(CHART_HAS_SERIES, arg=["latency-chart", sorted({f"{s['replica']} p50" for s in answered})],
                           timeout=60_000)
    page.wait_for_function(REPLICA_COUNT_IS, arg=2, timeout=60_000)  # the count asked for, over time

    victim = sorted(before)[0]
    cluster = serving_cluster(dashboard_platform)
    pids = node_processes(f"/clusters/{cluster}/nodes/{victim}/")
    assert pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # the node's power goes off
        except ProcessLookupError:
            pass
    events = page.locator("#version-events")
    expect(events).to_contain_text(f"{victim} ejected", timeout=LONG)
    expect(events).to_contain_text("replaced by", timeout=LONG)
    new = page.locator("#replicas-table tr[data-replica]").filter(has_not_text=victim)
    expect(new.locator(".state-badge", has_text="READY")).to_have_count(2, timeout=LONG)
    # The failed probes that ejected the victim are in its last sample, drawn on the health chart.
    page.wait_for_function(VICTIM_HAS_FAILED_PROBES, arg=victim, timeout=60_000)
    assert any(s["replica"] == victim and s["failures"] >= 1 and not s["healthy"] for s in
               team_a.request("GET", "/models/regression/versions/v1/replicaStats").json()["samples"])
    screenshot(page, "version-failover")

    # The admin sees the version's cluster and can replace a node by hand, through the same eject.
    admin = admin_page
    admin.goto("/dashboard/admin/clusters")
    card = admin.locator(f".cluster-card[data-cluster='{cluster}']")
    expect(card).to_contain_text("projects/team-a/models/regression/versions/v1")
    screenshot(admin, "admin-clusters")
    target = card.locator("tr[data-node]").first.get_attribute("data-node")
    card.locator(f"tr[data-node='{target}'] button").click()
    expect(admin.locator(".alert-success")).to_contain_text(f"{target} of {cluster} is being replaced")
    expect(events).to_contain_text(f"{target} ejected: replaced by a platform admin", timeout=LONG)


CHART_HAS_SERIES = """([id, labels]) => {
  const chart = Chart.getChart(document.getElementById(id));
  return !!chart && labels.every((label) => chart.data.datasets.some((d) => d.label === label));
}"""
REPLICA_COUNT_IS = """(count) => {
  const chart = Chart.getChart(document.getElementById("replicas-chart"));
  const line = chart && chart.data.datasets.find((d) => d.label === "replicas");
  return !!line && line.data.length > 0 && line.data[line.data.length - 1].y === count;
}"""
VICTIM_HAS_FAILED_PROBES = """(victim) => {
  const chart = Chart.getChart(document.getElementById("answered-chart"));
  return !!chart && chart.data.datasets.some((d) => d.label === victim && d.data.some((p) => p.y < 100));
}"""


def serving_cluster(platform) -> str:
    """The cluster of version v1 of team-a's model regression (named after the version's row)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(platform.env["CLOUDML_OS_DATABASE_URL"])
    with engine.connect() as connection:
        version_id = connection.execute(text(
            "SELECT v.id FROM versions v JOIN models m ON m.id = v.model_id "
            "WHERE m.project = 'team-a' AND m.name = 'regression' AND v.name = 'v1'")).scalar_one()
    engine.dispose()
    return f"cml-serve-{version_id}"


def test_a_member_sees_no_admin_panel_and_no_other_projects_rows(browser, dashboard_platform, team_a):
    other = dashboard_platform.client("team-b", "member")
    page = browser.signed_in(dashboard_platform.token("team-b", "member"))
    expect(page.locator("#nav-project")).to_be_visible()
    expect(page.locator("#nav-admin")).to_have_count(0)
    expect(page.locator("#project-switcher")).to_have_count(0)
    page.goto("/dashboard/project/jobs")
    expect(page.locator("#jobs-rows")).to_contain_text("No jobs.")  # team-a's jobs are not listed
    for panel in ("overview", "jobs", "clusters", "projects", "tokens", "events"):
        response = page.goto(f"/dashboard/admin/{panel}")
        assert response.status == 403, panel
        expect(page.locator("#page-error")).to_contain_text("platform admins")
    response = page.goto("/dashboard/project/jobs/dash_train")  # another project's job
    assert response.status == 404
    # The API itself refuses the same: the dashboard only shows what the token may see.
    assert other.request("GET", "/jobs/dash_train").status_code == 404


def test_forms_reject_bad_input_with_the_apis_messages(member_page, admin_page):
    page = member_page
    page.goto("/dashboard/project/models")
    open_modal(page, "#open-create-model", "#create-model")
    page.fill("#model-name", "1 bad name")
    page.click("#create-model button[type=submit]")
    expect(page.locator(".alert-danger")).to_contain_text("name:")
    page.goto("/dashboard/project/models/regression")
    open_modal(page, "#open-create-version", "#create-version")
    page.fill("#version-name", "v2")
    page.fill("#version-uri", "store://team-b/somewhere")
    page.select_option("#version-framework", "TENSORFLOW")
    page.fill("#version-nodes", "many")
    page.click("#create-version button[type=submit]")
    expect(page.locator(".alert-danger")).to_contain_text("manualScaling.nodes")
    page.goto("/dashboard/project/models/regression")
    open_modal(page, "#open-split-traffic", "#split-traffic")
    page.fill("#share-v1", "50")
    page.click("#split-traffic button[type=submit]")
    expect(page.locator(".alert-danger")).to_contain_text("trafficSplit: the percents sum to 50, not 100")
    page.goto("/dashboard/project/packages")
    open_modal(page, "#open-upload", "#upload-package")
    page.click("#upload-package button[type=submit]")
    expect(page.locator(".alert-danger")).to_contain_text("file:")

    admin = admin_page
    admin.goto("/dashboard/admin/tokens")
    open_modal(admin, "#open-create-token", "#create-token")
    admin.fill("#token-project", "Not A Project")
    admin.click("#create-token button[type=submit]")
    expect(admin.locator(".alert-danger")).to_contain_text("project")
    admin.goto("/dashboard/admin/projects")
    admin.wait_for_load_state("load")
    admin.locator("tr[data-project='team-a'] button").click()
    expect(admin.locator("#quotas-team-a")).to_be_visible()
    admin.fill("#quota-team-a-gpus", "-7")
    admin.click("#quotas-team-a button[type=submit]")
    expect(admin.locator(".alert-danger")).to_contain_text("quotas")


def test_admin_panels_show_every_project_and_the_audit_trail(admin_page, dashboard_platform):
    page = admin_page
    page.goto("/dashboard/admin/projects")
    page.locator("tr[data-project='team-a'] button").click()
    expect(page.locator("#quotas-team-a")).to_be_visible()
    page.fill("#quota-team-a-replicas", "4")
    page.fill("#quota-team-a-nodes", "6")
    page.click("#quotas-team-a button[type=submit]")
    expect(page.locator(".alert-success")).to_contain_text("Quotas of team-a saved")
    expect(page.locator("tr[data-project='team-a']")).to_contain_text("/ 4")
    screenshot(page, "admin-projects")
    page.goto("/dashboard/admin/overview")
    expect(page.locator("#usage-table tr[data-project='team-a']")).to_contain_text("/ 6")
    expect(page.locator("#usage-replicas")).to_be_visible()
    screenshot(page, "admin-overview")
    page.goto("/dashboard/admin/jobs")
    expect(page.locator("#admin-jobs-table tr[data-job='dash_train']")).to_contain_text("team-a")
    page.goto("/dashboard/admin/tokens")
    open_modal(page, "#open-create-token", "#create-token")
    page.fill("#token-project", "team-c")
    page.select_option("#token-role", "viewer")
    page.fill("#token-description", "made in the dashboard")
    page.click("#create-token button[type=submit]")
    token = page.locator("#created-token code").inner_text().strip()
    assert token.startswith("cmlos_")
    row = page.locator("#tokens-table tr", has_text="made in the dashboard")
    expect(row).to_contain_text("team-c")
    screenshot(page, "admin-tokens")
    row.locator("button").click()
    expect(page.locator(".alert-success")).to_contain_text("revoked")
    expect(page.locator("#tokens-table")).not_to_contain_text("made in the dashboard")
    page.goto("/dashboard/admin/events")
    audit = page.locator("#audit-table")
    expect(audit).to_contain_text("POST /v1/projects/team-a/jobs")
    expect(audit).to_contain_text("POST /v1/admin/tokens")
    expect(audit).to_contain_text("DELETE /v1/admin/tokens/")
    screenshot(page, "admin-events")
    # The project switcher shows another project's panels to the admin.
    page.select_option("#switch-project", "team-a")
    expect(page.locator(".alert-info")).to_contain_text("Now showing project team-a")
    expect(page.locator("#jobs-rows tr[data-job='dash_train']")).to_be_visible()


def test_an_admin_opens_another_projects_job_from_all_jobs(admin_page, dashboard_platform):
    store = Store(dashboard_platform.env["CLOUDML_OS_DATABASE_URL"])
    try:
        store.create_job(Job(project="team-open", job_id="dash_opened", state="SUCCEEDED", step="DONE",
                             framework="TENSORFLOW", training_input={"scaleTier": "BASIC", "packageUris": ["x"],
                                                                     "pythonModule": "trainer.task"}, labels={}))
    finally:
        store.engine.dispose()
    page = admin_page
    page.goto("/dashboard/admin/jobs")
    # A button in a form (a POST with the CSRF token: opening it switches the admin's project).
    page.locator("#admin-jobs-table tr[data-job='dash_opened'] button", has_text="dash_opened").click()
    expect(page).to_have_url(re.compile(r"/dashboard/project/jobs/dash_opened$"))
    expect(page.locator("#switch-project")).to_have_value("team-open")
    expect(page.locator("#job-status")).to_contain_text("SUCCEEDED")


def test_a_version_is_scaled_and_deleted_from_its_models_table(member_page, team_a):
    page = member_page
    page.goto("/dashboard/project/models/regression")
    row = page.locator("#versions-table tr[data-version='v1']")
    expect(row.locator(".state-badge")).to_have_text("READY", timeout=LONG)
    row.locator("input[name=nodes]").fill("1")
    row.locator("button", has_text="Scale").click()
    expect(page.locator(".alert-success")).to_contain_text("Scaling v1 to 1 replicas")
    row = page.locator("#versions-table tr[data-version='v1']")
    expect(row).to_contain_text("1 / 1", timeout=LONG)  # the polled table follows the operation
    expect(row.locator(".state-badge")).to_have_text("READY", timeout=LONG)
    ready = [r for r in team_a.request("GET", "/models/regression/versions/v1").json()["replicas"]
             if r["state"] == "READY"]
    assert len(ready) == 1
    expect(row.locator(".traffic")).to_have_text("100 %")
    open_modal(page, "#open-split-traffic", "#split-traffic")
    page.fill("#share-v1", "100")
    page.click("#split-traffic button[type=submit]")
    expect(page.locator(".alert-success")).to_contain_text("Traffic of regression: v1 100 %.")
    row = page.locator("#versions-table tr[data-version='v1']")
    row.locator("button", has_text="Delete").click()
    expect(page.locator(".alert-success")).to_contain_text("Version v1 is being deleted")
    expect(page.locator("#versions-table tr[data-version='v1']")).to_have_count(0, timeout=LONG)
    assert team_a.request("GET", "/models/regression/versions/v1").status_code == 404

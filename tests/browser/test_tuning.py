"""A hyperparameter tuning job's page in real Chromium: the Trials tab's table and charts, their refresh while
the job runs, and each trial's logs.

The job is written to the platform's database as the tuning workflow records one (``trainingOutput`` from its
trials, node logs under ``trial-N/NODE``) rather than run: the page is under test here, the search is tested in
tests/integration. Its step is held by a lease of a worker that does not exist, so the platform's reconciler
leaves it alone; the test ends it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from cloudml_os.store import Job, Store
from tests.browser.conftest import screenshot

pytestmark = pytest.mark.integration

PROJECT = "team-tune"
JOB = "dash_tune"
NAMES = ("learning_rate", "layers", "optimizer", "batch_size")
SPEC = {
    "goal": "MAXIMIZE", "hyperparameterMetricTag": "accuracy", "maxTrials": 6, "maxParallelTrials": 2,
    "params": [
        {"parameterName": "learning_rate", "type": "DOUBLE", "minValue": 0.0001, "maxValue": 0.1,
         "scaleType": "UNIT_LOG_SCALE"},
        {"parameterName": "layers", "type": "INTEGER", "minValue": 1, "maxValue": 4},
        {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["adam", "sgd"]},
        {"parameterName": "batch_size", "type": "DISCRETE", "discreteValues": [16, 32, 64]},
    ],
}


def trial(number: int, state: str, values: tuple[str, ...], objective: float | None = None, **extra) -> dict:
    """A trial as ``trainingOutput.trials`` holds it (v1 HyperparameterOutput, int64 fields as strings)."""
    out = {"trialId": str(number), "hyperparameters": dict(zip(NAMES, values, strict=True)), "state": state,
           "isTrialStoppedEarly": False, "startTime": f"2026-12-07T03:0{number}:00Z", **extra}
    if objective is not None:
        out["finalMetric"] = {"trainingStep": "300", "objectiveValue": objective}
    if state != "RUNNING":
        out["endTime"] = f"2026-12-07T03:0{number}:40Z"
    return out


def output(trials: list[dict]) -> dict:
    return {"isHyperparameterTuningJob": True, "hyperparameterMetricTag": "accuracy",
            "completedTrialCount": str(sum(t["state"] == "SUCCEEDED" for t in trials)), "trials": trials}


FIRST = [
    trial(1, "SUCCEEDED", ("0.0123", "2", "adam", "32"), 0.91),
    trial(2, "FAILED", ("0.0456", "3", "sgd", "16"),
          errorMessage="chief-0 exited with code 1: ValueError: loss is NaN"),
    trial(3, "RUNNING", ("0.00042", "1", "adam", "64")),
]
LATER = [
    *FIRST[:2],
    trial(3, "SUCCEEDED", ("0.00042", "1", "adam", "64"), 0.95),
    trial(4, "SUCCEEDED", ("0.0811", "4", "sgd", "16"), 0.62, isTrialStoppedEarly=True),
    trial(5, "SUCCEEDED", ("0.00235", "2", "sgd", "64"), 0.93),
    trial(6, "RUNNING", ("0.0009", "3", "adam", "32")),
]


@pytest.fixture(scope="module")
def store(dashboard_platform) -> Iterator[Store]:
    opened = Store(dashboard_platform.env["CLOUDML_OS_DATABASE_URL"])
    yield opened
    opened.engine.dispose()


@pytest.fixture(scope="module")
def tuning_job(store) -> Iterator[Job]:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    job = store.create_job(Job(
        project=PROJECT, job_id=JOB, state="RUNNING", step="TUNING", framework="TENSORFLOW",
        training_input={"scaleTier": "BASIC", "pythonModule": "trainer.task", "hyperparameters": SPEC,
                        "packageUris": [f"store://{PROJECT}/packages/trainer-0.1.tar.gz"]},
        training_output=output(FIRST), labels={}, start_time=now,
        lease_owner="browser-test", lease_until=now + dt.timedelta(hours=1)))
    store.append_logs(job.id, [(0, f"trial-{n}/{node}", 0, f"trial {n} {node}: epoch 1/3\n".encode())
                               for n in (1, 2, 3) for node in ("chief-0", "worker-0")])
    yield job
    store.update_job(job.id, state="SUCCEEDED", step="DONE", lease_owner=None, lease_until=None,
                     end_time=dt.datetime.now(dt.UTC).replace(tzinfo=None))


@pytest.fixture(scope="module")
def signed_in(browser, dashboard_platform) -> tuple[Page, list[str]]:
    """A viewer's page of the project, and the errors its scripts have thrown."""
    opened = browser.signed_in(dashboard_platform.token(PROJECT, "viewer"))
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    return opened, errors


@pytest.fixture
def page(signed_in) -> Iterator[Page]:
    opened, errors = signed_in
    yield opened
    assert errors == []


def row(page: Page, number: int):
    return page.locator(f"#trials-table tr[data-trial='{number}']")


CHART = """([id, what]) => {
  const chart = Chart.getChart(document.getElementById(id));
  if (!chart) return null;
  return what === "points" ? chart.data.datasets.map((d) => d.data.map((p) => [p.x, p.y]))
                           : {type: chart.options.scales.x.type, labels: chart.options.scales.x.labels ?? null};
}"""


def chart(page: Page, canvas_id: str, what: str = "points"):
    return page.evaluate(CHART, [canvas_id, what])


def test_the_trials_tab_lists_the_trials_and_charts_them_and_follows_the_running_job(page, tuning_job, store):
    page.goto(f"/dashboard/project/jobs/{JOB}")
    expect(page.locator("#pane-trials")).to_be_visible()  # a tuning job's page opens on its trials
    expect(page.locator("#trials-table tbody tr[data-trial]")).to_have_count(3)
    expect(page.locator("#trials-table thead")).to_contain_text("learning_rate")
    for name in NAMES:
        expect(page.locator(f"#trials-table thead th[data-parameter='{name}']")).to_have_text(name)
    expect(row(page, 1)).to_have_class(re.compile(r"\bbest-trial\b"))
    expect(row(page, 1).locator(".state-badge")).to_have_text("SUCCEEDED")
    expect(row(page, 1).locator(".trial-objective")).to_have_text("0.91")
    expect(row(page, 2).locator(".state-badge")).to_have_text("FAILED")
    expect(page.locator("#trials-table tr[data-error-of='2'] .trial-error")).to_contain_text("loss is NaN")
    expect(row(page, 3).locator(".state-badge")).to_have_text("RUNNING")
    expect(page.locator("#trials-table tr.best-trial")).to_have_count(1)
    # The charts drew: one point (trial 1; failed and running trials have no final metric), and a chart per
    # parameter with the axis its type and scale call for.
    page.wait_for_function("() => !!Chart.getChart(document.getElementById('trials-chart'))")
    assert chart(page, "trials-chart") == [[[1, 0.91]], [[1, 0.91]]]
    axes = {page.locator(f"#parameter-chart-{i}").get_attribute("data-parameter"): chart(page, f"parameter-chart-{i}",
                                                                                      "axis") for i in (1, 2, 3, 4)}
    assert axes == {"learning_rate": {"type": "logarithmic", "labels": None},
                    "layers": {"type": "linear", "labels": None},
                    "optimizer": {"type": "category", "labels": ["adam", "sgd"]},
                    "batch_size": {"type": "linear", "labels": None}}
    assert chart(page, "parameter-chart-1") == [[[0.0123, 0.91]]]

    # The workflow records more trials: the page follows without a reload, and the best trial moves.
    page.evaluate("window.notReloaded = true")
    store.update_job(tuning_job.id, training_output=output(LATER))
    expect(page.locator("#trials-table tbody tr[data-trial]")).to_have_count(6, timeout=30_000)
    expect(row(page, 3)).to_have_class(re.compile(r"\bbest-trial\b"))
    expect(page.locator("#trials-table tr.best-trial")).to_have_count(1)
    expect(row(page, 4).locator(".stopped-early")).to_have_text("stopped early")
    expect(page.locator("#best-trial")).to_have_text("3")
    page.wait_for_function("() => Chart.getChart(document.getElementById('trials-chart'))?.data.datasets[0]"
                           ".data.length === 4")
    assert page.evaluate("window.notReloaded") is True
    objective, best_so_far = chart(page, "trials-chart")
    assert objective == [[1, 0.91], [3, 0.95], [4, 0.62], [5, 0.93]]
    assert best_so_far == [[1, 0.91], [3, 0.95], [4, 0.95], [5, 0.95]]
    assert chart(page, "parameter-chart-3") == [[["adam", 0.91], ["adam", 0.95], ["sgd", 0.62], ["sgd", 0.93]]]
    # The replaced canvases' charts were freed: one Chart.js instance per canvas on the page.
    assert page.evaluate("Object.keys(Chart.instances).length") == page.locator("canvas[data-drawn]").count() == 5
    page.wait_for_timeout(300)  # the tab's fade, for the picture only
    screenshot(page, "job-trials")


def test_a_trials_logs_open_from_its_row_and_the_trial_filter_lists_its_nodes(page, tuning_job):
    page.goto(f"/dashboard/project/jobs/{JOB}")
    row(page, 2).locator("a.trial-logs").click()
    expect(page.locator("#pane-logs")).to_be_visible()
    expect(page.locator("#log-trial")).to_have_value("2")
    expect(page.locator("#log-node option")).to_have_text(["trial-2/chief-0", "trial-2/worker-0"])
    expect(page.locator("#log-view")).to_contain_text("trial 2 chief-0: epoch 1/3")
    page.select_option("#log-node", "trial-2/worker-0")
    expect(page.locator("#log-view")).to_contain_text("trial 2 worker-0: epoch 1/3")
    page.select_option("#log-trial", "3")
    expect(page).to_have_url(re.compile(r"[?&]trial=3(&|$)"))
    expect(page.locator("#log-node option")).to_have_text(["trial-3/chief-0", "trial-3/worker-0"])
    expect(page.locator("#log-view")).to_contain_text("trial 3 chief-0: epoch 1/3")
    page.select_option("#log-trial", "")
    expect(page.locator("#log-node option")).to_have_count(6)

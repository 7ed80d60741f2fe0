"""A batch prediction job in the dashboard, in Debian's Chromium against a real platform.

A tiny TorchScript model is made here with the PyTorch runtime's python and uploaded through the objects API,
with two input files of JSON instances (two lines of them unreadable); the job is submitted through the API
(``uri``, one node) while the jobs table is open. The table shows it as a batch prediction job with its
progress, and its page follows it to the end without a reload: model, inputs, formats, the progress bar, the
counts, node hours, the output files as links, events and the node's log.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ADMIN_PROJECT, screenshot
from tests.browser.test_dashboard import LONG, job_row

pytestmark = pytest.mark.integration

PROJECT = "team-a"
JOB = "dash_batch"
FILES, PER_FILE = 2, 150
BAD_LINES = ["not json", "[["]  # one per file: counted as errors, written to the errors_stats files
MODEL = """
import sys, torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval()
torch.jit.save(torch.jit.script(model), sys.argv[1])
"""


@pytest.fixture(scope="module")
def model_uri(team_a, pytorch_runtime, tmp_path_factory) -> str:
    model = tmp_path_factory.mktemp("batch-model") / "model.pt"
    subprocess.run([str(pytorch_runtime / "bin" / "python"), "-c", MODEL, str(model)], check=True)
    response = team_a.request("PUT", "/objects/dash-batch/model/model.pt", data=model.read_bytes())
    assert response.status_code == 200, response.text
    return f"store://{PROJECT}/dash-batch/model"


@pytest.fixture(scope="module")
def input_pattern(team_a) -> str:
    for index in range(FILES):
        lines = [json.dumps([float(index * PER_FILE + i)]) for i in range(PER_FILE)]
        lines.insert(PER_FILE // 2, BAD_LINES[index])
        response = team_a.request("PUT", f"/objects/dash-batch/in/part-{index}.json",
                                  data="".join(line + "\n" for line in lines).encode())
        assert response.status_code == 200, response.text
    return f"store://{PROJECT}/dash-batch/in/part-*.json"


def test_a_batch_prediction_job_shows_as_such_with_its_progress_counts_and_output_files(
        browser, dashboard_platform, team_a, model_uri, input_pattern):
    page = browser.signed_in(dashboard_platform.token(PROJECT, "member"))
    page.goto("/dashboard/project/jobs")
    response = team_a.request("POST", "/jobs", json={"jobId": JOB, "predictionInput": {
        "dataFormat": "JSON", "inputPaths": [input_pattern], "outputPath": f"store://{PROJECT}/dash-batch/out",
        "uri": model_uri, "maxWorkerCount": 1, "batchSize": 32}})
    assert response.status_code == 200, response.text

    row = job_row(page, JOB)
    expect(row).to_be_visible(timeout=30_000)  # appears by polling
    expect(row.locator(".job-kind")).to_have_text("Batch prediction")
    expect(row).to_contain_text("PYTORCH")
    expect(row.locator(".job-shape")).not_to_contain_text("BASIC")  # no training topology for it
    row.locator("a", has_text=JOB).click()

    # The page follows the job to its end by itself.
    page.evaluate("window.notReloaded = true")
    spec = page.locator("#job-spec")
    expect(spec.locator(".job-kind")).to_have_text("Batch prediction")
    expect(page.locator("#prediction-model")).to_contain_text(model_uri)
    expect(page.locator("#prediction-inputs")).to_have_text(input_pattern)
    expect(page.locator("#prediction-formats")).to_have_text("JSON in, JSON out")
    expect(page.locator("#tab-metrics")).to_have_count(0)
    expect(page.locator("#job-state .state-badge")).to_have_text("SUCCEEDED", timeout=LONG)
    records = FILES * (PER_FILE + 1)
    progress = page.locator("#prediction-progress")
    expect(progress.locator(".progress-text")).to_have_text(f"{records} / {records} records", timeout=30_000)
    expect(progress.locator(".progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#prediction-count")).to_have_text(str(FILES * PER_FILE))
    expect(page.locator("#error-count")).to_have_text(str(len(BAD_LINES)))
    expect(page.locator("#node-hours")).to_have_text(re.compile(r"^\d+(\.\d+)?(e-\d+)?$"))
    expect(page.locator("#shards")).to_have_text(f"{FILES} / {FILES}")
    assert page.evaluate("window.notReloaded") is True

    job = team_a.job(JOB)
    output = job["predictionOutput"]
    assert output["predictionCount"] == str(FILES * PER_FILE) and output["errorCount"] == str(len(BAD_LINES))
    files = page.locator("#output-files tr.output-file")
    expect(files).to_have_count(2 * FILES)  # a results and an errors_stats file per shard
    expect(files.locator("a")).to_have_text(
        [f"prediction.errors_stats-{i:05d}-of-{FILES:05d}" for i in range(FILES)]
        + [f"prediction.results-{i:05d}-of-{FILES:05d}" for i in range(FILES)])
    screenshot(page, "batch-prediction")
    with page.expect_download() as download:
        files.filter(has_text=f"prediction.results-00000-of-{FILES:05d}").locator("a").click()
    lines = open(download.value.path(), encoding="utf-8").read().splitlines()
    assert [json.loads(line)["instance"] for line in lines] == [[float(i)] for i in range(PER_FILE)]

    # Events and the node's log, as for a training job.
    page.wait_for_load_state("load")  # Bootstrap's tabs work once the page's scripts have run
    page.click("#tab-events")
    expect(page.locator("#events-table")).to_contain_text("SHARD")
    expect(page.locator("#events-table")).to_contain_text("worker-0")
    page.click("#tab-logs")
    expect(page.locator("#log-node")).to_have_value("worker-0")
    expect(page.locator("#log-view #log-end")).to_contain_text("SUCCEEDED", timeout=60_000)
    assert "done:" in team_a.logs(JOB)["worker-0"]
    expect(page.locator("#log-view")).to_contain_text("done:")  # the shard runner's last line per shard

    # The output folder opens in the Objects browser.
    page.click("#tab-overview")
    page.click("#output-folder")
    expect(page.locator("#object-path")).to_contain_text("out")
    expect(page.locator("#objects-table tr.object-file", has_text="prediction.results-")).to_have_count(FILES)

    # The jobs tables (the project's and the admin's) show its kind and its progress at the end.
    page.goto("/dashboard/project/jobs")
    expect(job_row(page, JOB).locator(".job-shape")).to_contain_text(f"{records} / {records} records")
    admin = browser.signed_in(dashboard_platform.token(ADMIN_PROJECT, "admin"))
    admin.goto("/dashboard/admin/jobs")
    admin_row = admin.locator(f"#admin-jobs-table tr[data-job='{JOB}']")
    expect(admin_row.locator(".job-kind")).to_have_text("Batch prediction")
    expect(admin_row.locator(".job-shape")).to_contain_text(f"{records} / {records} records")

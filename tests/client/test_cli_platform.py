"""``cloudml`` against a real platform (API, Celery worker, sshd nodes, TensorFlow): a new user's whole path
from an empty settings file to a prediction, failing jobs, refusals, and Ctrl-C while following a job.

Most commands run in-process with Click's CliRunner; the Ctrl-C test runs the installed command.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml

from tests.client.cli_helpers import CLOUDML, cli_env, process_env, run, run_installed
from tests.conftest import ROOT
from tests.harness import Client
from tests.integration.test_serving import flatten

pytestmark = pytest.mark.integration

PROJECT = "cli-user"
EXAMPLE = ROOT / "examples" / "tensorflow"


@pytest.fixture(scope="module")
def token(platform) -> str:
    return platform.token(PROJECT, "member")


@pytest.fixture(scope="module")
def api(platform, token) -> Client:
    """The test's own look at the project, straight over HTTP (not through the CLI)."""
    return Client(platform.base_url, PROJECT, token)


@pytest.fixture
def env(platform, token, tmp_path):
    return cli_env(tmp_path / "config.json", endpoint=platform.base_url, project=PROJECT, token=token)


def test_a_new_user_trains_deploys_predicts_and_cleans_up(platform, token, api, tmp_path):
    env = cli_env(tmp_path / "cloudml" / "config.json")
    assert run(env, "config", "set", "endpoint", platform.base_url).exit_code == 0
    assert run(env, "config", "set", "project", PROJECT).exit_code == 0
    assert run(env, "config", "set", "token", "-", input=token + "\n").exit_code == 0

    # The README's quick start: a data set made here, uploaded, and named in the trainer's args.
    data = tmp_path / "regression"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_regression_data.py"), str(data), "--files", "3",
                    "--rows", "500"], check=True)
    copied = run(env, "objects", "cp", "-r", str(data), f"store://{PROJECT}/data/regression")
    assert copied.exit_code == 0, copied.output
    listed = run(env, "objects", "ls", f"store://{PROJECT}/data/regression/")
    assert listed.stdout.split() == [f"store://{PROJECT}/data/regression/train-0000{i}.csv" for i in range(3)]
    train_files = f"store://{PROJECT}/data/regression/train-*.csv"
    submitted = run(env, "jobs", "submit", "training", "cli_census", "--package-path", str(EXAMPLE),
                    "--module-name", "trainer.task", "--region", "local", "--labels", "team=ml", "--stream-logs",
                    "--polling-interval", "0.3", "--", "--epochs", "2", "--train-files", train_files)
    assert submitted.exit_code == 0, submitted.output
    assert "Uploaded trainer-0.1.0.tar.gz" in submitted.stderr
    assert "Job [cli_census] submitted successfully." in submitted.stderr
    assert "Job cli_census ended SUCCEEDED." in submitted.stderr
    lines = submitted.stdout.splitlines()
    assert lines and all(line.startswith("chief-0: ") for line in lines), submitted.stdout
    assert any("epoch 2/2" in line for line in lines) and any("exported SavedModel" in line for line in lines)
    assert any("read 1500 rows from 3 file(s) matching /store/" in line for line in lines), submitted.stdout
    assert submitted.stdout == "".join(f"chief-0: {line}\n" for line in api.logs("cli_census")["chief-0"]
                                       .splitlines())  # every line once, in order

    described = run(env, "jobs", "describe", "cli_census")
    assert described.exit_code == 0
    job = yaml.safe_load(described.stdout)
    assert job["state"] == "SUCCEEDED" and job["labels"] == {"team": "ml"}
    assert job["trainingInput"]["args"] == ["--epochs", "2", "--train-files", train_files]
    assert job["trainingInput"]["packageUris"][0].startswith(f"store://{PROJECT}/packages/")
    export = job["trainingOutput"]["exportedModelUri"]
    value = run(env, "jobs", "describe", "cli_census", "--format", "value(state,trainingOutput.exportedModelUri)")
    assert value.stdout == f"SUCCEEDED\t{export}\n"
    listed = run(env, "jobs", "list", "--filter", "labels.team=ml")
    assert listed.stdout.split()[:4] == ["JOB_ID", "STATUS", "STEP", "CREATED"]
    assert listed.stdout.split()[4:7] == ["cli_census", "SUCCEEDED", "DONE"]

    assert run(env, "models", "create", "cli_regression", "--description", "y = 3x + 2").exit_code == 0
    started = run(env, "versions", "create", "v1", "--model", "cli_regression", "--origin-job", "cli_census",
                  "--runtime-version", "2.21", "--machine-type", "standard", "--nodes", "1", "--async",
                  "--format", "value(name)")
    assert started.exit_code == 0, started.output
    operation = started.stdout.strip()
    assert operation.startswith(f"projects/{PROJECT}/operations/")
    waited = run(env, "operations", "wait", operation, "--format", "json")
    assert waited.exit_code == 0, waited.output
    version = json.loads(waited.stdout)
    assert version["state"] == "READY" and version["deploymentUri"] == export and version["isDefault"] is True
    versions = run(env, "versions", "list", "--model", "cli_regression", "--format", "value(name,state)")
    assert versions.stdout == f"projects/{PROJECT}/models/cli_regression/versions/v1\tREADY\n"

    (tmp_path / "instances.json").write_text("[0.0]\n[1.0]\n\n[2.0]\n")
    predicted = run(env, "predict", "--model", "cli_regression", "--json-instances", str(tmp_path / "instances.json"))
    assert predicted.exit_code == 0, predicted.output
    assert flatten(json.loads(predicted.stdout)["predictions"]) == pytest.approx([2.0, 5.0, 8.0], abs=0.5)
    (tmp_path / "request.json").write_text(json.dumps({"instances": [[1.0]]}))
    request = run(env, "predict", "--model", "cli_regression", "--version", "v1", "--json-request",
                  str(tmp_path / "request.json"), "--format", "value(predictions)")
    assert float(request.stdout.strip()) == pytest.approx(5.0, abs=0.5)
    # The same model over files in the store, as a batch prediction job.
    (tmp_path / "batch.json").write_text("".join(f"[{x}.0]\n" for x in range(20)) + "oops\n")
    assert run(env, "objects", "cp", str(tmp_path / "batch.json"), f"store://{PROJECT}/batch/in.json").exit_code == 0
    batch = run(env, "jobs", "submit", "prediction", "cli_batch", "--model", "cli_regression", "--data-format",
                "json", "--input-paths", f"store://{PROJECT}/batch/in.json", "--output-path",
                f"store://{PROJECT}/batch/out", "--stream-logs", "--polling-interval", "0.3")
    assert batch.exit_code == 0, batch.output
    assert "Job cli_batch ended SUCCEEDED." in batch.stderr and "worker-0: " in batch.stdout
    counts = run(env, "jobs", "describe", "cli_batch", "--format", "value(predictionOutput.predictionCount,"
                 "predictionOutput.errorCount)")
    assert counts.stdout == "20\t1\n"
    results = run(env, "objects", "ls", f"store://{PROJECT}/batch/out/")
    assert results.stdout.split() == [f"store://{PROJECT}/batch/out/prediction.errors_stats-00000-of-00001",
                                      f"store://{PROJECT}/batch/out/prediction.results-00000-of-00001"]
    updated = run(env, "versions", "update", "v1", "--model", "cli_regression", "--description", "first",
                  "--format", "value(description)")
    assert updated.exit_code == 0 and updated.stdout == "first\n", updated.output
    autoscaled = run(env, "versions", "update", "v1", "--model", "cli_regression", "--min-nodes", "1",
                     "--max-nodes", "3", "--metric-targets", "requests-in-flight=2", "--format",
                     "value(autoScaling.minNodes,autoScaling.maxNodes,autoScaling.metrics[0].target)")
    assert autoscaled.exit_code == 0 and autoscaled.stdout == "1\t3\t2.0\n", autoscaled.output
    listed = run(env, "versions", "list", "--model", "cli_regression")
    assert listed.stdout.splitlines()[1].split()[-2:] == ["1-3", "*"], listed.stdout

    deleted = run(env, "versions", "delete", "v1", "--model", "cli_regression")
    assert deleted.exit_code == 0 and deleted.stdout == "", deleted.output
    gone = run(env, "versions", "describe", "v1", "--model", "cli_regression")
    assert gone.exit_code == 1 and gone.stderr.startswith("ERROR: NOT_FOUND: ")
    assert run(env, "models", "delete", "cli_regression").exit_code == 0
    assert api.request("GET", "/models/cli_regression").status_code == 404


def test_following_a_failing_job_prints_its_traceback_and_exits_1(env, api, tmp_path):
    package = tmp_path / "broken"
    (package / "trainer").mkdir(parents=True)
    (package / "trainer" / "__init__.py").write_text("")
    (package / "trainer" / "task.py").write_text(textwrap.dedent("""
        print("reading the data", flush=True)
        def load():
            raise FileNotFoundError("gs://bucket/data.csv is not here")
        load()
        """))
    (package / "setup.py").write_text("from setuptools import setup\nsetup(name='broken', version='1.0', "
                                      "packages=['trainer'])\n")
    result = run(env, "jobs", "submit", "training", "cli_broken", "--package-path", str(package),
                 "--module-name", "trainer.task", "--stream-logs", "--polling-interval", "0.3")
    assert result.exit_code == 1, result.output
    assert "chief-0: reading the data\n" in result.stdout
    assert "chief-0: Traceback (most recent call last):\n" in result.stdout
    assert "chief-0: FileNotFoundError: gs://bucket/data.csv is not here\n" in result.stdout
    error = result.stderr.split("ERROR: ", 1)[1]
    assert error.startswith("job cli_broken ended FAILED: ") and "gs://bucket/data.csv is not here" in error
    assert api.job("cli_broken")["state"] == "FAILED"
    # Following it again once it has ended prints the same log and fails the same way.
    again = run(env, "jobs", "stream-logs", "cli_broken")
    assert again.exit_code == 1 and again.stdout == result.stdout


def test_bad_input_is_refused_with_one_line_and_nothing_is_submitted(env, api, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("trainingInput: {scaleTier: BASIC}\nworkerCount: 2\n")
    submit = ["jobs", "submit", "training"]
    package = ["--package-path", str(EXAMPLE), "--module-name", "trainer.task"]
    cases = {  # job id -> (environment, arguments, exit status, the one line on stderr starts with)
        "cli_bad_token": ({**env, "CLOUDML_TOKEN": "cmlos_not_a_token"}, package, 1, "ERROR: UNAUTHENTICATED: "),
        "cli_no_setup": (env, ["--package-path", str(tmp_path / "empty"), "--module-name", "trainer.task"], 2,
                         f"ERROR: --package-path {tmp_path / 'empty'}: neither setup.py nor pyproject.toml"),
        "cli_bad_config": (env, [*package, "--config", str(tmp_path / "bad.yaml")], 2,
                           f"ERROR: --config {tmp_path / 'bad.yaml'}: unknown top-level key(s) workerCount"),
        "cli_bad_tier": (env, [*package, "--scale-tier", "huge"], 1,
                         "ERROR: INVALID_ARGUMENT: trainingInput.scaleTier: unknown tier 'HUGE'"),
        "cli_unknown_flag": (env, [*package, "--worker-cnt", "2"], 2, "Usage: cloudml jobs submit training"),
    }
    for job_id, (environment, args, status, first) in cases.items():
        result = run(environment, *submit, job_id, *args)
        assert result.exit_code == status, (job_id, result.output)
        assert result.stdout == "", job_id
        errors = [line for line in result.stderr.splitlines() if not line.startswith("Uploaded ")]
        if status == 2 and first.startswith("Usage"):
            assert errors[0].startswith(first) and "No such option '--worker-cnt'" in result.stderr
        else:
            assert len(errors) == 1 and errors[0].startswith(first), (job_id, result.stderr)
        assert api.request("GET", f"/jobs/{job_id}").status_code == 404, job_id
    wrong = run({**env, "CLOUDML_TOKEN": "cmlos_not_a_token"}, "jobs", "list")
    assert wrong.exit_code == 1 and wrong.stderr.count("\n") == 1
    missing = run(env, "jobs", "describe", "no_such_job")
    assert missing.exit_code == 1 and missing.stderr.startswith("ERROR: NOT_FOUND: ")


def test_submitting_without_following_prints_the_job_and_returns_at_once(env, api):
    result = run(env, "jobs", "submit", "training", "cli_background", "--package-path", str(EXAMPLE),
                 "--module-name", "trainer.task", "--", "--sleep-before-training", "600")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout) == {"jobId": "cli_background", "state": "QUEUED"}
    assert "cloudml jobs stream-logs cli_background" in result.stderr
    again = run(env, "jobs", "submit", "training", "cli_background", "--package-path", str(EXAMPLE),
                "--module-name", "trainer.task")
    assert again.exit_code == 1 and again.stderr.splitlines()[-1].startswith("ERROR: ALREADY_EXISTS: ")
    listed = run(env, "jobs", "list", "--limit", "1", "--format", "value(jobId)")
    assert listed.stdout == "cli_background\n"  # newest first
    cancelled = run(env, "jobs", "cancel", "cli_background")
    assert cancelled.exit_code == 0 and cancelled.stdout == ""
    assert api.wait("cli_background", timeout=300)["state"] == "CANCELLED"
    finished = run(env, "jobs", "cancel", "cli_background")
    assert finished.exit_code == 1 and finished.stderr.startswith("ERROR: FAILED_PRECONDITION: ")


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


def test_ctrl_c_while_following_leaves_the_job_running_and_says_how_to_follow_again(platform, token, api,
                                                                                     tmp_path):
    env = process_env(tmp_path / "config.json", endpoint=platform.base_url, project=PROJECT, token=token)
    process = subprocess.Popen(
        [str(CLOUDML), "jobs", "submit", "training", "cli_interrupted", "--package-path", str(EXAMPLE),
         "--module-name", "trainer.task", "--stream-logs", "--polling-interval", "0.3", "--",
         "--sleep-before-training", "600"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        seen = ""
        while "sleeping 600.0 s before training" not in seen:  # the trainer is running and we follow it
            seen = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert seen.startswith("chief-0: "), seen
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Stopped following job cli_interrupted; it is still running." in stderr
    assert "cloudml jobs stream-logs cli_interrupted" in stderr
    time.sleep(2)
    assert api.job("cli_interrupted")["state"] == "RUNNING"
    cancelled = run_installed(env, "jobs", "cancel", "cli_interrupted")
    assert cancelled.returncode == 0 and cancelled.stderr == "Cancelled job [cli_interrupted].\n"
    followed = run_installed(env, "jobs", "stream-logs", "cli_interrupted", timeout=300)
    assert followed.returncode == 1 and "sleeping 600.0 s" in followed.stdout
    assert followed.stderr.startswith("ERROR: job cli_interrupted ended CANCELLED")
    assert api.job("cli_interrupted")["state"] == "CANCELLED"

"""The ``cloudml`` command without a platform: what it imports, its settings, formats, help, completion,
the job body it builds, the log follower's bookkeeping, and refusals that happen before any request."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import click
import pytest

from cloudml_os.client.jobs import prediction_body, training_body
from cloudml_os.client.logs import LogFollower
from cloudml_os.client.main import cli
from cloudml_os.client.output import emit, field, parse_format
from cloudml_os.client.packaging import build_sdist
from cloudml_os.client.rest import MultipartFile
from tests.client.cli_helpers import cli_env, process_env, run, run_installed
from tests.harness import free_port

SERVER_SIDE = ("flask", "werkzeug", "sqlalchemy", "alembic", "celery", "kombu", "paramiko", "openstack",
               "keystonemiddleware", "marshmallow", "psycopg", "cloudml_os.api", "cloudml_os.store",
               "cloudml_os.workflows", "cloudml_os.tasks", "cloudml_os.remote", "cloudml_os.cloud")

LOAD_EVERY_COMMAND = """
import sys
import click
from cloudml_os.client.main import cli

def walk(command, ctx):
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            walk(command.get_command(ctx, name), ctx)

walk(cli, click.Context(cli))
print("\\n".join(sorted(sys.modules)))
"""


def test_the_cli_and_every_command_import_nothing_of_the_server_side():
    only_main = subprocess.run([sys.executable, "-c", "import sys, cloudml_os.client.main; "
                                "print('\\n'.join(sorted(sys.modules)))"], capture_output=True, text=True, check=True)
    every_command = subprocess.run([sys.executable, "-c", LOAD_EVERY_COMMAND], capture_output=True, text=True,
                                   check=True)
    for out in (only_main.stdout, every_command.stdout):
        modules = out.split()
        assert "cloudml_os.client.main" in modules
        leaked = [m for m in modules if any(m == name or m.startswith(name + ".") for name in SERVER_SIDE)]
        assert leaked == []
    assert "cloudml_os.client.jobs" in every_command.stdout.split()


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_every_command_has_help(tmp_path):
    paths = [path for path, _ in _commands(cli)]
    assert {("jobs", "submit", "training"), ("jobs", "stream-logs"), ("versions", "set-default"), ("predict",),
            ("operations", "wait"), ("auth", "login"), ("config", "unset")} <= set(paths)
    for path, command in _commands(cli):
        result = run(cli_env(tmp_path / "config.json"), *path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert result.stdout.startswith(f"Usage: cloudml {' '.join(path)}"), result.stdout
        first_line = (command.help or "").split("\n")[0].strip()
        assert first_line and first_line in " ".join(result.stdout.split())


def test_unknown_flags_are_usage_errors(tmp_path):
    env = cli_env(tmp_path / "config.json")
    for args in (["jobs", "list", "--bogus"], ["jobs", "submit", "training", "j1", "--module-name", "t.task",
                                              "--package-pth", "x"], ["--format", "xml", "jobs", "list"]):
        result = run(env, *args)
        assert result.exit_code == 2, result.output
        assert "Usage: cloudml" in result.stderr and result.stdout == ""


def test_settings_are_stored_0600_the_token_is_never_shown_and_env_and_flags_override(tmp_path):
    config = tmp_path / "settings" / "config.json"
    env = cli_env(config)
    assert run(env, "config", "set", "endpoint", "http://127.0.0.1:8080/v1/").exit_code == 0
    assert run(env, "config", "set", "project", "demo").exit_code == 0
    assert run(env, "config", "set", "token", "-", input="cmlos_secret\n").exit_code == 0
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert json.loads(config.read_text()) == {"endpoint": "http://127.0.0.1:8080", "project": "demo",
                                              "token": "cmlos_secret"}
    listed = run(env, "config", "list")
    assert listed.exit_code == 0
    assert "project = demo" in listed.stdout and "token = (hidden)" in listed.stdout
    assert "cmlos_secret" not in listed.output
    overridden = run({**env, "CLOUDML_PROJECT": "from-env"}, "--project", "from-flag", "config", "list",
                     "--format", "json")
    assert json.loads(overridden.stdout)["project"] == "from-flag"
    from_env = run({**env, "CLOUDML_PROJECT": "from-env"}, "config", "list")
    assert "project = from-env  # from CLOUDML_PROJECT" in from_env.stdout
    assert run(env, "config", "unset", "token").exit_code == 0
    assert "token" not in json.loads(config.read_text())
    bad = run(env, "config", "set", "endpoint", "ftp://x")
    assert bad.exit_code == 1 and bad.stderr.startswith("ERROR: endpoint: must be an http")


def test_formats_pick_fields_like_gclouds(capsys):
    job = {"jobId": "j1", "state": "SUCCEEDED", "trainingOutput": {"trials": [{"trialId": "2"}],
                                                                   "isHyperparameterTuningJob": True}}
    emit(job, parse_format("value(jobId,trainingOutput.trials[0].trialId,trainingOutput.isHyperparameterTuningJob)"))
    emit([job, {"jobId": "j2", "state": "QUEUED"}], parse_format("value(jobId,state)"))
    emit([job], parse_format("json"))
    emit({"jobId": "j1"}, parse_format("yaml"))
    emit([job], parse_format("table(jobId,state)"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["j1\t2\ttrue", "j1\tSUCCEEDED", "j2\tQUEUED"]
    assert json.loads("\n".join(lines[3:-3])) == [job]
    assert lines[-3] == "jobId: j1"
    assert lines[-2].split() == ["JOB_ID", "STATE"] and lines[-1].split() == ["j1", "SUCCEEDED"]
    assert field(job, "trainingOutput.trials[3].trialId") is None
    with pytest.raises(click.BadParameter):
        parse_format("value()")


def test_the_job_body_is_the_config_files_training_input_with_the_flags_over_it():
    document = {"trainingInput": {"scaleTier": "BASIC", "args": ["--from-config"], "region": "local",
                                  "hyperparameters": {"maxTrials": 2}}, "labels": {"team": "a", "stage": "dev"}}
    body = training_body("j1", document, {"module_name": "trainer.task", "scale_tier": "custom",
                                          "master_machine_type": "standard", "worker_count": 2,
                                          "framework": "mxnet", "region": None},
                         ["store://p/packages/1/t.tar.gz"], ["--epochs", "2"], {"stage": "prod"})
    assert body == {"jobId": "j1", "labels": {"team": "a", "stage": "prod"}, "trainingInput": {
        "scaleTier": "CUSTOM", "masterType": "standard", "workerCount": "2", "framework": "MXNET",
        "pythonModule": "trainer.task", "region": "local", "args": ["--epochs", "2"],
        "packageUris": ["store://p/packages/1/t.tar.gz"], "hyperparameters": {"maxTrials": 2}}}
    assert document["trainingInput"]["args"] == ["--from-config"]  # the document itself is left alone
    # Machine types without a tier mean a custom tier; nothing given keeps the config's values.
    assert training_body("j2", {}, {"master_machine_type": "standard"}, [], [], {})["trainingInput"] == {
        "masterType": "standard", "scaleTier": "CUSTOM"}
    assert training_body("j3", document, {}, [], [], {})["trainingInput"]["args"] == ["--from-config"]


def test_a_prediction_body_names_the_model_one_way_and_takes_gclouds_spellings(tmp_path):
    body = prediction_body("store://p/a/*.json, store://p/b.json", "store://p/out", "m", "v2", None,
                           {"data_format": "TF_RECORD_GZIP", "batch_size": 8, "region": None}, "p")
    assert body == {"inputPaths": ["store://p/a/*.json", "store://p/b.json"], "outputPath": "store://p/out",
                    "versionName": "projects/p/models/m/versions/v2", "dataFormat": "TF_RECORD_GZIP", "batchSize": 8}
    by_model = prediction_body("store://p/x", "store://p/o", "m", None, None, {}, "p")
    assert by_model["modelName"] == "projects/p/models/m"
    assert prediction_body("store://p/x", "store://p/o", None, None, "store://p/model", {"framework": "MXNET"},
                           "p") == {"inputPaths": ["store://p/x"], "outputPath": "store://p/o",
                                    "uri": "store://p/model", "framework": "MXNET"}
    env = cli_env(tmp_path / "config.json", endpoint="http://127.0.0.1:9", project="p", token="t")
    for args in (["--model", "m", "--model-dir", "store://p/model"], [],
                 ["--model-dir", "store://p/m", "--version", "v"]):
        result = run(env, "jobs", "submit", "prediction", "j", "--data-format", "tf-record", "--input-paths",
                     "store://p/x", "--output-path", "store://p/o", *args)
        assert result.exit_code == 2, result.output


def test_a_traffic_split_is_version_equals_percent_and_anything_else_is_a_usage_error(tmp_path):
    from cloudml_os.client.models import _split

    assert _split("v1=90, v2=10") == {"v1": 90, "v2": 10}
    env = cli_env(tmp_path / "config.json", endpoint="http://127.0.0.1:9", project="p", token="t")
    for split in ("v1", "v1=ninety", "=10", "v1=-5", ","):
        result = run(env, "models", "update", "census", "--traffic-split", split)
        assert result.exit_code == 2 and "--traffic-split" in result.output, result.output
    assert run(env, "models", "update", "census").exit_code == 2


def test_metric_targets_take_gclouds_names_and_autoscaling_flags_exclude_a_fixed_pool(tmp_path):
    from cloudml_os.client.models import parse_metric_targets

    assert parse_metric_targets("requests-in-flight=2, CPU-usage=60") == [
        {"name": "REQUESTS_IN_FLIGHT", "target": 2.0}, {"name": "CPU_USAGE", "target": 60.0}]
    env = cli_env(tmp_path / "config.json", endpoint="http://127.0.0.1:9", project="p", token="t")
    for args in (["--metric-targets", "qps=3"], ["--metric-targets", "cpu-usage=lots"], ["--metric-targets", ","],
                 ["--nodes", "2", "--max-nodes", "3"], ["--min-nodes", "-1"]):
        result = run(env, "versions", "update", "v1", "--model", "m", *args)
        assert result.exit_code == 2, (args, result.output)
    result = run(env, "versions", "create", "v1", "--model", "m", "--origin", "store://p/x", "--max-nodes", "3")
    assert result.exit_code == 2 and "--min-nodes" in result.output, result.output


class FakeLogs:
    """A job's state and logs as the API serves them, changed by the test between polls."""

    def __init__(self):
        self.state = "RUNNING"
        self.logs: dict[str, bytes] = {}
        self.polls = 0

    def job(self, job_id):
        return {"jobId": job_id, "state": self.state}

    def job_logs(self, job_id, node=None, offset=0):
        if node is None:
            return [{"node": name, "offset": 0, "nextOffset": len(data), "text": data.decode()}
                    for name, data in sorted(self.logs.items())]
        data = self.logs.get(node, b"")[offset:offset + (1 << 20)]
        return [{"node": node, "offset": offset, "nextOffset": offset + len(data), "text": data.decode()}]


def test_the_log_follower_writes_whole_prefixed_lines_finds_new_nodes_and_reads_to_the_end():
    api, written = FakeLogs(), []
    script = [  # what changes before each poll
        lambda: api.logs.update({"chief-0": b"start\nhalf a li"}),
        lambda: api.logs.update({"chief-0": b"start\nhalf a line\n", "trial-1/chief-0": b"trial one\n"}),
        lambda: api.logs.update({"chief-0": b"start\nhalf a line\n" + b"x" * (1 << 20) + b"\nlast, no newline"}),
        lambda: setattr(api, "state", "SUCCEEDED"),
    ]
    clock = iter(range(0, 1000, 10))

    def sleep(seconds):
        script.pop(0)()

    script.pop(0)()
    job = LogFollower(api, "j1", written.append, sleep=sleep, clock=lambda: next(clock)).run()
    assert job["state"] == "SUCCEEDED" and script == []
    assert written == ["chief-0: start\n", "chief-0: half a line\n", "trial-1/chief-0: trial one\n",
                       "chief-0: " + "x" * (1 << 20) + "\n", "chief-0: last, no newline\n"]


def test_a_multipart_upload_has_its_length_and_reports_the_files_bytes(tmp_path):
    package = tmp_path / "trainer-0.1.tar.gz"
    package.write_bytes(os.urandom(200_000))
    seen = []
    with MultipartFile(package, "file", seen.append) as body:
        data = b"".join(iter(lambda: body.read(8192), b""))
    assert len(data) == len(body) and sum(seen) == 200_000
    assert b'name="file"; filename="trainer-0.1.tar.gz"' in data and package.read_bytes() in data


def test_a_pyproject_only_package_is_built_as_an_sdist(tmp_path):
    source = tmp_path / "src" / "mytrainer"
    (source / "mytrainer").mkdir(parents=True)
    (source / "mytrainer" / "__init__.py").write_text("")
    (source / "mytrainer" / "task.py").write_text("print('hello')\n")
    (source / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "mytrainer"
        version = "0.2"
        [tool.setuptools]
        packages = ["mytrainer"]
        """))
    sdist = build_sdist(source, tmp_path / "work")
    assert sdist.name == "mytrainer-0.2.tar.gz"
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert "mytrainer-0.2/PKG-INFO" in names and "mytrainer-0.2/mytrainer/task.py" in names
    assert sorted(p.name for p in source.iterdir()) == ["mytrainer", "pyproject.toml"]  # the tree is untouched


def test_a_folder_without_setup_py_or_pyproject_is_refused_before_any_request(tmp_path):
    (tmp_path / "notapackage").mkdir()
    (tmp_path / "notapackage" / "task.py").write_text("")
    env = cli_env(tmp_path / "config.json", endpoint=f"http://127.0.0.1:{free_port()}", project="p", token="t")
    result = run(env, "jobs", "submit", "training", "j1", "--package-path", str(tmp_path / "notapackage"),
                 "--module-name", "trainer.task")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "neither setup.py nor pyproject.toml" in result.stderr


def test_an_unreachable_endpoint_is_one_line_and_a_failure(tmp_path):
    env = process_env(tmp_path / "config.json", endpoint=f"http://127.0.0.1:{free_port()}", project="p", token="t")
    for args in (["jobs", "list"], ["jobs", "submit", "training", "j1", "--module-name", "trainer.task",
                                    "--package-path", str(Path(__file__).parents[2] / "examples" / "tensorflow")]):
        done = run_installed(env, *args)
        assert done.returncode == 1, done.stderr
        assert done.stdout == ""
        assert done.stderr.splitlines() == [f"ERROR: cannot reach the API at {env['CLOUDML_ENDPOINT']}: "
                                            f"connection refused"], done.stderr
    missing = run_installed(process_env(tmp_path / "config.json"), "jobs", "list")
    assert missing.returncode == 2 and missing.stderr.startswith("ERROR: no project set")


def test_bash_and_zsh_completion_come_from_click(tmp_path):
    env = process_env(tmp_path / "config.json")
    for shell, marker in (("bash", "complete -o nosort -F _cloudml_completion cloudml"),
                          ("zsh", "compdef _cloudml_completion cloudml")):
        script = run_installed({**env, "_CLOUDML_COMPLETE": f"{shell}_source"})
        assert script.returncode == 0 and marker in script.stdout, script.stdout
    words = run_installed({**env, "_CLOUDML_COMPLETE": "bash_complete", "COMP_WORDS": "cloudml jobs su",
                           "COMP_CWORD": "2"})
    assert words.stdout.split() == ["plain,submit"]

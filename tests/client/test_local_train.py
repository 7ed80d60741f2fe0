"""``cloudml local train``: the example trainers run here as a cluster would run them, with the plugins' env.

The examples run with the node runtimes' pythons (built once per machine, see tests/conftest.py); the
other tests use small probe trainers under ``tmp_path`` and this interpreter, which needs no framework.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cloudml_os.client.local import collect_export, local, plan, prepare_job_dirs
from cloudml_os.config import MachineType
from cloudml_os.frameworks.base import Member, load_frameworks, topology_from_training_input

ROOT = Path(__file__).resolve().parents[2]
STARTING = re.compile(r"starting (\S+) on (\S+) ports (\d+)-(\d+)(?:, job dir (\S+))?$", re.MULTILINE)

# Prints what it was given, then waits until every process of the run has printed (so that none is
# stopped before it spoke when the chief's success ends the run), then exits 0.
PROBE = """
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
barrier, expected = Path(args[args.index("--barrier") + 1]), int(args[args.index("--expected") + 1])
print("PROBE " + json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}), flush=True)
(barrier / str(os.getpid())).touch()
deadline = time.monotonic() + 60
while len(list(barrier.iterdir())) < expected and time.monotonic() < deadline:
    time.sleep(0.05)
"""

# PyTorch ranks: master-0 is rank 0, worker-0 rank 1, worker-1 rank 2.
SLEEPER = """
import os, signal, sys, time
if os.environ.get("RANK") == os.environ.get("DEAF_RANK"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before the pid line: the test signals once all are printed
print(f"pid {os.getpid()}", flush=True)
if os.environ.get("RANK") == os.environ.get("FAIL_RANK"):
    sys.exit(3)
time.sleep(300)
"""


def write_package(root: Path, **modules: str) -> Path:
    """A package ``probe`` under ``root`` with the given modules; returns the package folder."""
    package = root / "probe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, source in modules.items():
        (package / f"{name}.py").write_text(source)
    return package


def invoke(*args: str) -> Result:
    return CliRunner().invoke(local, ["train", *args], catch_exceptions=False)


def lines_by_role(stdout: str) -> dict[str, list[str]]:
    """The relayed output, ``ROLE: line``, by role."""
    found: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        role, sep, text = line.partition(": ")
        if sep and re.fullmatch(r"[a-z]+-\d+", role):
            found.setdefault(role, []).append(text)
    return found


def started(stderr: str) -> dict[str, tuple[str, int, int, str | None]]:
    """What the command said it started: role -> (address, first port, last port, job dir)."""
    return {m[1]: (m[2], int(m[3]), int(m[4]), m[5]) for m in STARTING.finditer(stderr)}


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ---- the example trainers, distributed, with their runtimes ----------------------------------------

EXAMPLES = {
    "TENSORFLOW": ("tf_runtime", ["--epochs", "2", "--steps-per-epoch", "5"], "saved_model.pb",
                   {"chief-0", "worker-0"}),
    "MXNET": ("mxnet_runtime", ["--epochs", "2"], "model-symbol.json",
              {"worker-0", "worker-1", "server-0", "scheduler-0"}),
    "PYTORCH": ("pytorch_runtime", ["--epochs", "2", "--samples", "4096", "--threads", "1"], "model.pt",
                {"master-0", "worker-0"}),
}


@pytest.mark.parametrize("framework", list(EXAMPLES))
def test_the_distributed_example_trains_as_a_cluster_and_exports_its_model_under_job_dir(framework, request,
                                                                                       tmp_path):
    runtime_fixture, args, marker, roles = EXAMPLES[framework]
    runtime = request.getfixturevalue(runtime_fixture)
    source = tmp_path / "example"
    shutil.copytree(ROOT / "examples" / framework.lower(), source, ignore=shutil.ignore_patterns("__pycache__"))
    job_dir = tmp_path / "job"

    result = invoke("--package-path", str(source / "trainer"), "--module-name", "trainer.task",
                    "--job-dir", str(job_dir), "--distributed", "--worker-count", "1", "--framework", framework,
                    "--python", str(runtime / "bin" / "python"), "--", *args)

    assert result.exit_code == 0, result.output
    assert f"succeeded; model exported to {job_dir / 'model'}" in result.stderr
    assert (job_dir / "model" / marker).is_file()
    output = lines_by_role(result.stdout)
    assert roles <= set(output), result.output
    if framework == "TENSORFLOW":
        for role in roles:
            assert any("MultiWorkerMirroredStrategy: 2 replica(s)" in line for line in output[role]), output[role]
    else:  # dist_sync and DDP leave every trainer with the same parameters
        params = {role: [line for line in lines if line.startswith("PARAMS ")] for role, lines in output.items()}
        trained = {role: found[-1] for role, found in params.items() if found}
        assert len(trained) == 2 and len(set(trained.values())) == 1, trained
    # The other processes' private job directories are gone with the run.
    private = [Path(info[3]) for info in started(result.stderr).values() if info[3] and Path(info[3]) != job_dir]
    assert private and not any(path.exists() for path in private)


# ---- what every process gets --------------------------------------------------------------------------


@pytest.mark.parametrize(("framework", "roles"), [
    ("TENSORFLOW", {"chief-0", "worker-0", "worker-1"}),
    ("MXNET", {"worker-0", "worker-1", "worker-2", "server-0", "scheduler-0"}),
    ("PYTORCH", {"master-0", "worker-0", "worker-1"}),
])
def test_each_role_gets_the_environment_and_argv_its_framework_plugin_computes(framework, roles, tmp_path):
    package = write_package(tmp_path / "src", task=PROBE)
    barrier, job_dir = tmp_path / "barrier", tmp_path / "job"
    barrier.mkdir()
    user_args = ["--barrier", str(barrier), "--expected", str(len(roles))]

    result = invoke("--package-path", str(package), "--module-name", "probe.task", "--job-dir", str(job_dir),
                    "--distributed", "--framework", framework.lower(), "--", *user_args)

    assert result.exit_code == 0, result.output
    where = started(result.stderr)
    assert set(where) == roles
    probes = {role: json.loads(lines[0].removeprefix("PROBE "))
              for role, lines in lines_by_role(result.stdout).items()}
    assert set(probes) == roles, result.output

    # The job a platform would have run: a CUSTOM topology, default counts (MXNet: 1 server).
    fields = {"scaleTier": "CUSTOM", "masterType": "local", "workerType": "local", "workerCount": 2}
    if framework == "MXNET":
        fields.update(parameterServerType="local", parameterServerCount=1)
    fields.update(pythonModule="probe.task", args=user_args, framework=framework, jobDir=str(job_dir))
    plugin = load_frameworks()[framework]
    plugin_roles = plugin.roles(topology_from_training_input(fields, {"local": MachineType("local", "local")}),
                                fields)
    members = [Member(role, *where[role.node_name][:3]) for role in plugin_roles]
    body = {"jobId": "local_train", "trainingInput": fields}
    for member in members:
        name = member.role.node_name
        expected = plugin.environment(member, members, body)
        got = probes[name]["env"]
        assert {key: got.get(key) for key in expected} == expected, name
        if "TF_CONFIG" in expected:  # the very string, not only the same JSON
            assert got["TF_CONFIG"] == expected["TF_CONFIG"]
        assert probes[name]["cwd"] == str(package.parent)
        argv, own_dir = probes[name]["argv"], where[name][3]
        assert argv == [*user_args, "--job-dir", own_dir]
        assert (own_dir == str(job_dir)) == (member.role == plugin.export_roles(plugin_roles)[0]), name
    assert all(first + 9 == last for _, first, last, _ in where.values())
    assert len({first for _, first, _, _ in where.values()}) == len(roles)


def test_without_distributed_one_master_runs_from_the_folder_holding_the_package(tmp_path):
    package = write_package(tmp_path / "src", task=PROBE)
    barrier = tmp_path / "barrier"
    barrier.mkdir()

    result = invoke("--package-path", str(package.parent), "--module-name", "probe.task",
                    "--", "--barrier", str(barrier), "--expected", "1")

    assert result.exit_code == 0, result.output
    probes = lines_by_role(result.stdout)
    assert set(probes) == {"chief-0"}
    probe = json.loads(probes["chief-0"][0].removeprefix("PROBE "))
    assert probe["argv"] == ["--barrier", str(barrier), "--expected", "1"]  # no --job-dir given, none passed
    port = started(result.stderr)["chief-0"][1]
    assert json.loads(probe["env"]["TF_CONFIG"])["cluster"] == {"chief": [f"127.0.0.1:{port}"]}
    assert probe["cwd"] == str(package.parent)


# ---- failure, interruption, refusals ------------------------------------------------------------------


def test_a_failing_role_makes_the_command_exit_1_naming_it_and_stops_the_others(tmp_path, monkeypatch):
    package = write_package(tmp_path / "src", sleeper=SLEEPER)
    monkeypatch.setenv("FAIL_RANK", "1")
    began = time.monotonic()

    result = invoke("--package-path", str(package), "--module-name", "probe.sleeper", "--distributed",
                    "--framework", "PYTORCH")

    assert result.exit_code == 1
    assert "Error: worker-0 exited with code 3" in result.stderr
    assert time.monotonic() - began < 30
    pids = [int(line.split()[1]) for lines in lines_by_role(result.stdout).values() for line in lines
            if line.startswith("pid ")]
    assert pids and all(gone(pid) for pid in pids)


def test_ctrl_c_stops_every_process_killing_those_that_ignore_sigterm(tmp_path):
    package = write_package(tmp_path / "src", sleeper=SLEEPER)
    # SIGINT as a terminal delivers it, whatever disposition this test process inherited.
    script = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from cloudml_os.client.local import local; local()")
    command = subprocess.Popen(
        [sys.executable, "-c", script, "train", "--package-path", str(package), "--module-name", "probe.sleeper",
         "--distributed", "--framework", "PYTORCH"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "DEAF_RANK": "2"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in command.stdout], daemon=True).start()
    errors: list[str] = []  # read as it comes: a full stderr pipe would block the command
    threading.Thread(target=lambda: errors.extend(command.stderr), daemon=True).start()
    pids, exit_code = [], None
    try:
        while len(pids) < 3:
            line = lines.get(timeout=30)
            if ": pid " in line:
                pids.append(int(line.rsplit(" ", 1)[1]))
        command.send_signal(signal.SIGINT)
        exit_code = command.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        command.kill()
        command.wait()
    time.sleep(0.2)  # the reader threads' last lines
    stderr = "".join(errors)
    assert exit_code == 130, stderr
    assert "stopping master-0, worker-0, worker-1" in stderr
    assert "killing worker-1 (still running 5s after SIGTERM)" in stderr
    assert all(gone(pid) for pid in pids)


def test_a_topology_the_framework_cannot_run_is_refused_naming_the_option(tmp_path):
    package = write_package(tmp_path / "src", task=PROBE)

    mxnet = invoke("--package-path", str(package), "--module-name", "probe.task", "--distributed",
                   "--framework", "MXNET", "--parameter-server-count", "0")
    counts_alone = invoke("--package-path", str(package), "--module-name", "probe.task", "--worker-count", "1")
    unknown = invoke("--package-path", str(package), "--module-name", "missing.task")

    assert mxnet.exit_code == 2 and "--parameter-server-count: distributed MXNet" in mxnet.stderr
    assert counts_alone.exit_code == 2 and "need --distributed" in counts_alone.stderr
    assert unknown.exit_code == 2 and "no package or module 'missing'" in unknown.stderr


# ---- pieces -------------------------------------------------------------------------------------------


def test_a_model_exported_by_another_mxnet_worker_is_copied_into_job_dir(tmp_path):
    mxnet = load_frameworks()["MXNET"]
    fields = {"scaleTier": "CUSTOM", "masterType": "local", "workerType": "local", "workerCount": 1,
              "parameterServerType": "local", "parameterServerCount": 1, "pythonModule": "trainer.task"}
    job_dir, scratch = tmp_path / "job", tmp_path / "scratch"
    stale = job_dir / "model" / "model-symbol.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    planned = plan(mxnet, fields, "python", job_dir, scratch, lambda count: [20000 + 10 * i for i in range(count)])
    prepare_job_dirs(planned, job_dir)
    since = time.time()
    worker_1 = next(p for p in planned if p.member.role.node_name == "worker-1")
    (worker_1.job_dir / "model" / "model-symbol.json").write_text("rank 0 was worker-1")

    assert collect_export(mxnet, planned, job_dir, since) == job_dir / "model"
    assert stale.read_text() == "rank 0 was worker-1"


def test_the_command_imports_nothing_of_the_server_side():
    probe = ("import sys, cloudml_os.client.local; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('flask', 'sqlalchemy', 'celery', 'kombu', 'paramiko', 'openstack', 'marshmallow') "
             "or m.startswith(('cloudml_os.api', 'cloudml_os.store', 'cloudml_os.workflows', 'cloudml_os.tasks', "
             "'cloudml_os.cloud', 'cloudml_os.remote'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"

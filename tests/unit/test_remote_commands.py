"""Command building for remote nodes: whatever an argv, env or cwd holds reaches the process literally.

The built command lines are run here through the local /bin/sh (dash, as on the nodes) and bash,
which is what sshd does with them on a node, so no SSH server is needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cloudml_os.remote.parallel import FanOutError, fan_out
from cloudml_os.remote.ssh import (
    NodeSession,
    ProcessStatus,
    build_command,
    parse_process_status,
    quote_argv,
    script_argv,
    start_process_argv,
)

PRINT_ARGV = ("import json, os, sys; "
              "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}))")

NASTY = [
    "; rm -rf /",
    "$(id)",
    "`id`",
    "'single' \"double\"",
    "line one\nline two",
    "  spaces  around  ",
    "",
    "*",
    "~",
    "a\\b",
    "$HOME ${PATH}",
    "&& echo pwned ||",
    "| cat > /tmp/x",
    "#comment",
    "-n",
    "\t tab",
    "ünïcødé",
]

SHELLS = ["/bin/sh", "/bin/bash"]


def run_in_shell(shell: str, command: str) -> dict:
    completed = subprocess.run([shell, "-c", command], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


@pytest.mark.parametrize("shell", SHELLS)
def test_argv_with_shell_metacharacters_arrives_literally(shell):
    result = run_in_shell(shell, build_command([sys.executable, "-c", PRINT_ARGV, *NASTY]))
    assert result["argv"] == NASTY


@pytest.mark.parametrize("shell", SHELLS)
def test_env_values_and_cwd_with_metacharacters_arrive_literally(shell, tmp_path):
    workdir = tmp_path / "dir with 'quotes' and $(id) ; `x`"
    workdir.mkdir()
    env = {f"VAR_{index}": value for index, value in enumerate(NASTY)}
    result = run_in_shell(shell, build_command([sys.executable, "-c", PRINT_ARGV], env=env, cwd=str(workdir)))
    assert result["cwd"] == str(workdir)
    assert {name: result["env"][name] for name in env} == env


def test_first_word_with_equals_sign_is_a_program_not_an_assignment():
    assert quote_argv(["X=1", "Y=2"]) == "'X=1' Y=2"
    completed = subprocess.run(["/bin/sh", "-c", build_command(["X=1"])], capture_output=True, text=True)
    assert completed.returncode == 127  # "not found": it was run, not assigned


def test_reserved_word_as_program_is_run_as_a_command():
    completed = subprocess.run(["/bin/sh", "-c", build_command(["if"])], capture_output=True, text=True)
    assert completed.returncode == 127


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "A;B", "A=B", "$(id)"])
def test_invalid_environment_names_are_refused(name):
    with pytest.raises(ValueError, match="environment variable name"):
        build_command(["true"], env={name: "x"})


def test_empty_argv_is_refused():
    with pytest.raises(ValueError):
        build_command([])


def test_script_arguments_are_positional_parameters_never_script_text():
    command = build_command(script_argv('printf "%s|" "$@"', *NASTY[:6]))
    completed = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, check=True)
    assert completed.stdout == "".join(f"{arg}|" for arg in NASTY[:6])


@pytest.mark.parametrize("output, expected", [
    ("running\n", ProcessStatus(running=True, exit_code=None, lost=False)),
    ("exited 3\n", ProcessStatus(running=False, exit_code=3, lost=False)),
    ("exited 137", ProcessStatus(running=False, exit_code=137, lost=False)),
    ("exited 0 1764720000.250000000\n", ProcessStatus(running=False, exit_code=0, lost=False, ended_at=1764720000.25)),
    ("exited 1 never\n", ProcessStatus(running=False, exit_code=1, lost=False)),
    ("lost\n", ProcessStatus(running=False, exit_code=None, lost=True)),
    ("exited \n", ProcessStatus(running=False, exit_code=None, lost=True)),
    ("", ProcessStatus(running=False, exit_code=None, lost=True)),
])
def test_process_status_output_is_parsed(output, expected):
    assert parse_process_status(output) == expected


def test_start_process_requires_absolute_paths():
    with pytest.raises(ValueError):
        start_process_argv("relative/dir", ["true"], "/tmp")
    with pytest.raises(ValueError):
        start_process_argv("/proc-dir", ["true"], "relative")


def test_started_process_records_exit_code_and_literal_argv_and_start_is_idempotent(tmp_path: Path):
    proc_dir = tmp_path / "procs" / "job one"
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)", *NASTY[:5]]
    command = build_command(start_process_argv(str(proc_dir), argv, str(tmp_path)))
    subprocess.run(["/bin/sh", "-c", command], check=True, timeout=30)
    deadline = time.monotonic() + 10
    while not (proc_dir / "exit_code").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (proc_dir / "exit_code").read_text().strip() == "3"
    assert (proc_dir / "output.log").read_text() == f"{NASTY[:5]}\n"
    subprocess.run(["/bin/sh", "-c", command], check=True, timeout=30)  # a redelivered start
    time.sleep(0.2)
    assert (proc_dir / "output.log").read_text() == f"{NASTY[:5]}\n"


def test_fan_out_returns_results_in_item_order():
    def slow_square(value: int) -> int:
        time.sleep(0.01 * (5 - value))
        return value * value

    assert fan_out([1, 2, 3, 4], slow_square, max_workers=4) == [1, 4, 9, 16]
    assert fan_out([], slow_square, max_workers=4) == []


def test_fan_out_runs_at_most_max_workers_at_once():
    lock = threading.Lock()
    running = peak = 0

    def track(_: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    fan_out(list(range(12)), track, max_workers=3)
    assert peak == 3


def test_fan_out_attempts_every_item_and_names_each_failure():
    attempted = []

    class Node:
        def __init__(self, name: str) -> None:
            self.name = name

    def check(node: Node) -> str:
        attempted.append(node.name)
        if node.name in ("worker-1", "ps-0"):
            raise RuntimeError(f"{node.name} is down")
        return node.name

    nodes = [Node("master-0"), Node("worker-1"), Node("ps-0"), Node("worker-2")]
    with pytest.raises(FanOutError) as caught:
        fan_out(nodes, check, max_workers=2)
    assert sorted(attempted) == sorted(node.name for node in nodes)
    assert "2 of 4 failed" in str(caught.value)
    assert "worker-1: worker-1 is down" in str(caught.value)
    assert "ps-0: ps-0 is down" in str(caught.value)
    assert caught.value.results == ["master-0", None, None, "worker-2"]
    assert [node.name for node, _ in caught.value.failures] == ["worker-1", "ps-0"]


def test_closing_a_session_whose_node_is_gone_does_not_hide_the_error_that_matters():
    """A node powered off mid-watch: closing its SFTP channel raises EOFError in paramiko; close() must not,
    or it replaces the watch's 'connection closed' (node lost, restart) with an internal error."""
    class DeadSftp:
        def close(self) -> None:
            raise EOFError()

    class Client:
        closed = False

        def close(self) -> None:
            self.closed = True

    client = Client()
    session = NodeSession("chief-0", client)
    session._sftp_client = DeadSftp()
    session.close()
    assert client.closed and session._sftp_client is None

"""``cloudml-os up``, the embedded default, run for real: it restarts a child that dies while the others keep
serving, stops every child when told to, and says which local nodes outlive it; ``cloudml-os nodes`` lists and
stops them.

Each test runs ``up`` with a data directory, an API port and node addresses (127.41, ports from 23500) of its
own, with the runtimes already built (``up`` builds missing ones first, which takes minutes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from cloudml_os.cli import RestartPolicy, Supervisor
from cloudml_os.cloud.base import ClusterSpec, NodeSpec, load_driver
from cloudml_os.config import load_settings
from cloudml_os.keys import generate_keypair
from tests.harness import cli, free_port, node_processes

pytestmark = pytest.mark.integration

KINDS = ("worker", "api", "monitor", "beat")


def wait_for(what: str, probe: Callable[[], object], timeout: float = 30.0, interval: float = 0.1):
    """Call ``probe`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
    return result


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def up_children(up: subprocess.Popen) -> dict[str, int]:
    """``up``'s live children by kind (the last word of their command line)."""
    found = {}
    for pid in children_of(up.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        kind = argv[-2].decode() if len(argv) >= 2 else ""  # the command line ends with a NUL: argv[-1] is b""
        if kind in KINDS and alive(pid):
            found[kind] = pid
    return found


def replaced(up: subprocess.Popen, kind: str, old: int) -> int | None:
    """The pid of ``up``'s child ``kind`` once it is another than ``old``."""
    pid = up_children(up).get(kind)
    return pid if pid not in (None, old) else None


def processes_of(data_dir: Path) -> list[int]:
    """Host processes started with this data directory in their environment (``up``'s children and theirs;
    not nodes, whose sshd get a clean environment)."""
    marker = f"CLOUDML_OS_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


def healthy(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {**os.environ, "CLOUDML_OS_DATA_DIR": str(tmp_path / "data"), "CLOUDML_OS_API_PORT": str(free_port()),
            "CLOUDML_OS_LOCAL_ADDRESS_PREFIX": "127.41", "CLOUDML_OS_LOCAL_PORT_BASE": "23500"}


@contextlib.contextmanager
def running_up(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """``cloudml-os up`` with its output in ``log_path``, once the API answers; killed with its children after."""
    with log_path.open("ab") as log:
        up = subprocess.Popen([sys.executable, "-m", "cloudml_os.cli", "up"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("the API answers", lambda: up.poll() is not None or healthy(base_url(env)), timeout=90)
        assert up.poll() is None, log_path.read_text()[-3000:]
        yield up
    finally:
        if up.poll() is None:
            up.terminate()
            try:
                up.wait(timeout=40)
            except subprocess.TimeoutExpired:
                up.kill()
        for pid in processes_of(Path(env["CLOUDML_OS_DATA_DIR"])):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def base_url(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['CLOUDML_OS_API_PORT']}"


def stop_up(up: subprocess.Popen) -> None:
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=40) == 0


def test_up_restarts_each_child_killed_while_the_others_keep_serving(env, tmp_path):
    log = tmp_path / "up.log"
    data_dir = Path(env["CLOUDML_OS_DATA_DIR"])
    with running_up(env, log) as up:
        children = wait_for("four children", lambda: len(found := up_children(up)) == 4 and found)
        seen = set(children.values())
        killed = {}
        failures: list[str] = []
        watching = threading.Event()

        def watch_health() -> None:
            while not watching.wait(0.1):
                if not healthy(base_url(env)):
                    failures.append(time.strftime("%H:%M:%S"))

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        try:
            for kind in ("worker", "monitor", "beat"):
                old = killed[kind] = children[kind]
                os.kill(old, signal.SIGKILL)
                new = wait_for(f"a new {kind}", lambda kind=kind, old=old: replaced(up, kind, old))
                assert {k: v for k, v in up_children(up).items() if k != kind} == {
                    k: v for k, v in children.items() if k != kind}  # the others were left alone
                children[kind] = new
                seen.add(new)
        finally:
            watching.set()
            watcher.join()
        assert failures == [], "the API stopped answering while other children were killed"

        api = killed["api"] = children["api"]
        gunicorn_workers = children_of(api)
        assert gunicorn_workers
        os.kill(api, signal.SIGKILL)
        children["api"] = wait_for("a new API", lambda: replaced(up, "api", api))
        wait_for("the new API answers", lambda: healthy(base_url(env)))
        assert not any(alive(pid) for pid in gunicorn_workers), "the killed API's gunicorn worker was left behind"
        seen |= {children["api"], *children_of(children["api"])}

        text = log.read_text()
        for kind, pid in killed.items():
            assert f"cloudml-os up: {kind} (pid {pid}) was killed by SIGKILL after " in text
            assert f"cloudml-os up: {kind} restarted (pid {children[kind]})" in text
        assert text.count("; restarting it in 1 s (the others keep running)") == 4
        stop_up(up)
        wait_for("every process of up gone", lambda: not any(alive(pid) for pid in seen)
                 and not processes_of(data_dir), timeout=5)


@pytest.fixture
def leftover_node(env) -> Iterator[tuple[str, str]]:
    """A one-node cluster made through the local driver of a migrated data directory: (cluster, "ADDRESS:PORT")."""
    cli(env, "db", "upgrade")
    settings = load_settings(environ=env)
    driver = load_driver(settings)
    _, public_key = generate_keypair("test-up")
    [node] = driver.create_cluster(ClusterSpec("leftover", (NodeSpec("worker-0", "worker", 0, "m1.small"),),
                                               public_key))
    try:
        yield "leftover", f"{node.address}:{node.ssh_port}"
    finally:
        driver.delete_cluster("leftover")


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudml_os.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_up_names_the_nodes_that_outlive_it_and_nodes_stop_all_stops_them(env, tmp_path, leftover_node):
    cluster, address = leftover_node
    data_dir = Path(env["CLOUDML_OS_DATA_DIR"])
    marker = f"{data_dir / 'nodes' / 'clusters' / cluster}/"
    assert node_processes(marker)
    log = tmp_path / "up.log"
    with running_up(env, log) as up:
        refused = run_cli(env, "nodes", "stop", "--all")
        assert refused.returncode == 1
        assert f"cloudml-os up (pid {up.pid}) runs on {data_dir}: stop it first" in refused.stderr
        assert node_processes(marker)
        stop_up(up)
    text = log.read_text()
    assert "cloudml-os up: stopped; 1 local node(s) keep running" in text
    assert f"\n  {cluster}/worker-0 at {address}\n" in text
    assert f"cloudml-os nodes stop --all --data-dir {data_dir}" in text
    assert node_processes(marker), "stopping up stopped the node"

    listed = run_cli(env, "nodes", "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split() for line in listed.stdout.splitlines()] == [
        ["CLUSTER", "NODE", "ADDRESS", "STATE"], [cluster, "worker-0", address, "running"]]

    stopped = run_cli(env, "nodes", "stop", "--all")
    assert stopped.returncode == 0, stopped.stderr
    assert node_processes(marker) == []
    assert not (data_dir / "nodes" / "clusters" / cluster).exists()
    listed = run_cli(env, "nodes", "list")
    assert (listed.returncode, listed.stdout) == (0, "")
    assert f"no local node in {data_dir}" in listed.stderr


def test_nodes_stop_wants_cluster_names_or_all(env, leftover_node):
    cluster, _ = leftover_node
    assert run_cli(env, "nodes", "stop").returncode == 2
    assert run_cli(env, "nodes", "stop", "--all", cluster).returncode == 2
    unknown = run_cli(env, "nodes", "stop", "elsewhere")
    assert unknown.returncode == 1 and "no cluster elsewhere" in unknown.stderr
    assert run_cli(env, "nodes", "stop", cluster).returncode == 0
    assert node_processes(f"{Path(env['CLOUDML_OS_DATA_DIR']) / 'nodes' / 'clusters' / cluster}/") == []


def test_a_second_up_on_the_same_data_dir_or_port_stops_at_once(env, tmp_path):
    with running_up(env, tmp_path / "up.log") as up:
        second = run_cli(env, "up")
        assert second.returncode == 1
        assert f"cloudml-os up already runs on {env['CLOUDML_OS_DATA_DIR']} (pid {up.pid})" in second.stderr
        other = {**env, "CLOUDML_OS_DATA_DIR": str(tmp_path / "other")}
        second = run_cli(other, "up")
        assert second.returncode == 1
        assert f"the API cannot listen on 127.0.0.1:{env['CLOUDML_OS_API_PORT']}" in second.stderr
        stop_up(up)


# ---- the restart policy, with real processes and short delays ------------------------------------------------


def supervise(commands: dict[str, list[str]], policy: RestartPolicy, until: Callable[[list[str]], bool],
              timeout: float = 20.0) -> list[str]:
    """Run a Supervisor until ``until(messages)``; its messages."""
    messages: list[str] = []
    supervisor = Supervisor(commands, dict(os.environ), policy, say=messages.append)
    supervisor.start()
    try:
        wait_for("the supervisor's messages", lambda: supervisor.check() or until(messages), timeout=timeout,
                 interval=0.01)
    finally:
        supervisor.stop(grace=5)
    return messages


def test_restart_delays_double_from_one_second_to_thirty():
    assert [RestartPolicy().delay(crashes) for crashes in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_child_that_keeps_crashing_is_restarted_with_backoff_and_said_to_crash():
    policy = RestartPolicy(first_delay=0.05, max_delay=0.2, reset_after=30, loop_warning=3)
    messages = supervise({"crasher": [sys.executable, "-c", "raise SystemExit(3)"]}, policy,
                         lambda messages: sum("exited with code 3" in m for m in messages) >= 5)
    exits = [m for m in messages if "exited with code 3" in m]
    assert [m.split("restarting it in ")[1].split(" s")[0] for m in exits[:5]] == ["0.05", "0.1", "0.2", "0.2", "0.2"]
    assert ["keeps crashing" in m for m in exits[:5]] == [False, False, True, True, True]
    assert "It has now ended 3 times in a row, each within 30 s of its start" in exits[2]
    assert sum(m.startswith("crasher restarted (pid ") for m in messages) >= 4


def test_a_child_that_ran_long_enough_restarts_after_the_first_delay_again():
    policy = RestartPolicy(first_delay=0.05, max_delay=1, reset_after=0.3, loop_warning=2)
    messages = supervise({"sleeper": [sys.executable, "-c", "import time; time.sleep(0.5)"]}, policy,
                         lambda messages: sum("exited with code 0" in m for m in messages) >= 3)
    exits = [m for m in messages if "exited with code 0" in m]
    assert all("restarting it in 0.05 s" in m and "keeps crashing" not in m for m in exits)


def test_stop_kills_what_the_child_forked_and_a_child_that_ignores_sigterm():
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('ready', flush=True); "
            "time.sleep(60)")
    messages: list[str] = []
    supervisor = Supervisor({"stubborn": [sys.executable, "-c", code]}, dict(os.environ), say=messages.append)
    supervisor.start()
    pid = supervisor.pids()["stubborn"]
    grandchild = wait_for("the grandchild", lambda: children_of(pid) and children_of(pid)[0])
    supervisor.stop(grace=0.5)
    assert not alive(pid)  # waited for
    wait_for("the grandchild's end", lambda: not alive(grandchild), timeout=5)  # SIGKILLed; dying takes a moment
    assert messages[-1] == f"stubborn (pid {pid}) did not stop within 0.5 s: killed"

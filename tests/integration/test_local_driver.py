"""The local driver's sshd nodes, driven for real through paramiko with pinned host keys.

Nodes use the 127.3.x.x loopback addresses and their own ports, so these tests do not collide with an
installation (127.1) or other tests on the machine; an address already taken is skipped by the driver.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudml_os.cloud.base import ClusterSpec, DriverError, NodeInfo, NodeSpec
from cloudml_os.cloud.local import LocalDriver, ephemeral_port_range
from cloudml_os.config import Settings, load_settings
from cloudml_os.remote import (
    CommandFailed,
    HostKeyMismatch,
    NodeSession,
    RemoteError,
    connect_node,
    fan_out,
)

pytestmark = pytest.mark.integration

PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"
NASTY = ["; rm -rf /", "$(id)", "`id`", "'quoted' \"twice\"", "two\nlines", " spaced  out ", "", "*"]


def make_keypair() -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def spec(name: str, public_key: str, *gpus: int) -> ClusterSpec:
    kinds = [("master", 0), ("worker", 0), ("worker", 1), ("ps", 0)]
    nodes = tuple(NodeSpec(f"{kind}-{index}", kind, index, "m1.medium", gpu)
                  for (kind, index), gpu in zip(kinds, gpus, strict=False))
    return ClusterSpec(name=name, nodes=nodes, public_key=public_key)


def workers(name: str, public_key: str, *indices: int, gpus: int = 0) -> ClusterSpec:
    return ClusterSpec(name, tuple(NodeSpec(f"worker-{i}", "worker", i, "m1.small", gpus) for i in indices),
                       public_key)


def start_sleeper(node: NodeInfo, private_key: str, settings: Settings) -> tuple[str, str]:
    """Start a detached sleep on the node; return its process folder and the marker in its command line."""
    marker = f"marker-{uuid.uuid4()}"
    proc_dir = f"{node.workdir}/procs/sleeper"
    with connect_node(node, private_key, settings) as session:
        session.start_process(proc_dir, [sys.executable, "-c", "import time; time.sleep(1000)", marker],
                              env={}, cwd="/")
    assert processes_with(marker)
    return proc_dir, marker


def claims_of(settings: Settings, owner: str) -> list[str]:
    """Slot and GPU claims held by the cluster or node ``owner``."""
    root = settings.data_dir / "nodes"
    return sorted(f"{folder}/{entry.name}" for folder in ("slots", "gpus") for entry in (root / folder).iterdir()
                  if os.readlink(entry) == owner or os.readlink(entry).startswith(owner + "/"))


def recorded_nodes(settings: Settings, cluster: str) -> list[str]:
    return json.loads((settings.data_dir / "nodes" / "clusters" / cluster / "cluster.json").read_text())["nodes"]


def init_pid(node: NodeInfo) -> int:
    return int((Path(node.workdir).parent / "init.pid").read_text())


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def wait_for_exit_code(session: NodeSession, proc_dir: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        status = session.process_status(proc_dir)
        if not status.running or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return make_keypair()


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    data_dir = tmp_path_factory.mktemp("local-driver")
    return load_settings(environ={}, data_dir=data_dir, runtimes_dir=data_dir / "rt",
                         local_address_prefix="127.3", local_ssh_port=2322, local_port_base=26000,
                         local_ports_per_node=4, ssh_connect_timeout=5.0, ssh_boot_retries=5)


@pytest.fixture(scope="module")
def driver(settings):
    driver = LocalDriver(settings)
    yield driver
    for name in driver.list_clusters():
        driver.delete_cluster(name)


@pytest.fixture(scope="module")
def nodes(driver, keypair) -> list[NodeInfo]:
    return driver.create_cluster(spec("trio", keypair[1], 0, 0, 0))


@pytest.fixture()
def session(nodes, keypair, settings):
    with connect_node(nodes[0], keypair[0], settings) as session:
        yield session


def test_nodes_get_distinct_addresses_port_ranges_and_host_keys(nodes, settings):
    assert [node.name for node in nodes] == ["master-0", "worker-0", "worker-1"]
    assert len({node.address for node in nodes}) == 3
    assert all(node.address.startswith("127.3.") and node.ssh_port == 2322 for node in nodes)
    ranges = sorted((node.port_first, node.port_last) for node in nodes)
    assert all(last - first == 3 for first, last in ranges)
    assert all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert len({node.host_keys for node in nodes}) == 3
    assert all(node.host_keys[0].startswith("ssh-ed25519 ") for node in nodes)
    assert all(node.username == "root" and Path(node.workdir).is_dir() for node in nodes)
    assert all(node.runtime_root == str(settings.runtimes_dir) for node in nodes)
    assert all(node.environment == {"CUDA_VISIBLE_DEVICES": ""} for node in nodes)


def test_node_ports_in_the_hosts_ephemeral_range_are_warned_about(driver, keypair, settings, caplog):
    """TensorFlow listens on ``*:PORT``; an outgoing connection holding that port makes it fail to start."""
    low, high = ephemeral_port_range()
    caplog.set_level(logging.WARNING, logger="cloudml_os.cloud.local")
    driver.create_cluster(workers("below", keypair[1], 0))  # ports from 26000: below the range
    assert not caplog.records
    inside = LocalDriver(dataclasses.replace(settings, local_port_base=low + 1000))
    node = inside.create_cluster(workers("inside", keypair[1], 0))[0]
    try:
        assert [r.getMessage() for r in caplog.records] == [
            f"local node ports {node.port_first}-{node.port_last} lie in this host's ephemeral port range "
            f"{low}-{high} (net.ipv4.ip_local_port_range): a trainer may now and then fail to listen on them; "
            "set local_port_base below it"]
    finally:
        inside.delete_cluster("inside")
        driver.delete_cluster("below")


def test_every_node_runs_argv_with_metacharacters_literally(nodes, keypair, settings):
    def run_on(node: NodeInfo) -> list[str]:
        with connect_node(node, keypair[0], settings) as session:
            result = session.run([sys.executable, "-c", PRINT_ARGV, node.name, *NASTY],
                                 env={"IGNORED": "$(id); `id`"}, cwd=node.workdir, timeout=30)
            return json.loads(result.stdout)

    outputs = fan_out(nodes, run_on, max_workers=settings.ssh_parallelism)
    assert outputs == [[node.name, *NASTY] for node in nodes]


def test_sessions_see_only_their_nodes_processes_and_gpus(session):
    result = session.run(["sh", "-c", 'echo "gpus=[$CUDA_VISIBLE_DEVICES]"; ps -e -o pid= | head -1'])
    assert result.stdout.split() == ["gpus=[]", "1"]


def test_failed_command_raises_with_exit_code_unless_unchecked(session):
    with pytest.raises(CommandFailed) as caught:
        session.run(["sh", "-c", "echo boom >&2; exit 4"])
    assert caught.value.result.exit_code == 4
    assert "exited with 4: boom" in str(caught.value)
    assert session.run(["sh", "-c", "exit 5"], check=False).exit_code == 5


def test_create_cluster_again_returns_the_same_nodes(driver, nodes, keypair):
    assert driver.create_cluster(spec("trio", keypair[1], 0, 0, 0)) == nodes
    assert driver.list_clusters() == ["trio"]


def test_create_existing_cluster_with_other_nodes_is_refused(driver, nodes, keypair):
    with pytest.raises(DriverError, match="already exists"):
        driver.create_cluster(spec("trio", keypair[1], 0, 0))


def test_upload_read_back_download_and_find(session, nodes, tmp_path):
    model = f"{nodes[0].workdir}/upload/export/1234"
    session.put(b"saved model bytes", f"{model}/saved_model.pb")
    session.put(b"\x00\x01variables", f"{model}/variables/variables.data", mode=0o600)
    local_file = tmp_path / "trainer.tar.gz"
    local_file.write_bytes(b"package" * 1000)
    session.put(local_file, f"{nodes[0].workdir}/upload/pkg/trainer.tar.gz")

    assert session.read_file(f"{model}/saved_model.pb", 6, 5) == b"model"
    assert session.read_file(f"{nodes[0].workdir}/upload/pkg/trainer.tar.gz", 0, 1 << 20) == b"package" * 1000
    assert session.read_file(f"{model}/missing", 0, 10) == b""
    assert oct(Path(f"{model}/variables/variables.data").stat().st_mode & 0o777) == oct(0o600)
    assert session.find(f"{nodes[0].workdir}/upload", "saved_model.pb") == [model]
    assert session.find(f"{nodes[0].workdir}/nowhere", "saved_model.pb") == []

    session.get_tree(model, tmp_path / "copy")
    assert (tmp_path / "copy" / "saved_model.pb").read_bytes() == b"saved model bytes"
    assert (tmp_path / "copy" / "variables" / "variables.data").read_bytes() == b"\x00\x01variables"


def test_detached_process_records_exit_code_and_output_readable_by_offset(session, nodes):
    proc_dir = f"{nodes[0].workdir}/procs/exits-3"
    argv = ["sh", "-c", 'echo "out $GREETING $1"; echo err >&2; exit 3', "sh", "$(id)"]
    session.start_process(proc_dir, argv, env={"GREETING": "hello world"}, cwd=nodes[0].workdir)
    status = wait_for_exit_code(session, proc_dir)
    assert (status.running, status.exit_code, status.lost) == (False, 3, False)
    log = session.read_file(f"{proc_dir}/output.log", 0, 1000)
    assert log == b"out hello world $(id)\nerr\n"
    assert session.read_file(f"{proc_dir}/output.log", 4, 5) == b"hello"
    assert session.read_file(f"{proc_dir}/output.log", len(log), 1000) == b""

    session.start_process(proc_dir, ["sh", "-c", "echo again; exit 0"], env={}, cwd=nodes[0].workdir)
    assert session.process_status(proc_dir).exit_code == 3
    assert session.read_file(f"{proc_dir}/output.log", 0, 1000) == log


def read_stream(follower, until, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Poll a log stream until ``until(data, ended)`` holds (or the timeout passes); what came, and whether it ended."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        chunk, ended = follower.poll()
        data += chunk
        if until(data, ended) or time.monotonic() > deadline:
            return data, ended
        time.sleep(0.02)


def test_a_followed_log_streams_from_an_offset_until_the_process_exits(session, nodes):
    workdir = nodes[0].workdir
    proc_dir = f"{workdir}/procs/followed"
    session.start_process(proc_dir, ["sh", "-c", "echo one; until [ -e go ]; do sleep 0.02; done; echo two; exit 4"],
                          env={}, cwd=f"{workdir}/procs")
    follower = session.follow(proc_dir, 0, 0.1)
    data, ended = read_stream(follower, lambda data, ended: b"one\n" in data or ended)
    assert (data, ended) == (b"one\n", False)  # the process waits: the stream stays open
    follower.close()
    tails = ["sh", "-c", f"pgrep -af '^tail .*{proc_dir}/output.log' || true"]
    deadline = time.monotonic() + 10
    while session.run(tails).stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.run(tails).stdout == ""  # a closed stream leaves nothing running on the node

    follower = session.follow(proc_dir, len(b"one\n"), 0.1)
    session.put(b"", f"{workdir}/procs/go")
    data, ended = read_stream(follower, lambda data, ended: ended)
    assert (data, ended) == (b"two\n", True)
    status = session.process_status(proc_dir)
    assert status.exit_code == 4 and status.ended_at is not None and abs(status.ended_at - time.time()) < 600

    finished = session.follow(proc_dir, 0, 0.1)  # an ended process: its log's rest, then the end
    assert read_stream(finished, lambda data, ended: ended) == (b"one\ntwo\n", True)
    never = session.follow(f"{workdir}/procs/never-started", 0, 0.1)
    assert read_stream(never, lambda data, ended: ended) == (b"", True)
    finished.close()
    never.close()


def test_detached_process_outlives_its_session(nodes, keypair, settings):
    proc_dir = f"{nodes[1].workdir}/procs/outlives"
    with connect_node(nodes[1], keypair[0], settings) as first:
        first.start_process(proc_dir, ["sh", "-c", "until [ -e go ]; do sleep 0.02; done; echo done"],
                            env={}, cwd=proc_dir.rsplit("/", 1)[0])
    with connect_node(nodes[1], keypair[0], settings) as second:
        assert second.process_status(proc_dir).running
        second.put(b"", proc_dir.rsplit("/", 1)[0] + "/go")
        assert wait_for_exit_code(second, proc_dir).exit_code == 0
        assert second.read_file(f"{proc_dir}/output.log", 0, 100) == b"done\n"


def test_stop_process_kills_a_process_that_ignores_sigterm_after_the_grace(session, nodes):
    proc_dir = f"{nodes[0].workdir}/procs/stubborn"
    session.start_process(proc_dir, ["sh", "-c", "trap '' TERM; sleep 1000"], env={}, cwd="/")
    assert session.process_status(proc_dir).running
    session.stop_process(proc_dir, grace=0.5)
    status = session.process_status(proc_dir)
    assert (status.running, status.exit_code) == (False, 137)  # SIGTERM ignored, SIGKILL after the grace


def test_stop_process_ends_a_cooperative_process_with_sigterm(session, nodes):
    proc_dir = f"{nodes[0].workdir}/procs/polite"
    session.start_process(proc_dir, ["sleep", "1000"], env={}, cwd="/")
    session.stop_process(proc_dir, grace=10)
    assert session.process_status(proc_dir).exit_code == 143  # ended by SIGTERM, not killed after the grace


def test_stop_process_on_finished_or_missing_process_does_nothing(session, nodes):
    proc_dir = f"{nodes[0].workdir}/procs/quick"
    session.start_process(proc_dir, ["true"], env={}, cwd="/")
    assert wait_for_exit_code(session, proc_dir).exit_code == 0
    session.stop_process(proc_dir, grace=0.1)
    assert session.process_status(proc_dir).exit_code == 0
    session.stop_process(f"{nodes[0].workdir}/procs/never-started", grace=0.1)
    assert session.process_status(f"{nodes[0].workdir}/procs/never-started").lost


def test_wrong_pinned_host_key_raises_host_key_mismatch_at_once(nodes, keypair, monkeypatch):
    connections = []
    real_create_connection = socket.create_connection

    def counting(*args, **kwargs):
        connections.append(args[0])
        return real_create_connection(*args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counting)
    with pytest.raises(HostKeyMismatch, match="not the pinned key"):
        NodeSession.connect(name=nodes[0].name, address=nodes[0].address, port=nodes[0].ssh_port,
                            username="root", host_keys=nodes[1].host_keys, private_key=keypair[0],
                            timeout=5, retries=20)
    assert connections == [(nodes[0].address, nodes[0].ssh_port)]  # refused at the first try, never retried


def test_connect_retries_a_node_that_does_not_answer_then_gives_up(nodes, keypair):
    with pytest.raises(RemoteError, match="cannot connect to 127.3.255.254:2322 after 3 attempt"):
        NodeSession.connect(name="ghost", address="127.3.255.254", port=2322, username="root",
                            host_keys=nodes[0].host_keys, private_key=keypair[0], timeout=1, retries=2)


def test_key_not_authorized_is_refused_without_leaking_it(nodes):
    other_private, _ = make_keypair()
    with pytest.raises(RemoteError, match="refused the cluster's key") as caught:
        NodeSession.connect(name=nodes[0].name, address=nodes[0].address, port=nodes[0].ssh_port,
                            username="root", host_keys=nodes[0].host_keys, private_key=other_private,
                            timeout=5, retries=20)
    assert "PRIVATE" not in str(caught.value)


def test_delete_cluster_kills_every_process_and_recreate_gives_fresh_nodes(driver, keypair, settings):
    [node] = driver.create_cluster(spec("doomed", keypair[1], 0))
    marker = f"marker-{uuid.uuid4()}"
    with connect_node(node, keypair[0], settings) as session:
        session.start_process(f"{node.workdir}/procs/sleeper",
                              [sys.executable, "-c", "import time; time.sleep(1000)", marker],
                              env={}, cwd="/")
    pids = processes_with(marker)
    assert len(pids) >= 2  # the process and the wrapper waiting for it

    driver.delete_cluster("doomed")
    assert processes_with(marker) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert "doomed" not in driver.list_clusters()
    assert not Path(node.workdir).exists()
    driver.delete_cluster("doomed")  # idempotent

    [fresh] = driver.create_cluster(spec("doomed", keypair[1], 0))
    assert fresh.host_keys != node.host_keys
    with connect_node(fresh, keypair[0], settings) as session:
        assert session.process_status(f"{fresh.workdir}/procs/sleeper").lost
    driver.delete_cluster("doomed")


def test_create_reboots_a_dead_node_with_the_same_slot_and_keys(driver, keypair, settings):
    [node] = driver.create_cluster(spec("reboot", keypair[1], 0))
    with connect_node(node, keypair[0], settings) as session:
        session.start_process(f"{node.workdir}/procs/sleeper", ["sleep", "1000"], env={}, cwd="/")
    node_dir = Path(node.workdir).parent
    init_pid = int((node_dir / "init.pid").read_text())
    os.kill(init_pid, signal.SIGKILL)  # the VM loses power
    deadline = time.monotonic() + 5
    while Path(f"/proc/{init_pid}").exists():  # its unshare reaps it
        assert time.monotonic() < deadline
        time.sleep(0.01)

    assert driver.create_cluster(spec("reboot", keypair[1], 0)) == [node]
    with connect_node(node, keypair[0], settings) as session:
        assert session.process_status(f"{node.workdir}/procs/sleeper").lost
    driver.delete_cluster("reboot")


def test_failed_create_leaves_nothing_behind(driver, keypair, settings):
    slots_before = sorted(os.listdir(settings.data_dir / "nodes" / "slots"))
    with pytest.raises(DriverError, match="needs 1000 GPU"):
        driver.create_cluster(spec("greedy", keypair[1], 0, 1000))
    assert "greedy" not in driver.list_clusters()
    assert sorted(os.listdir(settings.data_dir / "nodes" / "slots")) == slots_before
    assert processes_with(str(settings.data_dir / "nodes" / "clusters" / "greedy")) == []


def test_gpus_are_shared_out_disjointly_and_released_on_delete(settings, keypair):
    driver = LocalDriver(settings, gpu_indices=["0", "1", "2"])
    nodes = driver.create_cluster(spec("gpu-a", keypair[1], 2, 0, 1))
    assert [node.environment["CUDA_VISIBLE_DEVICES"] for node in nodes] == ["0,1", "", "2"]
    with connect_node(nodes[0], keypair[0], settings) as session:
        assert session.run(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]).stdout == "0,1\n"

    with pytest.raises(DriverError, match="needs 1 GPU.* only 0 of this host's 3 are free"):
        driver.create_cluster(spec("gpu-b", keypair[1], 1))
    driver.delete_cluster("gpu-a")
    [node] = driver.create_cluster(spec("gpu-b", keypair[1], 3))
    assert node.environment["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    driver.delete_cluster("gpu-b")


def test_gpu_request_on_a_host_without_gpus_is_refused(settings, keypair):
    driver = LocalDriver(settings, gpu_indices=[])
    with pytest.raises(DriverError, match="needs 1 GPU.* this host has no NVIDIA GPU"):
        driver.create_cluster(spec("no-gpu", keypair[1], 1))
    assert "no-gpu" not in driver.list_clusters()


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "-dash", "x" * 200])
def test_unsafe_cluster_names_are_refused(driver, keypair, name):
    with pytest.raises(DriverError, match="cluster name"):
        driver.create_cluster(spec(name, keypair[1], 0))


def test_deleting_a_missing_cluster_is_not_an_error(driver):
    driver.delete_cluster("never-created")


def test_resize_grows_and_shrinks_leaving_the_survivors_untouched(driver, keypair, settings):
    private_key, public_key = keypair
    [first] = driver.create_cluster(workers("elastic", public_key, 0))
    proc_dir, marker = start_sleeper(first, private_key, settings)

    started = time.monotonic()
    grown = driver.resize_cluster(workers("elastic", public_key, 0, 1, 2))
    print(f"resize 1->3: {time.monotonic() - started:.3f}s")
    assert [node.name for node in grown] == ["worker-0", "worker-1", "worker-2"]
    assert grown[0] == first and init_pid(grown[0]) == init_pid(first)
    assert len({node.address for node in grown}) == 3 and len({node.host_keys for node in grown}) == 3
    assert recorded_nodes(settings, "elastic") == ["worker-0", "worker-1", "worker-2"]
    _, doomed_marker = start_sleeper(grown[1], private_key, settings)
    doomed_pids = processes_with(doomed_marker)

    started = time.monotonic()
    shrunk = driver.resize_cluster(workers("elastic", public_key, 0, 2))
    print(f"resize 3->[0,2]: {time.monotonic() - started:.3f}s")
    assert shrunk == [grown[0], grown[2]]
    assert processes_with(doomed_marker) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in doomed_pids)
    assert processes_with(str(Path(grown[1].workdir).parent)) == []
    assert not Path(grown[1].workdir).parent.exists()
    assert claims_of(settings, "elastic/worker-1") == []
    assert len(claims_of(settings, "elastic")) == 2
    assert recorded_nodes(settings, "elastic") == ["worker-0", "worker-2"]
    with connect_node(first, private_key, settings) as session:
        assert session.process_status(proc_dir).running
    assert processes_with(marker)

    pids = [init_pid(node) for node in shrunk]
    claims = claims_of(settings, "elastic")
    assert driver.resize_cluster(workers("elastic", public_key, 0, 2)) == shrunk  # the same spec: a no-op
    assert [init_pid(node) for node in shrunk] == pids and claims_of(settings, "elastic") == claims
    assert driver.create_cluster(workers("elastic", public_key, 0, 2)) == shrunk

    driver.delete_cluster("elastic")
    assert processes_with(marker) == []
    assert processes_with(str(settings.data_dir / "nodes" / "clusters" / "elastic")) == []
    assert claims_of(settings, "elastic") == [] and "elastic" not in driver.list_clusters()


def test_resize_of_a_missing_cluster_creates_it(driver, keypair, settings):
    [node] = driver.resize_cluster(workers("from-nothing", keypair[1], 3))
    assert (node.name, node.task_type, node.task_index) == ("worker-3", "worker", 3)
    with connect_node(node, keypair[0], settings) as session:
        assert session.run(["true"]).exit_code == 0
    driver.delete_cluster("from-nothing")
    assert claims_of(settings, "from-nothing") == []


def test_resize_that_cannot_add_a_node_keeps_the_cluster_as_it_was(settings, keypair):
    driver = LocalDriver(settings, gpu_indices=["0"])
    before = driver.create_cluster(workers("steady", keypair[1], 0))
    claims = claims_of(settings, "steady")
    with pytest.raises(DriverError, match="needs 2 GPU"):
        driver.resize_cluster(ClusterSpec("steady", (*workers("steady", keypair[1], 0).nodes,
                                                     NodeSpec("worker-1", "worker", 1, "m1.small", 0),
                                                     NodeSpec("worker-2", "worker", 2, "m1.small", 2)),
                                          keypair[1]))
    assert recorded_nodes(settings, "steady") == ["worker-0"]
    assert claims_of(settings, "steady") == claims
    assert processes_with(str(settings.data_dir / "nodes" / "clusters" / "steady" / "nodes" / "worker-1")) == []
    with pytest.raises(DriverError, match="exists as worker 0 with 0 GPU"):
        driver.resize_cluster(workers("steady", keypair[1], 0, gpus=1))
    assert driver.resize_cluster(workers("steady", keypair[1], 0)) == before
    driver.delete_cluster("steady")


def test_resize_cleans_up_a_node_an_interrupted_change_left_half_made(driver, keypair, settings):
    [node] = driver.create_cluster(workers("interrupted", keypair[1], 0))
    cluster_dir = settings.data_dir / "nodes" / "clusters" / "interrupted"
    # As left by a resize killed after it recorded and claimed worker-1 but before it wrote node.json.
    (cluster_dir / "cluster.json").write_text(json.dumps({"name": "interrupted", "nodes": ["worker-0", "worker-1"]}))
    (cluster_dir / "nodes" / "worker-1" / "work").mkdir(parents=True)
    os.symlink("interrupted/worker-1", settings.data_dir / "nodes" / "slots" / "65000")

    assert driver.resize_cluster(workers("interrupted", keypair[1], 0)) == [node]
    assert not (cluster_dir / "nodes" / "worker-1").exists()
    assert claims_of(settings, "interrupted/worker-1") == []
    assert recorded_nodes(settings, "interrupted") == ["worker-0"]
    driver.delete_cluster("interrupted")


def test_replace_node_boots_a_fresh_node_with_a_new_host_key_in_the_same_slot(driver, keypair, settings):
    private_key, public_key = keypair
    cluster = workers("phoenix", public_key, 0, 1)
    survivor, old = driver.create_cluster(cluster)
    survivor_proc, survivor_marker = start_sleeper(survivor, private_key, settings)
    old_proc, old_marker = start_sleeper(old, private_key, settings)
    claims = claims_of(settings, "phoenix/worker-1")

    started = time.monotonic()
    new = driver.replace_node(cluster, "worker-1")
    print(f"replace_node: {time.monotonic() - started:.3f}s")
    assert new.host_keys != old.host_keys
    assert new == dataclasses.replace(old, host_keys=new.host_keys)  # same name, role, address and ports
    assert claims_of(settings, "phoenix/worker-1") == claims
    assert processes_with(old_marker) == []
    with pytest.raises(HostKeyMismatch):
        connect_node(old, private_key, settings)
    with connect_node(new, private_key, settings) as session:
        assert session.process_status(old_proc).lost  # a fresh disk
    with connect_node(survivor, private_key, settings) as session:
        assert session.process_status(survivor_proc).running
    assert driver.create_cluster(cluster) == [survivor, new]

    with pytest.raises(DriverError, match="'worker-7' to replace is not one of the spec's nodes"):
        driver.replace_node(cluster, "worker-7")
    with pytest.raises(DriverError, match=r"has no node worker-7 to replace; its nodes are \['worker-0', 'worker-1'\]"):
        driver.replace_node(workers("phoenix", public_key, 0, 1, 7), "worker-7")
    with pytest.raises(DriverError, match="does not exist"):
        driver.replace_node(workers("nowhere", public_key, 0), "worker-0")
    assert "nowhere" not in driver.list_clusters()

    driver.delete_cluster("phoenix")
    assert processes_with(survivor_marker) == []
    assert processes_with(str(settings.data_dir / "nodes" / "clusters" / "phoenix")) == []
    assert claims_of(settings, "phoenix") == [] and "phoenix" not in driver.list_clusters()


def test_replace_node_boots_again_a_node_that_lost_power(driver, keypair, settings):
    cluster = workers("lost-power", keypair[1], 0)
    [old] = driver.create_cluster(cluster)
    os.kill(init_pid(old), signal.SIGKILL)
    new = driver.replace_node(cluster, "worker-0")
    assert (new.address, new.ssh_port) == (old.address, old.ssh_port) and new.host_keys != old.host_keys
    with connect_node(new, keypair[0], settings) as session:
        assert session.run(["true"]).exit_code == 0
    driver.delete_cluster("lost-power")

"""Nodes see their project's objects as read-only files under /store, and none of the platform's data.

First the local driver's nodes alone (real sshd nodes, through paramiko): what a node sees, at boot, after
a power loss, after a replacement, and in a network namespace of its own. Then the whole path on a real
platform (API, Celery worker, sshd nodes): a CSV data set uploaded through the objects API and given as a
``store://`` arg is read by TensorFlow (``tf.data``), MXNet and PyTorch (their data loaders) trainers; a
trainer that reaches for another project's objects or the platform's files, or writes into the store, gets
the OS error and changes nothing; a ``store://`` arg of another project is refused at submission.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cloudml_os.cloud.base import ClusterSpec, NodeSpec
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import load_settings
from cloudml_os.remote import connect_node
from tests.conftest import ROOT
from tests.harness import build_sdist
from tests.integration.test_local_driver import make_keypair
from tests.integration.test_training import assert_no_node_left

pytestmark = pytest.mark.integration

PROBE = ROOT / "tests" / "trainers" / "storedata" / "trainer" / "probe.py"
BRIDGE = "cmlos-view0"


def outcomes(log: str) -> dict[str, str]:
    """The probe's lines by what was tried: ``{"read PATH": "ALLOWED" | "DENIED ENOENT", "list PATH": "[...]"}``."""
    found = {}
    for line in log.splitlines():
        if match := re.match(r"(ALLOWED|DENIED|LISTED) (?:(\w+) )?(.+?)(?:: (.+))?$", line):
            kind, action, path, detail = match.groups()
            if kind == "LISTED":
                found[f"list {path}"] = detail
            elif action != "list":  # a listing's ALLOWED line follows its LISTED one
                found[f"{action} {path}"] = kind if kind == "ALLOWED" else f"DENIED {detail}"
    return found


def probe_args(reads=(), lists=(), writes=(), removes=()) -> list[str]:
    return [word for action, paths in (("--read", reads), ("--list", lists), ("--write", writes),
                                       ("--remove", removes)) for path in paths for word in (action, str(path))]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ---- the local driver's nodes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return make_keypair()


def driver_settings(data_dir: Path, **overrides):
    # The runtimes inside the data folder, as an installation may keep them: they must stay visible.
    return load_settings(environ={}, data_dir=data_dir, runtimes_dir=data_dir / "rt", local_address_prefix="127.19",
                         local_ssh_port=2922, local_port_base=28500, local_ports_per_node=4, ssh_connect_timeout=5.0,
                         ssh_boot_retries=5, **overrides)


def prepared(settings):
    """Objects of the projects p and q, a key in the data folder and a runtime file, for a node to reach for."""
    (settings.artifacts_root / "p" / "data").mkdir(parents=True)
    (settings.artifacts_root / "p" / "data" / "a.csv").write_text("x,y\n1,2\n")
    (settings.artifacts_root / "q").mkdir(parents=True)
    (settings.artifacts_root / "q" / "secret.csv").write_text("q's\n")
    (settings.data_dir / "key-encryption.key").write_text("not for nodes\n")
    (settings.runtimes_dir / "marker").parent.mkdir(parents=True)
    (settings.runtimes_dir / "marker").write_text("runtime\n")
    return settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return prepared(driver_settings(tmp_path_factory.mktemp("store-view")))


@pytest.fixture(scope="module")
def driver(settings):
    driver = LocalDriver(settings)
    yield driver
    for name in driver.list_clusters():
        driver.delete_cluster(name)


def one_node(name: str, public_key: str, project: str | None = "p") -> ClusterSpec:
    return ClusterSpec(name, (NodeSpec("master-0", "master", 0, "m1.small"),), public_key,
                       labels={"project": project, "job": "1"} if project else {"version": "1"})


def look(node, keypair, settings) -> dict[str, str]:
    """What the node's root gets when it reads, lists and writes where it must not (and where it may)."""
    data, artifacts, node_dir = settings.data_dir, settings.artifacts_root, Path(node.workdir).parent
    with connect_node(node, keypair[0], settings) as session:
        result = session.run([sys.executable, str(PROBE), *probe_args(
            reads=["/store/p/data/a.csv", "/store/q/secret.csv", artifacts / "q" / "secret.csv",
                   data / "key-encryption.key", settings.runtimes_dir / "marker", node_dir / "sshd_config"],
            lists=["/store", data, data / "nodes" / "clusters"],
            writes=["/store/p/data/a.csv", "/store/p/new.csv", "/store/new.csv", data / "planted",
                    f"{node.workdir}/mine"],
            removes=["/store/p/data/a.csv"])], check=False)
    assert result.exit_code == 1, result.stderr
    return outcomes(result.stdout)


def assert_node_view(seen: dict[str, str], settings, cluster: str) -> None:
    data, artifacts = settings.data_dir, settings.artifacts_root
    assert seen.pop("list /store") == '["p"]'
    assert seen.pop(f"list {data}") == '["nodes", "rt"]'  # its own folder and the runtimes are all it keeps
    assert seen.pop(f"list {data}/nodes/clusters") == json.dumps([cluster])
    assert seen == {
        "read /store/p/data/a.csv": "ALLOWED",
        "read /store/q/secret.csv": "DENIED ENOENT",
        f"read {artifacts}/q/secret.csv": "DENIED ENOENT",
        f"read {data}/key-encryption.key": "DENIED ENOENT",
        f"read {settings.runtimes_dir}/marker": "ALLOWED",
        f"read {data}/nodes/clusters/{cluster}/nodes/master-0/sshd_config": "ALLOWED",
        "write /store/p/data/a.csv": "DENIED EROFS",
        "write /store/p/new.csv": "DENIED EROFS",
        "write /store/new.csv": "DENIED EROFS",
        f"write {data}/planted": "DENIED EROFS",
        f"write {data}/nodes/clusters/{cluster}/nodes/master-0/work/mine": "ALLOWED",
        "remove /store/p/data/a.csv": "DENIED EROFS",
    }
    assert (artifacts / "p" / "data" / "a.csv").read_text() == "x,y\n1,2\n"
    assert sorted(os.listdir(artifacts / "p")) == ["data"] and not (data / "planted").exists()
    assert os.listdir("/store") == []  # the mount point on this host stays empty


def test_a_node_sees_its_projects_objects_read_only_and_none_of_the_data_folder(driver, keypair, settings):
    [node] = driver.create_cluster(one_node("view", keypair[1]))
    try:
        assert_node_view(look(node, keypair, settings), settings, "view")
        (settings.artifacts_root / "p" / "later.csv").write_text("put while the node runs\n")
        with connect_node(node, keypair[0], settings) as session:
            assert session.run(["cat", "/store/p/later.csv"]).stdout == "put while the node runs\n"
    finally:
        (settings.artifacts_root / "p" / "later.csv").unlink(missing_ok=True)
        driver.delete_cluster("view")


def test_a_node_booted_again_or_replaced_gets_the_same_view(driver, keypair, settings):
    [node] = driver.create_cluster(one_node("again", keypair[1]))
    try:
        os.kill(int((Path(node.workdir).parent / "init.pid").read_text()), 9)  # power loss
        [node] = driver.create_cluster(one_node("again", keypair[1]))  # boots it again
        assert_node_view(look(node, keypair, settings), settings, "again")
        node = driver.replace_node(one_node("again", keypair[1]), "master-0")
        assert_node_view(look(node, keypair, settings), settings, "again")
    finally:
        driver.delete_cluster("again")


def test_a_node_of_no_project_sees_an_empty_store(driver, keypair, settings):
    [node] = driver.create_cluster(one_node("serving", keypair[1], project=None))
    try:
        with connect_node(node, keypair[0], settings) as session:
            assert session.run(["ls", "-A", "/store"]).stdout == ""
            assert session.run(["ls", "-A", str(settings.data_dir)]).stdout == "nodes\nrt\n"
    finally:
        driver.delete_cluster("serving")


def test_with_swift_artifacts_nodes_get_no_store_but_the_data_folder_stays_hidden(tmp_path, keypair):
    settings = driver_settings(tmp_path, artifacts="swift")
    (settings.data_dir / "key-encryption.key").write_text("not for nodes\n")
    driver = LocalDriver(settings)
    [node] = driver.create_cluster(one_node("swift", keypair[1]))
    try:
        with connect_node(node, keypair[0], settings) as session:
            assert session.run(["ls", "-A", "/store"]).stdout == ""
            assert session.run(["ls", "-A", str(settings.data_dir)]).stdout == "nodes\nrt\n"
    finally:
        driver.delete_cluster("swift")


@pytest.fixture
def isolated_settings(tmp_path):
    yield prepared(driver_settings(tmp_path, local_network_isolation=True, local_network_bridge=BRIDGE,
                                   local_network_subnet="10.239.0.0/28"))
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)


def test_a_node_in_a_network_namespace_of_its_own_gets_the_same_view(isolated_settings, keypair):
    driver = LocalDriver(isolated_settings)
    [node] = driver.create_cluster(one_node("isolated", keypair[1]))
    try:
        assert_node_view(look(node, keypair, isolated_settings), isolated_settings, "isolated")
    finally:
        driver.delete_cluster("isolated")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"{BRIDGE}-s" not in listed


# ---- end to end, on a platform -----------------------------------------------------------------------------

PROJECT, OTHER = "team-store", "team-other"


@pytest.fixture(scope="module")
def client(platform):
    return platform.client(PROJECT, "member")


@pytest.fixture(scope="module")
def data_set(client, platform) -> dict[str, bytes]:
    """Two CSV training files (y = 4x - 1) and a file the pattern does not match, put through the objects API;
    and an object of another project."""
    rng = random.Random(7)
    files = {}
    for name in ("data/train-0.csv", "data/train-1.csv"):
        xs = [round(rng.uniform(-1, 1), 4) for _ in range(48)]
        files[name] = ("x,y\n" + "".join(f"{x},{4 * x - 1}\n" for x in xs)).encode()
    files["data/eval.csv"] = b"x,y\n0,100\n"
    for name, data in files.items():
        response = client.request("PUT", f"/objects/{name}", data=data)
        assert response.status_code == 200, response.text
    response = platform.client(OTHER).request("PUT", "/objects/data/secret.csv", data=b"x,y\n0,0\n")
    assert response.status_code == 200, response.text
    return files


@pytest.fixture(scope="module")
def package(client, tmp_path_factory, tf_runtime) -> str:
    sdist = build_sdist(ROOT / "tests" / "trainers" / "storedata", tmp_path_factory.mktemp("sdist"),
                        tf_runtime / "bin" / "python")
    return client.upload(sdist)


def params(log: str) -> dict[str, float]:
    return json.loads(re.search(r"^PARAMS (\{.*\})$", log, re.MULTILINE).group(1))


def test_trainers_of_each_framework_read_a_csv_data_set_given_as_a_store_uri_and_reach_nothing_else(
        platform, client, data_set, package, mxnet_runtime, pytorch_runtime):
    data, artifacts = platform.data_dir, platform.data_dir / "artifacts"
    pattern = f"store://{PROJECT}/data/train-*.csv"
    jobs = {  # every way of writing a store:// arg: a word, words, and --flag=URI
        "store_tf": dict(framework="TENSORFLOW", pythonModule="trainer.tf_csv", args=["--train-files", pattern]),
        "store_mx": dict(framework="MXNET", pythonModule="trainer.mx_csv", args=[
            "--train-files", f"store://{PROJECT}/data/train-0.csv", f"store://{PROJECT}/data/train-1.csv"]),
        "store_torch": dict(framework="PYTORCH", pythonModule="trainer.torch_csv", args=[f"--train-files={pattern}"]),
        "store_probe": dict(pythonModule="trainer.probe", args=probe_args(
            reads=[f"store://{PROJECT}/data/train-0.csv", f"/store/{OTHER}/data/secret.csv",
                   artifacts / OTHER / "data" / "secret.csv", data / "key-encryption.key"],
            lists=["/store", data, data / "nodes" / "clusters"],
            writes=[f"store://{PROJECT}/data/train-0.csv", f"/store/{PROJECT}/planted.csv", data / "planted"],
            removes=[f"store://{PROJECT}/data/train-1.csv"])),
    }
    assert (data / "key-encryption.key").is_file() and (artifacts / OTHER / "data" / "secret.csv").is_file()
    before = {folder: tree(folder) for folder in (artifacts / PROJECT / "data", artifacts / OTHER)}
    for job_id, training_input in jobs.items():
        client.submit(job_id, package, **training_input)

    for job_id in ("store_tf", "store_mx", "store_torch"):
        job = client.wait(job_id)
        assert job["state"] == "SUCCEEDED", job.get("errorMessage")
        [log] = client.logs(job_id).values()
        assert f'FILES ["/store/{PROJECT}/data/train-0.csv", "/store/{PROJECT}/data/train-1.csv"]' in log, log
        assert "ROWS 96" in log
        assert params(log) == pytest.approx({"slope": 4.0, "intercept": -1.0}, abs=0.05)
        assert_no_node_left(platform, client, job_id)

    job = client.wait("store_probe")
    assert job["state"] == "FAILED"
    assert f"FileNotFoundError: [Errno 2] No such file or directory: '/store/{OTHER}/data/secret.csv'" in \
        job["errorMessage"]
    [log] = client.logs("store_probe").values()
    seen = outcomes(log)
    assert seen.pop("list /store") == json.dumps([PROJECT])
    assert seen.pop(f"list {data}") == '["nodes"]'
    assert len(json.loads(seen.pop(f"list {data}/nodes/clusters"))) == 1  # its own cluster only
    assert seen == {
        f"read /store/{PROJECT}/data/train-0.csv": "ALLOWED",
        f"read /store/{OTHER}/data/secret.csv": "DENIED ENOENT",
        f"read {artifacts}/{OTHER}/data/secret.csv": "DENIED ENOENT",
        f"read {data}/key-encryption.key": "DENIED ENOENT",
        f"write /store/{PROJECT}/data/train-0.csv": "DENIED EROFS",
        f"write /store/{PROJECT}/planted.csv": "DENIED EROFS",
        f"write {data}/planted": "DENIED EROFS",
        f"remove /store/{PROJECT}/data/train-1.csv": "DENIED EROFS",
    }
    assert {folder: tree(folder) for folder in before} == before
    assert not (artifacts / PROJECT / "planted.csv").exists() and not (data / "planted").exists()
    assert_no_node_left(platform, client, "store_probe")


def test_a_store_arg_of_another_project_is_refused_at_submission(client, package):
    response = client.request("POST", "/jobs", json={"jobId": "store_other", "trainingInput": {
        "packageUris": [package], "pythonModule": "trainer.tf_csv", "region": "local",
        "args": ["--train-files", f"store://{OTHER}/data/secret.csv"]}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["message"].startswith(f"trainingInput.args[1]: 'store://{OTHER}/data/secret.csv' is not in "
                                       f"project {PROJECT}")
    assert client.request("GET", "/jobs/store_other").status_code == 404

"""The whole platform in OpenStack mode: Keystone tokens, Heat stacks of emulated VMs, Swift artifacts.

A real API, worker and monitor (PostgreSQL, RabbitMQ) run with ``driver = openstack``, ``artifacts =
swift`` and ``auth = keystone`` against the test cloud: a TensorFlow job trains on a Heat stack, its
model lands in Swift, a version serves it from another stack, and Keystone decides who sees what.
"""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from tests.harness import Client, start_platform
from tests.integration.test_serving import INSTANCES, deploy, flatten, predict_via_api
from tests.openstack.settings import openstack_environment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def platform(test_cloud, tmp_path_factory, database_url, tf_runtime):
    import kombu

    from tests.conftest import AMQP_URL

    queue = f"cloudml-test-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path_factory.mktemp("openstack-platform")
    with start_platform(data_dir, database_url=database_url, broker_url=AMQP_URL, task_queue=queue,
                        stop_grace_seconds=2, **openstack_environment(test_cloud)) as running:
        yield running
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(queue)


def keystone_client(platform, test_cloud, user: str, project: str) -> Client:
    return Client(platform.base_url, project, test_cloud.connect(user).auth_token, keystone=True)


@pytest.fixture(scope="module")
def alice(platform, test_cloud) -> Client:
    return keystone_client(platform, test_cloud, "alice", "team-a")


def stacks(test_cloud) -> list[str]:
    return [s.name for s in test_cloud.connect("cloudml-os").orchestration.stacks() if s.status != "DELETE_COMPLETE"]


def servers(test_cloud) -> list[str]:
    return [s.name for s in test_cloud.connect("cloudml-os").compute.servers()]


@pytest.fixture(scope="module")
def trained(alice, tf_package, test_cloud) -> dict:
    uri = alice.upload(tf_package)
    alice.submit("os_tf_job", uri, args=["--epochs", "2"], scaleTier="CUSTOM", masterType="standard",
                 workerType="standard", workerCount="1")
    job = alice.wait("os_tf_job")
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    return job


def test_a_tensorflow_job_trains_on_a_heat_stack_and_exports_to_swift(alice, trained, test_cloud):
    events = [e["message"] for e in alice.events("os_tf_job")]
    assert any(m.startswith("Cluster ") and m.endswith("ready with 2 node(s)") for m in events), events
    assert set(alice.logs("os_tf_job")) == {"chief-0", "worker-0"}
    uri = trained["trainingOutput"]["exportedModelUri"]
    assert uri.startswith("store://team-a/")
    swift = test_cloud.connect("cloudml-os").object_store
    key = uri.removeprefix("store://team-a/")
    names = [o.name for o in swift.objects("cloudml-os-team-a", prefix=key + "/")]
    assert f"{key}/saved_model.pb" in names
    # Every node's log is in Swift too, next to the job's outputs.
    logs = [o.name for o in swift.objects("cloudml-os-team-a", prefix="jobs/os_tf_job/logs/")]
    assert sorted(logs) == ["jobs/os_tf_job/logs/chief-0.log", "jobs/os_tf_job/logs/worker-0.log"]
    # The package went to Swift too, and the job's stack is gone with its servers.
    assert any(n.startswith("packages/") for n in (o.name for o in swift.objects("cloudml-os-team-a")))
    cluster = next(m.split()[1] for m in events if m.startswith("Cluster ") and m.endswith(" deleted"))
    assert cluster not in stacks(test_cloud)
    assert not [s for s in servers(test_cloud) if s.startswith(cluster)]


def test_a_version_serves_the_swift_model_from_its_own_stack(alice, trained, test_cloud):
    response = alice.request("POST", "/models", json={"name": "os_model"})
    assert response.status_code == 200, response.text
    version = deploy(alice, "os_model", "v1", trained, "TENSORFLOW", "2.21")
    assert [r["state"] for r in version["replicas"]] == ["READY"]
    predicted = predict_via_api(alice, "/models/os_model/versions/v1:predict")
    assert predicted.status_code == 200, predicted.text
    assert flatten(predicted.json()["predictions"]) == pytest.approx([3 * x + 2 for [x] in INSTANCES], abs=0.5)
    serving = [s for s in stacks(test_cloud) if s.startswith("cml-serve-")]
    assert serving
    response = alice.request("DELETE", "/models/os_model/versions/v1")
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 300
    while any(s in stacks(test_cloud) for s in serving):
        assert time.monotonic() < deadline, stacks(test_cloud)
        time.sleep(1)


def test_keystone_decides_who_sees_and_changes_what(platform, test_cloud, alice, trained):
    bob = keystone_client(platform, test_cloud, "bob", "team-a")
    assert bob.request("GET", "/jobs/os_tf_job").status_code == 404  # bob's token is for team-b
    carol = keystone_client(platform, test_cloud, "carol", "team-a")  # a reader
    assert carol.request("GET", "/jobs/os_tf_job").status_code == 200
    refused = carol.request("POST", "/jobs/os_tf_job:cancel")
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["status"] == "PERMISSION_DENIED"
    anonymous = requests.get(f"{platform.base_url}/v1/projects/team-a/jobs", timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["status"] == "UNAUTHENTICATED"
    forged = requests.get(f"{platform.base_url}/v1/projects/team-a/jobs", timeout=30,
                          headers={"X-Auth-Token": "not-a-token", "X-Identity-Status": "Confirmed",
                                   "X-Project-Name": "team-a", "X-Roles": "admin"})
    assert forged.status_code == 401
    # Cloud ML Engine clients send the token as a bearer credential; that works too.
    bearer = requests.get(f"{platform.base_url}/v1/projects/team-a/jobs/os_tf_job", timeout=30,
                          headers={"Authorization": f"Bearer {alice.token}"})
    assert bearer.status_code == 200, bearer.text


def test_no_clouds_yaml_password_or_keystone_token_reaches_logs_events_or_responses(platform, test_cloud, alice,
                                                                                   trained):
    """The platform holds the clouds.yaml passwords of its service accounts and its callers' Keystone tokens:
    none of them may appear in its processes' logs, a job's events or logs, or any answer of the API."""
    secrets = {test_cloud.service_password, test_cloud.admin_password, alice.token,
               test_cloud.connect("cloudml-os").auth_token}
    answers = [alice.request("GET", path).text for path in (
        "/jobs", "/jobs/os_tf_job", "/jobs/os_tf_job/events", "/jobs/os_tf_job/logs", "/jobs/os_tf_job/metrics",
        "/jobs/missing", ":getConfig", "/models")]
    answers.append(alice.request("POST", "/jobs", json={"jobId": "bad", "trainingInput": {"region": 1}}).text)
    files = [path for path in platform.data_dir.rglob("*") if path.is_file() and path.stat().st_size < 64 << 20]
    assert any(path.name.endswith(".log") for path in files)  # the API's, the worker's and the monitor's
    for secret in secrets:
        assert secret and len(secret) >= 8
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"a secret is in {path}"
        for answer in answers:
            assert secret not in answer


def test_two_hundred_mib_reach_swift_through_the_api_across_a_cut_connection(alice, test_cloud):
    """A resumable upload to Swift (8 MiB segments) cut half-way keeps whole segments, resumes from what it
    kept, and the object read back (an SLO) has the source's bytes."""
    import base64
    import hashlib
    import threading

    from tests.integration.test_objects import StreamedBody, pattern, send_cut, wait_received

    size, mib = 200 << 20, 1 << 20
    md5 = hashlib.md5()
    for piece in pattern(size):
        md5.update(piece)
    start = alice.request("POST", "/uploads", json={"name": "data/two-hundred", "size": size,
                                                    "md5Hash": base64.b64encode(md5.digest()).decode()})
    assert start.status_code == 200, start.text
    upload_id, chunk = start.json()["uploadId"], int(start.json()["chunkBytes"])
    cut = threading.Thread(target=send_cut, args=(alice, f"/uploads/{upload_id}",
                                                  {"Content-Range": f"bytes 0-{size - 1}/{size}"},
                                                  b"".join(pattern(size)), 100 * mib + 12345))
    cut.start()
    cut.join()
    received = wait_received(alice, upload_id, 96 * mib)
    assert received % chunk == 0 and 0 < received <= 100 * mib
    for _ in range(50):
        done = alice.request("PUT", f"/uploads/{upload_id}",
                              data=StreamedBody(pattern(size, received), size - received),
                             headers={"Content-Range": f"bytes {received}-{size - 1}/{size}"})
        if done.status_code != 409:
            break
        time.sleep(0.2)
    assert done.status_code == 200, done.text
    assert done.json()["object"]["md5Hash"] == base64.b64encode(md5.digest()).decode()
    downloaded = hashlib.md5()
    with alice.request("GET", "/objects/data/two-hundred", stream=True) as got:
        assert got.status_code == 200
        for piece in got.iter_content(mib):
            downloaded.update(piece)
    assert downloaded.digest() == md5.digest()
    assert alice.request("DELETE", "/objects/data/two-hundred").json() == {"deleted": 1}

"""Autoscaling on real replicas: a load step scales a version out (up to its project's quota), the end of the
load scales it in after the stable window with its replica drained, and a version at zero replicas wakes on
its first request. The monitor process decides from the load counters its probes read."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.harness import node_processes
from tests.integration.test_serving import INSTANCES, node_marker, version_events, wait_for

pytestmark = pytest.mark.integration

MODEL = "autoscaled"
# Requests big enough that most of their time is spent in the model server, where the load is counted:
# one client keeps at most one request in flight (wants one replica at a target of 1), eight clients several.
BIG = json.dumps({"instances": [[float(i % 7)] for i in range(20000)]}).encode()


@pytest.fixture(scope="module")
def client(serving_client):
    response = serving_client.request("POST", "/models", json={"name": MODEL})
    assert response.status_code == 200, response.text
    return serving_client


def create(client, job: dict, version: str, auto_scaling: dict) -> None:
    response = client.request("POST", f"/models/{MODEL}/versions", json={
        "name": version, "deploymentUri": job["trainingOutput"]["exportedModelUri"], "framework": "TENSORFLOW",
        "runtimeVersion": "2.21", "autoScaling": auto_scaling})
    assert response.status_code == 200, response.text
    operation_id = response.json()["name"].rsplit("/", 1)[1]
    operation = wait_for(lambda: (lambda o: o if o["done"] else None)(
        client.request("GET", f"/operations/{operation_id}").json()), timeout=600)
    assert "error" not in operation, operation


def live_replicas(client, version: str) -> list[dict]:
    replicas = client.request("GET", f"/models/{MODEL}/versions/{version}").json().get("replicas", [])
    return [r for r in replicas if r["state"] not in ("FAILED", "DELETED")]


def events(client, version: str) -> list[dict]:
    return client.request("GET", f"/models/{MODEL}/versions/{version}/events").json()["events"]


def ready_count(client, version: str) -> int:
    return sum(1 for r in live_replicas(client, version) if r["state"] == "READY")


def set_target(client, version: str, target: float) -> None:
    response = client.request("PATCH", f"/models/{MODEL}/versions/{version}?updateMask=autoScaling.metrics",
                              json={"autoScaling": {"metrics": [{"name": "REQUESTS_IN_FLIGHT", "target": target}]}})
    assert response.status_code == 200 and response.json()["done"], response.text


def set_replica_quota(admin, project: str, limit: int | None) -> requests.Response:
    """A platform admin's quotas PATCH of ``project`` (None: back to the default)."""
    return requests.patch(f"{admin.base_url}/v1/projects/{project}/quotas", json={"quotas": {"replicas": limit}},
                          headers={"Authorization": f"Bearer {admin.token}"}, timeout=60)


class Load:
    """Closed-loop clients predicting on one version; ``clients`` changes how many run."""

    def __init__(self, client, version: str):
        self.url = f"{client.base_url}/v1/projects/{client.project}/models/{MODEL}/versions/{version}:predict"
        self.token = client.token
        self.answered, self.failures = 0, []
        self._stops: list[threading.Event] = []
        self._threads: list[threading.Thread] = []

    def clients(self, count: int) -> None:
        while len(self._stops) < count:
            stop = threading.Event()
            thread = threading.Thread(target=self._run, args=(stop,))
            self._stops.append(stop)
            self._threads.append(thread)
            thread.start()
        while len(self._stops) > count:
            self._stops.pop().set()

    def stop(self) -> None:
        self.clients(0)
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self, stop: threading.Event) -> None:
        session = requests.Session()
        while not stop.is_set():
            response = session.post(self.url, data=BIG, timeout=120, headers={
                "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
            if response.status_code == 200:
                self.answered += 1
            else:
                self.failures.append((response.status_code, response.text[:300]))


def test_a_load_step_scales_out_to_the_quota_and_back_in_after_the_stable_window_failing_no_request(
        platform, client, trained_job):
    admin = platform.client("admin")
    create(client, trained_job("TENSORFLOW"), "steps", {
        "minNodes": 1, "maxNodes": 3, "metrics": [{"name": "REQUESTS_IN_FLIGHT", "target": 1}],
        "stableWindow": 10, "panicWindow": 2})
    usage = client.request("GET", "/quotas").json()["usage"]["replicas"]
    response = set_replica_quota(admin, client.project, usage + 1)
    assert response.status_code == 200, response.text
    most, watching = [0], threading.Event()

    def watch() -> None:  # the live replica count, every 0.2 s
        while not watching.is_set():
            most[0] = max(most[0], len(live_replicas(client, "steps")))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    load = Load(client, "steps")
    try:
        load.clients(1)
        time.sleep(5)
        load.clients(8)
        wait_for(lambda: ready_count(client, "steps") == 2, timeout=120, interval=0.2)
        # However much the step wanted, a target a quarter as high wants more than the quota's 2 replicas.
        set_target(client, "steps", 0.25)
        wait_for(lambda: any(e["kind"] == "QUOTA" for e in events(client, "steps")), timeout=60, interval=0.2)
        set_target(client, "steps", 1)
        load.clients(1)
        removed = time.monotonic()
        wait_for(lambda: len(live_replicas(client, "steps")) == 1, timeout=120, interval=0.2)
        scaled_in = time.monotonic() - removed
        time.sleep(2)
    finally:
        load.stop()
        watching.set()
        watcher.join()
        set_replica_quota(admin, client.project, None)
    assert load.failures == [] and load.answered > 100, (load.failures[:3], load.answered)
    assert most[0] == 2  # maxNodes is 3, but the quota leaves room for 2
    assert scaled_in >= 10 - 1, scaled_in  # not before the stable window
    happened = [(e["kind"], e["message"]) for e in events(client, "steps")]
    out = next(message for kind, message in happened if kind == "AUTOSCALE")
    assert out.startswith("1 → 2 replicas: REQUESTS_IN_FLIGHT") and "(panic)" in out, happened
    assert any(kind == "QUOTA" and "the project's quota allows 2" in message for kind, message in happened), happened
    drained = next(i for i, (kind, _) in enumerate(happened) if kind == "DRAINING")
    assert happened[drained - 1][0] == "AUTOSCALE" and happened[drained - 1][1].startswith("2 → 1 replicas"), happened


def test_a_version_at_zero_replicas_serves_its_first_request_and_sleeps_again(platform, client, trained_job):
    create(client, trained_job("TENSORFLOW"), "sleepy", {"minNodes": 0, "stableWindow": 6, "panicWindow": 1})
    assert live_replicas(client, "sleepy") == []
    started = time.monotonic()
    response = client.request("POST", f"/models/{MODEL}/versions/sleepy:predict", json={"instances": INSTANCES})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == len(INSTANCES)
    assert time.monotonic() - started > 0.5  # it waited for a replica to start
    assert "0 → 1 replicas: a prediction arrived while no replica served" in version_events(client, MODEL, "sleepy")
    woken = [r["name"] for r in live_replicas(client, "sleepy")]
    assert len(woken) == 1
    wait_for(lambda: live_replicas(client, "sleepy") == [], timeout=120, interval=0.5)
    assert node_processes(node_marker(platform, "sleepy", woken[0], MODEL)) == []

"""What the platform-level recovery tests share: following a job's events and logs, and failing its nodes
the way machines fail (power off, network cut)."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from cloudml_os.cloud.local import alive
from tests.harness import cluster_processes
from tests.recovery.conftest import node_namespaces

GIVE_UP = 900  # seconds: a job still not done by then has hung


def messages(client, job_id: str) -> list[str]:
    return [event["message"] for event in client.events(job_id)]


def print_events(client) -> None:
    """Every event of the project's jobs, with times: what happened, whatever the outcome."""
    for job in client.request("GET", "/jobs").json().get("jobs", []):
        for event in client.events(job["jobId"]):
            print(f"EVENT {job['jobId']} {event['time']} {event.get('node', '-')} {event['message'][:300]}")


def event_time(client, job_id: str, pattern: str, after: dt.datetime | None = None) -> dt.datetime:
    """When the first event matching ``pattern`` (after ``after``) was recorded (UTC)."""
    for event in client.events(job_id):
        when = dt.datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        if re.search(pattern, event["message"]) and (after is None or when > after):
            return when
    raise AssertionError(f"no event matches {pattern!r}: {messages(client, job_id)}")


def cluster_name(client, job_id: str) -> str:
    for message in messages(client, job_id):
        found = re.fullmatch(r"Cluster (\S+) ready with \d+ node\(s\)", message)
        if found:
            return found.group(1)
    raise AssertionError(f"no cluster recorded: {messages(client, job_id)}")


def wait_for_log(client, job_id: str, node: str, text: str) -> None:
    deadline = time.monotonic() + GIVE_UP
    while text not in client.logs(job_id).get(node, ""):
        assert time.monotonic() < deadline, f"{node} never logged {text!r}: {client.logs(job_id)}"
        job = client.job(job_id)
        assert job["state"] in ("QUEUED", "PREPARING", "RUNNING"), (job.get("errorMessage"),
                                                                    messages(client, job_id))
        time.sleep(0.5)


def node_dir(platform, cluster: str, node: str) -> Path:
    return platform.data_dir / "nodes" / "clusters" / cluster / "nodes" / node


def power_off(platform, cluster: str, node: str) -> dt.datetime:
    """SIGKILL the node's namespace PID 1, as a VM losing power: every process of it ends at once."""
    init_pid = int((node_dir(platform, cluster, node) / "init.pid").read_text())
    os.kill(init_pid, signal.SIGKILL)
    while alive(init_pid):
        time.sleep(0.01)
    return dt.datetime.utcnow()


def cut_link(platform, cluster: str, node: str) -> dt.datetime:
    """Set the host end of the node's veth down: the node runs on but nothing reaches it any more."""
    from cloudml_os.cloud.local import LocalDriver
    from cloudml_os.config import load_settings

    driver = LocalDriver(load_settings(environ=platform.env))
    subprocess.run(["ip", "link", "set", driver.host_link(cluster, node), "down"], check=True)
    return dt.datetime.utcnow()


def assert_no_node_left(platform, cluster: str) -> None:
    assert cluster_processes(platform, cluster) == []
    assert not (platform.data_dir / "nodes" / "clusters" / cluster).exists()
    assert node_namespaces() == []

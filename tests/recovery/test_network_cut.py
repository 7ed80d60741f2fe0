"""A training node cut off from the network mid-run is found within node_unreachable_seconds, replaced, and
the job goes on, instead of the platform waiting on it forever.

Real platform, real TensorFlow; the nodes live in network namespaces of their own on a bridge, and the test
sets the host end of one node's veth down: the node runs on, but nothing reaches it any more.
"""

from __future__ import annotations

import pytest

from tests.recovery.jobs import (
    GIVE_UP,
    assert_no_node_left,
    cluster_name,
    cut_link,
    event_time,
    messages,
    print_events,
    wait_for_log,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(isolated_platform):
    return isolated_platform.client("team-cut")


@pytest.fixture(scope="module")
def package(client, tf_package):
    return client.upload(tf_package)


@pytest.fixture(autouse=True)
def show_events(client):
    yield
    print_events(client)


def test_a_node_whose_network_is_cut_is_detected_replaced_and_the_job_still_succeeds(
        isolated_platform, client, package):
    client.submit("cut_off", package, args=["--epochs", "4", "--samples", "512", "--sleep-after-epoch", "2"],
                  scheduling={"restartPolicy": "ON_FAILURE"})
    wait_for_log(client, "cut_off", "chief-0", "epoch 1/4")
    cluster = cluster_name(client, "cut_off")
    cut_at = cut_link(isolated_platform, cluster, "chief-0")

    job = client.wait("cut_off", timeout=GIVE_UP)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    assert job["restartCount"] == 1, messages(client, job["jobId"])
    events = messages(client, "cut_off")
    assert any(m.startswith("Node chief-0 is unreachable") for m in events), events
    assert any(m.startswith("Node chief-0 replaced by a new node") for m in events), events
    assert_no_node_left(isolated_platform, cluster)
    detected = event_time(client, "cut_off", r"^Node chief-0 is unreachable")
    print(f"\nFIGURES link cut -> detected {(detected - cut_at).total_seconds():.1f} s "
          f"(node_unreachable_seconds 30)")

"""A batch prediction job survives a node powered off and its worker SIGKILLed mid-job: every record once.

The model is a TorchScript network made here and uploaded through the objects API, large enough that a shard
of 1,500 instances at batchSize 1 runs for seconds. While shards run on all three nodes, one node is powered
off (the shards it holds, the one it runs and the one queued behind it, go back to the queue and run on
other nodes), then the worker is killed inside PREDICTING
(see faults.py) and a new one started. The job succeeds, every input record is in the results exactly once,
in input order, and no node is left.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from sqlalchemy import text

from tests.recovery.jobs import power_off
from tests.reliability.faults import (
    assert_landed_mid_step,
    assert_no_node_left,
    job_pk_of,
    kill_worker_mid_step,
    wait_for,
)

pytestmark = pytest.mark.integration

PROJECT = "team-batch-crash"
FILES, PER_FILE = 9, 1500
MODEL = """
import sys, torch
torch.manual_seed(0)
layers = [torch.nn.Linear(1, 768), torch.nn.ReLU()]
for _ in range(3):
    layers += [torch.nn.Linear(768, 768), torch.nn.ReLU()]
layers.append(torch.nn.Linear(768, 1))
torch.jit.save(torch.jit.script(torch.nn.Sequential(*layers).eval()), sys.argv[1])
"""


def shard_rows(store, job_pk: int) -> list[dict]:
    with store.engine.connect() as connection:
        return [dict(row) for row in connection.execute(text(
            "SELECT index, state, node, run FROM prediction_shards WHERE job_id = :job ORDER BY index"),
            {"job": job_pk}).mappings()]


def test_a_node_powered_off_and_a_worker_killed_mid_job_still_give_every_record_once(
        platform, store, client, pytorch_runtime, tmp_path):
    model = tmp_path / "model.pt"
    subprocess.run([str(pytorch_runtime / "bin" / "python"), "-c", MODEL, str(model)], check=True)
    assert client.request("PUT", "/objects/models/deep/model.pt", data=model.read_bytes()).status_code == 200
    instances = [[float(i)] for i in range(FILES * PER_FILE)]
    for index in range(FILES):
        rows = instances[index * PER_FILE:(index + 1) * PER_FILE]
        body = "".join(json.dumps(row) + "\n" for row in rows).encode()
        assert client.request("PUT", f"/objects/in/part-{index:02d}.json", data=body).status_code == 200
    response = client.request("POST", "/jobs", json={"jobId": "crash_batch", "predictionInput": {
        "dataFormat": "JSON", "inputPaths": [f"store://{PROJECT}/in/part-*.json"],
        "outputPath": f"store://{PROJECT}/out",
        "uri": f"store://{PROJECT}/models/deep", "maxWorkerCount": 3, "batchSize": 1}})
    assert response.status_code == 200, response.text
    job_pk = job_pk_of(store, PROJECT, "crash_batch")

    # Every node runs a shard and one is done: power off a node in the middle of its shard.
    rows = wait_for(lambda: (r := shard_rows(store, job_pk)) and any(s["state"] == "DONE" for s in r)
                    and len({s["node"] for s in r if s["state"] == "RUNNING"}) == 3 and r,
                    "shards running on three nodes", timeout=600)
    victim = next(s for s in rows if s["state"] == "RUNNING")["node"]
    # The shards the node holds: the one it runs and the one queued behind it. The first may end, and be
    # collected, before the power goes; the queued one cannot.
    held = [s["index"] for s in rows if s["node"] == victim and s["state"] == "RUNNING"]
    cluster = next(e["message"].split()[1] for e in client.events("crash_batch") if e["kind"] == "CLUSTER")
    power_off(platform, cluster, victim)
    wait_for(lambda: any(e["kind"] == "NODE" and e.get("node") == victim
                         for e in client.events("crash_batch")), "the node to be found lost")
    # Then the worker dies inside PREDICTING, and a new one takes over once the step's lease has expired.
    kill = kill_worker_mid_step(platform, store, job_pk, "PREDICTING",
                                ready=lambda row: any(s["state"] == "RUNNING" for s in shard_rows(store, job_pk)))
    assert_landed_mid_step(kill)
    platform.start("worker")

    job = client.wait("crash_batch", timeout=900)
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    output = job["predictionOutput"]
    assert output["predictionCount"] == str(FILES * PER_FILE) and output["errorCount"] == "0", output
    listed = client.request("GET", "/objects", params={"prefix": "out/"}).json()["objects"]
    names = sorted(item["name"] for item in listed if "/prediction.results-" in item["name"])
    lines = [line for name in names for line in client.request("GET", f"/objects/{name}").text.splitlines()]
    assert [json.loads(line)["instance"] for line in lines] == instances  # each record once, in input order
    rows = shard_rows(store, job_pk)
    assert all(s["state"] == "DONE" for s in rows)
    assert any(rows[index]["node"] != victim for index in held)  # what the powered-off node held ran elsewhere
    assert_no_node_left(platform, cluster)

"""Batch prediction through the platform against the same model predicting the same files in one process.

A real platform (API, worker, local sshd nodes) runs a batch prediction job over JSON-lines files in the store
with a TorchScript model made here; beside it, one process of the same PyTorch runtime loads the model once
and predicts the same files with the same batch size, reading JSON and writing JSON lines as the runner does.
Per round, in an order that flips every round:

- platform, 1 node: records / seconds from the first shard's assignment to the job's outcome (node creation
  and the model's upload to the node excluded; the node's runner start, ``import torch`` and the model's load
  included);
- one process: records / its wall time, its start, ``import torch`` and the model's load included as well;

then the same job on 2 nodes, whose ratio to 1 node is bounded by this machine's 2 cores. Beside each figure,
the machine's busy CPU seconds while it ran (``/proc/stat``), which other load hardly changes per record.

    .venv/bin/python -m bench.batch_prediction [--files 4] [--records 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import node_runtime
from tests.harness import start_platform

TARGET = 0.8
BATCH = 64
MODEL = """
import sys, torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                          torch.nn.Linear(64, 2)).eval()
torch.jit.save(torch.jit.script(net), sys.argv[1])
"""
IN_PROCESS = """
import json, sys, torch
model_path, out_path, batch_size, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
model = torch.jit.load(model_path, map_location="cpu").eval()
count = 0
with open(out_path, "w") as out:
    def flush(batch):
        with torch.inference_mode():
            predictions = model(torch.tensor(batch, dtype=torch.float32)).tolist()
        for instance, prediction in zip(batch, predictions):
            out.write(json.dumps({"instance": instance, "prediction": prediction}, separators=(",", ":")) + "\\n")
    for path in files:
        batch = []
        with open(path, "rb") as lines:
            for line in lines:
                if line.strip():
                    batch.append(json.loads(line))
                    count += 1
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
        if batch:
            flush(batch)
print(json.dumps({"records": count}))
"""


def busy_cpu_seconds() -> float:
    """The whole machine's non-idle CPU time so far."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def event_time(event: dict) -> dt.datetime:
    return dt.datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ")


def run_job(client, job_id: str, workers: int, project: str) -> tuple[float, float]:
    """(records per second from the first shard's start to the outcome, busy CPU seconds meanwhile)."""
    response = client.request("POST", "/jobs", json={"jobId": job_id, "predictionInput": {
        "dataFormat": "JSON", "inputPaths": [f"store://{project}/in/*.json"], "outputPath": f"store://{project}/out/{job_id}",
        "uri": f"store://{project}/model", "maxWorkerCount": workers, "batchSize": BATCH}})
    response.raise_for_status()
    while not any(event["kind"] == "SHARD" for event in client.events(job_id)):
        time.sleep(0.05)
    cpu = busy_cpu_seconds()
    job = client.wait(job_id, timeout=1800, interval=0.2)
    cpu = busy_cpu_seconds() - cpu
    assert job["state"] == "SUCCEEDED", job.get("errorMessage")
    events = client.events(job_id)
    first = min(event_time(e) for e in events if e["kind"] == "SHARD")
    last = max(event_time(e) for e in events if e["kind"] == "OUTCOME")
    return int(job["predictionOutput"]["predictionCount"]) / (last - first).total_seconds(), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--records", type=int, default=100_000, help="records per file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    python = node_runtime("pytorch-2.13") / "bin" / "python"
    project = "bench"
    with tempfile.TemporaryDirectory(prefix="bench-batch-", dir=Path.home()) as tmp:
        work = Path(tmp)
        subprocess.run([str(python), "-c", MODEL, str(work / "model.pt")], check=True)
        files = []
        for index in range(args.files):
            path = work / f"in-{index}.json"
            with path.open("w") as out:
                for i in range(args.records):
                    x = (index * args.records + i) % 1000 / 100
                    out.write(json.dumps([x, -x, x / 2, 1.0]) + "\n")
            files.append(path)
        with start_platform(work / "platform") as platform:
            client = platform.client(project)
            client.request("PUT", "/objects/model/model.pt", data=(work / "model.pt").read_bytes()).raise_for_status()
            for path in files:
                client.request("PUT", f"/objects/in/{path.name}", data=path.read_bytes()).raise_for_status()

            def in_process() -> tuple[float, float]:
                cpu, started = busy_cpu_seconds(), time.perf_counter()
                out = subprocess.run([str(python), "-c", IN_PROCESS, str(work / "model.pt"), str(work / "out.json"),
                                      str(BATCH), *map(str, files)], check=True, capture_output=True, text=True)
                seconds = time.perf_counter() - started
                return json.loads(out.stdout)["records"] / seconds, busy_cpu_seconds() - cpu

            rates: dict[str, list[float]] = {"platform 1 node": [], "one process": [], "platform 2 nodes": []}
            cpus: dict[str, list[float]] = {name: [] for name in rates}
            for round_ in range(args.rounds):
                sides = [("platform 1 node", lambda r=round_: run_job(client, f"one_{r}", 1, project)),
                         ("one process", in_process)]
                for name, side in sides if round_ % 2 == 0 else reversed(sides):
                    rate, cpu = side()
                    rates[name].append(rate)
                    cpus[name].append(cpu)
                rate, cpu = run_job(client, f"two_{round_}", 2, project)
                rates["platform 2 nodes"].append(rate)
                cpus["platform 2 nodes"].append(cpu)

    total = args.files * args.records
    print(f"{total} records in {args.files} files, batchSize {BATCH}, {args.rounds} rounds, order flipped every round")
    for name, values in rates.items():
        per_record = statistics.median(cpus[name]) / total * 1e6
        print(f"  {name:17s} median {statistics.median(values):8.0f} records/s (min {min(values):.0f}, "
              f"max {max(values):.0f}); machine CPU {per_record:.1f} us per record")
    ratios = [a / b for a, b in zip(rates["platform 1 node"], rates["one process"], strict=True)]
    print(f"  platform 1 node / one process: median {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; target >= {TARGET})")
    scaling = [b / a for a, b in zip(rates["platform 1 node"], rates["platform 2 nodes"], strict=True)]
    print(f"  platform 2 nodes / 1 node: median {statistics.median(scaling):.2f} "
          f"(range {min(scaling):.2f}-{max(scaling):.2f}; bounded by 2 cores)")


if __name__ == "__main__":
    main()

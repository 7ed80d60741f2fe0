"""A trainer reading a data set from the store path on a node, against reading the same bytes from a local file.

One local node (a real sshd "VM" of the local driver, its mount namespace holding /store/PROJECT as the
read-only view of the project's objects) runs a reader that reads a file sequentially in 1 MiB pieces with
the runtime's Python, as a trainer's input pipeline would: once ``/store/bench/data/big.bin`` (an object
uploaded into the local store) and once a copy of the same bytes in the node's own work folder. The two
alternate, order flipped every round. Page cache: both files are read once before timing and both then come
from memory (the view is a bind mount: it adds no copy), so the figure compares the paths, not the disk.

Reported: each side's median MB/s and the per-round ratio store / local (median and range; target ≥ 0.8),
plus the reader's CPU seconds per GiB on each side (noise-free beside the throughput).

    .venv/bin/python -m bench.store_read [--mib 1024] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from cloudml_os.cloud.base import ClusterSpec, NodeSpec
from cloudml_os.cloud.local import LocalDriver
from cloudml_os.config import load_settings
from cloudml_os.keys import generate_keypair
from cloudml_os.remote import connect_node

MiB = 1 << 20
TARGET = 0.8
READER = (
    "import json, sys, time\n"
    "start, cpu, total = time.perf_counter(), time.process_time(), 0\n"
    "with open(sys.argv[1], 'rb', buffering=0) as data:\n"
    "    while piece := data.read(1 << 20):\n"
    "        total += len(piece)\n"
    "print(json.dumps([total, time.perf_counter() - start, time.process_time() - cpu]))\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    size = args.mib * MiB

    with tempfile.TemporaryDirectory(prefix="bench-store-read-", dir=Path.home()) as tmp:
        settings = load_settings(environ={}, data_dir=Path(tmp), local_address_prefix="127.23",
                                 local_ssh_port=2923, local_port_base=28700, local_ports_per_node=4)
        data = settings.artifacts_root / "bench" / "data" / "big.bin"
        data.parent.mkdir(parents=True)
        with data.open("wb") as out:
            for _ in range(args.mib):
                out.write(os.urandom(MiB))
        private_key, public_key = generate_keypair("bench-store-read")
        driver = LocalDriver(settings)
        spec = ClusterSpec("bench-store-read", (NodeSpec("master-0", "master", 0, "m1.small"),), public_key,
                           labels={"project": "bench", "job": "1"})
        try:
            node = driver.create_cluster(spec)[0]
            local = f"{node.workdir}/big.bin"
            shutil.copyfile(data, Path(node.workdir) / "big.bin")  # the node's work folder is on this host
            sides = {"store": "/store/bench/data/big.bin", "local": local}
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
            with connect_node(node, private_key, settings) as session:
                def read(path: str) -> tuple[float, float]:
                    out = session.run([sys.executable, "-c", READER, path])
                    total, seconds, cpu = json.loads(out.stdout)
                    assert total == size, (path, total)
                    return seconds, cpu

                for path in sides.values():  # warm the page cache for both
                    read(path)
                for round_ in range(args.rounds):
                    for name in (sides if round_ % 2 == 0 else reversed(list(sides))):
                        results[name].append(read(sides[name]))
        finally:
            driver.delete_cluster(spec.name)

    print(f"{args.mib} MiB read sequentially on a local node, {args.rounds} rounds, order flipped every round")
    for name, values in results.items():
        speeds = [size / seconds / 1e6 for seconds, _ in values]
        cpu = statistics.median(c for _, c in values) / (size / (1 << 30))
        print(f"  {name:6s} median {statistics.median(speeds):8.0f} MB/s (min {min(speeds):.0f}, "
              f"max {max(speeds):.0f}); reader CPU {cpu:.3f} s per GiB")
    ratios = [local[0] / store[0] for store, local in zip(results["store"], results["local"], strict=True)]
    print(f"  store / local throughput ratio: median {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; target >= {TARGET})")


if __name__ == "__main__":
    main()

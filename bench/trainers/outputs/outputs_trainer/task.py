"""A trainer that writes checkpoint-like files and says when each was closed: bench/output_sync.py measures how
soon each is in the job's directory in the store.

Every ``--every`` seconds (times a random factor of 0.5–1.5, so that files close at every phase of the
platform's copy rounds) it writes ``--size`` bytes to ``ckpt/sample-K.bin.tmp`` under ``--job-dir``, renames
the file into place, as TensorFlow does with its checkpoints, and prints ``CLOSED sample-K.bin TIME`` (Unix
time after the rename; local nodes share the benchmark's clock).
"""

import argparse
import os
import random
import time

parser = argparse.ArgumentParser()
parser.add_argument("--job-dir", required=True)
parser.add_argument("--files", type=int, default=30)
parser.add_argument("--every", type=float, default=1.0)
parser.add_argument("--size", type=int, default=1 << 20)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
rng = random.Random(args.seed)
folder = os.path.join(args.job_dir, "ckpt")
os.makedirs(folder, exist_ok=True)
payload = os.urandom(args.size)
for index in range(args.files):
    time.sleep(args.every * rng.uniform(0.5, 1.5))
    final = os.path.join(folder, f"sample-{index}.bin")
    with open(final + ".tmp", "wb") as handle:
        handle.write(payload)
    os.replace(final + ".tmp", final)
    print(f"CLOSED sample-{index}.bin {time.time():.6f}", flush=True)
time.sleep(3.0)  # the last file's copy while the trainer runs, not by the final round at its exit

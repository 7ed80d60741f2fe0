"""A trainer that does no training: it stamps when it started and, on the master, when it exits.

The control-plane benchmark reads these stamps from the job's logs to separate the platform's own
overhead from the trainer's work.
"""

import json
import os
import sys
import time

print(f"STARTED {time.time():.6f}", flush=True)
task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {}).get("type", "master")
if task in ("master", "chief"):
    time.sleep(float(sys.argv[sys.argv.index("--run-seconds") + 1]) if "--run-seconds" in sys.argv else 2.0)
    print(f"EXIT {time.time():.6f}", flush=True)
    sys.exit(0)
time.sleep(3600)  # workers wait to be stopped, as parameter servers do

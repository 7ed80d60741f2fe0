"""Linear regression (y = 3x + 2 + noise) with MXNet Gluon, alone or on a parameter server (``DMLC_*``).

The same trainer runs on Cloud ML Engine and on cloudml-os: ``python -m trainer.task --job-dir DIR``.
Every process of the job runs this module; ``DMLC_ROLE`` says what it becomes:

- no ``DMLC_ROLE``: one process trains alone with the ``local`` kvstore;
- ``worker``: trains its shard of the data with the ``dist_sync`` kvstore (``--kvstore dist_async``
  to update without waiting for the other workers); the worker that ps-lite gives rank 0 exports;
- ``server`` or ``scheduler``: ``import mxnet`` itself runs the role and returns only once the workers
  have finished, then this process exits 0.

MXNet is imported only after the role is known, so a server logs what it is before it serves. A
failure is simply raised: on cloudml-os the MXNet plugin runs trainers under a launcher that ends a
failed process at once (a normal exit would wait in MXNet's kvstore shutdown for the other workers).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

LOG = logging.getLogger("trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.task", description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", required=True, help="where outputs go; the model lands in JOB_DIR/model")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=4096, help="in the whole data set, split between workers")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--kvstore", choices=("local", "dist_sync", "dist_async"), default=None,
                        help="default: dist_sync when DMLC_ROLE is set, local otherwise")
    parser.add_argument("--fail-at-step", type=int, default=0,
                        help="raise an exception before this (1-based) step on one worker: a failing trainer")
    parser.add_argument("--fail-rank", type=int, default=-1,
                        help="the kvstore rank that fails (default: the last, so a single worker fails too)")
    parser.add_argument("--sleep-before-training", type=float, default=0.0,
                        help="seconds to sleep first: a job still running when cancelled")
    return parser.parse_args(argv)


def serve(role: str) -> int:
    """A server or the scheduler: MXNet runs the role while it is imported, then calls ``sys.exit()``."""
    LOG.info("DMLC_ROLE=%s: serving until the workers finish", role)
    try:
        import mxnet  # noqa: F401
    except SystemExit as exc:
        LOG.info("%s: the workers finished", role)
        return exc.code if isinstance(exc.code, int) else 0
    LOG.error("DMLC_ROLE=%s but MXNet did not run it", role)
    return 1


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    args = parse_args(argv)
    role = os.environ.get("DMLC_ROLE", "")
    if role in ("server", "scheduler"):
        return serve(role)
    if args.sleep_before_training:
        LOG.info("sleeping %.1f s before training", args.sleep_before_training)
        time.sleep(args.sleep_before_training)
    from trainer import model  # imports MXNet, which connects a worker to the scheduler

    model.train_and_export(args, args.kvstore or ("dist_sync" if role else "local"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

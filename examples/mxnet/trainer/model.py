"""The model, its training loop on a kvstore, and its export; only workers import this module.

Every worker generates the same data set (same seed) and trains on its shard: samples
``rank::num_workers``. Under ``dist_sync`` the servers sum the workers' gradients each step, so a step
is one update with the mean gradient of the global batch, and every worker pulls the same weights.
The worker of rank 0 exports ``JOB_DIR/model/model-symbol.json`` and ``model-0000.params``: a
``SymbolBlock`` whose input is ``data``, float32 of shape [N, 1]; and ``warmup.json``, the instances the
model server predicts before it reports ready.

After every epoch each worker saves the parameters and the epoch to ``JOB_DIR/checkpoints``
(``dist_sync`` keeps them equal on every worker); a restarted worker that finds them there loads them
and resumes after that epoch instead of starting again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

LOG = logging.getLogger("trainer")
TRUE_SLOPE, TRUE_INTERCEPT = 3.0, 2.0
EXPORT_PREFIX = "model"  # HybridBlock.export writes PREFIX-symbol.json and PREFIX-0000.params
WARMUP_INSTANCES = [[0.0], [1.0]]
CHECKPOINT_PARAMS, CHECKPOINT_STATE = "model.params", "state.json"


def make_data(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same samples in every process (same seed), so sharding splits one data set."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(samples, 1)).astype("float32")
    y = (TRUE_SLOPE * x + TRUE_INTERCEPT + rng.normal(0.0, 0.1, size=(samples, 1))).astype("float32")
    return x, y


def build_model() -> gluon.HybridBlock:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(1, in_units=1))
    net.initialize(mx.init.Normal(0.1))
    net.hybridize()
    return net


def model_params(net: gluon.HybridBlock) -> dict[str, float]:
    dense = net[0]
    return {"weight": float(dense.weight.data().asnumpy().ravel()[0]),
            "bias": float(dense.bias.data().asnumpy().ravel()[0])}


def train_and_export(args: argparse.Namespace, kvstore_type: str) -> gluon.HybridBlock:
    """Train on this worker's shard, print throughput and final parameters, export on rank 0.

    :raises RuntimeError: at ``--fail-at-step`` on the failing rank.
    """
    kvstore = mx.kv.create(kvstore_type)  # dist_*: waits until every worker and server has joined
    rank, num_workers = kvstore.rank, kvstore.num_workers
    LOG.info("worker rank %d of %d, kvstore %s, MXNet %s", rank, num_workers, kvstore.type, mx.__version__)
    mx.random.seed(args.seed)
    x, y = make_data(args.samples, args.seed)
    x, y = x[rank::num_workers], y[rank::num_workers]
    # Every worker takes the same number of steps: under dist_sync a missing push would block the rest.
    steps_per_epoch = max(1, (args.samples // num_workers) // args.batch_size)
    # dist_sync sums the workers' gradients before the update; dist_async applies each push alone.
    step_scale = args.batch_size * (num_workers if kvstore_type == "dist_sync" else 1)
    fail_rank = args.fail_rank if args.fail_rank >= 0 else num_workers - 1
    fail_at_step = args.fail_at_step if rank == fail_rank else 0

    net = build_model()
    checkpoints = os.path.join(args.job_dir, "checkpoints")
    done = restore(net, checkpoints)  # before the kvstore is initialised: it starts from these values
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": args.learning_rate},
                            kvstore=kvstore)
    loss_function = gluon.loss.L2Loss()
    order = np.random.default_rng(args.seed + rank)
    LOG.info("training: %d samples in this shard, batch %d, %d epochs of %d steps",
             len(x), args.batch_size, args.epochs, steps_per_epoch)
    started, cpu_started, started_at = time.monotonic(), time.process_time(), time.time()
    step = done * steps_per_epoch
    for epoch in range(done + 1, args.epochs + 1):
        permutation = order.permutation(len(x))
        total = 0.0
        for batch in range(steps_per_epoch):
            step += 1
            if step == fail_at_step:
                raise RuntimeError(f"Injected failure at step {step} (--fail-at-step, rank {rank})")
            indexes = permutation[batch * args.batch_size:(batch + 1) * args.batch_size]
            data, label = mx.nd.array(x[indexes]), mx.nd.array(y[indexes])
            with autograd.record():
                loss = loss_function(net(data), label)
            loss.backward()
            trainer.step(step_scale)
            total += float(loss.mean().asscalar())
        save(net, checkpoints, epoch)
        LOG.info("epoch %d/%d step %d loss %.6f", epoch, args.epochs, step, total / steps_per_epoch)
    elapsed, cpu_seconds, ended_at = time.monotonic() - started, time.process_time() - cpu_started, time.time()
    params = model_params(net)
    LOG.info("trained in %.2f s: y = %.3f x + %.3f (true: %.1f x + %.1f)", elapsed, params["weight"],
             params["bias"], TRUE_SLOPE, TRUE_INTERCEPT)
    trained_steps = step - done * steps_per_epoch
    print(f"THROUGHPUT samples_per_second={trained_steps * args.batch_size / elapsed:.1f} "
          f"cpu_cores={cpu_seconds / elapsed:.4f} "
          f"started={started_at:.3f} ended={ended_at:.3f}", flush=True)
    print(f"PARAMS {json.dumps(params, sort_keys=True)}", flush=True)
    if rank == 0:
        export(net, os.path.join(args.job_dir, "model"))
    return net


def save(net: gluon.HybridBlock, folder: str, epoch: int) -> None:
    """Parameters, then the state naming their epoch, each renamed into place: never a half checkpoint."""
    os.makedirs(folder, exist_ok=True)
    net.save_parameters(os.path.join(folder, f".{CHECKPOINT_PARAMS}.tmp"))
    os.replace(os.path.join(folder, f".{CHECKPOINT_PARAMS}.tmp"), os.path.join(folder, CHECKPOINT_PARAMS))
    with open(os.path.join(folder, f".{CHECKPOINT_STATE}.tmp"), "w") as handle:
        json.dump({"epoch": epoch}, handle)
    os.replace(os.path.join(folder, f".{CHECKPOINT_STATE}.tmp"), os.path.join(folder, CHECKPOINT_STATE))


def restore(net: gluon.HybridBlock, folder: str) -> int:
    """Load the checkpoint in ``folder``, if any; the epochs it holds."""
    try:
        with open(os.path.join(folder, CHECKPOINT_STATE)) as handle:
            epoch = int(json.load(handle)["epoch"])
    except FileNotFoundError:
        return 0
    net.load_parameters(os.path.join(folder, CHECKPOINT_PARAMS))
    LOG.info("resumed from checkpoint %s: %d epoch(s) already done", folder, epoch)
    return epoch


def export(net: gluon.HybridBlock, export_dir: str) -> None:
    os.makedirs(export_dir, exist_ok=True)
    net.export(os.path.join(export_dir, EXPORT_PREFIX), epoch=0)
    with open(os.path.join(export_dir, "warmup.json"), "w") as handle:
        json.dump(WARMUP_INSTANCES, handle)
    LOG.info("exported %s-symbol.json and %s-0000.params to %s", EXPORT_PREFIX, EXPORT_PREFIX, export_dir)

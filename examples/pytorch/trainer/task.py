"""Linear regression (y = 3x + 2 + noise) trained alone or with DistributedDataParallel across nodes.

The same trainer runs under cloudml-os, under ``torchrun`` and on Cloud ML Engine's PyTorch runtime:
``python -m trainer.task --job-dir DIR``. The cluster comes from torchrun's environment
(``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``):

- no ``WORLD_SIZE``, or 1: one process, no process group;
- more: ``init_process_group(init_method="env://")`` and the model wrapped in DDP; every rank trains
  its share of each epoch (the shuffling of ``DistributedSampler``) and gradients are averaged, so all
  ranks end with the same parameters.

The backend is ``nccl`` when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``), ``gloo``
otherwise. Gloo listens on ``NODE_ADDR`` when cloudml-os sets it (see :func:`gloo_backend`).
Rank 0 exports TorchScript to ``JOB_DIR/model/model.pt``: ``torch.jit.load`` it and call it on a
float32 tensor of shape [N, 1] to get y of shape [N, 1], without this package. Beside it, ``warmup.json``
holds the instances the model server predicts before it reports ready.

After every epoch each rank saves the model, the optimizer and the epoch to
``JOB_DIR/checkpoints/checkpoint.pt`` (DDP keeps them equal on every rank); a restarted rank that finds one
there loads it and resumes after that epoch instead of starting again.

Besides progress, each training rank prints ``THROUGHPUT samples_per_second=… cpu_cores=… started=…
ended=…`` (its own samples over its own training time, start-up and rendezvous excluded; its CPU-seconds
per second meanwhile; the loop's span in Unix time) and ``PARAMS {"weight": …, "bias": …}`` at full
precision, for the platform's benchmarks and tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

LOG = logging.getLogger("trainer")
TRUE_SLOPE, TRUE_INTERCEPT = 3.0, 2.0
GLOO_ON_NODE_ADDRESS = "gloo_node_addr"
WARMUP_INSTANCES = [[0.0], [1.0]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.task", description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", required=True, help="where outputs go; the model lands in JOB_DIR/model")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=65536, help="the whole data set, split between ranks")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads per process (torch.set_num_threads); 0: PyTorch's default, one per "
                             "core. torchrun sets 1 when several processes share a host; so should you")
    parser.add_argument("--fail-at-step", type=int, default=0,
                        help="raise an exception before this (1-based) step: a failing trainer")
    parser.add_argument("--fail-rank", type=int, default=-1,
                        help="the rank that fails at --fail-at-step (default: the last rank)")
    parser.add_argument("--sleep-before-training", type=float, default=0.0,
                        help="seconds to sleep first: a job still running when cancelled")
    parser.add_argument("--rendezvous-timeout", type=float, default=600.0,
                        help="seconds to wait for every rank, and for each collective")
    parser.add_argument("--note", default=None,
                        help="free text, logged as JSON: shows that arguments arrive literally")
    return parser.parse_args(argv)


def gloo_backend() -> str:
    """The Gloo backend to initialise: plain ``gloo``, or Gloo listening on ``NODE_ADDR``.

    Plain Gloo listens on the address the hostname resolves to, or on ``GLOO_SOCKET_IFNAME``'s
    interface. cloudml-os sets ``NODE_ADDR`` to the address the other nodes know this one by (on
    local nodes one of several loopback addresses sharing the host; on a VM its private address),
    so unless the user named an interface, Gloo's device is created for that address instead.
    """
    address = os.environ.get("NODE_ADDR")
    if not address or os.environ.get("GLOO_SOCKET_IFNAME"):
        return "gloo"

    def create(store, rank, world_size, timeout):
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        return dist.ProcessGroupGloo(store, rank, world_size, options)

    dist.Backend.register_backend(GLOO_ON_NODE_ADDRESS, create, devices=["cpu"])
    return GLOO_ON_NODE_ADDRESS


def make_data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same samples in every process (same seed); each rank trains on its own share."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(samples, 1, generator=generator) * 2.0 - 1.0
    y = TRUE_SLOPE * x + TRUE_INTERCEPT + 0.1 * torch.randn(samples, 1, generator=generator)
    return x, y


def train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> nn.Module:
    """Synchronous SGD on this rank's share; returns the plain (unwrapped) model."""
    x, y = make_data(args.samples, args.seed)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Linear(1, 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    checkpoint = os.path.join(args.job_dir, "checkpoints", "checkpoint.pt")
    done = restore(checkpoint, model, optimizer, device)  # before DDP broadcasts rank 0's parameters
    trained = model
    if world_size > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = nn.MSELoss()
    # Equal shares (drop_last), so every rank takes the same number of steps: DDP needs that.
    sampler = DistributedSampler(range(args.samples), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = max(1, sampler.num_samples // args.batch_size)
    fail_rank = args.fail_rank if args.fail_rank >= 0 else world_size - 1
    LOG.info("training: rank %d of %d on %s, batch %d per rank, %d epochs of %d steps",
             rank, world_size, device, args.batch_size, args.epochs, steps_per_epoch)

    step, samples_seen = done * steps_per_epoch, 0
    started, cpu_started, started_at = time.monotonic(), time.process_time(), time.time()
    for epoch in range(done + 1, args.epochs + 1):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        loss_sum = torch.zeros((), device=device)
        for batch in range(steps_per_epoch):
            step += 1
            if args.fail_at_step and step == args.fail_at_step and rank == fail_rank:
                raise RuntimeError(f"Injected failure at step {step} on rank {rank} (--fail-at-step)")
            indexes = order[batch * args.batch_size:(batch + 1) * args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(trained(x[indexes]), y[indexes])
            loss.backward()  # DDP averages the gradients of every rank here
            optimizer.step()
            loss_sum += loss.detach()
            samples_seen += len(indexes)
        if world_size > 1:
            dist.all_reduce(loss_sum)  # the mean loss over every rank, the same line on each
        save(checkpoint, model, optimizer, epoch)
        LOG.info("epoch %d/%d step %d loss %.6f", epoch, args.epochs, step,
                 loss_sum.item() / (steps_per_epoch * world_size))
    elapsed, cpu_seconds, ended_at = time.monotonic() - started, time.process_time() - cpu_started, time.time()
    print(f"THROUGHPUT samples_per_second={samples_seen / elapsed:.1f} cpu_cores={cpu_seconds / elapsed:.4f} "
          f"started={started_at:.3f} ended={ended_at:.3f}", flush=True)
    return model


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Write the checkpoint to a temporary name and rename it: a restart never reads half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}, path + ".tmp")
    os.replace(path + ".tmp", path)


def restore(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Load the checkpoint at ``path``, if any; the epochs it holds."""
    if not os.path.exists(path):
        return 0
    state = torch.load(path, map_location=device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    LOG.info("resumed from checkpoint %s: %d epoch(s) already done", path, state["epoch"])
    return int(state["epoch"])


def export(model: nn.Module, export_dir: str) -> str:
    """TorchScript on the CPU: loads with ``torch.jit.load`` alone, no Python class needed."""
    os.makedirs(export_dir, exist_ok=True)
    path = os.path.join(export_dir, "model.pt")
    scripted = torch.jit.script(model.to("cpu").eval())
    torch.jit.save(scripted, path)
    with open(os.path.join(export_dir, "warmup.json"), "w") as handle:
        json.dump(WARMUP_INSTANCES, handle)
    LOG.info("exported TorchScript to %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if args.threads:
        torch.set_num_threads(args.threads)
    LOG.info("rank %d of %d, PyTorch %s, device %s, %d intra-op thread(s)", rank, world_size, torch.__version__,
             device, torch.get_num_threads())
    if args.note is not None:
        LOG.info("note: %s", json.dumps(args.note))
    if args.sleep_before_training:
        LOG.info("sleeping %.1f s before training", args.sleep_before_training)
        time.sleep(args.sleep_before_training)

    if world_size > 1:
        if backend == "gloo":
            backend = gloo_backend()
        started = time.monotonic()
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=args.rendezvous_timeout))
        LOG.info("process group ready (%s, master %s:%s) in %.2f s", backend, os.environ.get("MASTER_ADDR"),
                 os.environ.get("MASTER_PORT"), time.monotonic() - started)
    # On an error the exception ends the process as it is: destroying a process group whose collective
    # failed aborts (SIGABRT) instead, and the exit closes the sockets, which is what the peers need.
    model = train(args, rank, world_size, device)
    weight, bias = float(model.weight.item()), float(model.bias.item())
    print("PARAMS " + json.dumps({"weight": weight, "bias": bias}), flush=True)
    LOG.info("y = %.3f x + %.3f (true: %.1f x + %.1f)", weight, bias, TRUE_SLOPE, TRUE_INTERCEPT)
    if rank == 0:
        export(model, os.path.join(args.job_dir, "model"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

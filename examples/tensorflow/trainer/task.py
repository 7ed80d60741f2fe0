"""Linear regression (y = 3x + 2 + noise) trained alone or across a cluster described by ``TF_CONFIG``.

The same trainer runs on Cloud ML Engine and on cloudml-os: ``python -m trainer.task --job-dir DIR``.
What it does depends on the cluster the platform describes in ``TF_CONFIG``:

- no ``TF_CONFIG``, or a master/chief alone: one process, TensorFlow's default strategy;
- a chief and workers, no ``ps``: ``MultiWorkerMirroredStrategy``, every task trains in lock-step;
- a chief, workers and ``ps``: ``ParameterServerStrategy``; the chief coordinates, workers and ps
  serve until the platform stops them;
- the evaluator: nothing to evaluate from, it logs and exits 0.

Every strategy shares one custom training loop (``strategy.run``): Keras 3's ``model.fit`` fails under
MultiWorkerMirroredStrategy on TF 2.21. The chief writes a SavedModel to ``JOB_DIR/model`` whose
``serving_default`` signature takes ``x``, float32 of shape [None, 1], and returns ``y``.

After every epoch a checkpoint (weights, optimizer, epoch) goes to ``JOB_DIR/checkpoints``, and a
restarted trainer that finds one there resumes after its epoch instead of starting again: what
``tf.keras.callbacks.BackupAndRestore`` does for ``model.fit``, done with ``tf.train.CheckpointManager``
for this loop. Under MultiWorkerMirroredStrategy every task saves (saving is collective) but only the
chief into ``JOB_DIR``; the others write scratch copies that are deleted, and all restore from
``JOB_DIR/checkpoints`` (the platform puts the chief's job directory onto every node before a restart).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

LOG = logging.getLogger("trainer")
TRUE_SLOPE, TRUE_INTERCEPT = 3.0, 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.task", description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", required=True, help="where outputs go; the model lands in JOB_DIR/model")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=0,
                        help="default: one pass over the samples at the global batch size")
    parser.add_argument("--batch-size", type=int, default=64, help="per replica")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=4096, help="synthetic samples, when no --train-files")
    parser.add_argument("--train-files", default="",
                        help="CSV files (glob; header 'x,y') to train on, e.g. store://PROJECT/data/train-*.csv, "
                             "which the platform hands over as the path its nodes see it at")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fail-at-step", type=int, default=0,
                        help="raise an exception before this (1-based, global) step: a failing trainer")
    parser.add_argument("--fail-task", default="",
                        help="only the task TYPE:INDEX fails (e.g. worker:1); default every training task")
    parser.add_argument("--sleep-before-training", type=float, default=0.0,
                        help="seconds to sleep first: a job still running when cancelled")
    parser.add_argument("--sleep-after-epoch", type=float, default=0.0,
                        help="seconds to sleep after each epoch: a job still training when a node dies")
    parser.add_argument("--note", default=None,
                        help="free text, logged as JSON: shows that arguments arrive literally")
    return parser.parse_args(argv)


def cluster_config() -> dict:
    """``TF_CONFIG`` with ``master`` (Cloud ML Engine before runtime 2.1) renamed ``chief``, as TF2 requires.

    The rewritten value goes back into the environment, where the strategies read it.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return {}
    config = json.loads(raw)
    cluster = config.get("cluster", {})
    if "master" in cluster:
        cluster["chief"] = cluster.pop("master")
    task = config.get("task", {})
    if task.get("type") == "master":
        task["type"] = "chief"
    os.environ["TF_CONFIG"] = json.dumps(config)
    return config


def make_data(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same samples in every process (same seed), so data sharding splits one data set."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(samples, 1)).astype("float32")
    y = (TRUE_SLOPE * x + TRUE_INTERCEPT + rng.normal(0.0, 0.1, size=(samples, 1))).astype("float32")
    return x, y


def read_csv(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the CSV files matching ``pattern`` (header ``x,y``), in file name order: plain file APIs,
    as on Cloud ML Engine's /gcs/ paths."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"--train-files {pattern!r}: no file matches")
    rows = np.concatenate([np.loadtxt(path, delimiter=",", skiprows=1, dtype="float32", ndmin=2) for path in paths])
    LOG.info("read %d rows from %d file(s) matching %s", len(rows), len(paths), pattern)
    return rows[:, :1], rows[:, 1:2]


def training_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    return read_csv(args.train_files) if args.train_files else make_data(args.samples, args.seed)


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat()
    options = tf.data.Options()
    # In-memory data has no files to shard by; split the elements instead of warning and falling back.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.batch(batch_size, drop_remainder=True).with_options(options)


def build_model() -> tf.keras.Model:
    return tf.keras.Sequential([tf.keras.Input(shape=(1,), dtype="float32"), tf.keras.layers.Dense(1)])


def make_train_step(strategy: tf.distribute.Strategy, model: tf.keras.Model,
                    optimizer: tf.keras.optimizers.Optimizer, global_batch_size: int):
    """One step: every replica computes its share of the mean squared error; gradients are summed."""

    @tf.function
    def train_step(iterator):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                squared_error = tf.reduce_sum(tf.square(model(x, training=True) - y), axis=-1)
                loss = tf.nn.compute_average_loss(squared_error, global_batch_size=global_batch_size)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            return loss

        per_replica_loss = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    return train_step


class EpochCheckpoint:
    """Saves weights, optimizer state and the epoch after each epoch; restores the latest at start.

    :param owner: whether this task writes ``JOB_DIR/checkpoints`` (the chief, or a process alone);
        the others save to a scratch folder, as MultiWorkerMirroredStrategy needs every task to save.
    :param io_device: the device that reads and writes the files. Under ParameterServerStrategy the variables
        live on the ps tasks, which would write their shards themselves, into a folder of the chief's machine
        they cannot see (as on separate VMs): the chief's CPU does all the I/O instead.
    """

    def __init__(self, job_dir: str, owner: bool, io_device: str | None = None, **objects):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(epoch=self.epoch, **objects)
        self.options = tf.train.CheckpointOptions(experimental_io_device=io_device)
        self.shared = os.path.join(job_dir, "checkpoints")
        self.scratch = None if owner else tempfile.mkdtemp(prefix="checkpoints-")
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.scratch or self.shared, max_to_keep=2)

    def restore(self) -> int:
        """Restore the latest checkpoint of ``JOB_DIR/checkpoints``, if any; the epochs it holds."""
        latest = tf.train.latest_checkpoint(self.shared)
        if latest is None:
            return 0
        self.checkpoint.restore(latest, options=self.options)
        LOG.info("resumed from checkpoint %s: %d epoch(s) already done", latest, int(self.epoch.numpy()))
        return int(self.epoch.numpy())

    def save(self, epoch: int) -> None:
        self.epoch.assign(epoch)
        self.manager.save(checkpoint_number=epoch, options=self.options)

    def close(self) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


class Summaries:
    """TensorBoard scalars (``tf.summary``) in ``JOB_DIR/tensorboard``, written by the chief only: the same
    per-epoch values the log lines show, which the platform archives and the dashboard draws.

    ``tf.summary.scalar`` needs the ``tensorboard`` package, which the node runtime does not hold; this is
    what it writes, with TensorFlow's own ``tf.summary.write`` and the scalars plugin's metadata.
    """

    METADATA = tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()

    def __init__(self, job_dir: str, owner: bool):
        self.writer = tf.summary.create_file_writer(os.path.join(job_dir, "tensorboard")) if owner else None

    def scalars(self, step: int, **values: float) -> None:
        if self.writer is None:
            return
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.write(name, tf.constant(value, tf.float32), metadata=self.METADATA)
        self.writer.flush()


class Failer:
    """Raises before the configured step, in the configured task only: the platform's failure tests."""

    def __init__(self, args: argparse.Namespace, task_type: str, task_index: int):
        wanted = args.fail_task.replace("master:", "chief:")
        self.step = args.fail_at_step if not wanted or wanted == f"{task_type}:{task_index}" else 0

    def before(self, step: int) -> None:
        if self.step and step == self.step:
            raise RuntimeError(f"Injected failure at step {step} (--fail-at-step)")


def train_synchronously(args: argparse.Namespace, strategy: tf.distribute.Strategy, strategy_name: str,
                        task_type: str, task_index: int) -> tf.keras.Model:
    """The default strategy or MultiWorkerMirroredStrategy: each task iterates its shard in lock-step."""
    global_batch = args.batch_size * strategy.num_replicas_in_sync
    x, y = training_data(args)
    steps_per_epoch = args.steps_per_epoch or max(1, len(x) // global_batch)
    with strategy.scope():
        model = build_model()
        optimizer = tf.keras.optimizers.SGD(learning_rate=args.learning_rate)
        checkpoint = EpochCheckpoint(args.job_dir, task_type == "chief", model=model, optimizer=optimizer)
    iterator = iter(strategy.experimental_distribute_dataset(make_dataset(x, y, global_batch, args.seed)))
    train_step = make_train_step(strategy, model, optimizer, global_batch)
    failer = Failer(args, task_type, task_index)
    summaries = Summaries(args.job_dir, task_type == "chief")
    done = checkpoint.restore()
    LOG.info("training with %s: %d replica(s), global batch %d, %d epochs of %d steps",
             strategy_name, strategy.num_replicas_in_sync, global_batch, args.epochs, steps_per_epoch)
    step = done * steps_per_epoch
    training_started, cpu_started, started_at = time.monotonic(), time.process_time(), time.time()
    for epoch in range(done + 1, args.epochs + 1):
        total = 0.0
        for _ in range(steps_per_epoch):
            step += 1
            failer.before(step)
            total += float(train_step(iterator))
        checkpoint.save(epoch)
        LOG.info("epoch %d/%d step %d loss %.6f", epoch, args.epochs, step, total / steps_per_epoch)
        summaries.scalars(step, loss=total / steps_per_epoch)
        time.sleep(args.sleep_after_epoch)
    checkpoint.close()
    # For benchmarks: this task's own samples per second of training (start-up and rendezvous excluded), the
    # CPU time the process got per second meanwhile (all its threads), and when (Unix time) the loop ran.
    trained_steps, elapsed = step - done * steps_per_epoch, time.monotonic() - training_started
    LOG.info("THROUGHPUT samples_per_second=%.1f cpu_cores=%.4f started=%.3f ended=%.3f",
             trained_steps * args.batch_size / elapsed, (time.process_time() - cpu_started) / elapsed, started_at,
             time.time())
    return model


def train_with_parameter_servers(args: argparse.Namespace, resolver) -> tf.keras.Model:
    """The chief coordinates: variables live on the ps, steps are scheduled onto the workers."""
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        model = build_model()
        optimizer = tf.keras.optimizers.SGD(learning_rate=args.learning_rate)
        checkpoint = EpochCheckpoint(args.job_dir, True, io_device="/job:chief/replica:0/task:0/device:CPU:0",
                                     model=model, optimizer=optimizer)
    x, y = training_data(args)

    def dataset_fn():
        return make_dataset(x, y, args.batch_size, args.seed)

    iterator = iter(coordinator.create_per_worker_dataset(dataset_fn))
    train_step = make_train_step(strategy, model, optimizer, args.batch_size)
    steps_per_epoch = args.steps_per_epoch or max(1, len(x) // args.batch_size)
    failer = Failer(args, "chief", 0)
    summaries = Summaries(args.job_dir, True)
    done = checkpoint.restore()
    cluster = resolver.cluster_spec().as_dict()
    LOG.info("training with ParameterServerStrategy: %d worker(s), %d ps, batch %d per step, %d epochs of %d steps",
             len(cluster.get("worker", [])), len(cluster.get("ps", [])), args.batch_size, args.epochs,
             steps_per_epoch)
    step = done * steps_per_epoch
    for epoch in range(done + 1, args.epochs + 1):
        losses = []
        for _ in range(steps_per_epoch):
            step += 1
            failer.before(step)
            losses.append(coordinator.schedule(train_step, args=(iterator,)))
        coordinator.join()
        mean_loss = sum(float(loss.fetch()) for loss in losses) / len(losses)
        checkpoint.save(epoch)
        LOG.info("epoch %d/%d step %d loss %.6f", epoch, args.epochs, step, mean_loss)
        summaries.scalars(step, loss=mean_loss)
        time.sleep(args.sleep_after_epoch)
    return model


def serve_forever(resolver) -> None:
    """A ps or a worker under ParameterServerStrategy: run the server the chief drives until stopped."""
    os.environ["GRPC_FAIL_FAST"] = "use_caller"
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol=resolver.rpc_layer or "grpc", start=True)
    LOG.info("%s %d serving at %s until the job ends", resolver.task_type, resolver.task_id, server.target)
    server.join()


class ServingModule(tf.Module):
    """The exported model: one ``serving_default`` signature, ``x`` [None, 1] -> ``y`` [None, 1]."""

    def __init__(self, model: tf.keras.Model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
    def serve(self, x):
        return {"y": self.model(x, training=False)}


def export(model: tf.keras.Model, export_dir: str) -> None:
    """Save a plain copy of the trained weights, made outside any strategy.

    Saving a distributed model is a collective operation every MultiWorkerMirroredStrategy task must
    join (non-chiefs writing to scratch directories); a copy is local, so only the chief saves, and the
    SavedModel holds ordinary variables whatever strategy trained it.
    """
    plain = build_model()
    plain.set_weights([np.asarray(weight) for weight in model.get_weights()])
    module = ServingModule(plain)
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
    LOG.info("exported SavedModel to %s", export_dir)


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)  # TensorFlow's own loggers keep their handlers: no line printed twice
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    args = parse_args(argv)
    tf.keras.utils.set_random_seed(args.seed)  # same initial weights and data order on every run
    config = cluster_config()
    cluster = config.get("cluster", {})
    task = config.get("task", {})
    task_type, task_index = task.get("type") or "chief", int(task.get("index", 0))
    LOG.info("task %s:%d, cluster %s, TensorFlow %s", task_type, task_index,
             {name: len(addresses) for name, addresses in cluster.items()} or "none", tf.__version__)
    if args.note is not None:
        LOG.info("note: %s", json.dumps(args.note))
    if args.sleep_before_training:
        LOG.info("sleeping %.1f s before training", args.sleep_before_training)
        time.sleep(args.sleep_before_training)
    started = time.monotonic()

    if task_type == "evaluator":
        LOG.info("evaluator: the chief exports the model; nothing to evaluate continuously here")
        return 0
    if "ps" in cluster:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        if task_type in ("worker", "ps"):
            serve_forever(resolver)
            return 0
        model = train_with_parameter_servers(args, resolver)
    elif "worker" in cluster:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        model = train_synchronously(args, strategy, "MultiWorkerMirroredStrategy", task_type, task_index)
    else:
        model = train_synchronously(args, tf.distribute.get_strategy(), "the default strategy", task_type,
                                    task_index)

    weights = [float(np.ravel(w)[0]) for w in model.get_weights()]
    LOG.info("trained in %.1f s: y = %.3f x + %.3f (true: %.1f x + %.1f)", time.monotonic() - started,
             weights[0], weights[1], TRUE_SLOPE, TRUE_INTERCEPT)
    # TensorFlow's convention: the chief, or worker 0 of a cluster without one, owns the outputs.
    if task_type == "chief" or (task_type == "worker" and task_index == 0 and "chief" not in cluster):
        export(model, os.path.join(args.job_dir, "model"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

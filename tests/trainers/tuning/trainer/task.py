"""A trainer for the tuning tests and benchmark: its metric is a known function of its hyperparameters.

It reports the metric with the real ``cloudml-hypertune`` package after each of ``--steps`` steps, so the
platform sees intermediate values (early stopping) and a final one. Only the chief reports and exports,
as a Cloud ML Engine trainer would; other roles wait ``--worker_seconds`` (they are stopped with the trial).

objective = 1 - (log10(learning_rate) + 2)^2 / 4 - 0.1 * (layers - 3)^2 + {adam: 0.3, sgd: 0} + batch_size / 640
(the best: learning_rate 0.01, layers 3, adam, the largest batch). ``--optimizer=crash`` exits 3 with a
traceback; ``--objective_is_minus_trial`` makes the objective minus the trial id (the later the worse);
``--report_with_tf_summary`` writes the metric as a TensorFlow summary under ``--job-dir`` instead.
The value at step s is objective - 0.1 * (steps - s): every trial's curve has the same shape.
"""

import argparse
import json
import math
import os
import sys
import time

import hypertune


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--batch_size", type=float, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step_seconds", type=float, default=0.0)
    parser.add_argument("--worker_seconds", type=float, default=0.0)
    parser.add_argument("--metric_tag", default="objective")
    parser.add_argument("--objective_is_minus_trial", action="store_true")
    parser.add_argument("--report_with_tf_summary", action="store_true")
    parser.add_argument("--job-dir", dest="job_dir", required=True)
    args = parser.parse_args()

    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    trial = os.environ.get("CLOUD_ML_TRIAL_ID", "")
    print(f"TRIAL {trial} task {task.get('type')} {task.get('index')} tf_config_trial {task.get('trial')} "
          f"args {' '.join(sys.argv[1:])}", flush=True)
    if task.get("type") not in ("chief", "master", None):
        time.sleep(args.worker_seconds)
        return
    if args.optimizer == "crash":
        raise RuntimeError(f"trial {trial}: optimizer 'crash' crashes, as asked")

    if args.objective_is_minus_trial:
        objective = -float(trial or 0)
    else:
        objective = (1 - (math.log10(args.learning_rate) + 2) ** 2 / 4 - 0.1 * (args.layers - 3) ** 2
                     + (0.3 if args.optimizer == "adam" else 0.0) + args.batch_size / 640)
    if args.report_with_tf_summary:
        # A TF1 simple_value summary event file, written with TensorFlow's own protos and record writer (the
        # runtime has no TensorBoard package, which tf.summary needs).
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2
        from tensorflow.core.util import event_pb2

        folder = os.path.join(args.job_dir, "summaries")
        os.makedirs(folder, exist_ok=True)
        writer = tf.io.TFRecordWriter(os.path.join(folder, f"events.out.tfevents.{int(time.time())}.trainer"))
        writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

        def report(value: float, step: int) -> None:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=args.metric_tag, simple_value=value)])
            writer.write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())
            writer.flush()
    else:
        tuner = hypertune.HyperTune()

        def report(value: float, step: int) -> None:
            tuner.report_hyperparameter_tuning_metric(hyperparameter_metric_tag=args.metric_tag,
                                                      metric_value=value, global_step=step)
    for step in range(1, args.steps + 1):
        time.sleep(args.step_seconds)
        value = objective - 0.1 * (args.steps - step)
        report(value, step)
        print(f"step {step} {args.metric_tag} {value}", flush=True)
    model = os.path.join(args.job_dir, "model")
    os.makedirs(model, exist_ok=True)
    with open(os.path.join(model, "saved_model.pb"), "w") as marker:
        marker.write(json.dumps({"trial": trial, "objective": objective}))


if __name__ == "__main__":
    main()

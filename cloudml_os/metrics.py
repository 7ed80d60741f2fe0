"""A training job's metric curves, for the API (``GET …/jobs/{job}/metrics``) and so for the dashboard.

Two sources, in this order:
- TensorBoard event files. While the trainers run, the training workflow copies every ``*tfevents*`` file
  under each node's job directory to ``JOB_DIR/tensorboard/NODE/…`` in the artifact store, seconds behind
  (:mod:`cloudml_os.workflows.outputs`), so running jobs have live curves; they are read with TensorBoard's
  own reader (``tensorboard`` package, no TensorFlow needed), which drops a torn last record of a file
  still being written: scalars written with ``tf.summary.scalar`` (TF2 tensors) or as TF1
  ``simple_value``\\ s, one curve per node and tag.
- The trainers' log lines, for trainers that write no summaries (the MXNet and PyTorch examples, a trainer
  reporting with cloudml-hypertune only): a JSON line
  ``{"metric": NAME, "value": V, "step": S}`` (the shape cloudml-hypertune reports) or a line with ``step S``
  followed by ``NAME VALUE`` pairs of decimal values, such as the example trainers' ``epoch 2/5 step 128 loss 0.0123``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from cloudml_os.artifacts import ArtifactError, ArtifactStore

Series = dict[str, list[dict[str, float]]]
TRIAL_FOLDER = re.compile(r"trial-\d+")


def tensorboard_uri(job_dir_uri: str) -> str:
    return f"{job_dir_uri.rstrip('/')}/tensorboard"


def tensorboard_scalars(artifacts: ArtifactStore, job_dir_uri: str) -> Series:
    """``{"NODE: TAG": [{"x": step, "y": value}, …]}`` from the job's event files in the store, by step;
    empty when there are none (yet)."""
    try:
        with artifacts.local_tree(tensorboard_uri(job_dir_uri)) as tree:
            return scalars_in(tree)
    except ArtifactError:
        return {}


def scalars_in(tree: Path) -> Series:
    """The scalars of every event file under ``tree``, whose first level is the node's name (two levels,
    ``trial-N/NODE``, for a trial of a hyperparameter tuning job)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    points: dict[str, dict[float, float]] = {}
    for path in sorted(tree.rglob("*tfevents*")):
        parts = path.relative_to(tree).parts
        node = "/".join(parts[:2]) if TRIAL_FOLDER.fullmatch(parts[0]) and len(parts) > 2 else parts[0]
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number = float(value.simple_value)
                elif kind == "tensor" and _is_scalar(value):
                    number = float(tensor_util.make_ndarray(value.tensor).item())
                else:
                    continue
                points.setdefault(f"{node}: {value.tag}", {})[float(event.step)] = number
    return {name: [{"x": step, "y": y} for step, y in sorted(by_step.items())] for name, by_step in points.items()}


def _is_scalar(value) -> bool:
    """One number of the scalars plugin (or of no plugin, as a bare ``tf.summary.write`` leaves it)."""
    from tensorboard.compat.proto import types_pb2

    numbers = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_INT32, types_pb2.DT_INT64)
    return (value.metadata.plugin_data.plugin_name in ("scalars", "") and not value.tensor.tensor_shape.dim
            and value.tensor.dtype in numbers)


def log_series(logs: Mapping[str, str]) -> Series:
    """``{"NODE: NAME": [{"x": step, "y": value}, …]}`` from each node's log text, in log order."""
    series: Series = {}
    for node, text in logs.items():
        for line in text.splitlines():
            for name, step, value in metric_points(line):
                series.setdefault(f"{node}: {name}", []).append({"x": step, "y": value})
    return series


STEP_PATTERN = re.compile(r"\bstep[=: ]+(\d+)\b")
VALUE_PATTERN = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)[=: ]+(-?\d+\.\d+(?:[eE][-+]?\d+)?)\b")


def metric_points(line: str) -> list[tuple[str, float, float]]:
    """The (name, step, value) points one log line reports; none for a line that reports none."""
    line = line.strip()
    if line.startswith("{") and '"metric"' in line:
        try:
            point = json.loads(line)
            return [(str(point["metric"]), float(point.get("step", 0)), float(point["value"]))]
        except (ValueError, KeyError, TypeError, AttributeError):
            return []
    step = STEP_PATTERN.search(line)
    if step is None:
        return []
    return [(name, float(step.group(1)), float(value))
            for name, value in VALUE_PATTERN.findall(line[step.end():])]

"""Batch prediction on a node: one runner that loads the model once and runs shard after shard.

The platform uploads this file beside ``model_server.py`` and starts it once per node with the node's
framework runtime, so a model predicts offline exactly as it does online (same loading, same instance →
tensor → prediction code), and pays for its runtime's start and the model's load once per node::

    python batch_predict.py --framework F --model-dir DIR --inbox DIR

The platform gives the runner a shard by putting an assignment in the inbox, whole or not at all
(``NNNNNNNN.json``; names starting with ``.`` are uploads in progress)::

    {"input": PATH, "inputName": URI, "start": B, "end": E | null, "dataFormat": …, "outputFormat": …,
     "batchSize": N, "out": DIR}

The runner takes assignments in name order. Taking one moves it to ``DIR/assignment.json`` first, so a runner
started after this one died never takes it again. A shard is the records of ``PATH`` whose first byte lies in
``[B, E)`` (text formats split at any byte: a line belongs to the shard its first byte is in), or the whole
file. Records:

- JSON (and TEXT, its old name): one instance per line, as an item of an online request's ``instances``.
- CSV: one instance per line, the list of its comma-separated numbers.
- TF_RECORD, TF_RECORD_GZIP: one instance per record, as JSON text.

Blank lines are not records. A record that cannot be read or that the model refuses is written to
``DIR/errors`` (``{"inputPath", "byteOffset" | "recordIndex", "line", "error"}``) and counted; it never stops
the shard. Results go to ``DIR/results``: JSON lines ``{"instance": …, "prediction": …}`` where ``prediction``
is the instance's entry of the online API's ``predictions``, or CSV rows of the prediction's numbers (several
outputs in their names' order). Both are written under a temporary name and renamed when the shard is done;
``DIR/progress.json`` (``{"total", "done", "errors"}``) is replaced about once a second. Last comes
``DIR/status.json``: ``{"ok": true}``, or ``{"ok": false, "error": …}`` when the input could not be read (the
runner goes on with the next assignment). Exit status 1: the model did not load; otherwise the runner runs
until it is stopped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import json
import logging
import os
import struct
import sys
import time

import model_server  # beside this file on the node

LOG = logging.getLogger("batch_predict")
MAX_ERROR_LINE = 1000  # characters of a bad record kept in the errors file
TEXT_FORMATS = ("JSON", "TEXT", "CSV")
# One encoder for every line: json.dumps with options builds a new one per call.
ENCODER = json.JSONEncoder(separators=(",", ":"), default=model_server.json_default)


class BadRecord(Exception):
    """A record that is not an instance (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One shard to run, as the platform wrote it (see the module's docstring)."""

    input: str
    input_name: str
    start: int
    end: int | None
    data_format: str
    output_format: str
    batch_size: int
    out: str

    @classmethod
    def from_json(cls, data: bytes) -> Assignment:
        """:raises ValueError: not an assignment."""
        item = json.loads(data)
        work = cls(input=item["input"], input_name=item["inputName"], start=int(item.get("start") or 0),
                   end=None if item.get("end") is None else int(item["end"]),
                   data_format=str(item["dataFormat"]).upper(), output_format=str(item["outputFormat"]).upper(),
                   batch_size=int(item["batchSize"]), out=item["out"])
        if work.data_format not in (*TEXT_FORMATS, "TF_RECORD", "TF_RECORD_GZIP") or \
                work.output_format not in ("JSON", "CSV") or work.batch_size < 1 or \
                not os.path.isabs(work.out):
            raise ValueError(f"not a valid assignment: {item}")
        return work

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)


# -- reading records -----------------------------------------------------------------------------------

def text_records(path: str, start: int, end: int | None):
    """(byte offset, line) of every non-blank line whose first byte is in ``[start, end)``."""
    with open(path, "rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the rest of a line that began before the shard (or just its newline)
        position = handle.tell()
        for line in handle:
            if end is not None and position >= end:
                return
            if line.strip():
                yield position, line
            position += len(line)


def tf_records(path: str, compressed: bool):
    """(record index, record bytes) of a TFRecord file: length (uint64 LE), its CRC, the data, its CRC.

    The CRCs are not checked (a damaged record fails as JSON instead); a file cut in the middle of a record
    raises :class:`ValueError`.
    """
    opener = gzip.open if compressed else open
    with opener(path, "rb") as handle:
        index = 0
        while True:
            header = handle.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"record {index}: the file ends inside its header")
            (length,) = struct.unpack("<Q", header[:8])
            data = handle.read(length)
            if len(data) < length or len(handle.read(4)) < 4:
                raise ValueError(f"record {index}: the file ends inside its data")
            yield index, data
            index += 1


def records(work: Assignment):
    if work.data_format in TEXT_FORMATS:
        return text_records(work.input, work.start, work.end)
    return tf_records(work.input, work.data_format == "TF_RECORD_GZIP")


def instance_of(data_format: str, raw: bytes):
    """The instance a record holds. :raises BadRecord: it holds none."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadRecord(f"not UTF-8: {error}") from None
    if data_format == "CSV":
        try:
            return [float(value) for value in next(csv.reader([text]))]
        except ValueError as error:
            raise BadRecord(f"not a row of numbers: {error}") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise BadRecord(f"not JSON: {error}") from None


# -- predicting ----------------------------------------------------------------------------------------

def predict(model, instances: list) -> list:
    """The online API's ``predictions`` for ``instances``. :raises model_server.RequestError: refused."""
    outputs = model.predict(model_server.instances_to_inputs(instances, model.inputs))
    return model_server.outputs_to_predictions(outputs, len(instances))


class Shard:
    """The shard's output files and counts."""

    def __init__(self, work: Assignment, total: int):
        self.work, self.total = work, total
        self.done = self.predictions = self.errors = 0
        self._results = open(work.path("results.partial"), "w", encoding="utf-8", newline="")
        self._errors = open(work.path("errors.partial"), "w", encoding="utf-8")
        self._csv = csv.writer(self._results, lineterminator="\n")
        self._reported = 0.0
        self.report(force=True)

    def result(self, instance, prediction) -> None:
        if self.work.output_format == "CSV":
            self._csv.writerow(flatten(prediction))
        else:
            self._results.write(ENCODER.encode({"instance": instance, "prediction": prediction}) + "\n")
        self.predictions += 1
        self.done += 1

    def error(self, position: int, raw: bytes, message: str) -> None:
        where = "byteOffset" if self.work.data_format in TEXT_FORMATS else "recordIndex"
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        self._errors.write(json.dumps({"inputPath": self.work.input_name, where: position,
                                       "line": line[:MAX_ERROR_LINE], "error": message}) + "\n")
        self.errors += 1
        self.done += 1

    def report(self, force: bool = False) -> None:
        """Replace the progress file (at most once a second unless forced)."""
        now = time.monotonic()
        if not force and now - self._reported < 1.0:
            return
        self._reported = now
        write_json(self.work.path("progress.json"), {"total": self.total, "done": self.done, "errors": self.errors})

    def close(self) -> None:
        for handle in (self._results, self._errors):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        os.replace(self.work.path("results.partial"), self.work.path("results"))
        os.replace(self.work.path("errors.partial"), self.work.path("errors"))
        self.report(force=True)


def write_json(path: str, value) -> None:
    """Replace ``path`` with ``value`` as JSON, whole or not at all."""
    temporary = path + ".partial"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
    os.replace(temporary, path)


def flatten(value) -> list:
    if isinstance(value, dict):
        return [item for name in sorted(value) for item in flatten(value[name])]
    if isinstance(value, list):
        return [item for entry in value for item in flatten(entry)]
    return [value]


def run_batch(model, shard: Shard, batch: list[tuple[int, bytes, object]]) -> None:
    """Predict a batch; if the model refuses it, each instance alone, so one bad record costs only itself."""
    if not batch:
        return
    try:
        predictions = predict(model, [instance for _, _, instance in batch])
    except model_server.RequestError as error:
        if len(batch) == 1:
            position, raw, _ = batch[0]
            shard.error(position, raw, error.message)
            return
        for item in batch:
            run_batch(model, shard, [item])
        return
    for (_, _, instance), prediction in zip(batch, predictions, strict=True):
        shard.result(instance, prediction)


def run_shard(model, work: Assignment) -> None:
    """Predict every record of one shard into its files. :raises OSError, ValueError: the input is unreadable."""
    started = time.monotonic()
    total = sum(1 for _ in records(work))
    LOG.info("%s [%d, %s): %d records", work.input_name, work.start, "end" if work.end is None else work.end, total)
    shard = Shard(work, total)
    batch: list[tuple[int, bytes, object]] = []
    for position, raw in records(work):
        try:
            batch.append((position, raw, instance_of(work.data_format, raw)))
        except BadRecord as error:
            shard.error(position, raw, str(error))
        if len(batch) >= work.batch_size:
            run_batch(model, shard, batch)
            batch = []
            shard.report()
    run_batch(model, shard, batch)
    shard.close()
    LOG.info("%s done: %d predictions, %d errors in %.2f s", work.input_name, shard.predictions, shard.errors,
             time.monotonic() - started)


def take_next(inbox: str) -> Assignment | None:
    """The inbox's first assignment, moved to its shard's folder; None when the inbox is empty.

    An assignment that cannot be read is set aside as ``NAME.invalid`` (the platform wrote it; it never is).
    """
    names = sorted(name for name in os.listdir(inbox) if name.endswith(".json") and not name.startswith("."))
    for name in names:
        path = os.path.join(inbox, name)
        try:
            with open(path, "rb") as handle:
                work = Assignment.from_json(handle.read())
        except (OSError, ValueError, KeyError, TypeError) as error:
            LOG.error("assignment %s set aside: %s", name, error)
            os.replace(path, path + ".invalid")
            continue
        os.makedirs(work.out, exist_ok=True)
        os.replace(path, work.path("assignment.json"))
        return work
    return None


def serve(model, inbox: str, poll_interval: float = 0.05, stop=lambda: False) -> None:
    """Run the inbox's shards one after the other, forever (or until ``stop()``)."""
    while not stop():
        work = take_next(inbox)
        if work is None:
            time.sleep(poll_interval)
            continue
        try:
            run_shard(model, work)
        except (OSError, ValueError) as error:
            LOG.error("cannot read %s: %s", work.input_name, error)
            write_json(work.path("status.json"), {"ok": False, "error": f"cannot read {work.input_name}: {error}"})
            continue
        write_json(work.path("status.json"), {"ok": True})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batch_predict.py", description=__doc__.splitlines()[0])
    parser.add_argument("--framework", required=True, type=str.upper, choices=sorted(model_server.FRAMEWORKS))
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--inbox", required=True, help="the folder the platform puts assignments in")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s batch_predict %(levelname)s %(message)s")
    started = time.monotonic()
    try:
        model = model_server.FRAMEWORKS[args.framework](args.model_dir)
    except Exception as error:  # noqa: BLE001 - any failure to load is the run's end, said in the log
        LOG.error("the %s model in %s did not load: %s: %s", args.framework, args.model_dir,
                  type(error).__name__, model_server.framework_message(error))
        return 1
    LOG.info("loaded the %s model in %.2f s; waiting for shards in %s", args.framework,
             time.monotonic() - started, args.inbox)
    os.makedirs(args.inbox, exist_ok=True)
    serve(model, args.inbox)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch prediction over one shard of input on a node: the model server's loader and conversions, no server.

The platform uploads this file beside ``model_server.py`` and runs it with the node's framework runtime, so a
model predicts offline exactly as it does online (same loading, same instance → tensor → prediction code)::

    python batch_predict.py --framework F --model-dir DIR --input PATH [--start B --end E] --input-name URI \\
        --data-format JSON|TEXT|CSV|TF_RECORD|TF_RECORD_GZIP --output-format JSON|CSV --batch-size N \\
        --results FILE --errors FILE --progress FILE

A shard is the records of ``PATH`` whose first byte lies in ``[B, E)`` (text formats split at any byte: a
line belongs to the shard its first byte is in), or the whole file. Records:

- JSON (and TEXT, its old name): one instance per line, as an item of an online request's ``instances``.
- CSV: one instance per line, the list of its comma-separated numbers.
- TF_RECORD, TF_RECORD_GZIP: one instance per record, as JSON text.

Blank lines are not records. A record that cannot be read or that the model refuses is written to the errors
file (``{"inputPath", "byteOffset" | "recordIndex", "line", "error"}``) and counted; it never stops the run.
Results are JSON lines ``{"instance": …, "prediction": …}`` where ``prediction`` is the instance's entry of
the online API's ``predictions``, or CSV rows of the prediction's numbers (several outputs in their names'
order). Both files are written under a temporary name and renamed when the shard is done; the progress file
(``{"total", "done", "errors"}``) is replaced about once a second. Exit status 0: the shard is done; 1: it
could not be done (the model did not load, the input could not be opened).
"""

from __future__ import annotations

import argparse
import csv
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


# -- reading records -----------------------------------------------------------------------------------

def text_records(path: str, start: int, end: int | None):
    """(byte offset, line) of every non-blank line whose first byte is in ``[start, end)``."""
    with open(path, "rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the rest of a line that began before the shard (or just its newline)
        position = handle.tell()
        while end is None or position < end:
            line = handle.readline()
            if not line:
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


def records(args: argparse.Namespace):
    if args.data_format in TEXT_FORMATS:
        return text_records(args.input, args.start, args.end)
    return tf_records(args.input, args.data_format == "TF_RECORD_GZIP")


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

    def __init__(self, args: argparse.Namespace, total: int):
        self.args, self.total = args, total
        self.done = self.predictions = self.errors = 0
        self._results = open(args.results + ".partial", "w", encoding="utf-8", newline="")
        self._errors = open(args.errors + ".partial", "w", encoding="utf-8")
        self._csv = csv.writer(self._results, lineterminator="\n")
        self._reported = 0.0
        self.report(force=True)

    def result(self, instance, prediction) -> None:
        if self.args.output_format == "CSV":
            self._csv.writerow(flatten(prediction))
        else:
            self._results.write(ENCODER.encode({"instance": instance, "prediction": prediction}) + "\n")
        self.predictions += 1
        self.done += 1

    def error(self, position: int, raw: bytes, message: str) -> None:
        where = "byteOffset" if self.args.data_format in TEXT_FORMATS else "recordIndex"
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        self._errors.write(json.dumps({"inputPath": self.args.input_name, where: position,
                                       "line": line[:MAX_ERROR_LINE], "error": message}) + "\n")
        self.errors += 1
        self.done += 1

    def report(self, force: bool = False) -> None:
        """Replace the progress file (at most once a second unless forced)."""
        now = time.monotonic()
        if not force and now - self._reported < 1.0:
            return
        self._reported = now
        temporary = self.args.progress + ".partial"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"total": self.total, "done": self.done, "errors": self.errors}, handle)
        os.replace(temporary, self.args.progress)

    def close(self) -> None:
        for handle in (self._results, self._errors):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        os.replace(self.args.results + ".partial", self.args.results)
        os.replace(self.args.errors + ".partial", self.args.errors)
        self.report(force=True)


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batch_predict.py", description=__doc__.splitlines()[0])
    parser.add_argument("--framework", required=True, type=str.upper, choices=sorted(model_server.FRAMEWORKS))
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--input", required=True, help="the input file, as the node sees it")
    parser.add_argument("--input-name", required=True, help="the input's store:// URI, for the errors file")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=None, help="default: the end of the file")
    parser.add_argument("--data-format", required=True, type=str.upper,
                        choices=[*TEXT_FORMATS, "TF_RECORD", "TF_RECORD_GZIP"])
    parser.add_argument("--output-format", default="JSON", type=str.upper, choices=["JSON", "CSV"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--results", required=True)
    parser.add_argument("--errors", required=True)
    parser.add_argument("--progress", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s batch_predict %(levelname)s %(message)s")
    started = time.monotonic()
    try:
        total = sum(1 for _ in records(args))
    except (OSError, ValueError) as error:
        LOG.error("cannot read %s: %s", args.input_name, error)
        return 1
    LOG.info("%s [%d, %s): %d records", args.input_name, args.start, "end" if args.end is None else args.end, total)
    try:
        model = model_server.FRAMEWORKS[args.framework](args.model_dir)
    except Exception as error:  # noqa: BLE001 - any failure to load is the run's end, said in the log
        LOG.error("the %s model in %s did not load: %s: %s", args.framework, args.model_dir,
                  type(error).__name__, model_server.framework_message(error))
        return 1
    LOG.info("loaded the %s model in %.2f s", args.framework, time.monotonic() - started)
    shard = Shard(args, total)
    batch: list[tuple[int, bytes, object]] = []
    for position, raw in records(args):
        try:
            batch.append((position, raw, instance_of(args.data_format, raw)))
        except BadRecord as error:
            shard.error(position, raw, str(error))
        if len(batch) >= args.batch_size:
            run_batch(model, shard, batch)
            batch = []
        shard.report()
    run_batch(model, shard, batch)
    shard.close()
    LOG.info("done: %d predictions, %d errors in %.2f s", shard.predictions, shard.errors,
             time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())

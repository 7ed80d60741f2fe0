"""What every framework's trainer shares: the arguments, the files a pattern matches, the CSV rows, the report.

The data set is CSV files with a header ``x,y``; the trainers fit ``y = slope * x + intercept`` and log
``FILES [...]``, ``ROWS N`` and ``PARAMS {"slope": …, "intercept": …}`` for the tests to read.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-files", nargs="+", required=True, help="files or glob patterns")
    parser.add_argument("--job-dir", required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=0.3)
    return parser.parse_args(argv)


def matching_files(patterns: list[str]) -> list[str]:
    """Every file the patterns match, with Python's own glob, in name order."""
    files = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"no file matches {patterns}")
    return files


def read_rows(files: list[str]) -> list[tuple[float, float]]:
    rows = []
    for path in files:
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            next(reader)  # the header
            rows.extend((float(x), float(y)) for x, y in reader)
    return rows


def report(files: list[str], rows: int, slope: float, intercept: float) -> None:
    print("FILES " + json.dumps(files), flush=True)
    print(f"ROWS {rows}", flush=True)
    print("PARAMS " + json.dumps({"slope": round(slope, 4), "intercept": round(intercept, 4)}), flush=True)

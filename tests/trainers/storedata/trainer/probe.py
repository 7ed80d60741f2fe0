"""Tries, in order, to read, list, write and remove the paths it is given; logs what each attempt got.

Each line is ``ALLOWED ACTION PATH``, ``DENIED ACTION PATH: ERRNO_NAME`` or ``LISTED PATH: [names]``. A write
appends one byte and a removal unlinks, so an attempt that is let through changes what it touched. The
process then fails with the first OS error it got (exit 0 only when nothing was denied).
"""

from __future__ import annotations

import argparse
import errno
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    for action in ("read", "list", "write", "remove"):
        parser.add_argument(f"--{action}", action="append", default=[])
    parser.add_argument("--job-dir")
    args = parser.parse_args()
    attempts = {
        "read": lambda path: open(path, "rb").read(64),
        "list": lambda path: print(f"LISTED {path}: {json.dumps(sorted(os.listdir(path)))}", flush=True),
        "write": lambda path: open(path, "ab").write(b"!"),
        "remove": os.unlink,
    }
    first_error = None
    for action, attempt in attempts.items():
        for path in getattr(args, action):
            try:
                attempt(path)
            except OSError as exc:
                print(f"DENIED {action} {path}: {errno.errorcode.get(exc.errno, exc.errno)}", flush=True)
                first_error = first_error or exc
            else:
                print(f"ALLOWED {action} {path}", flush=True)
    if first_error is not None:
        raise first_error


if __name__ == "__main__":
    main()

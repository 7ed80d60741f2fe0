"""Moving bytes through the objects API against moving the same bytes without it.

A real platform (API under gunicorn, local store, embedded SQLite) and, beside it, a plain HTTP server (the
standard library's ``ThreadingHTTPServer``: PUT streams the body to a file, GET streams a file back, both in
1 MiB pieces, no checks) writing to the same disk. Per round, in an order that flips every round:

- upload: ``PUT …/objects/NAME`` (with ``Content-MD5``, which the API verifies) vs. PUT to the plain server,
  without and with the same MD5 check (``plain+md5``), all sent by ``curl -T`` from the same file, and ``cp``
  of the file (the local store's floor: one copy on the same disk);
- download: ``GET …/objects/NAME`` vs. GET from the plain server, by ``curl`` to ``/dev/null``.

The client is curl, not Python: a ``requests`` client writing to a file spent about as much CPU as the
servers on these two cores and set the pace (and the noise) of both sides.

Reported: each side's median MB/s, and the ratio API / plain of each round, median and range over the rounds
(target ≥ 0.8), and API / cp. Noise-free beside them: the API process's CPU seconds per GiB moved
(``/proc/PID/stat`` of its gunicorn worker), which other load hardly changes.

    .venv/bin/python -m bench.objects [--mib 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.server
import multiprocessing
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness import start_platform

MiB = 1 << 20
TARGET = 0.8


class _PlainHandler(http.server.BaseHTTPRequestHandler):
    """PUT writes the body to ROOT/NAME (checking its MD5 when a ``Content-MD5`` came with it, as the API does:
    the fair floor of a verified upload); GET streams it back. Nothing else: the baseline."""

    protocol_version = "HTTP/1.1"
    root: Path

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        left = int(self.headers["Content-Length"])
        md5 = hashlib.md5() if "Content-MD5" in self.headers else None
        with (self.root / Path(self.path).name).open("wb") as out:
            while left:
                chunk = self.rfile.read(min(MiB, left))
                left -= len(chunk)
                if md5 is not None:
                    md5.update(chunk)
                out.write(chunk)
        good = md5 is None or base64.b64encode(md5.digest()).decode() == self.headers["Content-MD5"]
        self.send_response(200 if good else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        path = self.root / Path(self.path).name
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as data:
            while chunk := data.read(MiB):
                self.wfile.write(chunk)

    def log_message(self, *args: object) -> None:
        pass


def _serve_plain(root: Path, ready: multiprocessing.connection.Connection) -> None:
    """The plain server, in a process of its own as the API is (not sharing the client's GIL)."""
    _PlainHandler.root = root
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PlainHandler)
    ready.send(server.server_address[1])
    server.serve_forever()


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.mib * MiB

    with tempfile.TemporaryDirectory(prefix="bench-objects-", dir=Path.home()) as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        md5 = hashlib.md5()
        with source.open("wb") as out:
            for _ in range(args.mib):
                block = os.urandom(MiB)
                md5.update(block)
                out.write(block)
        content_md5 = base64.b64encode(md5.digest()).decode()
        (work / "plain").mkdir()
        receive, send = multiprocessing.Pipe(duplex=False)
        plain = multiprocessing.Process(target=_serve_plain, args=(work / "plain", send), daemon=True)
        plain.start()
        plain_url = f"http://127.0.0.1:{receive.recv()}/object"

        with start_platform(work / "platform") as platform:
            client = platform.client("bench")
            api = platform.processes["api"].pid
            workers = [int(p) for p in Path(f"/proc/{api}/task/{api}/children").read_text().split()] or [api]
            headers = {"Authorization": f"Bearer {client.token}"}
            object_url = f"{client.base_url}/v1/projects/bench/objects/data/source.bin"

            def curl(url: str, extra: dict[str, str], *args: str) -> None:
                flags = [item for name, value in extra.items() for item in ("-H", f"{name}: {value}")]
                subprocess.run(["curl", "-sSf", "-o", "/dev/null", *flags, *args, url], check=True)

            def put(url: str, extra: dict[str, str]) -> None:
                curl(url, extra, "-T", str(source))

            def get(url: str, extra: dict[str, str]) -> None:
                curl(url, extra)

            sides: dict[str, Callable[[], None]] = {
                "upload api": lambda: put(object_url, {**headers, "Content-MD5": content_md5}),
                "upload plain": lambda: put(plain_url, {}),
                "upload plain+md5": lambda: put(plain_url, {"Content-MD5": content_md5}),
                "upload cp": lambda: subprocess.run(["cp", str(source), str(work / "copy.bin")], check=True),
                "download api": lambda: get(object_url, headers),
                "download plain": lambda: get(plain_url, {}),
            }
            seconds: dict[str, list[float]] = {name: [] for name in sides}
            api_cpu = {"upload api": 0.0, "download api": 0.0}
            for round_ in range(args.rounds):
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for name in order:
                    before = _cpu_seconds(workers)
                    seconds[name].append(_timed(sides[name]))
                    if name in api_cpu:
                        api_cpu[name] += _cpu_seconds(workers) - before
                    for leftover in ("copy.bin",):
                        (work / leftover).unlink(missing_ok=True)
            stored = platform.data_dir / "artifacts" / "bench" / "data" / "source.bin"
            assert hashlib.md5(stored.read_bytes()).digest() == md5.digest()
        plain.terminate()
        shutil.rmtree(work / "plain", ignore_errors=True)

    print(f"{args.mib} MiB per transfer, {args.rounds} rounds, order flipped every round")
    for name, values in seconds.items():
        print(f"  {name:16s} median {size / statistics.median(values) / 1e6:7.1f} MB/s "
              f"(min {size / max(values) / 1e6:.1f}, max {size / min(values) / 1e6:.1f})")
    for kind in ("upload", "download"):
        for other in ("plain", "plain+md5", "cp") if kind == "upload" else ("plain",):
            ratios = [b / a for a, b in zip(seconds[f"{kind} api"], seconds[f"{kind} {other}"], strict=True)]
            print(f"  {kind} api / {other:9s} throughput ratio: median {statistics.median(ratios):.2f} "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f}; target >= {TARGET})")
        print(f"  {kind} api: {api_cpu[f'{kind} api'] / args.rounds / (size / (1 << 30)):.2f} CPU s per GiB "
              "in the API process")


if __name__ == "__main__":
    main()

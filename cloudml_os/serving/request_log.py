"""Online prediction request logging (v1 ``requestLoggingConfig``): sampled requests and their answers, as
JSON lines in the project's store, through a spool on the API host's disk.

An API process appends each sampled record to its own open spool segment with one ``write`` before the
answer goes out, so the record of an answered request survives the process being killed; it never waits on
the store. A shipper thread in every API process sends closed segments, and the open ones of processes that
died, to the store: one object per (project, model, version, hour) of a segment, named after the segment,
then removes the segment. A segment shipped again after a crash writes the same objects with the same bytes,
so each record is in the store exactly once. Segments are locked (``flock``) by their writer while open and
by their shipper while shipped, so two processes never ship one segment at once. A spool past its size cap
drops records and counts them (said as a version event by the shipper) rather than filling the disk.

Objects: ``store://PROJECT/request-logs/MODEL/VERSION/YYYY/MM/DD/HH/SEGMENT.jsonl``, one line per request
with the columns of v1's BigQuery request log table (``model``, ``model_version``, ``time``, ``raw_data``,
``raw_prediction``, ``groundtruth``) and the ``request_id`` the answer carried.
"""

from __future__ import annotations

import collections
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

OPEN, CLOSED = ".open", ".jsonl"
PREFIX = "request-logs"


def object_key(model: str, version: str, hour: str, segment: str) -> str:
    """The store key of one segment's records of a version in one hour (``hour``: ``YYYY/MM/DD/HH``)."""
    return f"{PREFIX}/{model}/{version}/{hour}/{segment}.jsonl"


class RequestLog:
    """The spool of one API process and its shipper.

    :param spool: the folder of segments (shared by the host's API processes).
    :param put_object: ``(project, key, bytes)`` writes one object to the store.
    :param on_dropped: ``(project, model, version, count)``: records dropped since the last call (a full spool).
    """

    def __init__(self, spool: Path, put_object: Callable[[str, str, bytes], None], *, max_bytes: int,
                 segment_seconds: float = 2.0, segment_bytes: int = 8 << 20,
                 on_dropped: Callable[[str, str, str, int], None] = lambda *args: None):
        self.spool, self._put, self._on_dropped = spool, put_object, on_dropped
        self.max_bytes, self.segment_seconds, self.segment_bytes = max_bytes, segment_seconds, segment_bytes
        self._lock = threading.Lock()
        self._pid = 0  # the process this object last wrote or shipped from (a forked child starts afresh)
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened_at = self._size = self._sequence = 0
        self._spool_bytes, self._measured_at = 0, 0.0
        self._dropped: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the request path ----

    def record(self, project: str, model: str, version: str, request_id: str, raw_data: bytes,
               raw_prediction: bytes) -> bool:
        """Append one answered request to the spool (one write); False when the spool is full (counted)."""
        line = json.dumps({"model": model, "model_version": version,
                           "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                           "request_id": request_id, "raw_data": raw_data.decode("utf-8", "replace"),
                           "raw_prediction": raw_prediction.decode("utf-8", "replace"), "groundtruth": None,
                           "project": project}, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            self._ensure_process()
            if self._full(len(line)):
                self._dropped[project, model, version] += 1
                return False
            if self._fd is None or self._size >= self.segment_bytes:
                self._rotate()
                self._open()
            os.write(self._fd, line)
            self._size += len(line)
            self._spool_bytes += len(line)
        return True

    def _full(self, adding: int) -> bool:
        now = time.monotonic()
        if now - self._measured_at > 1.0:  # the other processes' segments count too: measured once a second
            self._spool_bytes = sum(entry.stat().st_size for entry in os.scandir(self.spool)
                                    if entry.name.endswith((OPEN, CLOSED)))
            self._measured_at = now
        return self._spool_bytes + adding > self.max_bytes

    def _open(self) -> None:
        self._sequence += 1
        name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}-{self._sequence:06d}"
        self._path = self.spool / (name + OPEN)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # ours while open: no shipper takes it
        self._opened_at, self._size = time.monotonic(), 0

    def _rotate(self) -> None:
        """Close the open segment (renamed, then unlocked): the shipper's to send."""
        if self._fd is None:
            return
        os.rename(self._path, self._path.with_suffix(CLOSED))
        os.close(self._fd)
        self._fd = self._path = None

    def _ensure_process(self) -> None:
        """In a process forked after this object was made (gunicorn's worker), forget the parent's segment
        (its lock is the parent's) and start this process's shipper."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._fd = self._path = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ship_forever, name="request-log-shipper", daemon=True)
        self._thread.start()

    def start(self) -> None:
        """Start this process's shipper (at most once per process; cheap on every request after the first)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            self._ensure_process()

    def close(self) -> None:
        """Close the open segment, stop the shipper after one last pass."""
        with self._lock:
            self._rotate()
        self._stop.set()
        if self._thread is not None and self._thread.ident != threading.get_ident():
            self._thread.join(timeout=30)

    # ---- the shipper ----

    def _ship_forever(self) -> None:
        while True:
            stopping = self._stop.wait(min(1.0, self.segment_seconds / 2))
            try:
                with self._lock:
                    if self._fd is not None and time.monotonic() - self._opened_at >= self.segment_seconds:
                        self._rotate()
                    dropped, self._dropped = self._dropped, collections.Counter()
                for (project, model, version), count in dropped.items():
                    self._on_dropped(project, model, version, count)
                self.ship()
            except Exception:  # the store may be down: the segments wait in the spool for the next pass
                log.exception("request log: shipping failed; retrying")
            if stopping:
                return

    def ship(self) -> int:
        """Send every closed segment, and the open ones no live process holds, to the store; the count sent."""
        shipped = 0
        for entry in sorted(os.scandir(self.spool), key=lambda e: e.name):
            if not entry.name.endswith((OPEN, CLOSED)):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # shipped meanwhile by another process
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer's open segment, or another shipper's
                if not os.path.exists(entry.path):
                    continue  # shipped and removed while we waited for the lock
                with os.fdopen(os.dup(fd), "rb") as source:
                    self._send(entry.name.rsplit(".", 1)[0], source.read())
                os.unlink(entry.path)
                shipped += 1
            finally:
                os.close(fd)
        return shipped

    def _send(self, segment: str, data: bytes) -> None:
        """One object per (project, model, version, hour) of the segment's whole lines, in their order."""
        groups: dict[tuple[str, str, str, str], list[bytes]] = collections.defaultdict(list)
        for line in data.split(b"\n"):
            if not line:
                continue
            try:
                item = json.loads(line)
                key = (item.pop("project"), item["model"], item["model_version"],
                       item["time"][:13].replace("-", "/").replace("T", "/"))
            except (ValueError, KeyError, TypeError):
                log.warning("request log: a damaged line of segment %s skipped", segment)
                continue
            groups[key].append(json.dumps(item, separators=(",", ":")).encode())
        for (project, model, version, hour), lines in groups.items():
            self._put(project, object_key(model, version, hour, segment), b"\n".join(lines) + b"\n")

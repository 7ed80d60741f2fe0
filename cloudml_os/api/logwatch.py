"""One watcher per API process for every ``follow=true`` log stream.

A follower that found nothing new waits here instead of polling the database itself: every ``interval`` the
watcher reads, in one query, a mark of each followed job (its state and its newest log chunk) and wakes the
followers of the jobs whose mark changed. Five hundred idle follows then cost one query per interval, not a
thousand, and a waiting follower holds no database connection — only its (cheap, idle) thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Hashable, Iterator

from cloudml_os.store import Store

log = logging.getLogger(__name__)


class LogWatch:
    def __init__(self, store: Store, interval: float):
        self.store, self.interval = store, interval
        self._followers: collections.Counter[int] = collections.Counter()
        self._marks: dict[int, Hashable] = {}
        self._changed = threading.Condition()
        self._pid: int | None = None  # the process whose watcher thread runs (gunicorn forks after create_app)

    @contextlib.contextmanager
    def following(self, job_pk: int) -> Iterator[None]:
        """Watch ``job_pk`` while the block runs."""
        self._ensure_thread()
        with self._changed:
            self._followers[job_pk] += 1
        try:
            yield
        finally:
            with self._changed:
                self._followers[job_pk] -= 1
                if not self._followers[job_pk]:
                    del self._followers[job_pk]
                    self._marks.pop(job_pk, None)

    def mark(self, job_pk: int) -> Hashable:
        """The job's current mark (None before the watcher first looked); take it before reading the log."""
        with self._changed:
            return self._marks.get(job_pk)

    def wait(self, job_pk: int, mark: Hashable, timeout: float) -> None:
        """Return when the job's mark is no longer ``mark``, or after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._marks.get(job_pk) != mark, timeout)

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._changed:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="log-watch", daemon=True).start()

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.interval):
            with self._changed:
                jobs = list(self._followers)
            if not jobs:
                continue
            try:
                marks = self.store.log_marks(jobs)
            except Exception:
                log.exception("reading the marks of %d followed job(s) failed", len(jobs))
                continue
            with self._changed:
                changed = False
                for job_pk in jobs:
                    if job_pk in self._followers and self._marks.get(job_pk) != marks.get(job_pk, "gone"):
                        self._marks[job_pk] = marks.get(job_pk, "gone")
                        changed = True
                if changed:
                    self._changed.notify_all()

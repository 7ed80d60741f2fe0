"""Following a job's logs until it ends, every node at once, as ``gcloud ai-platform jobs stream-logs`` does.

The API streams one node per request (``follow=true``); a job has many nodes, and a tuning job gains
new ones (``trial-N/chief-0``) while it runs. So this polls instead, on one thread: every ``interval``
it reads the job's state and each known node's log from the offset it has reached
(``…/logs?node=N&offset=O``), and every ``discover_every`` seconds it lists the job's logs to find new
nodes. Lines are written whole, prefixed ``NODE: ``. The job's state is read before the logs, so once
a final state has been seen, one more full read gets everything (the workflow stores the last bytes
before it marks a job final).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cloudml_os.client.rest import ApiClient

FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
ONE_READ = 1 << 20  # the API's most bytes of one node per read


class LogFollower:
    """Writes a job's log lines (``write`` gets ``"NODE: line\\n"``) until the job has ended.

    :param sleep: and ``clock`` are injected so that a test can run the loop without waiting.
    """

    def __init__(self, api: ApiClient, job_id: str, write: Callable[[str], None], *, interval: float = 1.0,
                 discover_every: float = 5.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.api, self.job_id, self.write = api, job_id, write
        self.interval, self.discover_every = interval, discover_every
        self.sleep, self.clock = sleep, clock
        self.offsets: dict[str, int] = {}
        self.partial: dict[str, str] = {}

    def run(self) -> dict[str, Any]:
        """Follow until the job ends; the job as it ended."""
        discovered_at = None
        while True:
            job = self.api.job(self.job_id)
            final = job["state"] in FINAL_STATES
            if final or discovered_at is None or self.clock() - discovered_at >= self.discover_every:
                self._discover()
                discovered_at = self.clock()
            for node in sorted(self.offsets):
                self._read(node)
            if final:
                for node in sorted(self.partial):
                    self._flush(node)
                return job
            self.sleep(self.interval)

    def _discover(self) -> None:
        for entry in self.api.job_logs(self.job_id):
            self.offsets.setdefault(entry["node"], 0)

    def _read(self, node: str) -> None:
        """Everything of ``node``'s log past its offset (more than one read when over :data:`ONE_READ`)."""
        while True:
            entries = self.api.job_logs(self.job_id, node=node, offset=self.offsets[node])
            if not entries:
                return
            entry = entries[0]
            moved = entry["nextOffset"] - self.offsets[node]
            self.offsets[node] = entry["nextOffset"]
            self._lines(node, entry["text"])
            if moved < ONE_READ:
                return

    def _lines(self, node: str, text: str) -> None:
        text = self.partial.pop(node, "") + text
        *lines, rest = text.split("\n")
        for line in lines:
            self.write(f"{node}: {line}\n")
        if rest:
            self.partial[node] = rest

    def _flush(self, node: str) -> None:
        rest = self.partial.pop(node, "")
        if rest:
            self.write(f"{node}: {rest}\n")

"""How many replicas an autoscaled version needs, decided from its replicas' load once a second.

The algorithm is Knative's (KPA) with two rules of Kubernetes' HPA, in the terms of docs/operator-guide.md:

- Each replica's model server keeps counters (:class:`Load`): the integral of its requests in flight over
  time and its CPU seconds. The monitor reads them with every readiness probe; the difference of two
  readings is the replica's average concurrency (REQUESTS_IN_FLIGHT) and CPU use (CPU_USAGE, percent of
  the node's cores) between them. Once a second the version's totals (summed over its ready replicas)
  go into a history.
- The **stable** average is the totals' mean over ``stableWindow`` (60 s), the **panic** average the mean
  over ``panicWindow`` (6 s). Each wants ``ceil(average / target)`` replicas; with several metrics the
  largest want wins (as HPA).
- **Tolerance** (HPA): when the stable average is within 10 % of ``ready × target`` the stable want is the
  ready count, so steady load near the target does not flap.
- **Panic** (Knative): when the panic want reaches 200 % of the ready replicas, the version panics for a
  stable window: it scales out to the panic want at once (within one panic window of a load step) and
  never scales in while panicking.
- **Scale-in stabilisation** (HPA): a lower count is the highest want the recent load (the panic window's)
  had at any moment of the last stable window, and only once the current count has been observed for a
  whole stable window: load that stops is let go in one step a window later, a noisy load's dips remove
  nothing, and a version just woken from zero is not put back to sleep at once.
- The result is clamped to ``[minNodes, maxNodes]``; the caller also stops at the project's quota.

Nothing here reads a clock, a database or the network: the caller passes the time and the readings, so
the algorithm is tested and benchmarked with simulated load.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

REQUESTS_IN_FLIGHT, CPU_USAGE, GPU_DUTY_CYCLE = "REQUESTS_IN_FLIGHT", "CPU_USAGE", "GPU_DUTY_CYCLE"
MEASURED = (REQUESTS_IN_FLIGHT, CPU_USAGE, GPU_DUTY_CYCLE)  # what the model server's counters give
DEFAULT_TARGETS = {REQUESTS_IN_FLIGHT: 4.0, CPU_USAGE: 60.0, GPU_DUTY_CYCLE: 60.0}  # per replica; percents
DEFAULT_STABLE_WINDOW, DEFAULT_PANIC_WINDOW = 60.0, 6.0  # seconds, Knative's defaults
PANIC_THRESHOLD = 2.0  # Knative: panic when the panic window wants 200 % of the ready replicas
TOLERANCE = 0.1  # HPA: a stable average within 10 % of the target changes nothing
LOAD_HEADER = "X-Cloudml-Load"


@dataclass(frozen=True)
class Policy:
    """A version's ``autoScaling``, defaults filled in (as stored in ``Version.auto_scaling``)."""

    min_nodes: int
    max_nodes: int
    targets: tuple[tuple[str, float], ...]
    stable_window: float = DEFAULT_STABLE_WINDOW
    panic_window: float = DEFAULT_PANIC_WINDOW

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Policy:
        return cls(config["minNodes"], config["maxNodes"],
                   tuple((metric["name"], float(metric["target"])) for metric in config["metrics"]),
                   float(config["stableWindow"]), float(config["panicWindow"]))


@dataclass(frozen=True)
class Load:
    """One reading of a replica's counters: its clock (seconds), the integral of its requests in flight
    over that clock (request-seconds), its process's CPU seconds and its node's cores."""

    time: float
    busy: float
    cpu: float
    cpus: int
    in_flight: int = 0  # requests in flight when it was read, besides the one asking
    gpu: float | None = None  # busy GPU-seconds (the mean over its GPUs); None: the node has none

    def header(self) -> str:
        gpu = f"; gpu={self.gpu:.6f}" if self.gpu is not None else ""
        return (f"time={self.time:.6f}; busy={self.busy:.6f}; cpu={self.cpu:.6f}; cpus={self.cpus}; "
                f"in_flight={self.in_flight}{gpu}")

    @classmethod
    def parse(cls, header: str) -> Load | None:
        """The reading in a :data:`LOAD_HEADER` value; None when it is not one."""
        try:
            fields = dict(part.strip().split("=", 1) for part in header.split(";"))
            load = cls(float(fields["time"]), float(fields["busy"]), float(fields["cpu"]), int(fields["cpus"]),
                       int(fields.get("in_flight", 0)), float(fields["gpu"]) if "gpu" in fields else None)
        except (KeyError, ValueError):
            return None
        values = (load.time, load.busy, load.cpu, 0.0 if load.gpu is None else load.gpu)
        return load if load.cpus > 0 and all(math.isfinite(v) for v in values) else None


def rates(before: Load, after: Load) -> dict[str, float] | None:
    """A replica's average load between two readings, per metric; None when they do not make an interval
    (the same reading twice, or a restarted server whose counters began again)."""
    elapsed = after.time - before.time
    if elapsed <= 0 or after.busy < before.busy or after.cpu < before.cpu:
        return None
    found = {REQUESTS_IN_FLIGHT: (after.busy - before.busy) / elapsed,
             CPU_USAGE: 100.0 * (after.cpu - before.cpu) / elapsed / after.cpus}
    if before.gpu is not None and after.gpu is not None and after.gpu >= before.gpu:
        found[GPU_DUTY_CYCLE] = 100.0 * (after.gpu - before.gpu) / elapsed
    return found


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str  # the deciding metric, its average, window and target


class Scaler:
    """One version's decisions: call :meth:`observe` once per tick with the version's state and totals."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self._history: deque[tuple[float, dict[str, float]]] = deque()
        self._wants: deque[tuple[float, int]] = deque()
        self._panic_until = -math.inf
        self._count: int | None = None
        self._count_since = 0.0

    def observe(self, now: float, current: int, ready: int, totals: dict[str, float]) -> Decision | None:
        """Record this tick's totals (metric → the sum over the ``ready`` replicas that reported) and return
        a decision when the version should have another count than ``current``."""
        policy = self.policy
        if self._count is None or current > self._count:  # new replicas: observe them a whole window
            self._count_since = now
        self._count = current
        self._history.append((now, totals))
        while self._history and self._history[0][0] <= now - policy.stable_window:
            self._history.popleft()
        stable_want, stable_why = self._want(now, policy.stable_window, ready, tolerance=True)
        panic_want, panic_why = self._want(now, policy.panic_window, ready, tolerance=False)
        if ready and panic_want >= PANIC_THRESHOLD * ready:
            self._panic_until = now + policy.stable_window
        panicking = now < self._panic_until
        if panicking:
            want, why = max(panic_want, current), f"{panic_why} (panic)"
        else:
            want, why = stable_want, stable_why
        self._wants.append((now, panic_want))
        while self._wants and self._wants[0][0] <= now - policy.stable_window:
            self._wants.popleft()
        if want < current:
            if now - self._count_since < policy.stable_window:
                want = current
            else:  # what the recent load wanted at any moment of the window, not only its mean
                want = max(want, *(w for _, w in self._wants))
        want = min(max(want, policy.min_nodes), policy.max_nodes)
        if want == current:
            return None
        return Decision(want, why)

    def _want(self, now: float, window: float, ready: int, *, tolerance: bool) -> tuple[int, str]:
        """Replicas the mean totals of the last ``window`` seconds ask for, and why (the deciding metric)."""
        recent = [totals for time, totals in self._history if time > now - window]
        wants = []
        for metric, target in self.policy.targets:
            average = sum(totals.get(metric, 0.0) for totals in recent) / len(recent) if recent else 0.0
            want = math.ceil(average / target - 1e-9)
            if tolerance and ready and abs(average / (ready * target) - 1) <= TOLERANCE:
                want = ready
            wants.append((want, average, metric, target))
        want, average, metric, target = max(wants)
        if not average:
            return want, f"no load over the last {window:g} s"
        return want, f"{metric} {average:.2f} in total over the last {window:g} s, target {target:g} per replica"

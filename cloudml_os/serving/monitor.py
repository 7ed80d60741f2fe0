"""The active health monitor: probes every serving replica's readiness and reports when one changes state.

HAProxy's semantics: each :class:`Target` is probed every ``interval`` seconds with
``GET /v2/health/ready`` (KServe v2; 200 means ready) within ``timeout`` seconds; a healthy target becomes
unhealthy after ``fall`` consecutive failed probes, an unhealthy one healthy after ``rise`` consecutive
successful ones, and each transition is reported through ``on_change(target, healthy, reason)``. A failed
probe is a refused or broken connection, a timeout, any status but 200, or a response that is not HTTP.

One asyncio loop probes every target (a task each) over raw streams with a minimal HTTP/1.1 client that
keeps the connection open between probes, so one process watches a thousand replicas at one probe per
second each on a fraction of a core. It knows nothing of the database or Celery: targets come from the
``targets`` callable, re-read every ``refresh_interval``; a target's state lives as long as its key is
listed. Optionally (``on_samples``) it also hands over, every ``sample_interval`` seconds, one aggregated
:class:`ProbeSample` per target (probes, failures, median and maximum latency): a thousand replicas make one
batch of a thousand small rows every ten seconds, not a write per probe. A ready answer also carries the
model server's load counters (``X-Cloudml-Load``); :meth:`HealthMonitor.rates` gives each healthy target's
load between its last two readings, which the autoscaler sums per version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import statistics
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cloudml_os.serving.autoscaler import LOAD_HEADER, Load, rates

log = logging.getLogger(__name__)

READY_PATH = "/v2/health/ready"
LOAD_FIELD = LOAD_HEADER.lower().encode()
MAX_BODY = 64 * 1024  # a readiness answer is a few bytes; more than this is not a model server


@dataclass(frozen=True)
class Target:
    """A replica to probe.

    ``key`` identifies it across refreshes (e.g. the replica id); ``interval`` and ``timeout`` are seconds;
    ``fall`` consecutive failed probes make a healthy target unhealthy, ``rise`` consecutive successful ones
    an unhealthy target healthy; ``initially_healthy`` is its state before any probe (not reported).
    """

    key: Hashable
    address: str
    port: int
    interval: float = 1.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    initially_healthy: bool = False


@dataclass
class ProbeSample:
    """One target's probes over one sampling window: how many, how many failed, and the latency of the
    answered ones (seconds; None when none was answered). ``healthy`` is the target's state at the end."""

    key: Hashable
    probes: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    healthy: bool = False

    @property
    def latency_p50(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None

    @property
    def latency_max(self) -> float | None:
        return max(self.latencies) if self.latencies else None


class _Malformed(Exception):
    """The answer is not the HTTP/1.x response we asked for."""


class _ClosedBeforeAnswer(Exception):
    """The connection ended before a single byte of the answer."""


class _Probe:
    """One target's probing state: its consecutive counters and its kept-alive connection."""

    def __init__(self, target: Target):
        self.target = target
        self.healthy = target.initially_healthy
        self.successes = 0
        self.failures = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self.request = _request(target)
        self.sample = ProbeSample(target.key)
        self.load: Load | None = None  # the last counters its model server reported
        self.rates: dict[str, float] | None = None  # its load between the last two readings

    def retarget(self, target: Target) -> None:
        if (target.address, target.port) != (self.target.address, self.target.port):
            self.close()
            self.request = _request(target)
            self.load = self.rates = None
        self.target = target

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class HealthMonitor:
    """Probe targets' readiness and report their transitions between healthy and unhealthy.

    :param targets: ``targets()`` → the replicas to watch now. Called every ``refresh_interval`` in the
        monitor's callback thread (it may read a database); if it raises, the current targets are kept.
    :param on_change: ``on_change(target, healthy, reason)`` on each transition, e.g.
        ``(target, False, "3 probes failed: timeout after 1.0s")``. Called in one thread of the monitor's own,
        in the order the transitions happened, never in the probing loop: a slow callback delays later
        callbacks and refreshes, never the probes. An exception it raises is logged.
    :param refresh_interval: seconds between two calls of ``targets``.
    :param on_samples: ``on_samples([ProbeSample, …])``: every ``sample_interval`` seconds, one sample per
        target probed in that window (e.g. written to the database in one batch). Called in the same thread
        as ``on_change``; an exception it raises is logged and the samples are dropped.
    """

    def __init__(self, targets: Callable[[], list[Target]], on_change: Callable[[Target, bool, str], None],
                 *, refresh_interval: float = 1.0,
                 on_samples: Callable[[list[ProbeSample]], None] | None = None, sample_interval: float = 10.0):
        self._targets = targets
        self._on_change = on_change
        self._refresh_interval = refresh_interval
        self._on_samples = on_samples
        self._sample_interval = sample_interval
        self._forgotten: list[ProbeSample] = []  # windows of targets dropped since the last hand-over
        self._probes: dict[Hashable, _Probe] = {}
        self._callbacks: ThreadPoolExecutor | None = None

    def states(self) -> dict[Hashable, bool]:
        """Each watched target's current state (key → healthy); safe to call from any thread."""
        return {key: probe.healthy for key, probe in dict(self._probes).items()}

    def rates(self) -> dict[Hashable, dict[str, float]]:
        """Each healthy target's load between its last two readings (key → metric → value, see
        :func:`cloudml_os.serving.autoscaler.rates`); safe to call from any thread."""
        return {key: probe.rates for key, probe in dict(self._probes).items()
                if probe.healthy and probe.rates is not None}

    async def run(self, stop: asyncio.Event) -> None:
        """Probe until ``stop`` is set, then close every connection and wait for pending callbacks."""
        loop = asyncio.get_running_loop()
        self._callbacks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-monitor")
        next_sample = loop.time() + self._sample_interval
        try:
            while not stop.is_set():
                await self._refresh(loop)
                if loop.time() >= next_sample:
                    self._hand_over_samples()
                    next_sample = loop.time() + self._sample_interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._refresh_interval):
                        await stop.wait()
        finally:
            tasks = [self._forget(key) for key in list(self._probes)]
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.run_in_executor(None, self._callbacks.shutdown)

    def run_forever(self) -> None:
        """Run in this process until SIGINT or SIGTERM (for a process of its own; main thread only)."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            await self.run(stop)

        asyncio.run(main())

    def start_thread(self) -> MonitorThread:
        """Run in a background thread of this process; :meth:`MonitorThread.stop` ends it."""
        return MonitorThread(self)

    async def _refresh(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            wanted = {target.key: target for target in await loop.run_in_executor(self._callbacks, self._targets)}
        except Exception:
            log.exception("listing health-check targets failed; keeping the current ones")
            return
        for key in self._probes.keys() - wanted.keys():
            self._forget(key)
        for key, target in wanted.items():
            probe = self._probes.get(key)
            if probe is None:
                probe = self._probes[key] = _Probe(target)
                probe.task = asyncio.create_task(self._watch(probe), name=f"health-probe-{key}")
                probe.task.add_done_callback(_log_crash)
            elif probe.target != target:
                probe.retarget(target)

    def _hand_over_samples(self) -> None:
        """Close every target's sampling window and pass the windows that saw probes to ``on_samples``."""
        if self._on_samples is None:
            return
        samples, self._forgotten = self._forgotten, []
        for probe in self._probes.values():
            sample, probe.sample = probe.sample, ProbeSample(probe.target.key)
            if sample.probes:
                sample.healthy = probe.healthy
                samples.append(sample)
        if samples:
            self._callbacks.submit(self._call_on_samples, samples)

    def _call_on_samples(self, samples: list[ProbeSample]) -> None:
        try:
            self._on_samples(samples)
        except Exception:
            log.exception("on_samples for %d target(s) raised", len(samples))

    def _forget(self, key: Hashable) -> asyncio.Task:
        probe = self._probes.pop(key)
        if probe.sample.probes:
            # Its last window is still reported: often the very failures that got the replica ejected.
            probe.sample.healthy = probe.healthy
            self._forgotten.append(probe.sample)
        probe.task.cancel()
        probe.close()
        return probe.task

    async def _watch(self, probe: _Probe) -> None:
        loop = asyncio.get_running_loop()
        # Start at a random point of the interval so that a thousand targets listed at once spread their probes.
        await asyncio.sleep(random.uniform(0, probe.target.interval))
        due = loop.time()
        while True:
            started = loop.time()
            failure = await self._probe(probe)
            self._record(probe, failure, loop.time() - started)
            due += probe.target.interval
            delay = due - loop.time()
            if delay < 0:  # the probe outlasted the interval: probe again now, don't burst to catch up
                due, delay = loop.time(), 0
            await asyncio.sleep(delay)

    def _record(self, probe: _Probe, failure: str | None, latency: float = 0.0) -> None:
        """Count one probe's outcome (``failure`` is its reason, None for success; ``latency`` its seconds)
        in the current sample, and report a transition."""
        target = probe.target
        if self._on_samples is not None:  # samples nobody takes are not kept
            probe.sample.probes += 1
            if failure is None:
                probe.sample.latencies.append(latency)
            else:
                probe.sample.failures += 1
        if failure is None:
            probe.failures = 0
            if not probe.healthy:
                probe.successes += 1
                if probe.successes >= target.rise:
                    probe.healthy, probe.successes = True, 0
                    self._notify(target, True, f"{_probes(target.rise)} succeeded")
        else:
            probe.successes = 0
            if probe.healthy:
                probe.failures += 1
                if probe.failures >= target.fall:
                    probe.healthy, probe.failures = False, 0
                    self._notify(target, False, f"{_probes(target.fall)} failed: {failure}")

    def _notify(self, target: Target, healthy: bool, reason: str) -> None:
        log.info("health of %s (%s:%s): %s, %s", target.key, target.address, target.port,
                 "healthy" if healthy else "unhealthy", reason)
        self._callbacks.submit(self._call_on_change, target, healthy, reason)

    def _call_on_change(self, target: Target, healthy: bool, reason: str) -> None:
        try:
            self._on_change(target, healthy, reason)
        except Exception:
            log.exception("on_change for %s raised", target.key)

    async def _probe(self, probe: _Probe) -> str | None:
        """One readiness probe; returns None when ready, else why not."""
        timeout = probe.target.timeout
        try:
            async with asyncio.timeout(timeout):
                status, load = await _ask_ready(probe)
        except TimeoutError:
            probe.close()
            return f"timeout after {timeout}s"
        except ConnectionRefusedError:
            probe.close()
            return "connection refused"
        except _ClosedBeforeAnswer:
            probe.close()
            return "connection closed without an answer"
        except (_Malformed, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
            probe.close()
            return f"malformed response: {error}"
        except OSError as error:
            probe.close()
            return error.strerror or repr(error)
        if status != 200:
            return f"HTTP {status}"
        reading = Load.parse(load.decode("ascii", "replace")) if load else None
        if reading is not None:
            if probe.load is not None:
                probe.rates = rates(probe.load, reading) or probe.rates
            probe.load = reading
        return None


class MonitorThread:
    """A :class:`HealthMonitor` running in a daemon thread of its own event loop."""

    def __init__(self, monitor: HealthMonitor):
        self._monitor = monitor
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="health-monitor",
                                        daemon=True)
        self._thread.start()
        self._started.wait()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        await self._monitor.run(self._stop)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop probing, close the connections, wait for pending callbacks (at most ``timeout`` seconds)."""
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


async def _ask_ready(probe: _Probe) -> tuple[int, bytes | None]:
    """GET the readiness path on the probe's connection (opened or re-opened as needed); the status code
    and the load counters the answer carried (:data:`LOAD_HEADER`), if any."""
    if probe.writer is not None and (probe.writer.is_closing() or probe.reader.at_eof()):
        probe.close()  # the replica closed the idle connection
    reused = probe.writer is not None
    if not reused:
        probe.reader, probe.writer = await asyncio.open_connection(probe.target.address, probe.target.port)
    try:
        return await _exchange(probe)
    except (_ClosedBeforeAnswer, ConnectionResetError, BrokenPipeError):
        if not reused:
            raise
    # The replica closed the kept-alive connection just as the probe went out: ask once on a new one.
    probe.close()
    probe.reader, probe.writer = await asyncio.open_connection(probe.target.address, probe.target.port)
    return await _exchange(probe)


async def _exchange(probe: _Probe) -> tuple[int, bytes | None]:
    """Send the request, read the whole response; keep the connection only if HTTP allows reusing it."""
    reader = probe.reader
    probe.writer.write(probe.request)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            raise _ClosedBeforeAnswer() from None
        raise _Malformed("connection closed inside the headers") from None
    except asyncio.LimitOverrunError:
        raise _Malformed("headers too long") from None
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or len(code) != 3 or rest[3:4] not in b" ":
        raise _Malformed(f"status line {lines[0][:80]!r}")
    status = int(code)
    fields = {}
    for line in lines[1:]:
        if line:
            name, colon, value = line.partition(b":")
            if not colon:
                raise _Malformed(f"header line {line[:80]!r}")
            fields[name.strip().lower()] = value.strip().lower()
    connection = fields.get(b"connection", b"")
    keep_alive = b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection
    if status < 200 or status in (204, 304):
        pass
    elif b"chunked" in fields.get(b"transfer-encoding", b""):
        await _read_chunked(reader)
    elif b"content-length" in fields:
        length = int(fields[b"content-length"])
        if not 0 <= length <= MAX_BODY:
            raise _Malformed(f"Content-Length {length}")
        await reader.readexactly(length)
    else:
        keep_alive = False  # the body runs to the end of the connection; the status is all we need
    if not keep_alive:
        probe.close()
    return status, fields.get(LOAD_FIELD)


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        total += size
        if total > MAX_BODY:
            raise _Malformed("chunked body too long")
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the empty line
                pass
            return
        await reader.readexactly(size + 2)


def _request(target: Target) -> bytes:
    host = f"[{target.address}]" if ":" in target.address else target.address
    return (f"GET {READY_PATH} HTTP/1.1\r\nHost: {host}:{target.port}\r\n"
            "User-Agent: cloudml-os-health-monitor\r\nAccept: */*\r\n\r\n").encode()


def _probes(count: int) -> str:
    return f"{count} probe" if count == 1 else f"{count} probes"


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("health probe task %s crashed", task.get_name(), exc_info=task.exception())

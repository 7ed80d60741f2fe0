"""The router in front of a model version's replicas: one prediction in, one healthy replica chosen, its answer out.

:class:`Router` picks the replica with the fewest requests in flight from this process (ties taken in turn),
sends the request over a pooled keep-alive connection, and returns the replica's answer as it is — any HTTP
status, a model's 400 included, is an answer and is never retried. Every request has a deadline.

- **Failover.** A replica that cannot be reached (refused, reset, connect timeout) is reported through
  ``on_failure`` — passive ejection, the caller takes it out of the pool and replaces it — and the request is
  sent once more, to another replica.
- **Hedging** (as "The Tail at Scale" describes): a request still unanswered after three times the version's
  recent 95th percentile latency is sent to a second replica as well (predictions are idempotent), and the
  first answer wins. A model whose usual latency is near the deadline is not hedged.
- **Outlier detection.** A replica out-run by a hedge is skipped by this router until its request ends (a
  frozen replica gets no new requests within a few of its usual latencies); one that has not answered at the
  deadline is reported like an unreachable one. A slow replica that answers within the deadline is not.

At most two replicas work on one request; when neither answers in time, or none is left,
:class:`NoReplicaAvailable` is raised (the API answers 503).

It knows nothing of the database, Celery or Flask: the healthy replicas of a version come from the
``endpoints`` callable it is given, and failures go out through ``on_failure``. It is thread-safe; one
instance serves every thread of an API process.
"""

from __future__ import annotations

import collections
import http.client
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

log = logging.getLogger(__name__)

# Replicas whose connection pools are kept; the least recently used pool beyond this is closed, so that
# replicas replaced or scaled away do not keep sockets open.
MAX_POOLED_REPLICAS = 1024
# Attempts in flight at once in one API process (each a thread blocked on a replica's answer): the API's own
# request threads, twice over for hedges, with room to spare.
MAX_HEDGES = 256
LATENCY_SAMPLES = 200  # a version's latest answers kept for its hedge delay
HEDGE_SAMPLES = 20  # answers known before a version's requests are hedged
# Request headers that belong to one connection (RFC 9110 §7.6.1) or that urllib3 computes itself.
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                            "upgrade", "host", "content-length"})
_DEFAULT_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Endpoint:
    """One serving replica as the router sees it: the model server at ``address:port``."""

    replica_id: int
    name: str
    address: str
    port: int


@dataclass(frozen=True)
class RoutedResponse:
    """A replica's answer: status, headers (case-insensitive) and body as it sent them, and who answered."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    replica: str


class NoReplicaAvailable(Exception):
    """No healthy replica could answer: none listed, or the ones tried failed (the API maps it to 503)."""


class Router:
    """Send requests for a model version to its least busy healthy replica, hedging and failing over once.

    :param endpoints: ``endpoints(version_id)`` → the version's healthy replicas. Called once per request;
        the caller keeps it cheap (a short cache in front of the database).
    :param on_failure: ``on_failure(endpoint, reason)`` when a replica did not answer. Called once per failure
        episode (see ``quarantine``), from a request's thread or a hedged attempt's, so it must be quick:
        record the ejection and hand the replacement to a task. An exception it raises is logged and does not
        fail the request.
    :param connect_timeout: seconds to establish a TCP connection to a replica.
    :param deadline: seconds a request may take when :meth:`forward` is given none; a replica that has not
        answered by then is reported.
    :param pool_size: keep-alive connections kept per replica (more are opened under load, then closed).
    :param quarantine: seconds this router skips a replica after reporting it, even if ``endpoints`` still
        lists it (the caller's cache may lag behind the ejection); 0 disables.
    :param min_hedge_delay: the earliest a request is hedged, in seconds.
    :param clock: monotonic clock, injectable for tests.
    """

    def __init__(self, endpoints: Callable[[int], list[Endpoint]], on_failure: Callable[[Endpoint, str], None],
                 *, connect_timeout: float = 1.0, deadline: float = 30.0, pool_size: int = 32,
                 quarantine: float = 5.0, min_hedge_delay: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self._endpoints = endpoints
        self._on_failure = on_failure
        self._connect_timeout = connect_timeout
        self._deadline = deadline
        self._pool_size = pool_size
        self._quarantine = quarantine
        self._min_hedge_delay = min_hedge_delay
        self._clock = clock
        self._lock = threading.Lock()  # guards everything below
        self._pools: OrderedDict[tuple[str, int], urllib3.HTTPConnectionPool] = OrderedDict()  # least recent first
        self._outstanding: dict[Endpoint, int] = {}
        self._quarantined: dict[Endpoint, float] = {}  # endpoint → until (clock time)
        self._outrun: dict[Endpoint, set[int]] = {}  # endpoint → its attempts still pending after a hedge won
        self._latencies: dict[int, collections.deque[float]] = {}  # version → its last answers' seconds
        self._turn = 0
        self._attempt_ids = itertools.count()
        self._attempts = ThreadPoolExecutor(max_workers=MAX_HEDGES, thread_name_prefix="router-hedge")

    def forward(self, version_id: int, path: str, body: bytes, headers: Mapping[str, str] | None = None,
                deadline: float | None = None) -> RoutedResponse:
        """POST ``body`` to ``path`` on one of the version's healthy replicas and return its answer.

        :param version_id: the model version whose replicas may answer.
        :param path: the model server's path, e.g. ``/v1/models/census:predict``.
        :param body: the request body, sent as is.
        :param headers: request headers (``Content-Type: application/json`` when none); hop-by-hop headers
            are dropped.
        :param deadline: seconds the request may take (the router's default when None).
        :returns: the first answer a replica gave, whatever its HTTP status.
        :raises NoReplicaAvailable: no healthy replica, or none answered within the deadline.
        """
        deadline = self._deadline if deadline is None else deadline
        started = self._clock()
        candidates = self._endpoints(version_id)
        sent_headers = _DEFAULT_HEADERS if headers is None else {
            key: value for key, value in headers.items() if key.lower() not in _NOT_FORWARDED}
        timeout = urllib3.Timeout(connect=min(self._connect_timeout, deadline), read=deadline)
        failures: list[str] = []
        tried: set[Endpoint] = set()
        pending: dict[Future, Endpoint] = {}
        attempt_ids: dict[Future, int] = {}
        hedge_at = started + self._hedge_delay(version_id, deadline)

        def launch() -> bool:
            chosen = self._acquire(candidates, tried)
            if chosen is None:
                return False
            endpoint, pool = chosen
            tried.add(endpoint)
            attempt_id = next(self._attempt_ids)
            attempt = self._attempts.submit(self._attempt, attempt_id, endpoint, pool, path, body, sent_headers,
                                            timeout)
            pending[attempt], attempt_ids[attempt] = endpoint, attempt_id
            return True

        if not launch():
            raise NoReplicaAvailable(f"version {version_id} has no healthy replica")
        hedged = False
        ends = started + deadline
        while pending:
            wake = ends if hedged or len(tried) >= 2 else min(hedge_at, ends)
            done, _ = wait(list(pending), timeout=max(0.0, wake - self._clock()), return_when=FIRST_COMPLETED)
            for attempt in done:
                endpoint = pending.pop(attempt)
                response, reason = attempt.result()
                if response is not None:
                    self._answered(version_id, self._clock() - started,
                                   [(pending[other], attempt_ids[other]) for other in pending])
                    return RoutedResponse(response.status, response.headers, response.data, endpoint.name)
                failures.append(f"{endpoint.name}: {reason}")
                if not pending and len(tried) < 2 and launch():
                    ends = self._clock() + deadline  # the one retry a failure gets, with a deadline of its own
            now = self._clock()
            if now >= ends and pending:
                for endpoint in pending.values():  # given up on: reported now (its own thread ends later)
                    reason = f"no answer within {deadline:g}s"
                    failures.append(f"{endpoint.name}: {reason}")
                    self._report(endpoint, reason)
                pending.clear()
                if len(tried) < 2 and launch():
                    ends = self._clock() + deadline
            elif not done and not hedged and len(tried) < 2 and now >= hedge_at:
                hedged = launch()
                if not hedged:
                    hedge_at = ends  # no other replica: wait for this one
        if not failures:
            raise NoReplicaAvailable(f"version {version_id} has no healthy replica")
        raise NoReplicaAvailable(f"version {version_id}: no replica answered ({'; '.join(failures)})")

    def close(self) -> None:
        """Close every pooled connection; for shutdown, once no request is in flight."""
        self._attempts.shutdown(wait=False)
        with self._lock:
            pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            pool.close()

    def _attempt(self, attempt_id: int, endpoint: Endpoint, pool: urllib3.HTTPConnectionPool, path: str, body: bytes,
                 headers: Mapping[str, str], timeout: urllib3.Timeout) -> tuple[urllib3.BaseHTTPResponse | None, str]:
        """One replica's try at the request, in a thread of its own: (answer, "") or (None, why it failed). A
        failure is reported here, so a replica that never answers is reported at the deadline even when a hedge
        answered the request long before."""
        try:
            return _send(pool, path, body, headers, timeout), ""
        except HTTPError as error:
            reason = _describe(error, timeout)
            self._report(endpoint, reason)
            return None, reason
        finally:
            self._release(endpoint, attempt_id)

    def _hedge_delay(self, version_id: int, deadline: float) -> float:
        """Three times the version's recent 95th percentile latency (at least ``min_hedge_delay``); the
        deadline (no hedge) while fewer than HEDGE_SAMPLES answers are known or when that is over half of it."""
        with self._lock:
            recent = sorted(self._latencies.get(version_id, ()))
        if len(recent) < HEDGE_SAMPLES:
            return deadline
        delay = max(self._min_hedge_delay, 3 * recent[int(len(recent) * 0.95)])
        return delay if delay <= deadline / 2 else deadline

    def _answered(self, version_id: int, seconds: float, outrun: Iterable[tuple[Endpoint, int]]) -> None:
        """Record an answer's latency; replicas still working on the request were out-run by it: skip them
        until that attempt ends."""
        with self._lock:
            self._latencies.setdefault(version_id, collections.deque(maxlen=LATENCY_SAMPLES)).append(seconds)
            for slow, attempt_id in outrun:
                self._outrun.setdefault(slow, set()).add(attempt_id)

    def _acquire(self, candidates: list[Endpoint],
                 excluded: set[Endpoint]) -> tuple[Endpoint, urllib3.HTTPConnectionPool] | None:
        """The least busy usable candidate and its pool, counted as busy until :meth:`_release`; ties are
        taken in turn. Replicas quarantined or out-run by a hedge are used only when nothing else is left."""
        with self._lock:
            now = self._clock()
            usable = [endpoint for endpoint in candidates if endpoint not in excluded
                      and self._quarantined.get(endpoint, now) <= now]
            fast = [endpoint for endpoint in usable if not self._outrun.get(endpoint)]
            best: list[Endpoint] = []
            fewest = None
            for endpoint in fast or usable:
                busy = self._outstanding.get(endpoint, 0)
                if fewest is None or busy < fewest:
                    best, fewest = [endpoint], busy
                elif busy == fewest:
                    best.append(endpoint)
            if not best:
                return None
            self._turn += 1
            endpoint = best[self._turn % len(best)]
            self._outstanding[endpoint] = self._outstanding.get(endpoint, 0) + 1
            return endpoint, self._pool(endpoint)

    def _pool(self, endpoint: Endpoint) -> urllib3.HTTPConnectionPool:
        """The endpoint's connection pool, made on first use; the least recently used beyond the limit is closed."""
        key = (endpoint.address, endpoint.port)
        pool = self._pools.get(key)
        if pool is None:
            # retries=False: a failure surfaces at once as the underlying error; failover is ours to do.
            # block=False: beyond pool_size, extra connections are opened and closed after use.
            pool = self._pools[key] = urllib3.HTTPConnectionPool(
                endpoint.address, endpoint.port, maxsize=self._pool_size, block=False, retries=False)
            if len(self._pools) > MAX_POOLED_REPLICAS:
                self._pools.popitem(last=False)[1].close()
        else:
            self._pools.move_to_end(key)
        return pool

    def _release(self, endpoint: Endpoint, attempt_id: int) -> None:
        """An attempt on ``endpoint`` ended: one request fewer in flight there, and not out-run any more."""
        with self._lock:
            left = self._outstanding[endpoint] - 1
            if left:
                self._outstanding[endpoint] = left
            else:
                del self._outstanding[endpoint]
            outrun = self._outrun.get(endpoint)
            if outrun is not None:
                outrun.discard(attempt_id)
                if not outrun:
                    del self._outrun[endpoint]

    def _report(self, endpoint: Endpoint, reason: str) -> None:
        with self._lock:
            now = self._clock()
            if self._quarantined.get(endpoint, now) > now:
                return  # another thread reported this failure already
            self._quarantined = {key: until for key, until in self._quarantined.items() if until > now}
            if self._quarantine > 0:
                self._quarantined[endpoint] = now + self._quarantine
        log.warning("replica %s (%s:%s) failed: %s", endpoint.name, endpoint.address, endpoint.port, reason)
        try:
            self._on_failure(endpoint, reason)
        except Exception:
            log.exception("on_failure for replica %s raised", endpoint.name)


def _send(pool: urllib3.HTTPConnectionPool, path: str, body: bytes, headers: Mapping[str, str],
          timeout: urllib3.Timeout) -> urllib3.BaseHTTPResponse:
    try:
        return pool.urlopen("POST", path, body=body, headers=headers, redirect=False, assert_same_host=False,
                            timeout=timeout)
    except ProtocolError as error:
        if not _closed_without_answer(error):
            raise
    # A keep-alive connection the replica closed while it sat idle in the pool fails like this too; that is
    # no fault of the replica, so it gets one more try on a new connection before it is reported.
    return pool.urlopen("POST", path, body=body, headers=headers, redirect=False, assert_same_host=False,
                        timeout=timeout)


def _closed_without_answer(error: ProtocolError) -> bool:
    cause = error.args[1] if len(error.args) > 1 else None
    return isinstance(cause, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError)


def _describe(error: HTTPError, timeout: urllib3.Timeout) -> str:
    """A short reason for ``on_failure`` and logs: what went wrong, not urllib3's wording."""
    if isinstance(error, NewConnectionError):
        cause = error.__context__
        return f"connect failed: {cause.strerror if isinstance(cause, OSError) and cause.strerror else error}"
    if isinstance(error, ConnectTimeoutError):
        return f"connect timeout after {timeout.connect_timeout}s"
    if isinstance(error, ReadTimeoutError):
        return f"no answer within {timeout.read_timeout}s"
    if isinstance(error, ProtocolError):
        cause = error.args[1] if len(error.args) > 1 else error
        return f"connection broken: {cause!r}"
    return f"{type(error).__name__}: {error}"

"""The router in front of a model version's replicas: one prediction in, one healthy replica chosen, its answer out.

:class:`Router` picks the replica with the fewest requests in flight from this process (ties taken in turn),
sends the request over a pooled keep-alive connection, and returns the replica's answer as it is — any HTTP
status, a model's 400 included, is an answer and is never retried. Every request has a deadline.

- **Failover.** A replica that cannot be reached (refused, reset, connect timeout) is reported through
  ``on_failure`` — passive ejection, the caller takes it out of the pool and replaces it — and the request is
  sent once more, to another replica.
- **Outliers.** A request still unanswered after three times the version's recent 95th percentile latency
  (Envoy's per-try timeout) is sent to another replica instead, when there is one, and the slow replica is
  skipped by this router for a deadline's time: a frozen replica costs one request a few of its usual
  latencies, and gets no more. A model whose usual latency is near the deadline gets no per-try timeout.
- **Deadline.** A replica that has not answered a request by its deadline is reported like an unreachable one;
  a slow replica that answers within it is not.

At most two replicas are tried for one request, within its deadline plus at most one per-try timeout; when
neither answers, or none is left, :class:`NoReplicaAvailable` is raised (the API answers 503).

It knows nothing of the database, Celery or Flask: the healthy replicas of a version come from the
``endpoints`` callable it is given, and failures go out through ``on_failure``. It is thread-safe; one
instance serves every thread of an API process.
"""

from __future__ import annotations

import collections
import http.client
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
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
LATENCY_SAMPLES = 200  # a version's latest answers kept for its per-try timeout
TRY_SAMPLES = 20  # answers known before a version's requests get a per-try timeout
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
    """Send requests for a model version to its least busy healthy replica, trying another one once.

    :param endpoints: ``endpoints(version_id)`` → the version's healthy replicas. Called once per request;
        the caller keeps it cheap (a short cache in front of the database).
    :param on_failure: ``on_failure(endpoint, reason)`` when a replica did not answer. Called once per failure
        episode (see ``quarantine``), in the request's thread, so it must be quick:
        record the ejection and hand the replacement to a task. An exception it raises is logged and does not
        fail the request.
    :param connect_timeout: seconds to establish a TCP connection to a replica.
    :param deadline: seconds a request may take when :meth:`forward` is given none; a replica that has not
        answered by then is reported.
    :param pool_size: keep-alive connections kept per replica (more are opened under load, then closed).
    :param quarantine: seconds this router skips a replica after reporting it, even if ``endpoints`` still
        lists it (the caller's cache may lag behind the ejection); 0 disables.
    :param min_try_timeout: the shortest per-try timeout, in seconds.
    :param clock: monotonic clock, injectable for tests.
    """

    def __init__(self, endpoints: Callable[[int], list[Endpoint]], on_failure: Callable[[Endpoint, str], None],
                 *, connect_timeout: float = 1.0, deadline: float = 30.0, pool_size: int = 32,
                 quarantine: float = 5.0, min_try_timeout: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self._endpoints = endpoints
        self._on_failure = on_failure
        self._connect_timeout = connect_timeout
        self._deadline = deadline
        self._pool_size = pool_size
        self._quarantine = quarantine
        self._min_try_timeout = min_try_timeout
        self._clock = clock
        self._lock = threading.Lock()  # guards everything below
        self._pools: OrderedDict[tuple[str, int], urllib3.HTTPConnectionPool] = OrderedDict()  # least recent first
        self._outstanding: dict[Endpoint, int] = {}
        self._quarantined: dict[Endpoint, float] = {}  # endpoint → until (clock time): reported
        self._slow: dict[Endpoint, float] = {}  # endpoint → until: out-run by another replica
        self._latencies: dict[int, collections.deque[float]] = {}  # version → its last answers' seconds
        self._try_limits: dict[int, float] = {}  # version → its per-try timeout (read without the lock)
        self._answers = 0
        self._timeouts: dict[float, urllib3.Timeout] = {}
        self._turn = 0

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
        :raises NoReplicaAvailable: no healthy replica, or the ones tried did not answer.
        """
        deadline = self._deadline if deadline is None else deadline
        candidates = self._endpoints(version_id)
        sent_headers = _DEFAULT_HEADERS if headers is None else {
            key: value for key, value in headers.items() if key.lower() not in _NOT_FORWARDED}
        try_timeout = self._try_timeout(version_id, deadline)
        failures: list[str] = []
        tried: set[Endpoint] = set()
        for _attempt in range(2):
            chosen = self._acquire(candidates, tried)
            if chosen is None:
                break
            endpoint, pool, others = chosen
            tried.add(endpoint)
            limit = try_timeout if try_timeout is not None and others and len(tried) == 1 else deadline
            timeout = self._timeout(limit)
            started = self._clock()
            try:
                response = _send(pool, path, body, sent_headers, timeout)
            except ReadTimeoutError:
                if limit < deadline:  # out-run, not failed: another replica gets the request
                    self._mark_slow(endpoint, deadline)
                    failures.append(f"{endpoint.name}: no answer within {limit:.3g}s, sent to another replica")
                    continue
                reason = f"no answer within {deadline:g}s"
                failures.append(f"{endpoint.name}: {reason}")
                self._report(endpoint, reason)
                continue
            except HTTPError as error:
                reason = _describe(error, timeout)
                failures.append(f"{endpoint.name}: {reason}")
                self._report(endpoint, reason)
                continue
            finally:
                self._release(endpoint)
            self._answered(version_id, self._clock() - started)
            return RoutedResponse(response.status, response.headers, response.data, endpoint.name)
        if not failures:
            raise NoReplicaAvailable(f"version {version_id} has no healthy replica")
        raise NoReplicaAvailable(f"version {version_id}: no replica answered ({'; '.join(failures)})")

    def close(self) -> None:
        """Close every pooled connection; for shutdown, once no request is in flight."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            pool.close()

    def _timeout(self, limit: float) -> urllib3.Timeout:
        """urllib3's timeout for an attempt of ``limit`` seconds (made once per value: they are few)."""
        timeout = self._timeouts.get(limit)
        if timeout is None:
            if len(self._timeouts) > 256:
                self._timeouts.clear()
            timeout = self._timeouts[limit] = urllib3.Timeout(connect=min(self._connect_timeout, limit), read=limit)
        return timeout

    def _try_timeout(self, version_id: int, deadline: float) -> float | None:
        """Three times the version's recent 95th percentile latency (at least ``min_try_timeout``); None (the
        deadline) while fewer than TRY_SAMPLES answers are known, or when that is over half the deadline."""
        limit = self._try_limits.get(version_id)
        return limit if limit is not None and limit <= deadline / 2 else None

    def _answered(self, version_id: int, seconds: float) -> None:
        """Record an answer's latency; every TRY_SAMPLES answers, the version's per-try timeout follows them."""
        with self._lock:
            recent = self._latencies.get(version_id)
            if recent is None:
                recent = self._latencies[version_id] = collections.deque(maxlen=LATENCY_SAMPLES)
            recent.append(seconds)
            self._answers += 1
            if self._answers % TRY_SAMPLES == 0 or version_id not in self._try_limits and len(recent) >= TRY_SAMPLES:
                ordered = sorted(recent)
                self._try_limits[version_id] = max(self._min_try_timeout, 3 * ordered[int(len(ordered) * 0.95)])

    def _mark_slow(self, endpoint: Endpoint, seconds: float) -> None:
        with self._lock:
            self._slow[endpoint] = self._clock() + seconds
        log.warning("replica %s (%s:%s) out-run: skipped for %gs", endpoint.name, endpoint.address, endpoint.port,
                    seconds)

    def _acquire(self, candidates: list[Endpoint],
                 excluded: set[Endpoint]) -> tuple[Endpoint, urllib3.HTTPConnectionPool, bool] | None:
        """The least busy usable candidate, its pool, and whether another one is usable; counted as busy until
        :meth:`_release`; ties are taken in turn. Replicas out-run lately are used only when nothing else is."""
        with self._lock:
            now = self._clock()
            usable = [endpoint for endpoint in candidates if endpoint not in excluded
                      and self._quarantined.get(endpoint, now) <= now]
            fast = [endpoint for endpoint in usable if self._slow.get(endpoint, now) <= now]
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
            return endpoint, self._pool(endpoint), len(usable) > 1

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

    def _release(self, endpoint: Endpoint) -> None:
        with self._lock:
            left = self._outstanding[endpoint] - 1
            if left:
                self._outstanding[endpoint] = left
            else:
                del self._outstanding[endpoint]

    def _report(self, endpoint: Endpoint, reason: str) -> None:
        with self._lock:
            now = self._clock()
            if self._quarantined.get(endpoint, now) > now:
                return  # another thread reported this failure already
            self._quarantined = {key: until for key, until in self._quarantined.items() if until > now}
            self._slow = {key: until for key, until in self._slow.items() if until > now}
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

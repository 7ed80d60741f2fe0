"""The router in front of a model version's replicas: one prediction in, one healthy replica chosen, its answer out.

:class:`Router` picks the replica with the fewest requests in flight from this process (ties taken in turn),
sends the request over a pooled keep-alive connection, and returns the replica's answer as it is — any HTTP
status, a model's 400 included, is an answer and is never retried. A replica that does not answer (refused,
reset, connect or read timeout: a frozen replica accepts TCP and never replies) is reported through
``on_failure`` — passive ejection, the caller takes it out of the pool and replaces it — and the request is
retried once on another replica; when none is left :class:`NoReplicaAvailable` is raised (the API answers 503).

It knows nothing of the database, Celery or Flask: the healthy replicas of a version come from the
``endpoints`` callable it is given, and failures go out through ``on_failure``. It is thread-safe; one
instance serves every thread of an API process.
"""

from __future__ import annotations

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
    """Send requests for a model version to its least busy healthy replica, failing over once.

    :param endpoints: ``endpoints(version_id)`` → the version's healthy replicas. Called once per request;
        the caller keeps it cheap (a short cache in front of the database).
    :param on_failure: ``on_failure(endpoint, reason)`` when a replica did not answer. Called in the request's
        thread, once per failure episode (see ``quarantine``), so it must be quick: record the ejection and
        hand the replacement to a task. An exception it raises is logged and does not fail the request.
    :param connect_timeout: seconds to establish a TCP connection to a replica.
    :param read_timeout: seconds to wait for each read of the answer; a model slower than this is treated as
        a frozen replica.
    :param pool_size: keep-alive connections kept per replica (more are opened under load, then closed).
    :param quarantine: seconds this router skips a replica after reporting it, even if ``endpoints`` still
        lists it (the caller's cache may lag behind the ejection); 0 disables.
    :param clock: monotonic clock, injectable for tests.
    """

    def __init__(self, endpoints: Callable[[int], list[Endpoint]], on_failure: Callable[[Endpoint, str], None],
                 *, connect_timeout: float = 1.0, read_timeout: float = 30.0, pool_size: int = 32,
                 quarantine: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self._endpoints = endpoints
        self._on_failure = on_failure
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._pool_size = pool_size
        self._quarantine = quarantine
        self._clock = clock
        self._lock = threading.Lock()  # guards everything below
        self._pools: OrderedDict[tuple[str, int], urllib3.HTTPConnectionPool] = OrderedDict()  # least recent first
        self._outstanding: dict[Endpoint, int] = {}
        self._quarantined: dict[Endpoint, float] = {}  # endpoint → until (clock time)
        self._turn = 0

    def forward(self, version_id: int, path: str, body: bytes,
                headers: Mapping[str, str] | None = None) -> RoutedResponse:
        """POST ``body`` to ``path`` on one of the version's healthy replicas and return its answer.

        :param version_id: the model version whose replicas may answer.
        :param path: the model server's path, e.g. ``/v1/models/census:predict``.
        :param body: the request body, sent as is.
        :param headers: request headers (``Content-Type: application/json`` when none); hop-by-hop headers
            are dropped.
        :returns: the first answer a replica gave, whatever its HTTP status.
        :raises NoReplicaAvailable: no healthy replica, or the chosen one and one other failed to answer.
        """
        candidates = self._endpoints(version_id)
        sent_headers = _DEFAULT_HEADERS if headers is None else {
            key: value for key, value in headers.items() if key.lower() not in _NOT_FORWARDED}
        failures: list[str] = []
        excluded: set[Endpoint] = set()
        for _attempt in range(2):
            chosen = self._acquire(candidates, excluded)
            if chosen is None:
                break
            endpoint, pool = chosen
            try:
                response = _send(pool, path, body, sent_headers)
            except HTTPError as error:
                reason = _describe(error, self._timeout)
                failures.append(f"{endpoint.name}: {reason}")
                excluded.add(endpoint)
                self._report(endpoint, reason)
                continue
            finally:
                self._release(endpoint)
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

    def _acquire(self, candidates: list[Endpoint],
                 excluded: set[Endpoint]) -> tuple[Endpoint, urllib3.HTTPConnectionPool] | None:
        """The least busy usable candidate and its pool, counted as busy until :meth:`_release`; ties are
        taken in turn."""
        with self._lock:
            now = self._clock()
            best: list[Endpoint] = []
            fewest = None
            for endpoint in candidates:
                if endpoint in excluded or self._quarantined.get(endpoint, now) > now:
                    continue
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
                endpoint.address, endpoint.port, maxsize=self._pool_size, block=False, retries=False,
                timeout=self._timeout)
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
            if self._quarantine > 0:
                self._quarantined[endpoint] = now + self._quarantine
        log.warning("replica %s (%s:%s) failed: %s", endpoint.name, endpoint.address, endpoint.port, reason)
        try:
            self._on_failure(endpoint, reason)
        except Exception:
            log.exception("on_failure for replica %s raised", endpoint.name)


def _send(pool: urllib3.HTTPConnectionPool, path: str, body: bytes,
          headers: Mapping[str, str]) -> urllib3.BaseHTTPResponse:
    try:
        return pool.urlopen("POST", path, body=body, headers=headers, redirect=False, assert_same_host=False)
    except ProtocolError as error:
        if not _closed_without_answer(error):
            raise
    # A keep-alive connection the replica closed while it sat idle in the pool fails like this too; that is
    # no fault of the replica, so it gets one more try on a new connection before it is reported.
    return pool.urlopen("POST", path, body=body, headers=headers, redirect=False, assert_same_host=False)


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

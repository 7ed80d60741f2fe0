"""A thread-safe cache of recent lookups, each answer trusted for a few seconds (cachetools' TTLCache).

The API's hot path — a token by its hash, a model's serving version, a version's healthy replicas — would
otherwise pay a database query each per request. A process trusts an answer for ``ttl`` seconds, so a change
made elsewhere (a token revoked by another API process, a traffic split moved) applies within that time;
a process that makes a change itself forgets at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import cachetools

_MISSING = object()


class TtlCache:
    def __init__(self, ttl: float, maxsize: int = 10_000):
        self._entries: cachetools.TTLCache = cachetools.TTLCache(maxsize, ttl)
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The cached answer for ``key``, else ``load()``'s (kept unless it is None: misses are not cached,
        so unknown keys cannot fill the cache and a thing created meanwhile is found at once)."""
        with self._lock:
            value = self._entries.get(key, _MISSING)
        if value is not _MISSING:
            return value
        value = load()
        if value is not None:
            with self._lock:
                self._entries[key] = value
        return value

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

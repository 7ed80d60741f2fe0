"""Fan work out to many nodes at once in a bounded thread pool (SSH is I/O bound; threads suffice).

Every item is attempted even when some fail, so a step learns about every broken node in one pass,
and no call is left running in the background when :func:`fan_out` returns or raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cloudml_os.remote.ssh import RemoteError

Item = TypeVar("Item")
Result = TypeVar("Result")


class FanOutError(RemoteError):
    """Some items failed. ``failures`` pairs each failed item with its exception; ``results`` holds
    the results in item order, with None where the item failed."""

    def __init__(self, failures: list[tuple[Any, BaseException]], results: list[Any],
                 describe: Callable[[Any], str]) -> None:
        details = "; ".join(f"{describe(item)}: {exc}" for item, exc in failures)
        super().__init__(f"{len(failures)} of {len(results)} failed: {details}")
        self.failures = failures
        self.results = results


def fan_out(items: Sequence[Item], fn: Callable[[Item], Result], max_workers: int,
            describe: Callable[[Item], str] | None = None) -> list[Result]:
    """Call ``fn(item)`` for every item, at most ``max_workers`` at a time; results in item order.

    :param describe: names an item in the error message; by default its ``name`` attribute, else ``str``.
    :raises FanOutError: after all calls ended, if any raised; it names each failed item.
    """
    if not items:
        return []
    describe = describe or _default_describe
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(items))),
                            thread_name_prefix="fan-out") as pool:
        futures = [pool.submit(fn, item) for item in items]
    results: list[Any] = []
    failures: list[tuple[Any, BaseException]] = []
    for item, future in zip(items, futures, strict=True):
        error = future.exception()
        if error is None:
            results.append(future.result())
        else:
            results.append(None)
            failures.append((item, error))
    if failures:
        raise FanOutError(failures, results, describe)
    return results


def _default_describe(item: Any) -> str:
    name = getattr(item, "name", None)
    return name if isinstance(name, str) else str(item)

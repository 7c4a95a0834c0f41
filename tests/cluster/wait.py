"""Polling helpers: tests and the control plane wait on conditions, never on the clock alone."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """An AssertionError so a timed-out wait reads as a failed test, with the last value seen."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    message: str = "condition",
    fatal: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns something truthy, and return that value.

    Exceptions from the predicate count as "not yet" (the API may be briefly unavailable), but the last one is
    reported on timeout so a failure explains itself. Exceptions of a type in `fatal` end the wait at once.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    max_polls = int(timeout / max(interval, 0.001)) + 2  # bounded in count as well as time
    for _ in range(max_polls):
        try:
            last_value = predicate()
            if last_value:
                return last_value  # type: ignore[return-value]
            last_exc = None
        except fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - reported below
            last_exc = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    detail = f"last error: {last_exc!r}" if last_exc else f"last value: {last_value!r}"
    raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {message} ({detail})")


async def async_wait_for(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = 30.0,
    interval: float = 0.2,
    message: str = "condition",
    fatal: tuple[type[BaseException], ...] = (),
) -> T:
    """`wait_for` for coroutines."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    max_polls = int(timeout / max(interval, 0.001)) + 2
    for _ in range(max_polls):
        try:
            last_value = await predicate()
            if last_value:
                return last_value  # type: ignore[return-value]
            last_exc = None
        except fatal:
            raise
        except Exception as exc:  # noqa: BLE001
            last_exc = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await asyncio.sleep(min(interval, remaining))
    detail = f"last error: {last_exc!r}" if last_exc else f"last value: {last_value!r}"
    raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {message} ({detail})")

"""A controller-runtime style work queue: keys, not events.

A key is queued at most once; a key being reconciled is never handed to a second worker (a change that arrives
meanwhile re-queues it once the first pass ends); retries back off per key; delayed adds keep the earliest time.
"""

from __future__ import annotations

import asyncio
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, *, base_delay: float = 0.5, max_delay: float = 60.0):
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self.base_delay, self.max_delay = base_delay, max_delay

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: K) -> None:
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        existing = self._timers.get(key)
        if existing and existing[0] <= when:
            return
        if existing:
            existing[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry(self, key: K) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay: float = min(self.max_delay, self.base_delay * (2**n))
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Success (or a permanent error): the next failure starts the backoff from scratch."""
        self._failures.pop(key, None)

    async def get(self) -> K:
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: K) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

"""`async with within(seconds):` raises asyncio.TimeoutError when the block takes longer.

asyncio.timeout on Python 3.11+, which arms one timer and no task (asyncio.wait_for makes a task per wait, a cost on
the gateway's per-request path); an equivalent for 3.10.
"""

from __future__ import annotations

import asyncio
import sys

if sys.version_info >= (3, 11):
    within = asyncio.timeout
else:  # pragma: no cover
    from contextlib import asynccontextmanager
    from typing import AsyncIterator

    @asynccontextmanager
    async def within(delay: float) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None  # `async with` runs in a task
        handle = asyncio.get_running_loop().call_later(delay, task.cancel)
        try:
            yield
        except asyncio.CancelledError:
            raise asyncio.TimeoutError from None
        finally:
            handle.cancel()

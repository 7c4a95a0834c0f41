"""An injected clock for asyncio tests, and condition waits that work while it is frozen (test_workqueue.py,
the gateway's tests): nothing in a unit test passes or fails because the machine was slow."""

import asyncio
import time


class FrozenLoopClock:
    """The running loop's clock, frozen at install and moved only by advance().

    asyncio schedules every timer (call_later, call_at, asyncio.sleep, asyncio.wait_for, the queue's add_after) on
    loop.time(), so shadowing that one method on the loop instance injects the clock without touching the code under
    test. I/O still runs as usual; only timers wait for the test. release() hands the loop back a clock that moves
    again, never backwards, so what the scenario leaves behind (cleanup timers) still runs.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.now = self._loop.time()
        self._loop.time = lambda: self.now  # type: ignore[method-assign]

    async def advance(self, seconds: float) -> None:
        """Move the clock; timers now due run at the loop's next pass, and what they wake at the pass after it."""
        self.now += seconds
        await settle()

    def release(self) -> None:
        real = type(self._loop).time.__get__(self._loop)
        offset = max(0.0, self.now - real())
        self._loop.time = lambda: real() + offset  # type: ignore[method-assign]

    async def __aenter__(self) -> "FrozenLoopClock":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


async def settle(passes: int = 5) -> None:
    """Let the loop run what is ready (no clock involved): a timer's callback, then the tasks it woke."""
    for _ in range(passes):
        await asyncio.sleep(0)


async def until(predicate, timeout: float = 30.0, message: str = "condition") -> None:
    """Poll predicate() until true; fail after `timeout` real seconds. The pauses run in a thread, so the poll works
    with the loop's clock frozen (asyncio.sleep would wait for the test to move it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        await asyncio.to_thread(time.sleep, 0.005)

"""The work queue: one entry per key, FIFO, no key on two workers, retries that back off.

Delays are judged on an injected clock (FrozenLoopClock): the event loop's own clock, which asyncio's timers and the
queue's delayed adds read, moved only by the test. A slow machine cannot fire a retry early or late, and nothing
here waits on the wall clock.
"""

import asyncio
import time

import pytest

from modelservice.workqueue import WorkQueue


def run(coro):
    # No asyncio.wait_for guard here: on a frozen loop clock it would never fire. pytest-timeout bounds a hang.
    return asyncio.run(coro)


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


async def drain(q: WorkQueue) -> list:
    out = []
    while len(q):
        key = await q.get()
        out.append(key)
        q.done(key)
    return out


def test_a_key_is_queued_once_and_never_on_two_workers():
    async def scenario():
        q = WorkQueue()
        q.add("a")
        q.add("a")
        assert len(q) == 1
        key = await q.get()
        q.add("a")  # changed while a worker has it: not handed to a second worker now...
        assert len(q) == 0
        q.done(key)  # ...but once the first pass ends
        assert await drain(q) == ["a"]
    run(scenario())


def test_keys_come_out_in_the_order_they_went_in():
    async def scenario():
        q = WorkQueue()
        for k in ("n1", "n2", "n3", "n1"):
            q.add(k)
        return await drain(q)
    assert run(scenario()) == ["n1", "n2", "n3"]


def test_waiting_workers_wake_for_new_keys_and_retries_back_off():
    async def scenario():
        async with FrozenLoopClock() as clock:
            q = WorkQueue(base_delay=0.05)
            workers = [asyncio.ensure_future(q.get()) for _ in range(3)]
            await settle()
            assert not any(w.done() for w in workers)  # no key, no wake-up, however long they wait
            q.add("a")
            q.add("b")
            await until(lambda: sum(w.done() for w in workers) == 2, message="two workers woken")
            assert sorted(w.result() for w in workers if w.done()) == ["a", "b"]
            idle = next(w for w in workers if not w.done())
            assert q.retry("a") == pytest.approx(0.05) and q.retry("a") == pytest.approx(0.1)
            q.done("a")
            await clock.advance(0.049)
            assert not idle.done() and len(q) == 0  # not before the earlier of the two retries...
            await clock.advance(0.001)
            await until(idle.done, message="the retry of a")  # ...which fires at 0.05
            assert idle.result() == "a"
            q.done("a")
            await clock.advance(10)  # far past the later retry (0.1): it was folded into the earlier one
            assert len(q) == 0  # fired once only (a second add after done() would queue "a" again)
    run(scenario())

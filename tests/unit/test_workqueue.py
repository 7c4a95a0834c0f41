"""The work queue: one entry per key, FIFO, no key on two workers, retries that back off.

Delays are judged on an injected clock (FrozenLoopClock): the event loop's own clock, which asyncio's timers and the
queue's delayed adds read, moved only by the test. A slow machine cannot fire a retry early or late, and nothing
here waits on the wall clock.
"""

import asyncio

import pytest

from modelservice.workqueue import WorkQueue
from tests.unit.loop_clock import FrozenLoopClock, settle, until


async def drain(q: WorkQueue) -> list:
    out = []
    while len(q):
        key = await q.get()
        out.append(key)
        q.done(key)
    return out


async def test_a_key_is_queued_once_and_never_on_two_workers():
    q = WorkQueue()
    q.add("a")
    q.add("a")
    assert len(q) == 1
    key = await q.get()
    q.add("a")  # changed while a worker has it: not handed to a second worker now...
    assert len(q) == 0
    q.done(key)  # ...but once the first pass ends
    assert await drain(q) == ["a"]


async def test_keys_come_out_in_the_order_they_went_in():
    async def scenario():
        q = WorkQueue()
        for k in ("n1", "n2", "n3", "n1"):
            q.add(k)
        return await drain(q)

    assert await scenario() == ["n1", "n2", "n3"]


async def test_waiting_workers_wake_for_new_keys_and_retries_back_off():
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

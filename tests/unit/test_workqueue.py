"""The work queue: one entry per key, FIFO, no key on two workers, retries that back off."""

import asyncio

import pytest

from modelservice.workqueue import WorkQueue


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


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
        q = WorkQueue(base_delay=0.05)
        workers = [asyncio.ensure_future(q.get()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in workers)
        q.add("a")
        q.add("b")
        await asyncio.sleep(0.01)
        assert sorted(w.result() for w in workers if w.done()) == ["a", "b"]
        idle = next(w for w in workers if not w.done())
        assert q.retry("a") == pytest.approx(0.05) and q.retry("a") == pytest.approx(0.1)
        q.done("a")
        assert await asyncio.wait_for(idle, 1) == "a"  # the earlier of the two retries fires
        await asyncio.sleep(0.15)
        assert len(q) == 0  # and only once
    run(scenario())

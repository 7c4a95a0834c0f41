"""Activity Leases: names, bodies, and when a write is due."""

import asyncio

import pytest

from modelservice.gateway.activity import ActivityTracker, lease_name, rfc3339_micro
from modelservice.gateway.routes import model_entry
from modelservice.gateway.testing import modelservice
from modelservice.labels import (
    ACTIVITY_LABEL,
    IN_FLIGHT_ANNOTATION,
    IN_FLIGHT_NOW_ANNOTATION,
    LAST_REQUEST_ANNOTATION,
    MODELSERVICE_LABEL,
    WAITING_ANNOTATION,
)

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.wall, self.mono = 1_800_000_000.0, 1000.0

    def advance(self, s):
        self.wall += s
        self.mono += s


def test_lease_name_is_stable_short_and_per_pod():
    a, b = lease_name("llama", "gw-0"), lease_name("llama", "gw-1")
    assert a.startswith("modelservice-llama-") and a != b and a == lease_name("llama", "gw-0")
    long = lease_name("x" * 253, "gw-0")
    assert len(long) <= 253 and long != lease_name("x" * 252 + "y", "gw-0")


def test_rfc3339_micro():
    assert rfc3339_micro(1_800_000_000.5) == "2027-01-15T08:00:00.500000Z"


def test_lease_body():
    clock = Clock()
    t = ActivityTracker("gw-0", 10, wall=lambda: clock.wall, mono=lambda: clock.mono)
    e = model_entry(modelservice("llama", "team-a"))
    t.started(e.key)
    t.started(e.key)
    t.finished(e.key)
    lease = t.lease(e)
    meta = lease["metadata"]
    assert meta["namespace"] == "team-a" and meta["name"] == lease_name("llama", "gw-0")
    assert meta["labels"] == {MODELSERVICE_LABEL: "llama", ACTIVITY_LABEL: "true"}
    assert meta["annotations"] == {
        IN_FLIGHT_ANNOTATION: "2",
        IN_FLIGHT_NOW_ANNOTATION: "1",
        LAST_REQUEST_ANNOTATION: rfc3339_micro(clock.wall),
    }
    assert meta["ownerReferences"][0]["uid"] == "uid-team-a-llama"
    assert lease["spec"]["holderIdentity"] == "gw-0" and lease["spec"]["renewTime"] == rfc3339_micro(clock.wall)


def test_writes_are_rate_limited_and_only_on_change():
    clock = Clock()
    t = ActivityTracker("gw-0", 10, wall=lambda: clock.wall, mono=lambda: clock.mono)
    e = model_entry(modelservice("m"))
    assert t.due() == []
    t.started(e.key)
    assert t.due() == [e.key]
    assert t.lease(e)["metadata"]["annotations"][IN_FLIGHT_ANNOTATION] == "1"
    t.started(e.key)
    clock.advance(5)
    assert t.due() == []  # written 5 s ago: wait for the interval
    t.finished(e.key)
    clock.advance(5)
    assert t.due() == [e.key]
    ann = t.lease(e)["metadata"]["annotations"]
    assert ann[IN_FLIGHT_ANNOTATION] == "2" and ann[IN_FLIGHT_NOW_ANNOTATION] == "1"  # peak of the last interval
    t.finished(e.key)
    clock.advance(10)
    assert t.due() == [e.key]  # went idle (and the peak 2 → 1): written at the next tick, then the peak 1 → 0
    clock.advance(10)
    assert t.due() == [e.key]
    assert t.lease(e)["metadata"]["annotations"][IN_FLIGHT_ANNOTATION] == "1"
    clock.advance(10)
    assert t.due() == [e.key]  # peak went 1 → 0: the operator must see the drop
    assert t.lease(e)["metadata"]["annotations"][IN_FLIGHT_ANNOTATION] == "0"
    clock.advance(60)
    assert t.due() == []  # idle and unchanged: no writes at all


def test_a_model_that_goes_idle_is_written_at_once_but_writes_stay_bounded():
    """The pool planner parks only idle models: the drop to idle is written at the next tick, not after the
    interval (in-flight-now 0; the peak keeps the interval's load for scaling). Busy again, the interval rules."""
    clock = Clock()
    t = ActivityTracker("gw-0", 10, wall=lambda: clock.wall, mono=lambda: clock.mono)
    e = model_entry(modelservice("m"))
    t.started(e.key)
    assert t.lease(e)["metadata"]["annotations"][IN_FLIGHT_NOW_ANNOTATION] == "1"
    clock.advance(1)
    t.finished(e.key)
    assert t.due() == [e.key]  # 1 s after a write, but busy → idle
    ann = t.lease(e)["metadata"]["annotations"]
    assert ann[IN_FLIGHT_NOW_ANNOTATION] == "0" and ann[IN_FLIGHT_ANNOTATION] == "1"
    writes = 0
    for _ in range(20):  # a request every second, 0.5 s each, for 20 s: busy and idle in turn
        t.started(e.key)
        writes += bool(t.due()) and bool(t.lease(e))
        clock.advance(0.5)
        t.finished(e.key)
        writes += bool(t.due()) and bool(t.lease(e))
        clock.advance(0.5)
    assert 2 <= writes <= 4  # two intervals: at most one busy write and one idle write each


def test_a_request_in_flight_renews_the_lease_every_interval():
    """A held request (a slow load) or a long stream is demand for as long as it lasts: its Lease must not go
    stale (the operator ignores in-flight figures older than LEASE_FRESH_SECONDS and would park the model)."""
    clock = Clock()
    t = ActivityTracker("gw-0", 10, wall=lambda: clock.wall, mono=lambda: clock.mono)
    e = model_entry(modelservice("m"))
    t.started(e.key)
    t.lease(e)
    for _ in range(6):  # a minute with one request in flight and nothing else happening
        clock.advance(10)
        assert t.due() == [e.key]
        lease = t.lease(e)
        assert lease["metadata"]["annotations"][IN_FLIGHT_ANNOTATION] == "1"
        assert lease["spec"]["renewTime"] == rfc3339_micro(clock.wall)
    t.finished(e.key)
    clock.advance(10)
    assert t.due() == [e.key] and t.lease(e)["metadata"]["annotations"][IN_FLIGHT_ANNOTATION] == "1"
    clock.advance(10)
    assert t.due() == [e.key] and t.lease(e)["metadata"]["annotations"][IN_FLIGHT_ANNOTATION] == "0"
    clock.advance(60)
    assert t.due() == []


def test_wake_lease_sets_last_request_now():
    clock = Clock()
    t = ActivityTracker("gw-0", 10, wall=lambda: clock.wall, mono=lambda: clock.mono)
    lease = t.lease(model_entry(modelservice("m")), wake=True)
    assert lease["metadata"]["annotations"][LAST_REQUEST_ANNOTATION] == rfc3339_micro(clock.wall)


def test_the_lease_carries_the_engines_queue_and_a_change_in_it_is_written():
    clock = Clock()
    t = ActivityTracker("gw-0", 10, wall=lambda: clock.wall, mono=lambda: clock.mono)
    e = model_entry(modelservice("m"))
    queue: dict = {}
    t.waiting = lambda key: queue.get(key)
    t.started(e.key)
    t.finished(e.key)
    assert WAITING_ANNOTATION not in t.lease(e)["metadata"]["annotations"]  # not known: not said
    clock.advance(10)
    t.lease(e)  # the peak's drop to 0
    clock.advance(10)
    assert t.due() == []
    queue[e.key] = 7  # other gateways' traffic queues in the engines: the operator must hear of it
    assert t.due() == [e.key]
    assert t.lease(e)["metadata"]["annotations"][WAITING_ANNOTATION] == "7"
    clock.advance(10)
    assert t.due() == []  # unchanged
    queue[e.key] = 0
    clock.advance(10)
    assert t.due() == [e.key] and t.lease(e)["metadata"]["annotations"][WAITING_ANNOTATION] == "0"


async def test_the_flusher_writes_a_drop_to_idle_without_waiting_for_its_tick():
    """The planner waits on that write to park the model for a woken one: no tick's delay on top (the tick here is an
    hour, so only the drop to idle can have caused the write)."""
    t = ActivityTracker("gw-0", 10)
    e = model_entry(modelservice("m"))
    t.started(e.key)
    t.lease(e)  # the busy write (in flight now: 1)

    class Ops:
        def __init__(self):
            self.written = asyncio.Queue()

        async def write_lease(self, body):
            await self.written.put(body)

    ops = Ops()
    flusher = asyncio.create_task(t.run(ops, {e.key: e}.get, tick=3600))
    try:
        await asyncio.sleep(0)  # the flusher is waiting
        t.finished(e.key)
        body = await asyncio.wait_for(ops.written.get(), 30)
        assert body["metadata"]["annotations"][IN_FLIGHT_NOW_ANNOTATION] == "0"
        t.started(e.key)
        t.finished(e.key)  # idle again, but the last write already said idle: nothing more to write
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert ops.written.empty()
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)

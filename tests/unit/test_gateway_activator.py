"""Scale from zero with a fake scaler: one wake-up for many held requests, Lease before scale, failures.

Held requests are awaited as conditions (the activator's own count), "at once" means "before the activation timeout
could have answered" (a timeout far beyond the test's guard), and the activation time is read on an injected clock.
"""

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import pytest

from modelservice.gateway import activator
from modelservice.gateway.testing import FakeOps, deployment, endpointslice, modelservice
from tests.unit.gateway_harness import chat, gateway, post, stubs
from tests.unit.loop_clock import until

# Longer than the test's own timeout (pytest-timeout): a held request answered by this timeout fails the test instead.
NEVER = 3600

pytestmark = pytest.mark.unit


async def test_twenty_held_requests_one_wake_up(monkeypatch):
    # The activator times a wake with time.monotonic(); its module's `time` becomes a clock the "pod" moves.
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(activator, "time", SimpleNamespace(monotonic=lambda: clock.now))

    async with stubs("127.0.0.6") as addrs:
        host, port = addrs[0]
        box = {}

        async def bring_up(ns, name, replicas):
            gw = box["gw"]

            async def later():  # the "pod" becomes Ready once all 20 wait, 0.5 s later on the clock
                gw.table.apply_deployment("MODIFIED", deployment(name, replicas, ns))
                await until(lambda: gw.activator.held((ns, name)) == 20, message="20 held requests")
                clock.now += 0.5
                gw.table.apply_slice("ADDED", endpointslice(name, [(host, True)], port, ns))

            asyncio.get_running_loop().create_task(later())

        ops = FakeOps(on_scale=bring_up)
        async with (
            gateway(modelservice("z", min_replicas=0), deployment("z", 0), ops=ops, activation_timeout=NEVER) as (
                gw,
                url,
            ),
            aiohttp.ClientSession() as s,
        ):
            box["gw"] = gw
            results = await asyncio.gather(*(post(s, url, chat("z", stream=True)) for _ in range(20)))
            assert [r[0] for r in results] == [200] * 20
            assert all(b"[DONE]" in r[1] for r in results)
            assert ops.scales == [("default", "z", 1)]  # ONE wake-up
            assert ops.calls[:2] == ["lease", "scale"]  # the Lease is written before the scale call
            assert gw.activator.wakes == 1 and gw.activator._episodes == {}
            hist = {s.name: s.value for s in gw.metrics.activation.collect()[0].samples}
            assert hist["modelservice_gateway_activation_seconds_count"] == 1
            assert hist["modelservice_gateway_activation_seconds_sum"] == pytest.approx(0.5)
            held = gw.metrics.held.labels("default/z")._value.get()
            assert held == 0


async def test_wake_scales_to_min_replicas_when_above_zero():
    ops = FakeOps()
    async with (
        gateway(modelservice("z", min_replicas=2), deployment("z", 0), ops=ops, activation_timeout=0.5) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        assert (await post(s, url, chat("z")))[0] == 503
        assert ops.scales == [("default", "z", 2)]


async def test_manual_zero_is_not_woken():
    ops = FakeOps()
    async with gateway(modelservice("z"), deployment("z", 0), ops=ops) as (gw, url), aiohttp.ClientSession() as s:
        status, body, _ = await post(s, url, chat("z"))
        assert status == 503 and "spec.replicas" in json.loads(body)["error"]["message"]
        assert ops.scales == []


async def test_failed_scale_releases_held_requests_at_once():
    class Forbidden(Exception):
        status = 403

    box = {}

    async def deny(ns, name, replicas):  # refused once all five wait: one wake-up answers them all
        await until(lambda: box["gw"].activator.held((ns, name)) == 5, message="five held requests")
        raise Forbidden('deployments.apps "z" is forbidden: cannot patch resource "deployments/scale"')

    ops = FakeOps(on_scale=deny)
    async with (
        gateway(modelservice("z", min_replicas=0), deployment("z", 0), ops=ops, activation_timeout=NEVER) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        box["gw"] = gw
        results = await asyncio.gather(*(post(s, url, chat("z")) for _ in range(5)))
        assert [r[0] for r in results] == [503] * 5
        assert all("could not scale" in json.loads(r[1])["error"]["message"] for r in results)
        assert len(ops.scales) == 1  # permanent errors are not retried


async def test_requests_wait_for_a_starting_pod_without_scaling():
    async with stubs("127.0.0.7") as addrs:
        ops = FakeOps()
        async with (
            gateway(modelservice("m", min_replicas=0), deployment("m", 1), ops=ops, activation_timeout=NEVER) as (
                gw,
                url,
            ),
            aiohttp.ClientSession() as s,
        ):
            task = asyncio.create_task(post(s, url, chat("m")))
            await until(lambda: gw.activator.held(("default", "m")) == 1, message="the request held")
            assert not task.done()
            gw.table.apply_slice("ADDED", endpointslice("m", [(addrs[0][0], True)], addrs[0][1]))
            assert (await task)[0] == 200
            assert ops.scales == []


async def test_deleting_the_model_answers_held_requests_at_once():
    async with (
        gateway(modelservice("z", min_replicas=0), deployment("z", 1), activation_timeout=NEVER) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        held = [asyncio.create_task(post(s, url, chat("z"))) for _ in range(3)]
        await until(lambda: gw.activator.held(("default", "z")) == 3, message="three held requests")
        gw.table.apply_modelservice("DELETED", modelservice("z", min_replicas=0))
        results = await asyncio.gather(*held)
        assert [r[0] for r in results] == [503] * 3
        assert all("deleted" in json.loads(r[1])["error"]["message"] for r in results)


async def test_a_held_request_that_times_out_waiting_for_gpus_says_so():
    said = (
        "no GPU free: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu.; nothing can be parked: "
        "team-a/x is busy (1 request(s) in flight)"
    )

    box = {}

    async def pending(ns, name, replicas):  # scaled up, and the operator then says its pod waits for GPUs
        gw = box["gw"]
        gw.table.apply_deployment("MODIFIED", deployment(name, replicas, ns))
        ms = modelservice(name, ns, min_replicas=0)
        ms["status"] = {
            "conditions": [{"type": "Ready", "status": "False", "reason": "AwaitingCapacity", "message": said}]
        }
        gw.table.apply_modelservice("MODIFIED", ms)

    ops = FakeOps(on_scale=pending)
    async with (
        gateway(modelservice("z", min_replicas=0), deployment("z", 0), ops=ops, activation_timeout=0.5) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        box["gw"] = gw
        status, body, _ = await post(s, url, chat("z"))
        error = json.loads(body)["error"]
        assert status == 503 and error["code"] == "awaiting_capacity"
        assert error["message"] == f"model default/z did not become ready within 0.5s: {said}; retry later"

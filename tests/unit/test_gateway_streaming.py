"""Streaming through the gateway: chunks pass unbuffered, disconnects reach the backend, truncation is visible.

Nothing here is judged by the clock. "Unbuffered" is checked in lockstep: the upstream writes its next chunk only
once the client holds the previous one, so a gateway that sat on a chunk would stall the stream (and fail at the
upstream's deadline). "A disconnect reaches the backend" is the upstream's own write failing on a stream that would
otherwise never end. Waits are conditions (`until`), and one that reaches its deadline fails the test.
"""

import asyncio

import aiohttp
import pytest
from aiohttp import web

from modelservice.gateway.testing import endpointslice, modelservice, serving
from tests.unit.gateway_harness import chat, gateway
from tests.unit.loop_clock import until

pytestmark = pytest.mark.unit

# How long an upstream waits for a condition only a broken gateway leaves unmet (a chunk not relayed). Reaching it
# fails the test; a working gateway never comes near it, however slow the machine.
DEADLINE = 10


def upstream_on(handler):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_streaming_passes_chunks_through_unbuffered():
    n = 10

    delivered = [asyncio.Event() for _ in range(n)]
    stalled: list[int] = []  # chunks the client did not get before the upstream's deadline

    async def lockstep(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(f'data: {{"token": {i}}}\n\n'.encode())
            try:  # the next chunk only once the client holds this one: a buffering gateway deadlocks here
                await asyncio.wait_for(delivered[i].wait(), DEADLINE)
            except asyncio.TimeoutError:
                stalled.append(i)
                break  # end the stream: the test reports the stall instead of hanging
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with (
        serving(upstream_on(lockstep), host="127.0.0.5") as up_url,
        gateway(modelservice("m"), endpointslice("m", [("127.0.0.5", True)], port_of(up_url))) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        got = []
        async with s.post(url + "/v1/chat/completions", json=chat("m", stream=True)) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b'data: {"token": '):
                    i = int(line[len(b'data: {"token": ') :].split(b"}")[0])
                    got.append(i)
                    delivered[i].set()
        assert stalled == [], f"chunk {stalled} did not reach the client before the upstream's next write"
        assert got == list(range(n))
        await until(lambda: gw.balancer._in_flight == {}, message="the endpoint released")


async def test_client_disconnect_cancels_upstream():
    started, gone, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def endless(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            # Far longer than the test can run (bounded all the same): only a closed connection ends this loop.
            for i in range(1_000_000):
                await resp.write(f"data: {i}\n\n".encode())
                started.set()
                await asyncio.sleep(0.05)  # pacing only; nothing is judged by it
        except ConnectionResetError:
            gone.set()  # the write failed: the gateway closed the connection
            return resp
        except asyncio.CancelledError:
            gone.set()  # aiohttp cancelled the handler: the gateway closed the connection
            raise
        finished.set()
        return resp

    async with (
        serving(upstream_on(endless), host="127.0.0.4") as up_url,
        gateway(modelservice("m"), endpointslice("m", [("127.0.0.4", True)], port_of(up_url))) as (gw, url),
    ):
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", json=chat("m", stream=True)) as r:
                assert r.status == 200
                await r.content.readline()  # one event, then the client hangs up
        # The upstream's stream can only end by its connection closing: the gateway passed the hang-up on.
        await until(lambda: gone.is_set() or finished.is_set(), message="the upstream's connection to close")
        assert started.is_set() and gone.is_set() and not finished.is_set()
        await until(
            lambda: not gw.balancer._in_flight and gw.activity.in_flight(("default", "m")) == 0,
            message="the gateway's in-flight counts back to zero",
        )
        answered = {
            s.labels["code"]: s.value
            for s in gw.metrics.requests.collect()[0].samples
            if s.name.endswith("_total") and s.labels.get("model") == "default/m"
        }
        assert answered == {"499": 1}, answered  # logged as the client's hang-up, not as a success or an error


async def test_upstream_death_mid_stream_truncates_the_response():
    first_delivered = asyncio.Event()

    async def dies(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        # Die mid-stream by construction: once the client holds the first event (bounded: a gateway that never
        # relays it fails on the assertion below instead).
        try:
            await asyncio.wait_for(first_delivered.wait(), DEADLINE)
        except asyncio.TimeoutError:
            pass
        request.transport.close()  # the pod is killed
        return resp

    async with (
        serving(upstream_on(dies), host="127.0.0.8") as up_url,
        gateway(modelservice("m"), endpointslice("m", [("127.0.0.8", True)], port_of(up_url))) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        async with s.post(url + "/v1/chat/completions", json=chat("m", stream=True)) as r:
            assert r.status == 200
            assert await r.content.readline() == b"data: 1\n"
            first_delivered.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()  # not a clean end: the client knows the answer is cut short

"""Streaming through the gateway: chunks pass unbuffered, disconnects reach the backend, truncation is visible."""

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from modelservice.gateway.testing import endpointslice, modelservice, serving
from tests.unit.test_gateway_http import chat, gateway, run, slice_for, stubs

pytestmark = pytest.mark.unit


def test_streaming_passes_chunks_through_unbuffered():
    async def scenario():
        async with stubs("127.0.0.1", tps=20) as addrs, gateway(modelservice("m"), *slice_for("m", addrs)) as (
                gw, url), aiohttp.ClientSession() as s:
            started = time.monotonic()
            arrivals = []
            async with s.post(url + "/v1/chat/completions", json=chat("m", stream=True, max_tokens=10)) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        arrivals.append(time.monotonic() - started)
            # 10 tokens at 20/s arrive over ~0.5 s, not all at the end.
            assert len(arrivals) >= 10 and arrivals[-1] - arrivals[1] > 0.3
            assert gw.balancer._in_flight == {}

    run(scenario())


def test_client_disconnect_cancels_upstream():
    async def scenario():
        events = {"started": asyncio.Event(), "gone": asyncio.Event()}

        async def slow(request):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            events["started"].set()
            try:
                for i in range(200):  # 10 s if nobody stops us
                    await resp.write(f"data: {i}\n\n".encode())
                    await asyncio.sleep(0.05)
            except (ConnectionResetError, asyncio.CancelledError):
                events["gone"].set()
                raise
            return resp

        upstream = web.Application()
        upstream.router.add_post("/v1/chat/completions", slow)
        async with serving(upstream, host="127.0.0.4") as up_url, gateway(
                modelservice("m"), endpointslice("m", [("127.0.0.4", True)], int(up_url.rsplit(":", 1)[1]))) as (
                gw, url):
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/chat/completions", json=chat("m", stream=True)) as r:
                    await r.content.readline()
            t0 = time.monotonic()
            await asyncio.wait_for(events["gone"].wait(), 5)
            assert time.monotonic() - t0 < 2
            for _ in range(50):
                if not gw.balancer._in_flight and gw.activity.in_flight(("default", "m")) == 0:
                    break
                await asyncio.sleep(0.02)
            assert gw.balancer._in_flight == {} and gw.activity.in_flight(("default", "m")) == 0

    run(scenario())


def test_upstream_death_mid_stream_truncates_the_response():
    async def scenario():
        async def dies(request):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: 1\n\n")
            await asyncio.sleep(0.1)
            request.transport.close()  # the pod is killed
            return resp

        upstream = web.Application()
        upstream.router.add_post("/v1/chat/completions", dies)
        async with serving(upstream, host="127.0.0.8") as up_url, gateway(
                modelservice("m"), endpointslice("m", [("127.0.0.8", True)], int(up_url.rsplit(":", 1)[1]))) as (
                gw, url), aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", json=chat("m", stream=True)) as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()  # not a clean end: the client knows the answer is cut short

    run(scenario())

"""The gateway's one replay rule (proxy.py, docs/reliability.md "One replay rule"), branch by branch, through the
whole gateway against raw engines on 127.0.0.x that each count the requests they read.

A request goes to a second endpoint only when the first provably produced nothing: no byte was written (NotSent:
test_gateway_upstream.py and test_dead_endpoint_is_retried_elsewhere), or it refused the request (503/429) with
nothing but that answer. Anything else is the client's answer, and the other endpoints never see the request.
"""

import asyncio
import contextlib
import json
import random
import socket
import struct

import aiohttp
import pytest

from modelservice.gateway import proxy
from modelservice.gateway.testing import deployment, endpointslice, gateway_with, modelservice

pytestmark = pytest.mark.unit
HOSTS = ("127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24", "127.0.0.25")


class FirstChoice(random.Random):
    """The balancer's tie-break, made predictable: the first least-loaded endpoint in slice order."""

    def choice(self, seq):
        return seq[0]


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def answer(mode: str, writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
    if mode == "ok":
        body = b'{"choices": []}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    elif mode in ("503", "429"):
        body = b'{"error": "server busy"}'
        writer.write(
            b"HTTP/1.1 %s Busy\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (mode.encode(), len(body), body)
        )
    elif mode == "garbage":
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
    elif mode == "silent":
        await release.wait()
    elif mode == "midstream":
        event = b'data: {"token": 0}\n\n'
        writer.write(SSE_HEAD + b"%x\r\n%s\r\n" % (len(event), event))
    # "close": nothing at all; the connection closes below
    await writer.drain()


@contextlib.asynccontextmanager
async def engines(*modes: str):
    """One raw engine per mode on its own loopback address; yields ([(host, port)], requests read per host)."""
    seen = {h: 0 for h in HOSTS[: len(modes)]}
    release = asyncio.Event()
    servers = []

    def handler(host, mode):
        async def on_conn(reader, writer):
            try:
                if mode == "unread":  # a server shutting down: the request arrived, it resets the connection
                    await reader.readuntil(b"\r\n\r\n")
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                    return
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        0,
                    )
                    await reader.readexactly(length)
                    if head.startswith(b"POST "):  # not the gateway's engine-load poll (GET /metrics, engine_load.py)
                        seen[host] += 1
                    await answer(mode, writer, release)
                    if mode not in ("ok", "503", "429"):
                        break
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        return on_conn

    try:
        addrs = []
        for host, mode in zip(HOSTS, modes):
            server = await asyncio.start_server(handler(host, mode), host, 0)
            servers.append(server)
            addrs.append((host, server.sockets[0].getsockname()[1]))
        yield addrs, seen
    finally:
        release.set()
        for server in servers:
            server.close()


@contextlib.asynccontextmanager
async def gateway_to(addrs, **config):
    slices = [endpointslice("m", [(h, True)], p, name=f"m-{i}") for i, (h, p) in enumerate(addrs)]
    # LeastInFlight with its ties broken towards the first endpoint: the tests say which engine is tried first.
    ms = modelservice("m", routing="LeastInFlight")
    async with gateway_with(ms, deployment("m", len(addrs)), *slices, **config) as (gw, url):
        gw.proxy.balancer._rng = FirstChoice()
        yield gw, url


async def chat(url: str, stream: bool = False) -> tuple[int, bytes]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            got = b""
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():
                    got += chunk
            return r.status, got


def untouched(gw) -> dict[str, float]:
    """modelservice_gateway_untouched_tries of model m, by reason."""
    family = gw.metrics.untouched_tries.collect()[0]
    return {x.labels["reason"]: x.value for x in family.samples if x.name.endswith("_total") and x.value}


def code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


@pytest.mark.parametrize(
    "mode, status, error",
    [
        ("close", 502, "bad_gateway"),  # read the request, closed without a byte of answer: it may have started on it
        ("garbage", 502, "bad_gateway"),
        ("silent", 504, "upstream_timeout"),
        ("midstream", 200, None),  # the answer began: the client gets it, cut, and the error event
    ],
)
async def test_an_engine_that_may_have_worked_on_the_request_is_not_replayed(mode, status, error):
    async def scenario():
        async with engines(mode, "ok") as (addrs, seen), gateway_to(addrs, upstream_timeout=0.5) as (gw, url):
            got = await chat(url, stream=mode == "midstream")
            return got, seen

    (got_status, body), seen = await scenario()
    assert got_status == status
    if error:
        assert code(body) == error
    else:
        assert b"upstream_failed_mid_stream" in body
    assert seen == {HOSTS[0]: 1, HOSTS[1]: 0}  # the healthy endpoint never saw it


async def test_a_request_dropped_unread_goes_to_another_endpoint():
    """An engine stopping (no preStop wait: --prestop-seconds 0) resets a connection whose request it never read: no
    byte of an answer, a reset, so it cannot have acted on it, and the next endpoint answers."""

    async def scenario():
        async with engines("unread", "ok") as (addrs, seen), gateway_to(addrs) as (gw, url):
            return await chat(url), seen, untouched(gw)

    (status, body), seen, tries = await scenario()
    assert status == 200 and json.loads(body) == {"choices": []}
    assert seen == {HOSTS[0]: 0, HOSTS[1]: 1}
    assert tries == {"unread": 1.0}  # modelservice_gateway_untouched_tries says why it went elsewhere


@pytest.mark.parametrize("refusal", ["503", "429"])
async def test_a_refusal_goes_to_another_endpoint(refusal):
    async def scenario():
        async with engines(refusal, "ok") as (addrs, seen), gateway_to(addrs) as (gw, url):
            return await chat(url), seen, untouched(gw)

    (status, body), seen, tries = await scenario()
    assert status == 200 and json.loads(body) == {"choices": []}
    assert seen == {HOSTS[0]: 1, HOSTS[1]: 1}
    assert tries == {"refused": 1.0}


async def test_a_refusal_with_no_other_endpoint_reaches_the_client_in_the_engines_words():
    async def scenario():
        async with engines("503") as (addrs, seen), gateway_to(addrs) as (gw, url):
            return await chat(url), seen

    (status, body), seen = await scenario()
    assert (status, json.loads(body)) == (503, {"error": "server busy"})
    assert seen == {HOSTS[0]: 1}


async def test_one_budget_per_request_however_many_endpoints_refuse():
    async def scenario():
        async with engines(*["503"] * 5) as (addrs, seen), gateway_to(addrs) as (gw, url):
            return await chat(url), seen

    (status, body), seen = await scenario()
    assert status == 503  # the last try's answer, relayed
    assert sum(seen.values()) == proxy.MAX_ATTEMPTS == 3


async def test_a_refusal_then_unreachable_endpoints_says_busy_and_quarantines_only_the_unreachable():
    """A refusal says more than a refused connection: with the budget spent, the client is told the model is busy;
    the endpoints that did not listen are out of the table, the busy one is not."""

    async def scenario():
        async with engines("503") as (addrs, seen):
            port = addrs[0][1]
            async with gateway_to(addrs + [("127.0.0.29", port), ("127.0.0.30", port)]) as (gw, url):
                got = await chat(url)
                return got, seen, [e.address for e in gw.table.ready(("default", "m"))]

    (status, body), seen, ready = await scenario()
    assert status == 503 and code(body) == "backend_busy"
    assert seen == {HOSTS[0]: 1}
    assert ready == [HOSTS[0]]

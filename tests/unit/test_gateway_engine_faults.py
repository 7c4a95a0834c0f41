"""What a client sees when the engine itself fails: a model that cannot start, and a stream cut mid-answer."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from modelservice.gateway.testing import FakeOps, deployment, endpointslice, feed, gateway_with, modelservice

pytestmark = pytest.mark.unit


LOG = "llama-server: error: invalid argument: --no-such-flag"


def stalled(ms: dict, message: str = LOG) -> dict:
    """The ModelService as the operator reports a crash-looping engine (status.py)."""
    ms = json.loads(json.dumps(ms))
    ms["metadata"]["generation"] = 1
    ms["status"] = {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Stalled",
                "status": "True",
                "reason": "CrashLoopBackOff",
                "message": f"pod m-1: CrashLoopBackOff: back-off 10s; its last log lines:\n{message}",
            }
        ],
    }
    return ms


def chat(model: str, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": 4}


async def _post(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            return r.status, await r.json()


async def test_a_model_that_cannot_start_answers_503_with_the_engines_words_at_once():
    async with gateway_with(stalled(modelservice("m")), deployment("m", 1), activation_timeout=300) as (gw, url):
        status, body = await asyncio.wait_for(_post(url, chat("m")), 10)  # not the 300 s activation timeout
    assert status == 503
    assert body["error"]["code"] == "model_not_starting" and LOG in body["error"]["message"]


async def test_held_requests_learn_why_the_model_did_not_come_up():
    ops = FakeOps()
    ms = modelservice("z", min_replicas=0)
    async with gateway_with(ms, deployment("z", 0), ops=ops, activation_timeout=300) as (gw, url):
        held = asyncio.ensure_future(_post(url, chat("z", stream=True)))
        while not ops.scales:  # the wake-up went out: the request is held
            await asyncio.sleep(0.01)
        feed(gw.table, deployment("z", 1), event="MODIFIED")
        assert not held.done()
        feed(gw.table, stalled(ms), event="MODIFIED")  # the engine crash-loops: the operator says so
        status, body = await asyncio.wait_for(held, 10)
    assert status == 503 and LOG in body["error"]["message"]


async def test_a_stale_stalled_condition_does_not_refuse_a_new_spec():
    ms = stalled(modelservice("m"))
    ms["metadata"]["generation"] = 2  # the user fixed the spec; the operator has not judged it yet
    async with gateway_with(ms, deployment("m", 1), activation_timeout=0.2) as (gw, url):
        status, body = await _post(url, chat("m"))
    assert status == 503 and body["error"]["code"] != "model_not_starting"


async def test_an_engine_that_dies_mid_stream_leaves_an_openai_error_event():
    """The engine writes one SSE chunk and its connection closes: the client gets the chunk, then an error event in
    OpenAI's shape (SDKs raise on it), then a cut connection (not a clean end that would pass for a whole answer)."""
    first = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(first):x}\r\n".encode()
            + first
            + b"\r\n"
        )
        await writer.drain()
        writer.close()  # dies here

    server = await asyncio.start_server(engine, "127.0.0.9", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with gateway_with(
            modelservice("m"), deployment("m", 1), endpointslice("m", [("127.0.0.9", True)], port)
        ) as (gw, url):
            got = b""
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/chat/completions", json=chat("m", stream=True)) as r:
                    assert r.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        async for chunk in r.content.iter_any():
                            got += chunk
    finally:
        server.close()
    events = [e for e in got.split(b"\n\n") if e]
    assert events[0] + b"\n\n" == first
    error = json.loads(events[1].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_failed_mid_stream" and "incomplete" in error["message"]


async def test_a_request_to_a_pod_that_just_went_away_waits_for_its_replacement():
    """Scaled to zero and woken at once: the EndpointSlice still lists the old pod, which no longer listens. Nothing
    was sent to it, so the request waits for the new pod instead of failing with 502."""
    import socket

    from modelservice.gateway.testing import serving
    from tests.cluster.stub_server import make_app as stub_app

    with socket.socket() as s:  # an address where nothing listens: the old pod
        s.bind(("127.0.0.11", 0))
        gone_port = s.getsockname()[1]
    async with serving(stub_app("m", 1000.0), host="127.0.0.12") as new_url:
        new_port = int(new_url.rsplit(":", 1)[1])
        async with gateway_with(
            modelservice("m", min_replicas=0),
            deployment("m", 1),
            endpointslice("m", [("127.0.0.11", True)], gone_port, name="m-old"),
            activation_timeout=300,
        ) as (gw, url):
            answer = asyncio.ensure_future(_post(url, chat("m")))
            while not gw.activator.held(("default", "m")):  # refused, then held: not a 502
                assert not answer.done(), answer.result()
                await asyncio.sleep(0.01)
            feed(gw.table, endpointslice("m", [], gone_port, name="m-old"), event="MODIFIED")  # the old pod leaves
            assert not answer.done()
            feed(gw.table, endpointslice("m", [("127.0.0.12", True)], new_port, name="m-new"))  # the new one is Ready
            status, body = await asyncio.wait_for(answer, 10)
    assert status == 200, body

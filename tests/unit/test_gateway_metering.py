"""Token metering (metering.py): usage read from answers, the usage event asked for and hidden, cuts, cardinality."""

import base64
import json

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from modelservice.gateway.metering import Meter, Metering, prepare
from modelservice.gateway.tenants import TENANT_LABEL
from modelservice.gateway.testing import endpointslice, gateway_with, modelservice, serving
from tests.cluster.stub_server import make_app as stub_app
from tests.unit.loop_clock import until

pytestmark = pytest.mark.unit

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}}
CONTENT = [b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i for i in range(3)]
USAGE_EVENT = b'data: {"id":"x","choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n"
STREAM = b"".join(CONTENT) + USAGE_EVENT + b"data: [DONE]\n\n"


def _feed(meter, data, at):
    out = b""
    for i in range(0, len(data), at) if at else [0]:
        out += meter.feed(data[i : i + at] if at else data)
    return out + meter.finish()


@pytest.mark.parametrize("at", [0, 1, 2, 7, 13, 50, 64])
def test_stream_usage_event_is_read_and_hidden_however_the_bytes_are_cut(at):
    meter = Meter(stream=True, strip=True)
    assert _feed(meter, STREAM, at) == b"".join(CONTENT) + b"data: [DONE]\n\n"
    assert (meter.prompt, meter.completion, meter.done) == (7, 3, True)


@pytest.mark.parametrize("at", [0, 1, 5, 33])
def test_a_client_that_asked_gets_the_stream_byte_for_byte(at):
    meter = Meter(stream=True)
    assert _feed(meter, STREAM, at) == STREAM
    assert (meter.prompt, meter.completion) == (7, 3)


@pytest.mark.parametrize("at", [0, 1, 9, 100])
def test_non_streamed_body_in_any_chunks(at):
    body = json.dumps({"id": "x", "choices": [{"message": {"content": "{usage}"}}], "usage": USAGE}).encode()
    meter = Meter(stream=False)
    assert _feed(meter, body, at) == body
    assert (meter.prompt, meter.completion) == (7, 3)
    whole = Meter(stream=False)
    whole.whole(body)
    assert (whole.prompt, whole.completion, whole.done) == (7, 3, True)


def test_usage_in_the_last_content_event_stays_and_counts():
    last = (
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
    )
    meter = Meter(stream=True, strip=True)
    assert _feed(meter, CONTENT[0] + last, 0) == CONTENT[0] + last
    assert (meter.prompt, meter.completion) == (2, 1)


def test_no_usage_is_unknown_and_a_cut_stream_counts_its_events():
    meter = Meter(stream=True, strip=True)
    _feed(meter, b"".join(CONTENT) + b"data: [DONE]\n\n", 0)
    assert meter.prompt is None and meter.done
    cut = Meter(stream=True, strip=True)
    for c in CONTENT[:2]:
        cut.feed(c)
    assert cut.events == 2 and not cut.done


def test_prepare_asks_for_usage_only_when_the_client_did_not():
    doc = {"model": "m", "stream": True}
    meter, changed = prepare(doc, "/v1/chat/completions")
    assert changed and meter.strip and doc["stream_options"] == {"include_usage": True}
    doc = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    meter, changed = prepare(doc, "/v1/completions")
    assert not changed and not meter.strip
    doc = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": False}}
    meter, changed = prepare(doc, "/v1/chat/completions")
    assert changed and doc["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    doc = {"model": "m", "stream": True, "stream_options": "yes"}
    assert prepare(doc, "/v1/chat/completions")[1] is False and doc["stream_options"] == "yes"
    assert prepare({"model": "m"}, "/v1/embeddings")[0].stream is False
    assert prepare({"model": "m"}, "/api/chat") == (None, False)


def test_tenant_labels_are_bounded():
    reg = CollectorRegistry()
    m = Metering(reg, max_tenants=2)
    for t in ("a", "b", "c", "d", "c"):
        m.record(t, "ns/m", 200, None, False)
    assert (
        reg.get_sample_value(
            "modelservice_gateway_tenant_requests_total", {"tenant": "_other", "model": "ns/m", "outcome": "ok"}
        )
        == 3
    )
    assert reg.get_sample_value("modelservice_gateway_tenants_aggregated") == 2


def _tenant_secret(name, key, namespaces="default"):
    return {
        "metadata": {
            "name": name,
            "namespace": "gw",
            "uid": name,
            "resourceVersion": "1",
            "labels": {TENANT_LABEL: name},
            "annotations": {"serving.modelservice.dev/namespaces": namespaces},
        },
        "data": {"keys": base64.b64encode(key.encode()).decode()},
    }


async def test_gateway_meters_tokens_per_tenant_from_a_real_stream():
    """Over sockets, the stub engine counting its own tokens: what the client saw and the counters agree."""

    async def no_usage(request: web.Request) -> web.Response:
        return web.json_response({"id": "x", "choices": [{"message": {"content": "hi"}}]})

    bare = web.Application()
    bare.router.add_post("/v1/chat/completions", no_usage)
    async with serving(stub_app("m", 10000.0)) as up, serving(bare, host="127.0.0.2") as up2:
        port, port2 = int(up.rsplit(":", 1)[1]), int(up2.rsplit(":", 1)[1])
        async with (
            gateway_with(
                modelservice("m"),
                endpointslice("m", [("127.0.0.1", True)], port),
                modelservice("bare"),
                endpointslice("bare", [("127.0.0.2", True)], port2),
                tenant_namespace="gw",
            ) as (gw, url),
            aiohttp.ClientSession() as s,
        ):
            gw.keys.tenants.apply("ADDED", _tenant_secret("team-a", "ka"))
            gw.keys.tenants.apply("ADDED", _tenant_secret("team-b", "kb"))

            async def chat(key, model="m", **extra):
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": "one two three"}],
                    "max_tokens": 5,
                    **extra,
                }
                async with s.post(
                    url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                ) as r:
                    assert r.status == 200
                    return await r.read()

            plain = await chat("ka", stream=True)
            assert b'"usage"' not in plain and plain.endswith(b"data: [DONE]\n\n")
            asked = await chat("ka", stream=True, stream_options={"include_usage": True})
            assert asked.count(b"data: {") == plain.count(b"data: {") + 1  # only the usage event differs
            events = [json.loads(e[6:]) for e in asked.split(b"\n\n") if e.startswith(b"data: {")]
            client_usage = events[-1]["usage"]
            assert events[-1]["choices"] == [] and client_usage["completion_tokens"] == 5
            whole = json.loads(await chat("kb"))
            await chat("kb", model="bare")

            def sample(name, **labels):
                return gw.metrics.registry.get_sample_value(name, labels) or 0

            a = {"tenant": "team-a", "model": "default/m", "outcome": "ok"}
            b = {"tenant": "team-b", "model": "default/m", "outcome": "ok"}
            assert sample("modelservice_gateway_tenant_requests_total", **a) == 2
            assert sample("modelservice_gateway_prompt_tokens_total", **a) == 2 * client_usage["prompt_tokens"]
            assert sample("modelservice_gateway_completion_tokens_total", **a) == 10
            assert sample("modelservice_gateway_prompt_tokens_total", **b) == whole["usage"]["prompt_tokens"]
            assert sample("modelservice_gateway_completion_tokens_total", **b) == whole["usage"]["completion_tokens"]
            assert (
                sample(
                    "modelservice_gateway_unmetered_requests_total",
                    tenant="team-b",
                    model="default/bare",
                    reason="no_usage",
                )
                == 1
            )

            # A client that leaves mid-stream: outcome cut, the events it got counted, prompt unknown.
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000, "stream": True}
            async with s.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer kb"}) as r:
                await r.content.readuntil(b"\n\n")
            r.close()
            cut = {"tenant": "team-b", "model": "default/m"}
            await until(lambda: sample("modelservice_gateway_unmetered_requests_total", **cut, reason="cut") == 1)
            assert sample("modelservice_gateway_tenant_requests_total", **cut, outcome="cut") == 1
            assert sample("modelservice_gateway_completion_tokens_total", **cut, outcome="cut") >= 1

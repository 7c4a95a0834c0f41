"""Quotas (quotas.py): token buckets per tenant on an injected clock, reserve-then-settle, the 429 a client gets."""

import base64

import aiohttp
import pytest

from modelservice.gateway.quotas import QuotaExceeded, Quotas
from modelservice.gateway.tenants import TENANT_LABEL, parse_secret
from modelservice.gateway.testing import endpointslice, gateway_with, modelservice, serving
from tests.cluster.stub_server import make_app as stub_app
from tests.cluster.stub_server import stub_state

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_requests_per_minute_refill_continuously():
    clock = Clock()
    q = Quotas(clock=clock)
    for _ in range(60):
        q.admit("a", 60, None, 0)
    with pytest.raises(QuotaExceeded) as e:
        q.admit("a", 60, None, 0)
    assert e.value.status == 429 and e.value.retry_after == 1
    assert e.value.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }
    q.admit("b", 60, None, 0)  # tenants are separate
    clock.now += 1.0
    q.admit("a", 60, None, 0)  # one second: one request back
    with pytest.raises(QuotaExceeded):
        q.admit("a", 60, None, 0)


def test_each_replica_enforces_its_share():
    q = Quotas(share=3, clock=Clock())
    for _ in range(20):
        q.admit("a", 60, None, 0)
    with pytest.raises(QuotaExceeded) as e:
        q.admit("a", 60, None, 0)
    assert e.value.retry_after == 3 and e.value.headers["x-ratelimit-limit-requests"] == "60"


def test_tokens_are_reserved_then_settled_to_what_was_used():
    clock = Clock()
    q = Quotas(clock=clock)
    first = q.admit("a", None, 1000, 600)
    with pytest.raises(QuotaExceeded) as e:  # 400 left, 600 wanted: nothing is taken from either bucket
        q.admit("a", None, 1000, 600)
    assert e.value.headers["x-ratelimit-remaining-tokens"] == "400"
    assert e.value.retry_after == 12  # 200 tokens at 1000/60 per second
    q.settle(first, 100)  # it used 100: 500 come back
    second = q.admit("a", None, 1000, 600)
    q.settle(second, 1500)  # it used more than reserved: a debt the next requests wait out
    with pytest.raises(QuotaExceeded) as e:
        q.admit("a", None, 1000, 1)
    assert e.value.retry_after == 37  # from -600 to 1 token at 1000/60 per second: 36.06 s, rounded up
    clock.now += 37
    q.admit("a", None, 1000, 1)
    q.settle(None, 5)  # no reservation: nothing to do


def test_unknown_usage_keeps_the_reservation_and_a_request_over_the_whole_minute_passes_when_full():
    q = Quotas(clock=Clock())
    r = q.admit("a", None, 100, 5000)  # bigger than a minute: it passes on a full bucket, and empties it
    q.settle(r, None)
    with pytest.raises(QuotaExceeded):
        q.admit("a", None, 100, 1)


def test_a_lowered_limit_keeps_what_was_used():
    clock = Clock()
    q = Quotas(clock=clock)
    for _ in range(10):
        q.admit("a", 100, None, 0)
    q.admit("a", 50, None, 0)  # capacity 50, 90 were left: 50 now, one taken
    for _ in range(49):
        q.admit("a", 50, None, 0)
    with pytest.raises(QuotaExceeded):
        q.admit("a", 50, None, 0)


def test_estimate():
    q = Quotas(default_max_tokens=100)
    assert q.estimate(400, {"max_tokens": 7}, "/v1/chat/completions") == 107
    assert q.estimate(400, {"max_completion_tokens": 9, "max_tokens": 7}, "/v1/chat/completions") == 109
    assert q.estimate(400, {}, "/v1/completions") == 200
    assert q.estimate(401, {"max_tokens": 7}, "/v1/embeddings") == 101
    assert q.estimate(8, None, "/api/chat") == 2


def _secret(rpm="", tpm="", bad=None):
    notes = {"serving.modelservice.dev/namespaces": "*"}
    if rpm:
        notes["serving.modelservice.dev/requests-per-minute"] = rpm
    if tpm:
        notes["serving.modelservice.dev/tokens-per-minute"] = tpm
    return {
        "metadata": {
            "name": "s",
            "namespace": "gw",
            "uid": "u",
            "resourceVersion": "1",
            "labels": {TENANT_LABEL: "team-a"},
            "annotations": notes,
        },
        "data": {"keys": base64.b64encode(b"ka").decode()},
    }


@pytest.mark.parametrize("rpm, tpm", [("0", ""), ("-1", ""), ("1.5", ""), ("", "lots")])
def test_bad_limits_refuse_the_secret(rpm, tpm):
    parsed, wrong = parse_secret(_secret(rpm, tpm))
    assert parsed is None and "whole number" in wrong


async def test_gateway_refuses_over_quota_before_the_engine():
    stub = stub_app("m", 10000.0)
    async with serving(stub) as up:
        port = int(up.rsplit(":", 1)[1])
        async with (
            gateway_with(modelservice("m"), endpointslice("m", [("127.0.0.1", True)], port), tenant_namespace="gw") as (
                gw,
                url,
            ),
            aiohttp.ClientSession() as s,
        ):
            gw.quotas.clock = Clock()  # frozen: no refill while the test runs
            gw.keys.tenants.apply("ADDED", _secret(rpm="2"))
            headers = {"Authorization": "Bearer ka"}
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200
            async with s.get(url + "/models/default/m/v1/models", headers=headers) as r:
                assert r.status == 200  # every client path counts
            served = dict(stub_state(stub).success)
            async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                err = (await r.json())["error"]
                assert r.status == 429 and err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
                assert r.headers["Retry-After"] == "30"
                assert r.headers["x-ratelimit-limit-requests"] == "2"
                assert r.headers["x-ratelimit-remaining-requests"] == "0"
            assert stub_state(stub).success == served and sum(served.values()) == 1  # not sent to the engine
            assert (
                gw.metrics.registry.get_sample_value(
                    "modelservice_gateway_tenant_requests_total",
                    {"tenant": "team-a", "model": "default/m", "outcome": "rate_limited"},
                )
                == 1
            )


def test_tenant_and_tenant_on_model_both_hold_and_nothing_is_taken_on_refusal():
    clock = Clock()
    q = Quotas(clock=clock)
    scopes = [("a", "tenant a", 60, None), ("a|ns/m", "tenant a on model ns/m", 2, 1000)]
    first = q.admit_all(scopes, 100)
    q.admit_all(scopes, 100)
    with pytest.raises(QuotaExceeded) as e:
        q.admit_all(scopes, 100)
    assert "on model ns/m" in e.value.message and e.value.headers["x-ratelimit-limit-requests"] == "2"
    for _ in range(58):  # the tenant's own bucket lost only the two admitted requests
        q.admit("a", 60, None, 0)
    with pytest.raises(QuotaExceeded):
        q.admit("a", 60, None, 0)
    q.settle(first, 10)  # settles the model scope's tokens bucket (the tenant scope has no token limit)
    assert q._tokens["a|ns/m"].level == pytest.approx(1000 - 100 - 100 + 90)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("ns/m:rpm=60,tpm=1000", True),
        ("ns/m:rpm=5; other/x.y:tpm=7", True),
        ("ns/m", False),
        ("ns/m:rpm=0", False),
        ("ns/m:gpu=1", False),
        ("ns/m:", False),
        ("NS/m:rpm=1", False),
    ],
)
def test_model_quotas_annotation(text, ok):
    obj = _secret(rpm="100")
    obj["metadata"]["annotations"]["serving.modelservice.dev/model-quotas"] = text
    parsed, wrong = parse_secret(obj)
    assert (parsed is not None) == ok, wrong
    if ok:
        assert parsed.tenant.limits_on("ns/m") != (None, None) or "other" in text


async def test_gateway_applies_a_tenants_quota_on_one_model():
    async with serving(stub_app("m", 10000.0)) as up:
        port = int(up.rsplit(":", 1)[1])
        async with (
            gateway_with(modelservice("m"), endpointslice("m", [("127.0.0.1", True)], port), tenant_namespace="gw") as (
                gw,
                url,
            ),
            aiohttp.ClientSession() as s,
        ):
            gw.quotas.clock = Clock()
            obj = _secret()
            obj["metadata"]["annotations"]["serving.modelservice.dev/model-quotas"] = "default/m:rpm=1"
            gw.keys.tenants.apply("ADDED", obj)
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            statuses = []
            for _ in range(2):
                async with s.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer ka"}) as r:
                    statuses.append((r.status, (await r.json()).get("error", {}).get("message", "")))
            assert statuses[0][0] == 200 and statuses[1][0] == 429 and "on model default/m" in statuses[1][1]

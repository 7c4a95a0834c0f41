"""The gateway over real sockets on 127.0.0.x: status codes, streaming, balancing, retries, disconnects.

No cluster: the routing table is filled by hand and the Kubernetes-facing parts are a FakeOps.
"""

import asyncio
import base64
import contextlib
import json
import time

import aiohttp
import pytest
from aiohttp import web

from modelservice.gateway import reqstate as rs
from modelservice.gateway.testing import (FakeOps, deployment, endpointslice, gateway_with, modelservice,
                                         serving)
from tests.cluster.stub_server import make_app as stub_app

pytestmark = pytest.mark.unit


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


gateway = gateway_with


@contextlib.asynccontextmanager
async def stubs(*hosts, model="m", tps=1000.0):
    """One stub model server per loopback address; yields [(host, port)]."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for h in hosts:
            url = await stack.enter_async_context(serving(stub_app(model, tps), host=h))
            out.append((h, int(url.rsplit(":", 1)[1])))
        yield out


def slice_for(name, addrs, ns="default"):
    """All stubs must share one port number for one slice; so one slice per address here."""
    return [endpointslice(name, [(h, True)], p, ns, name=f"{name}-{i}") for i, (h, p) in enumerate(addrs)]


def chat(model, stream=False, max_tokens=4):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "max_tokens": max_tokens}


async def post(session, url, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with session.post(url + "/v1/chat/completions", data=data, **kw) as r:
        return r.status, await r.read(), r.headers


def test_bad_input_status_codes():
    async def scenario():
        secret = {"data": {"keys": base64.b64encode(b"sekret").decode()}}
        ops = FakeOps()
        ops.secrets[("default", "s")] = secret
        async with stubs("127.0.0.1") as addrs, gateway(
                modelservice("m"), modelservice("locked", api_key_secret="s"), modelservice("dup", "a"),
                modelservice("dup", "b"), *slice_for("m", addrs), *slice_for("locked", addrs),
                ops=ops, max_body_bytes=1000) as (gw, url), aiohttp.ClientSession() as s:
            assert (await post(s, url, b"{not json"))[0] == 400
            assert (await post(s, url, b""))[0] == 400
            assert (await post(s, url, b"[1]"))[0] == 400
            status, body, _ = await post(s, url, {"messages": []})
            assert status == 400 and json.loads(body)["error"]["code"] == "missing_model"
            status, body, _ = await post(s, url, chat("nope"))
            err = json.loads(body)["error"]
            assert status == 404 and err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
            status, body, _ = await post(s, url, chat("dup"))
            assert status == 400 and "a/dup" in json.loads(body)["error"]["message"]
            assert (await post(s, url, {"model": "m", "pad": "x" * 2000}))[0] == 413
            async def chunks():  # no Content-Length: the limit holds while reading
                for _ in range(10):
                    yield b" " * 500
            async with s.post(url + "/v1/chat/completions", data=chunks()) as r:
                assert r.status == 413
            assert (await post(s, url, chat("locked")))[0] == 401
            assert (await post(s, url, chat("locked"), headers={"Authorization": "Bearer wrong"}))[0] == 401
            ok = await post(s, url, chat("locked"), headers={"Authorization": "Bearer sekret"})
            assert ok[0] == 200, ok
            assert (await post(s, url, chat("m")))[0] == 200
            async with s.get(url + "/v1/chat/completions") as r:
                assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
            async with s.get(url + "/nowhere") as r:
                assert r.status == 404 and "error" in await r.json()
            async with s.get(url + "/models/default/locked/v1/models") as r:
                assert r.status == 401
            async with s.get(url + "/models/default/m/v1/models?x=1") as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == "m"
            async with s.get(url + "/models/default/absent/v1/models") as r:
                assert r.status == 404
            async with s.get(url + "/v1/models") as r:
                ids = {m["id"] for m in (await r.json())["data"]}
                assert ids == {"m", "a/dup", "b/dup"}  # not "locked": this caller has no key for it
            async with s.get(url + "/v1/models", headers={"Authorization": "Bearer sekret"}) as r:
                assert "locked" in {m["id"] for m in (await r.json())["data"]}
            codes = {s.labels["code"] for s in gw.metrics.requests.collect()[0].samples if s.name.endswith("_total")}
            assert {"400", "401", "404", "413", "200"} <= codes

    run(scenario())


def test_held_queue_full_is_429_and_no_backend_is_503():
    async def scenario():
        async with gateway(modelservice("z", min_replicas=0), deployment("z", 0), modelservice("gone"),
                           max_held_per_model=2, activation_timeout=2) as (gw, url), aiohttp.ClientSession() as s:
            held = [asyncio.create_task(post(s, url, chat("z"))) for _ in range(2)]
            for _ in range(100):
                await asyncio.sleep(0.02)
                if gw.activator.held(("default", "z")) == 2:
                    break
            status, body, headers = await post(s, url, chat("z"))
            assert status == 429 and headers["Retry-After"] and json.loads(body)["error"]["code"]
            results = await asyncio.gather(*held)  # nothing comes up: activation timeout
            assert [r[0] for r in results] == [503, 503]
            assert json.loads(results[0][1])["error"]["code"] == "activation_timeout"
            status, body, _ = await post(s, url, chat("gone"))  # no Deployment at all
            assert status == 503 and json.loads(body)["error"]["code"] == "no_backend"

    run(scenario())


def test_least_in_flight_spreads_over_three_replicas():
    async def scenario():
        hosts = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
        async with stubs(*hosts, tps=100) as addrs, gateway(modelservice("m"), *slice_for("m", addrs)) as (
                gw, url), aiohttp.ClientSession() as s:
            seen = []
            orig = gw.proxy.forward

            async def spy(request, *a, **kw):
                resp = await orig(request, *a, **kw)
                seen.append(request[rs.ENDPOINT].address)
                return resp
            gw.proxy.forward = spy
            results = await asyncio.gather(*(post(s, url, chat("m", max_tokens=20)) for _ in range(30)))
            assert all(r[0] == 200 for r in results)
            counts = {h: seen.count(h) for h in hosts}
            assert all(8 <= c <= 12 for c in counts.values()), counts

    run(scenario())


def test_dead_endpoint_is_retried_elsewhere():
    async def scenario():
        async with stubs("127.0.0.2") as addrs, gateway(
                modelservice("m"), endpointslice("m", [("127.0.0.9", True)], addrs[0][1], name="m-dead"),
                *slice_for("m", addrs)) as (gw, url), aiohttp.ClientSession() as s:
            results = [await post(s, url, chat("m")) for _ in range(6)]
            assert [r[0] for r in results] == [200] * 6  # 127.0.0.9 refuses connections; never surfaces

    run(scenario())


def test_all_endpoints_dead_is_502():
    async def scenario():
        async with gateway(modelservice("m"), endpointslice("m", [("127.0.0.9", True)], 1, name="m-dead")) as (
                gw, url), aiohttp.ClientSession() as s:
            status, body, _ = await post(s, url, chat("m"))
            assert status == 502 and json.loads(body)["error"]["type"] == "upstream_error"

    run(scenario())


def test_ollama_model_field_is_rewritten_and_auth_not_forwarded():
    async def scenario():
        seen = {}

        async def echo(request):
            seen["body"] = await request.json()
            seen["auth"] = request.headers.get("Authorization")
            return web.json_response({"ok": True})

        upstream = web.Application()
        upstream.router.add_post("/v1/chat/completions", echo)
        ops = FakeOps()
        ops.secrets[("default", "s")] = {"data": {"keys": base64.b64encode(b"k").decode()}}
        async with serving(upstream, host="127.0.0.5") as up_url, gateway(
                modelservice("o", engine="ollama", uri="ollama://llama3.2:1b", served_name="tiny",
                              api_key_secret="s"),
                endpointslice("o", [("127.0.0.5", True)], int(up_url.rsplit(":", 1)[1])), ops=ops) as (gw, url):
            async with aiohttp.ClientSession() as s:
                status, _, _ = await post(s, url, chat("tiny"), headers={"Authorization": "Bearer k"})
            assert status == 200 and seen["body"]["model"] == "llama3.2:1b" and seen["auth"] is None

    run(scenario())


def test_slow_request_head_is_cut_off():
    async def scenario():
        async with gateway(modelservice("m"), header_timeout=0.5) as (gw, url):
            host, port = url[len("http://"):].split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # ...and never finish the head
            await writer.drain()
            t0 = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed the connection
            assert time.monotonic() - t0 < 2
            writer.close()

    run(scenario())


def test_healthz_waits_for_sync():
    async def scenario():
        async with gateway() as (gw, url), aiohttp.ClientSession() as s:
            gw.synced = False
            async with s.get(url + "/healthz") as r:
                assert r.status == 503
            gw.synced = True
            async with s.get(url + "/healthz") as r:
                assert r.status == 200

    run(scenario())


def test_activity_leases_are_flushed_in_the_background():
    async def scenario():
        ops = FakeOps()
        async with stubs("127.0.0.1") as addrs, gateway(modelservice("m"), *slice_for("m", addrs), ops=ops,
                                                        activity_interval=0.5) as (gw, url), \
                aiohttp.ClientSession() as s:
            assert (await post(s, url, chat("m")))[0] == 200
            assert ops.leases == []  # never on the request path
            for _ in range(40):
                await asyncio.sleep(0.1)
                if len(ops.leases) >= 2:
                    break
            ann = [lease["metadata"]["annotations"]["serving.modelservice.dev/in-flight"] for lease in ops.leases]
            assert ann[:2] == ["1", "0"]
            await asyncio.sleep(1.2)
            assert len(ops.leases) == 2  # idle and unchanged: no more writes

    run(scenario())


def test_trickled_body_hits_the_body_deadline(monkeypatch):
    from modelservice.gateway import parsing
    monkeypatch.setattr(parsing, "BODY_DEADLINE", 0.5)

    async def scenario():
        async def drip():
            for _ in range(20):  # one byte every 0.1 s: never idle, never done
                yield b" "
                await asyncio.sleep(0.1)

        async with gateway(modelservice("m"), idle_timeout=1) as (gw, url), aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.post(url + "/v1/chat/completions", data=drip()) as r:
                assert r.status == 408
            assert time.monotonic() - t0 < 1.5

    run(scenario())

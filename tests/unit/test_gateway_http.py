"""The gateway over real sockets on 127.0.0.x: status codes, streaming, balancing, retries, disconnects.

No cluster: the routing table is filled by hand and the Kubernetes-facing parts are a FakeOps. Timeouts are judged
on an injected clock (the event loop's, frozen and moved by the test: FrozenLoopClock), waits are on conditions
(`until`), and nothing passes or fails because the machine was slow.
"""

import asyncio
import base64
import contextlib
import json

import aiohttp
import pytest
from aiohttp import web

from modelservice.gateway.testing import FakeOps, deployment, endpointslice, modelservice, serving
from tests.unit.gateway_harness import chat, gateway, post, slice_for, stubs, upstreams
from tests.unit.loop_clock import FrozenLoopClock, settle, until

pytestmark = pytest.mark.unit


async def test_bad_input_status_codes():
    secret = {"data": {"keys": base64.b64encode(b"sekret").decode()}}
    ops = FakeOps()
    ops.secrets[("default", "s")] = secret
    async with (
        stubs("127.0.0.1") as addrs,
        gateway(
            modelservice("m"),
            modelservice("locked", api_key_secret="s"),
            modelservice("dup", "a"),
            modelservice("dup", "b"),
            *slice_for("m", addrs),
            *slice_for("locked", addrs),
            ops=ops,
            max_body_bytes=1000,
        ) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
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


async def test_held_queue_full_is_429_and_no_backend_is_503():
    async with (
        gateway(
            modelservice("z", min_replicas=0),
            deployment("z", 0),
            modelservice("gone"),
            max_held_per_model=2,
            activation_timeout=2,
        ) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        # The activation timeout runs on the frozen clock: the two held requests stay held until the test moves
        # it, however long the third request takes to get through.
        async with FrozenLoopClock() as clock:
            held = [asyncio.create_task(post(s, url, chat("z"))) for _ in range(2)]
            await until(lambda: gw.activator.held(("default", "z")) == 2, message="two held requests")
            status, body, headers = await post(s, url, chat("z"))
            assert status == 429 and headers["Retry-After"] and json.loads(body)["error"]["code"]
            assert not any(t.done() for t in held)
            await clock.advance(2)  # nothing comes up: activation timeout
            await until(lambda: all(t.done() for t in held), message="the held requests answered")
        results = [t.result() for t in held]
        assert [r[0] for r in results] == [503, 503]
        assert all(json.loads(r[1])["error"]["code"] == "activation_timeout" for r in results)
        status, body, _ = await post(s, url, chat("gone"))  # no Deployment at all
        assert status == 503 and json.loads(body)["error"]["code"] == "no_backend"


async def test_least_in_flight_spreads_over_three_replicas():
    """30 requests at once over three replicas: exactly 10 each. Every upstream holds its answer until all 30 have
    arrived, so all 30 are in flight together whatever the machine's speed, and each choice rests on in-flight
    counts alone (a request that finished early would leave a tie, broken at random)."""
    n = 30

    hosts = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    arrived = {h: 0 for h in hosts}
    everyone = asyncio.Event()

    def upstream(host):
        async def answer(request):
            arrived[host] += 1
            if sum(arrived.values()) == n:
                everyone.set()
            await everyone.wait()
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": "hi"}}]})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        return app

    async with contextlib.AsyncExitStack() as stack:
        addrs = await stack.enter_async_context(upstreams(upstream, *hosts))
        gw, url = await stack.enter_async_context(
            gateway(modelservice("m", routing="LeastInFlight"), *slice_for("m", addrs))
        )
        s = await stack.enter_async_context(aiohttp.ClientSession())
        results = await asyncio.gather(*(post(s, url, chat("m")) for _ in range(n)))
    assert all(r[0] == 200 for r in results)
    assert arrived == {h: n // len(hosts) for h in hosts}, arrived


async def test_dead_endpoint_is_retried_elsewhere():
    async with (
        stubs("127.0.0.2") as addrs,
        gateway(
            modelservice("m"),
            endpointslice("m", [("127.0.0.9", True)], addrs[0][1], name="m-dead"),
            *slice_for("m", addrs),
        ) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        results = [await post(s, url, chat("m")) for _ in range(6)]
        assert [r[0] for r in results] == [200] * 6  # 127.0.0.9 refuses connections; never surfaces


async def test_all_endpoints_dead_is_502():
    async with (
        gateway(modelservice("m"), endpointslice("m", [("127.0.0.9", True)], 1, name="m-dead")) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        status, body, _ = await post(s, url, chat("m"))
        assert status == 502 and json.loads(body)["error"]["type"] == "upstream_error"


async def test_ollama_model_field_is_rewritten_and_auth_not_forwarded():
    seen = {}

    async def echo(request):
        seen["body"] = await request.json()
        seen["auth"] = request.headers.get("Authorization")
        return web.json_response({"ok": True})

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", echo)
    ops = FakeOps()
    ops.secrets[("default", "s")] = {"data": {"keys": base64.b64encode(b"k").decode()}}
    async with (
        serving(upstream, host="127.0.0.5") as up_url,
        gateway(
            modelservice("o", engine="ollama", uri="ollama://llama3.2:1b", served_name="tiny", api_key_secret="s"),
            endpointslice("o", [("127.0.0.5", True)], int(up_url.rsplit(":", 1)[1])),
            ops=ops,
        ) as (gw, url),
    ):
        async with aiohttp.ClientSession() as s:
            status, _, _ = await post(s, url, chat("tiny"), headers={"Authorization": "Bearer k"})
        assert status == 200 and seen["body"]["model"] == "llama3.2:1b" and seen["auth"] is None


async def test_slow_request_head_is_cut_off():
    async with gateway(modelservice("m"), header_timeout=0.5) as (gw, url):
        host, port = url[len("http://") :].split(":")
        # The header timeout runs on the frozen clock (frozen before the connection, so it is armed at 0): the
        # connection is open until the clock passes it, and closed once it has, however slow the machine.
        async with FrozenLoopClock() as clock:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # ...and never finish the head
            await writer.drain()
            closed = asyncio.create_task(reader.read())
            await clock.advance(0.4)
            await settle(20)
            assert not closed.done(), "cut before the header timeout"
            await clock.advance(0.2)
            await until(closed.done, message="the gateway to close the connection")
        assert closed.result() == b""  # closed without an answer
        writer.close()


async def test_healthz_waits_for_sync():
    async with gateway() as (gw, url), aiohttp.ClientSession() as s:
        gw.synced = False
        async with s.get(url + "/healthz") as r:
            assert r.status == 503
        gw.synced = True
        async with s.get(url + "/healthz") as r:
            assert r.status == 200


async def test_activity_leases_are_flushed_in_the_background():
    class RecordingOps(FakeOps):
        def __init__(self):
            super().__init__()
            self.writers = []  # the task that wrote each Lease

        async def write_lease(self, lease):
            self.writers.append(asyncio.current_task().get_name())
            await super().write_lease(lease)

    ops = RecordingOps()
    async with (
        stubs("127.0.0.1") as addrs,
        gateway(modelservice("m"), *slice_for("m", addrs), ops=ops, activity_interval=0.5) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        passes = []  # the flusher's passes: it asks due() once per tick
        due = gw.activity.due

        def counting_due():
            passes.append(1)
            return due()

        gw.activity.due = counting_due
        assert (await post(s, url, chat("m")))[0] == 200

        def in_flight(lease):
            return lease["metadata"]["annotations"]["serving.modelservice.dev/in-flight"]

        await until(lambda: ops.leases and in_flight(ops.leases[-1]) == "0", message="a Lease saying 0 in flight")
        ann = [in_flight(lease) for lease in ops.leases]
        # 1 in flight (once, or twice if a flush fell inside the request), then 0; never on the request path.
        assert ann[0] == "1" and ann[-1] == "0" and set(ann[:-1]) == {"1"} and len(ann) <= 3, ann
        assert set(ops.writers) == {"activity-leases"}, ops.writers
        # Idle and unchanged: two more passes of the flusher, each a whole tick (1 s) after the last write, so
        # past the interval (0.5 s): a Lease would be due at each if the tracker wrote when nothing changed.
        written, seen = len(ops.leases), len(passes)
        await until(lambda: len(passes) >= seen + 2, message="two more flusher passes")
        assert len(ops.leases) == written


async def test_trickled_body_hits_the_body_deadline(monkeypatch):
    from modelservice.gateway import parsing

    monkeypatch.setattr(parsing, "BODY_DEADLINE", 0.5)

    drips: asyncio.Queue = asyncio.Queue()

    async def drip():  # one byte whenever the test says: never idle, never done
        while True:
            yield await drips.get()

    # Both deadlines run on the frozen clock, moved 0.2 s per byte: the idle timeout (1 s) can never fire and
    # the body never ends, so a 408 can only be the body deadline's, and never before the clock passes 0.5 s.
    async with gateway(modelservice("m"), idle_timeout=1) as (gw, url), aiohttp.ClientSession() as s:
        async with FrozenLoopClock() as clock:

            async def send():
                async with s.post(url + "/v1/chat/completions", data=drip()) as r:
                    return r.status

            start, seen_at = clock.now, None
            answer = asyncio.create_task(send())
            for _ in range(10):  # bounded: 2 s on the frozen clock, four times the deadline
                drips.put_nowait(b" ")
                await settle(20)  # the byte goes out and is read at the current time
                if answer.done():
                    seen_at = clock.now - start
                    break
                await clock.advance(0.2)
            await until(answer.done, message="the gateway's answer")
        assert answer.result() == 408
        assert seen_at is None or seen_at >= 0.5, f"cut at {seen_at:.1f}s, before the body deadline"


async def test_a_key_secret_the_gateway_may_not_read_is_503_with_the_reason():
    class Forbidden(FakeOps):
        async def get_secret(self, namespace, name):
            raise RuntimeError('403 Forbidden: secrets "s" is forbidden')

    async with (
        stubs("127.0.0.1") as addrs,
        gateway(modelservice("locked", api_key_secret="s"), *slice_for("locked", addrs), ops=Forbidden()) as (gw, url),
        aiohttp.ClientSession() as s,
    ):
        status, body, _ = await post(s, url, chat("locked"), headers={"Authorization": "Bearer sekret"})
        err = json.loads(body)["error"]
        assert status == 503 and err["code"] == "api_keys_unavailable", body
        assert "cannot read the API key Secret default/s: 403 Forbidden" in err["message"]

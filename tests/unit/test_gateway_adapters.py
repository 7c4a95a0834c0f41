"""The gateway's adapter path over real sockets, against a fake of vLLM's adapter API (the real engine's behaviour is
pinned by tests/integration/test_vllm_lora.py and exercised end to end by test_lora_cluster.py): resolve by adapter
name, load before forwarding, the engine's refusal, removal, a lost adapter replayed, the base's activity and Lease."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from modelservice.gateway.adapters import ADAPTERS_ANNOTATION
from modelservice.gateway.testing import feed, modelservice, serving
from tests.unit.gateway_harness import chat, gateway, post, slice_for
from tests.unit.loop_clock import until


def base(*adapters: str) -> dict:
    obj = modelservice("base", served_name="base")
    obj["spec"]["lora"] = {"claim": "adapters", "maxLoaded": 2, "maxRank": 8}
    obj["spec"]["adapters"] = [{"name": n, "uri": f"pvc://adapters/{n}/v1"} for n in adapters]
    return obj


def fake_vllm(calls: list, registered: set) -> web.Application:
    async def load(request: web.Request) -> web.Response:
        doc = await request.json()
        calls.append(("load", doc["lora_name"], doc["lora_path"]))
        if doc["lora_name"] == "bad":
            return web.json_response(
                {
                    "error": {
                        "message": "LoRA rank 16 is greater than max_lora_rank 8.",
                        "type": "InternalServerError",
                        "code": 500,
                    }
                },
                status=500,
            )
        registered.add(doc["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{doc['lora_name']}' added successfully.")

    async def unload(request: web.Request) -> web.Response:
        doc = await request.json()
        calls.append(("unload", doc["lora_name"]))
        registered.discard(doc["lora_name"])
        return web.Response(text="Success")

    async def complete(request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        calls.append(("chat", model))
        if model != "base" and model not in registered:
            return web.json_response(
                {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "code": 404}},
                status=404,
            )
        return web.json_response({"model": model, "choices": [{"message": {"content": f"from {model}"}}]})

    app = web.Application()
    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)
    app.router.add_post("/v1/chat/completions", complete)
    return app


async def test_an_adapter_is_loaded_on_its_base_before_its_request_and_refusals_and_removal_are_clear():
    calls: list = []
    registered: set = set()
    async with serving(fake_vllm(calls, registered), host="127.0.0.1") as engine_url:
        port = int(engine_url.rsplit(":", 1)[1])
        async with (
            gateway(base("a", "bad"), *slice_for("base", [("127.0.0.1", port)])) as (gw, url),
            aiohttp.ClientSession() as s,
        ):
            status, body, _ = await post(s, url, chat("a"))
            assert status == 200 and json.loads(body)["model"] == "a", body
            assert calls == [("load", "a", "./a/v1"), ("chat", "a")]
            assert gw.activity.in_flight(("default", "base")) == 0  # counted (and finished) as the base's

            # Twice more: loaded, no second load.
            for _ in range(2):
                assert (await post(s, url, chat("a")))[0] == 200
            assert [c for c in calls if c[0] == "load"] == [("load", "a", "./a/v1")]

            # The engine refuses: its message, in OpenAI's shape; nothing forwarded; the base keeps serving.
            gw.adapters.clock = lambda: 0.0  # frozen: the next request falls inside the back-off window
            status, body, _ = await post(s, url, chat("bad"))
            err = json.loads(body)["error"]
            assert status == 503 and err["code"] == "adapter_load_failed" and "max_lora_rank 8" in err["message"]
            assert ("chat", "bad") not in calls
            # Asked again at once: the same answer from the back-off, with when it retries; no second load call.
            status, body, headers = await post(s, url, chat("bad"))
            err = json.loads(body)["error"]
            assert status == 503 and err["code"] == "adapter_load_failed" and "max_lora_rank 8" in err["message"]
            assert "backing off" in err["message"] and headers["Retry-After"] == "1"
            assert [c for c in calls if c[1] == "bad"] == [("load", "bad", "./bad/v1")]
            assert (await post(s, url, chat("base")))[0] == 200

            # modelservice_gateway_adapter_loads_total: one load of a, one refused load of bad.
            def loads(adapter: str, outcome: str) -> float | None:
                labels = {"model": "default/base", "adapter": adapter, "outcome": outcome}
                return gw.metrics.registry.get_sample_value("modelservice_gateway_adapter_loads_total", labels)

            assert (loads("a", "loaded"), loads("bad", "failed"), loads("a", "failed")) == (1.0, 1.0, None)

            # What the base's activity Lease carries to the operator.
            lease = gw.activity.lease(gw.table.get("default", "base"))
            report = json.loads(lease["metadata"]["annotations"][ADAPTERS_ANNOTATION])
            assert report["a"] == {"loadedOn": ["127.0.0.1"]} and "max_lora_rank" in report["bad"]["error"]

            # The engine lost it (restarted in place): loaded again and the request replayed, no error to the client.
            registered.clear()
            assert (await post(s, url, chat("a")))[0] == 200
            assert [c for c in calls if c[0] == "load"][-1] == ("load", "a", "./a/v1")

            # Removed from the spec: 404 in OpenAI's shape at once, and unloaded from the replica.
            feed(gw.table, base("bad"), event="MODIFIED")
            status, body, _ = await post(s, url, chat("a"))
            err = json.loads(body)["error"]
            assert status == 404 and err["code"] == "model_not_found", body
            await until(lambda: ("unload", "a") in calls, message="adapter a unloaded from the replica")
            assert "a" not in registered
            assert (loads("a", "loaded"), loads("a", "unloaded")) == (2.0, 1.0)  # the reload after the engine lost it

            # The engine's adapter API is not a client path.
            async with s.post(
                url + "/models/default/base/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}
            ) as r:
                assert r.status == 404

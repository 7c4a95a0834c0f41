"""Token metering with a real engine (llama.cpp's llama-server) and two tenants: the gateway's counters are the
engine's own usage, the usage event asked for behind a client's back never reaches it, and a client that asked gets
it unchanged."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.engine_client import LLAMA_ARGS, assert_native, check_stream
from tests.integration.gateway_process import TEST_FLAGS, GatewayProcess

TENANT = "serving.modelservice.dev/tenant"


def _tenant(name: str, key: str, ns: str) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {TENANT: name},
            "annotations": {"serving.modelservice.dev/namespaces": ns},
        },
        "data": {"keys": base64.b64encode(key.encode()).decode()},
    }


async def _chat(url: str, key: str, name: str, *, stream: bool, usage: bool = False) -> tuple[dict | None, list]:
    """(the usage the client saw, the stream's chunks)."""
    body = {
        "model": name,
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": "Count from one to five."}],
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            raw = await r.read()
            assert r.status == 200, raw[-1000:]
    if not stream:
        return json.loads(raw)["usage"], []
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", raw[-300:]
    chunks = [json.loads(e) for e in events[:-1]]
    return (chunks[-1].get("usage") if usage else None), chunks


def test_llamacpp_usage_is_metered_per_tenant(kube, namespace, operator, fake_nodes, engines, tmp_path):
    ns, name = namespace, "metered"
    kube.core.create_namespaced_secret(ns, _tenant("team-a", "key-a", ns))
    kube.core.create_namespaced_secret(ns, _tenant("team-b", "key-b", ns))
    ms.create(
        kube,
        ns,
        ms.body(
            name,
            engine="llamacpp",
            image=None,
            model={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"},
            args=LLAMA_ARGS,
        ),
    )
    ms.wait_condition(kube, ns, name, "Ready", "True", timeout=120)
    assert_native(kube, ns, name, "llamacpp")
    gw = GatewayProcess(
        kube.kubeconfig, tmp_path / "gateway.log", *TEST_FLAGS, "--namespace", ns, "--tenants", "--tenant-namespace", ns
    ).start()
    try:
        wait_for(
            lambda: gw.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/{name}") == 1,
            timeout=60,
            message="the engine's endpoint in the gateway",
        )

        async def traffic():
            hidden = await _chat(gw.url, "key-a", name, stream=True)  # the gateway asks for usage, hides it
            asked = await _chat(gw.url, "key-a", name, stream=True, usage=True)
            whole = await _chat(gw.url, "key-b", name, stream=False)
            return hidden, asked, whole

        (_, hidden_chunks), (asked_usage, asked_chunks), (whole_usage, _) = asyncio.run(traffic())
        check_stream(hidden_chunks, name, usage=False)  # no usage event reached the client that did not ask
        check_stream(asked_chunks, name, usage=True)
        # The same greedy request twice: the hidden stream's usage equals the one the client saw.
        model = f"{ns}/{name}"

        def counted(metric: str, tenant: str) -> float:
            return gw.metric(f"modelservice_gateway_{metric}_total", tenant=tenant, model=model, outcome="ok")

        assert counted("tenant_requests", "team-a") == 2 and counted("tenant_requests", "team-b") == 1
        assert counted("prompt_tokens", "team-a") == 2 * asked_usage["prompt_tokens"]
        assert counted("completion_tokens", "team-a") == 2 * asked_usage["completion_tokens"]
        assert counted("prompt_tokens", "team-b") == whole_usage["prompt_tokens"]
        assert counted("completion_tokens", "team-b") == whole_usage["completion_tokens"]
        assert gw.metric("modelservice_gateway_unmetered_requests_total") == 0
        # The engine's own metrics, through the gateway (the NetworkPolicy keeps Prometheus away from the engine).
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/engine-metrics", timeout=30) as r:
            engine = {
                (x.name, x.labels.get("modelservice")): x.value
                for f in text_string_to_metric_families(r.read().decode())
                for x in f.samples
            }
        assert engine[("llamacpp:prompt_tokens_total", name)] > 0  # llama-server's own counter, relabelled
    finally:
        gw.stop()

"""Helpers for tests of real engines: an OpenAI client through a gateway (streamed chat, and the checks every real
stream passes), and the check that a pod runs the real engine, not the stub (test_real_engines.py,
test_image_in_cluster.py, test_metering_real.py, test_lora_cluster.py), the vLLM settings they share, and putting
a model to sleep."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import aiohttp

from modelservice.labels import MODELSERVICE_LABEL
from tests.cluster.wait import wait_for

if TYPE_CHECKING:
    from tests.integration.gateway_process import GatewayProcess

LLAMA_ARGS = ["-t", "1", "-c", "4096", "-np", "2"]  # one thread, two slots: a 2-core machine
# vLLM's CPU build on a 2-core machine: float32 (the tiny model's dtype), no graph compilation, a small KV cache.
VLLM_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "4"]
VLLM_ENV = [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}, {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "0"}]
SCALE_TO_ZERO = {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "6s"}
VLLM_LOAD = 600  # seconds: ~30-75 s seen on a quiet machine, much more beside a busy test suite


async def stream_chat(
    url: str,
    model: str,
    *,
    max_tokens: int = 16,
    usage: bool = True,
    timeout: float = 660,
    headers: dict[str, str] | None = None,
) -> tuple[int, list[dict], bytes]:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello to the cluster."}],
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    # 660 s: a real vLLM loading on a busy 2-core machine (VLLM_LOAD) plus the answer.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            raw = await r.read()
            if r.status != 200:
                return r.status, [], raw
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events and events[-1] == b"[DONE]", raw[-500:]
    return 200, [json.loads(e) for e in events[:-1]], raw


def check_stream(chunks: list[dict], served: str, *, usage: bool = True) -> str:
    """Real SSE chunks: deltas with text, a finish reason, and (when asked) a final usage chunk with no choices."""
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks[:2]
    text = "".join((ch.get("delta") or {}).get("content") or "" for c in chunks for ch in c.get("choices") or [])
    assert text, chunks[:3]
    assert any(ch.get("finish_reason") for c in chunks for ch in c.get("choices") or [])
    if usage:
        last = chunks[-1]
        assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0 and last["usage"]["prompt_tokens"] > 0
    else:
        assert not any(c.get("usage") for c in chunks if not c.get("choices")), chunks[-1]
    assert {c["model"] for c in chunks} == {served}
    return text


async def post(url: str, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(url + path, json=body) as r:
            return r.status, await r.json(content_type=None)


def pods(kube, ns: str, name: str) -> list:
    return [
        p
        for p in kube.core.list_namespaced_pod(ns, label_selector=f"{MODELSERVICE_LABEL}={name}").items
        if not p.metadata.deletion_timestamp
    ]


def assert_native(kube, ns: str, name: str, engine: str) -> object:
    """The pod runs the real engine, not the stub (the node agent reports native:// image IDs for those)."""
    running = [p for p in pods(kube, ns, name) if p.status.container_statuses]
    assert running, f"no pod of {ns}/{name} has started"
    image_id = running[0].status.container_statuses[0].image_id
    assert image_id.startswith("native://"), (
        f"pod {running[0].metadata.name} runs {image_id!r}, not the real {engine}: the cluster's node agent was "
        f"started without --engine {engine} (a cluster left running by `make cluster`? `make cluster-down`)"
    )
    return running[0]


def asleep(kube, gw: GatewayProcess, ns: str, name: str) -> None:
    kube.apps.patch_namespaced_deployment_scale(name, ns, {"spec": {"replicas": 0}})
    wait_for(
        lambda: (
            not pods(kube, ns, name) and gw.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/{name}") == 0
        ),
        timeout=120,
        message=f"{ns}/{name} asleep: no pods, no endpoints",
    )

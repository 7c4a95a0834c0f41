"""Real engines in the loop: vLLM (CPU build) and llama.cpp's llama-server run what the operator renders.

The fake node agent runs pods of vLLM's and llama.cpp's images as the real engines (tests/cluster/native.py lists the
few host translations), serving our generated tiny model (tests/cluster/tiny_model.py) under whatever hub name the
spec asks for. Nothing here talks to the stub model server. At most one vLLM runs at a time (about 3 GB); the fault
tests use llama.cpp, which starts in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.engine_client import (
    LLAMA_ARGS,
    SCALE_TO_ZERO,
    VLLM_ARGS,
    VLLM_ENV,
    VLLM_LOAD,
    asleep,
    assert_native,
    check_stream,
    pods,
    post,
    stream_chat,
)
from tests.integration.gateway_process import GatewayProcess
from tests.integration.operator_process import kubectl


@pytest.fixture(scope="module")
def engine_gateway(cluster, crds, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway that holds requests as long as a real vLLM may take to load on a busy 2-core machine."""
    gw = GatewayProcess(
        cluster.kubeconfig,
        tmp_path_factory.mktemp("engine-gw") / "gateway.log",
        "--activation-timeout",
        f"{VLLM_LOAD}s",
        "--activity-interval",
        "2s",
    ).start()
    yield gw
    gw.stop()


def scrape(pod) -> dict[str, float]:
    """The engine's own /metrics at the address and path the rendered scrape annotations name."""
    ann = pod.metadata.annotations or {}
    url = f"http://{pod.status.pod_ip}:{ann['prometheus.io/port']}{ann['prometheus.io/path']}"
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def serverless_loop(kube, namespace: str, gw: GatewayProcess, name: str, engine: str, served: str) -> list:
    """zero → a request wakes the real engine → streamed answer → idle → zero. Returns the streamed chunks."""
    asleep(kube, gw, namespace, name)
    status, chunks, raw = asyncio.run(stream_chat(gw.url, served))
    assert status == 200, raw[-2000:]
    check_stream(chunks, served)
    assert_native(kube, namespace, name, engine)
    ms.wait_condition(kube, namespace, name, "Ready", "False", reason="ScaledToZero", timeout=180)
    wait_for(lambda: not pods(kube, namespace, name), timeout=120, message="the engine's pod gone")
    return chunks


def test_llamacpp_serverless_loop_and_its_metrics(kube, namespace, operator, fake_nodes, engines, engine_gateway):
    name = "qwen-gguf"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            engine="llamacpp",
            image=None,
            model={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"},
            args=LLAMA_ARGS,
            autoscaling=SCALE_TO_ZERO,
        ),
    )
    # A new scale-to-zero model first proves that it loads: one real replica, Ready from llama-server's /health.
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=120)
    pod = assert_native(kube, namespace, name, "llamacpp")
    # Its metrics, where the rendered annotations say a scraper finds them (--metrics is rendered).
    metrics = scrape(pod)
    assert {"llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:prompt_tokens_total"} <= set(
        metrics
    )
    # `kubectl logs` reads the engine's own output through the API server (the agent serves the kubelet's endpoint).
    logs = kubectl(kube.kubeconfig, "logs", "-n", namespace, pod.metadata.name, "--tail=200")
    assert "llama" in logs.lower() and "server" in logs.lower(), logs[-1000:]
    # llama-server's own error, unchanged and in OpenAI's shape, through the gateway: a prompt over its context.
    too_long = asyncio.run(
        post(
            engine_gateway.url,
            {"model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "hello " * 6000}]},
        )
    )
    assert too_long[0] == 400 and "context" in too_long[1]["error"]["message"].lower(), too_long
    # Without include_usage, no usage chunk: the client gets what it asked for.
    status, chunks, raw = asyncio.run(stream_chat(engine_gateway.url, name, usage=False))
    assert status == 200, raw[-2000:]
    check_stream(chunks, name, usage=False)
    serverless_loop(kube, namespace, engine_gateway, name, "llamacpp", name)


@pytest.mark.timeout(VLLM_LOAD + 300)
def test_vllm_serverless_loop_errors_and_metrics(kube, namespace, operator, fake_nodes, engines, engine_gateway):
    """One vLLM process for the whole test (it is the expensive one): woken from zero by a request, it streams,
    passes its own errors through, shows its metrics, and goes back to zero."""
    name, served = "llama-1b", "llama"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            engine="vllm",
            image=None,
            model={"uri": "hf://meta-llama/Llama-3.2-1B-Instruct", "servedName": served},
            args=VLLM_ARGS,
            env=VLLM_ENV,
            autoscaling={**SCALE_TO_ZERO, "scaleToZeroAfter": "20s"},
            startupTimeout="15m",
        ),
    )
    wait_for(lambda: kube.apps.read_namespaced_deployment(name, namespace), timeout=30, message="Deployment")
    # Straight to zero, before the first replica has loaded: the one vLLM start of this test is the wake-up's.
    asleep(kube, engine_gateway, namespace, name)

    async def wake_and_use() -> tuple:
        woken = await stream_chat(engine_gateway.url, served)
        # vLLM's own errors, unchanged and in OpenAI's shape, through the gateway:
        too_long = await post(
            engine_gateway.url,
            {"model": served, "max_tokens": 4, "messages": [{"role": "user", "content": "hello " * 3000}]},
        )
        unknown = await post(
            engine_gateway.url,
            {"model": "not-served-here", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
            path=f"/models/{namespace}/{name}/v1/chat/completions",
        )
        return woken, too_long, unknown

    (status, chunks, raw), too_long, unknown = asyncio.run(wake_and_use())
    assert status == 200, raw[-2000:]
    check_stream(chunks, served)
    pod = assert_native(kube, namespace, name, "vllm")
    assert too_long[0] == 400 and "context" in too_long[1]["error"]["message"].lower(), too_long
    assert unknown[0] == 404 and "not-served-here" in unknown[1]["error"]["message"], unknown
    metrics = scrape(pod)
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= set(metrics)
    assert metrics["vllm:prompt_tokens_total"] > 0
    # Idle → zero, and the engine's processes (API server, engine core, worker) are gone with the pod.
    groups = {os.getpgid(pid) for pid in _processes_on(pod.status.pod_ip)}
    assert groups, "no vLLM process found on the pod's address"
    ms.wait_condition(kube, namespace, name, "Ready", "False", reason="ScaledToZero", timeout=180)
    wait_for(lambda: not pods(kube, namespace, name), timeout=120, message="the vLLM pod gone")
    wait_for(lambda: not _in_groups(groups), timeout=60, message="no vLLM process left behind")


def _processes_on(ip: str) -> list[int]:
    """PIDs of processes whose command line names this pod address (the engine's server process)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if any(ip.encode() in arg for arg in cmd.split(b"\0")):
                out.append(int(d.name))
    return out


def _in_groups(groups: set[int]) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != "Z" and int(stat[2]) in groups:
                out.append(int(d.name))
    return out


def test_an_engine_with_bad_args_is_reported_with_its_own_words(
    kube, namespace, operator, fake_nodes, engines, engine_gateway
):
    name = "bad-args"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            engine="llamacpp",
            image=None,
            model={"uri": "hf://org/model-GGUF:Q8_0"},
            args=["--no-such-flag"],
            autoscaling=SCALE_TO_ZERO,
        ),
    )
    obj = ms.wait_condition(kube, namespace, name, "Stalled", "True", timeout=120)
    stalled = ms.condition(obj, "Stalled")
    assert ms.condition(obj, "Ready")["status"] == "False"
    # The engine's last log lines, from the pod's status (FallbackToLogsOnError), not from a side channel.
    assert "--no-such-flag" in stalled["message"] and "exited with code" in stalled["message"], stalled
    # A request for it is answered at once with the same reason, not held until the activation timeout.
    status, body = asyncio.run(
        asyncio.wait_for(
            post(engine_gateway.url, {"model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
            60,
        )
    )
    assert status == 503 and body["error"]["code"] == "model_not_starting", body
    assert "--no-such-flag" in body["error"]["message"]


def test_an_engine_that_never_gets_ready_is_restarted_by_its_startup_probe(
    kube, namespace, operator, fake_nodes, engines
):
    name = "never-ready"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            engine="llamacpp",
            image=None,
            model={"uri": "hf://org/model-GGUF:Q8_0"},
            args=LLAMA_ARGS,
            probes={"readinessPath": "/no-such-path"},
            startupTimeout="3s",
        ),
    )
    obj = ms.wait_condition(kube, namespace, name, "Stalled", "True", timeout=120)
    pod = assert_native(kube, namespace, name, "llamacpp")
    cs = pod.status.container_statuses[0]
    assert cs.restart_count >= 1 and not cs.ready
    message = ms.condition(obj, "Stalled")["message"]
    assert "the engine exited with code" in message and "restart(s)" in message, message
    # What a kubelet says on the pod: the probe's failure and the kill (kubectl describe pod).
    events = kube.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod.metadata.name}")
    reasons = {e.reason: e.message for e in events.items}
    assert "no-such-path" in reasons.get("Unhealthy", "") and "startup probe" in reasons.get("Killing", ""), reasons


def test_an_engine_that_dies_mid_stream_ends_the_stream_with_an_error_event(
    kube, namespace, operator, fake_nodes, engines, engine_gateway
):
    name = "dies"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            engine="llamacpp",
            image=None,
            model={"uri": "hf://org/model-GGUF:Q8_0"},
            args=["-t", "1", "-c", "32768", "-np", "1"],
        ),
    )
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=120)
    pod = assert_native(kube, namespace, name, "llamacpp")

    async def cut() -> tuple[bytes, bool]:
        body = {
            "model": name,
            "stream": True,
            "max_tokens": 30000,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me everything."}],
        }
        got, truncated = b"", False
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            async with s.post(engine_gateway.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                try:
                    async for chunk in r.content.iter_any():
                        if not got:
                            for pid in _processes_on(pod.status.pod_ip):  # the engine dies mid-answer
                                os.kill(pid, signal.SIGKILL)
                        got += chunk
                except aiohttp.ClientPayloadError:
                    truncated = True
        return got, truncated

    got, truncated = asyncio.run(cut())
    events = [e.removeprefix(b"data: ") for e in got.split(b"\n\n") if e.startswith(b"data: ")]
    assert truncated and b"[DONE]" not in events  # not passed off as a whole answer
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_failed_mid_stream", error
    assert any(b'"delta"' in e for e in events[:-1])  # real chunks came before it

"""Scale from zero with a real engine (vLLM's CPU build by default): what the platform adds to a cold start.

Each cycle: the model is at zero; one streamed chat completion goes to the gateway; the gateway wakes the model,
Kubernetes schedules the pod, the fake node starts the real engine from the rendered pod spec, the kubelet-like
probes see it healthy, the EndpointSlice carries the address, the gateway forwards the held request, the engine
streams. The figure is

    overhead = (request sent → first token) − (engine process start → its first /health 200)

i.e. what the operator, the gateway, the probes and Kubernetes add to the engine's own start. The node agent
measures the engine's own start with a 50 ms poll of the startup-probe path, independent of the probes
(tests/cluster/container.py), and leaves it in the pod's directory; the cycle reads it before the pod goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.cluster import control_plane
from bench.stats import summary
from modelservice import GROUP, PLURAL, VERSION
from modelservice.labels import MODELSERVICE_LABEL
from modelservice.render import STARTUP_PERIOD_SECONDS
from tests.cluster.wait import async_wait_for
from tests.integration.gateway_process import GatewayProcess
from tests.integration.operator_process import OperatorProcess

log = logging.getLogger("bench")
NS, NAME = "bench-engine", "cold-llm"
SPECS = {
    "vllm": {
        "engine": "vllm",
        "model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct", "servedName": NAME},
        "args": ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "4"],
        "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}],
        "startupTimeout": "15m",
    },
    "llamacpp": {
        "engine": "llamacpp",
        "model": {"uri": "hf://org/model-GGUF:Q8_0", "servedName": NAME},
        "args": ["-t", "1", "-c", "2048"],
    },
}
LOAD_LIMIT = 600.0  # seconds a cold start may take on a busy machine before the cycle counts as failed


@dataclass
class EngineColdConfig:
    work: Path
    engine: str = "vllm"
    cold_starts: int = 5


async def _first_token(url: str) -> tuple[int, float, float]:
    """(status, wall time of the first content token, wall time of the end) of one streamed chat completion."""
    body = {
        "model": NAME,
        "stream": True,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "hello"}],
    }
    first = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=LOAD_LIMIT + 60)) as s:
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            async for line in r.content:
                if not first and line.startswith(b"data: {") and b'"content"' in line:
                    first = time.time()
            return r.status, first, time.time()


async def run(cfg: EngineColdConfig) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    failures = 0
    async with control_plane(cfg.work, "engine-cold", pods=10, engines=(cfg.engine,)) as cluster:
        kube = cluster.kube
        await cluster.namespace(NS)
        op = OperatorProcess(cluster.kubeconfig, cfg.work / "engine-operator.log", extra_args=["--gateway-enabled"])
        gw = GatewayProcess(
            cluster.kubeconfig,
            cfg.work / "engine-gateway.log",
            "--activation-timeout",
            f"{LOAD_LIMIT:.0f}s",
            "--activity-interval",
            "1s",
        )
        await asyncio.to_thread(op.start)
        await asyncio.to_thread(gw.start)
        try:
            await kube.create(
                f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}",
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ModelService",
                    "metadata": {"name": NAME},
                    "spec": {
                        **SPECS[cfg.engine],
                        "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "1h"},
                    },
                },
            )
            dep = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"
            pods_path = f"/api/v1/namespaces/{NS}/pods"
            await async_wait_for(lambda: kube.get_or_none(dep), 60, message="the Deployment")

            async def pods() -> list[dict[str, Any]]:
                items = (await kube.get(pods_path, labelSelector=f"{MODELSERVICE_LABEL}={NAME}"))["items"]
                return [p for p in items if not p["metadata"].get("deletionTimestamp")]

            async def asleep() -> bool:
                eps = await asyncio.to_thread(gw.metric, "modelservice_gateway_ready_endpoints", model=f"{NS}/{NAME}")
                return not await pods() and not eps

            for i in range(cfg.cold_starts):
                # Straight to zero (the idle timer is what other figures measure; this one is the wake-up).
                await kube.merge_patch(dep + "/scale", {"spec": {"replicas": 0}})
                await async_wait_for(asleep, 300, message="the model at zero")
                await asyncio.sleep(1.0)  # the gateway's Deployment watch has seen replicas 0
                sent = time.time()
                status, first, _ = await _first_token(gw.url)
                running = await pods()
                start_file = (
                    cluster.state / "pods" / running[0]["metadata"]["uid"] / "engine-start.json" if running else None
                )
                if status != 200 or not first or start_file is None or not start_file.exists():
                    failures += 1
                    log.warning("engine cold start %d: status %d, first token %s", i, status, bool(first))
                    continue
                engine = json.loads(start_file.read_text())
                row = {
                    "request_to_first_token": first - sent,
                    "engine_start": engine["engine_start_seconds"],
                    "request_to_process_start": engine["process_started"] - sent,
                    "healthy_to_first_token": first - engine["first_healthy"],
                }
                row["overhead"] = row["request_to_first_token"] - row["engine_start"]
                rows.append(row)
                log.info(
                    "engine cold start %d: first token %.2f s after the request; engine's own start %.2f s; "
                    "overhead %.0f ms (before the process: %.0f ms, after /health: %.0f ms)",
                    i,
                    row["request_to_first_token"],
                    row["engine_start"],
                    row["overhead"] * 1000,
                    row["request_to_process_start"] * 1000,
                    row["healthy_to_first_token"] * 1000,
                )
        finally:
            await asyncio.to_thread(gw.stop)
            await asyncio.to_thread(op.stop)

    def col(k: str) -> list[float]:
        return [r[k] for r in rows]

    return {
        "engine": cfg.engine,
        "cycles": cfg.cold_starts,
        "failures": failures,
        "startup_probe_period_seconds": STARTUP_PERIOD_SECONDS,
        **{
            k: summary(col(k))
            for k in (
                "overhead",
                "request_to_first_token",
                "engine_start",
                "request_to_process_start",
                "healthy_to_first_token",
            )
        },
        "rows": rows,
    }

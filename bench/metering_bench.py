"""What token metering and quota checks cost the gateway's hot path (issue #16): two gateways in one run, one with
--no-metering and no tenants ("off"), one with tenant keys, metering and a quota that never refuses ("on"), measured
interleaved over at least 5 rounds against the same stub processes:

- added latency p50 (gateway minus direct, in the same round) of small non-streaming completions at a fixed
  concurrency; per round, so the spread across rounds is the run-to-run noise the difference is judged against;
- streaming throughput: tokens/s delivered to concurrent SSE clients (the "on" gateway adds include_usage to each
  request and hides the usage event from the client, which asked for none).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bench import loadgen
from bench.cluster import run_part
from bench.gateway_bench import (
    NS,
    StubProcess,
    _engine,
    _median,
    _wait,
    chat,
    endpoint_slice,
    gateway,
    modelservice,
    slice_version,
)
from modelservice import GROUP, PLURAL, VERSION
from modelservice.gateway.tenants import NAMESPACES_ANNOTATION, RPM_ANNOTATION, TENANT_LABEL, TPM_ANNOTATION

log = logging.getLogger("bench")
LAT, STREAM = "lat", "stream"
KEY = "bench-tenant-key"


@dataclass
class MeteringConfig:
    work: Path
    rounds: int = 5
    concurrency: int = 1  # one request at a time: the per-request cost, not CPU contention between requests
    latency_seconds: float = 6.0
    max_requests: int = 500_000
    loadgen: str = "auto"
    streams: int = 256
    stream_tokens: int = 200
    stream_tps: float = 100.0


def _spread(xs: list[Optional[float]]) -> dict[str, Optional[float]]:
    vals = [x for x in xs if x is not None]
    return {
        "median": _median(vals),
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "per_round": xs,
    }


async def run(cfg: MeteringConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": cfg.rounds, "concurrency": cfg.concurrency, "hot_path_us": hot_path_costs()}
    return await run_part(cfg.work, "metering", 2, lambda cluster: _run_in(cluster, cfg, out), out)


async def _run_in(cluster: Any, cfg: MeteringConfig, out: dict[str, Any]) -> None:
    kube = cluster.kube
    await cluster.namespace(NS)
    # A quota far above what the run sends: every request pays for the check and the reservation, none is refused.
    await kube.create(
        f"/api/v1/namespaces/{NS}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "bench-tenant",
                "namespace": NS,
                "labels": {TENANT_LABEL: "bench"},
                "annotations": {
                    NAMESPACES_ANNOTATION: NS,
                    RPM_ANNOTATION: "1000000000",
                    TPM_ANNOTATION: "1000000000000",
                },
            },
            "data": {"keys": base64.b64encode(KEY.encode()).decode()},
        },
    )
    off = gateway(cluster.kubeconfig, cfg.work / "gateway-off.log", "--no-metering", "--namespace", NS)
    on = gateway(
        cluster.kubeconfig, cfg.work / "gateway-on.log", "--namespace", NS, "--tenants", "--tenant-namespace", NS
    )
    stubs: list[StubProcess] = []
    try:
        lat_stub = await asyncio.to_thread(StubProcess(LAT, 0, cfg.work / "meter-stub-lat.log").start)
        stubs.append(lat_stub)
        stream_stub = await asyncio.to_thread(
            StubProcess(STREAM, cfg.stream_tps, cfg.work / "meter-stub-stream.log").start
        )
        stubs.append(stream_stub)
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"
        slices = await slice_version(kube)
        for name, stub in ((LAT, lat_stub), (STREAM, stream_stub)):
            await kube.create(path, modelservice(name, {}, replicas=0))
            await kube.create(
                f"/apis/{slices}/namespaces/{NS}/endpointslices", endpoint_slice(slices, name, stub.host, stub.port)
            )
        for gw in (off, on):
            await asyncio.to_thread(gw.start)
            for name in (LAT, STREAM):
                await _wait(
                    lambda g=gw, n=name: asyncio.to_thread(
                        g.metric, "modelservice_gateway_ready_endpoints", model=f"{NS}/{n}"
                    ),
                    120,
                    f"{name} routable",
                )
        engine = _engine(cfg.loadgen)
        out["loadgen"] = engine
        auth = {"Authorization": f"Bearer {KEY}"}
        targets = {
            "direct": (f"{lat_stub.url}/v1/chat/completions", None),
            "off": (f"{off.url}/v1/chat/completions", None),
            "on": (f"{on.url}/v1/chat/completions", auth),
        }
        body = chat(LAT)
        p50: dict[str, list[Optional[float]]] = {k: [] for k in targets}
        errors = {k: 0 for k in targets}
        names = list(targets)
        for r in range(cfg.rounds):
            for name in names[r % 3 :] + names[: r % 3]:  # rotated: no path always runs first or last
                url, headers = targets[name]
                await asyncio.to_thread(
                    loadgen.latency_run, engine, url, body, cfg.concurrency, 1, cfg.max_requests, headers
                )  # warm-up: the pools hold their connections
                res = await asyncio.to_thread(
                    loadgen.latency_run,
                    engine,
                    url,
                    body,
                    cfg.concurrency,
                    cfg.latency_seconds,
                    cfg.max_requests,
                    headers,
                )
                p50[name].append(res.latency.get("p50"))
                errors[name] += res.errors
                log.info(
                    "metering latency round %d %-6s p50 %.3f ms, %d errors",
                    r,
                    name,
                    (res.latency.get("p50") or 0) * 1000,
                    res.errors,
                )
        added = {
            k: [(a - d) if a is not None and d is not None else None for a, d in zip(p50[k], p50["direct"])]
            for k in ("off", "on")
        }
        diff = [(a - b) if a is not None and b is not None else None for a, b in zip(added["on"], added["off"])]
        out["latency"] = {
            "p50_seconds": {k: _spread(v) for k, v in p50.items()},
            "added_p50_seconds": {k: _spread(v) for k, v in added.items()},
            "on_minus_off_added_p50_seconds": _spread(diff),
            "errors": errors,
        }

        sbody = chat(STREAM, stream=True, max_tokens=cfg.stream_tokens)
        limit = 60 + 4 * cfg.stream_tokens / cfg.stream_tps
        tps: dict[str, list[Optional[float]]] = {"off": [], "on": []}
        complete = {"off": 0, "on": 0}
        for r in range(cfg.rounds):
            for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                url, headers = targets[name]
                res = await loadgen.streams(url, sbody, cfg.streams, cfg.streams, limit, cfg.stream_tokens, headers)
                tps[name].append(res["tokens_per_second"])
                complete[name] += res["completed"]
                log.info(
                    "metering streams round %d %-3s %.0f tokens/s, %d/%d complete",
                    r,
                    name,
                    res["tokens_per_second"],
                    res["completed"],
                    res["streams"],
                )
        ratio = [(a / b - 1) if a and b else None for a, b in zip(tps["on"], tps["off"])]
        out["streaming"] = {
            "tokens_per_second": {k: _spread(v) for k, v in tps.items()},
            "on_vs_off_relative": _spread(ratio),
            "completed": complete,
            "streams_per_run": cfg.streams,
        }
        out["on_gateway_metered"] = {
            "requests": await asyncio.to_thread(
                on.metric, "modelservice_gateway_tenant_requests_total", tenant="bench"
            ),
            "completion_tokens": await asyncio.to_thread(
                on.metric, "modelservice_gateway_completion_tokens_total", tenant="bench"
            ),
        }
    finally:
        for gw in (on, off):
            await asyncio.to_thread(gw.stop)
        for stub in stubs:
            await asyncio.to_thread(stub.stop)


def hot_path_costs(n: int = 20_000) -> dict[str, float]:
    """Microseconds of CPU per call of what metering and quotas add to a request, in this process: the minimum of 5
    repeats, which other load on the machine can only raise (end-to-end figures above carry all of that noise)."""
    import json
    import time
    import timeit

    from prometheus_client import CollectorRegistry

    from modelservice.gateway.metering import Meter, Metering, prepare
    from modelservice.gateway.quotas import Quotas
    from modelservice.gateway.tenants import TenantStore

    metering, quotas, store = Metering(CollectorRegistry()), Quotas(), TenantStore()
    store.apply(
        "ADDED",
        {
            "metadata": {
                "name": "t",
                "namespace": "ns",
                "uid": "u",
                "resourceVersion": "1",
                "labels": {TENANT_LABEL: "t"},
                "annotations": {NAMESPACES_ANNOTATION: "*"},
            },
            "data": {"keys": base64.b64encode(KEY.encode()).decode()},
        },
    )
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    answer = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "token0 token1 token2 token3"},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
        }
    ).encode()
    event = (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":{"content":"token7"},"logprobs":null,"finish_reason":null}]}\n\n'
    )

    def request_path() -> None:  # what a metered, quota-checked, non-streaming request adds, end to end
        store.identify(KEY)
        doc = dict(request)
        meter, _ = prepare(doc, "/v1/chat/completions")
        reservation = quotas.admit("t", 10**9, 10**12, quotas.estimate(120, doc, "/v1/chat/completions"))
        meter.whole(answer)
        metering.record("t", "ns/m", 200, meter, True)
        quotas.settle(reservation, (meter.prompt or 0) + (meter.completion or 0))

    def stream_start() -> None:  # a streaming request: include_usage added, the body re-encoded
        doc = dict(request, stream=True)
        prepare(doc, "/v1/chat/completions")
        json.dumps(doc, separators=(",", ":")).encode()

    meter = Meter(stream=True, strip=True)

    def per_chunk() -> None:
        meter.feed(event)

    # CPU time of this process, not wall time: time spent descheduled by other load on the machine is not counted.
    return {
        name: min(timeit.repeat(fn, number=n, repeat=5, timer=time.process_time)) / n * 1e6
        for name, fn in (("request", request_path), ("stream_start", stream_start), ("stream_chunk", per_chunk))
    }


def rows(res: dict[str, Any]) -> list[str]:
    if "error" in res:
        return [f"metering bench failed: {res['error']}"]
    lat, st = res["latency"], res["streaming"]

    def us(x: Optional[float]) -> str:
        return "-" if x is None else f"{x * 1e6:.0f} us"

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{x * 100:+.1f} %"

    a, d = lat["added_p50_seconds"], lat["on_minus_off_added_p50_seconds"]
    h = res.get("hot_path_us") or {}
    r = st["on_vs_off_relative"]
    return [
        f"added p50 at c={res['concurrency']} ({res['rounds']} interleaved rounds, {res.get('loadgen')}): "
        f"off {us(a['off']['median'])} [{us(a['off']['min'])}..{us(a['off']['max'])}], "
        f"on {us(a['on']['median'])} [{us(a['on']['min'])}..{us(a['on']['max'])}]; on - off per round: median "
        f"{us(d['median'])} [{us(d['min'])}..{us(d['max'])}] (goal <= 50 us or within the spread)",
        f"streaming tokens/s: off {st['tokens_per_second']['off']['median']:.0f} "
        f"[{st['tokens_per_second']['off']['min']:.0f}..{st['tokens_per_second']['off']['max']:.0f}], on "
        f"{st['tokens_per_second']['on']['median']:.0f} [{st['tokens_per_second']['on']['min']:.0f}.."
        f"{st['tokens_per_second']['on']['max']:.0f}]; on vs off per round: median {pct(r['median'])} "
        f"[{pct(r['min'])}..{pct(r['max'])}] (goal >= -3 % or within the spread)",
        f"in-process CPU added (min of 5 x 20k calls): per request {h.get('request', 0):.1f} us (key lookup, quota "
        f"admit+settle, usage scan, counters), per streaming request start {h.get('stream_start', 0):.1f} us, "
        f"per streamed chunk {h.get('stream_chunk', 0):.2f} us",
    ]

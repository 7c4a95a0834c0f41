"""Adapter benchmark: LoRA adapters on 2 real vLLM replicas through our gateway (docs/lora.md, docs/benchmarks.md).

    python -m bench --only adapters [--adapters-requests 240]

1. Two vLLM CPU replicas of the tiny Llama, started as the routing bench starts them (routing.replicas: one core
   each), plus `--enable-lora --max-loras M --max-cpu-loras M --max-lora-rank 8` and runtime loading
   (VLLM_ALLOW_RUNTIME_LORA_UPDATING), working directory = a directory of tiny adapters (tests/cluster/tiny_lora.py,
   r=8 on q/v, one seed each): the gateway loads `./<name>`, as in a pod whose cwd is the adapter claim's mount.
2. Our gateway, in this process, with its table fed by hand (modelservice.gateway.testing): one ModelService with
   spec.lora (maxLoaded M) and spec.adapters, one EndpointSlice per replica, spec.routing.policy LeastInFlight (so
   the only difference between the two workload runs is the adapter affinity, not prompt hashing).
3. Cold load: COLD_SAMPLES adapters never loaded anywhere, one at a time: a request for it (the gateway loads it,
   then forwards), then a second request for it (loaded). Time to first token of each, streamed, from send; the
   figure is the p50 of the per-adapter differences. The gateway's load call is timed too.
4. Workload: N adapters (default 2 x M: they fit on 2 replicas, not on one), a seeded uniform sequence of requests,
   closed loop, CONCURRENCY at a time, through the gateway with affinity (adapters.prefer_loaded), then through a
   fresh gateway without it (Adapters.affinity off: the balancer alone picks). Every adapter is unloaded from both
   replicas before each run. Loads are the gateway's load calls: in total, and in the steady state (after half the
   requests finished), per minute per adapter per replica. The goal (issue 15): at most 1 in the steady state with
   affinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import aiohttp

from bench.routing import MODEL, VLLM_LOAD, RoutingConfig, one, replicas
from bench.routing_gateway import backend_slices
from bench.stats import summary
from modelservice.gateway.testing import gateway_with, modelservice
from tests.cluster import tiny_lora
from tests.cluster.models_offline import OfflineModels

log = logging.getLogger("bench")
CLAIM = "adapters"
MAX_LOADED = 2
MAX_RANK = 8
COLD_SAMPLES = 6
CONCURRENCY = 4  # 2 per replica, each replica's vLLM runs --max-num-seqs 4
MAX_TOKENS = 16
REQUESTS = 240  # per workload run: about a minute each here
SEED = 1
LOADS_METRIC = "modelservice_gateway_adapter_loads_total"
LOAD_OUTCOMES = ("loaded", "failed")  # load calls; "evicted" and "unloaded" count unload calls
WARM = "warm"  # loaded straight on each replica once before measuring: first-request costs out of the figures


@dataclass
class AdaptersConfig:
    work: Path
    adapters: int = 2 * MAX_LOADED
    max_loaded: int = MAX_LOADED
    requests: int = REQUESTS
    concurrency: int = CONCURRENCY
    cold_samples: int = COLD_SAMPLES
    max_tokens: int = MAX_TOKENS
    seed: int = SEED


def _names(cfg: AdaptersConfig) -> tuple[list[str], list[str]]:
    return [f"cold-{i}" for i in range(cfg.cold_samples)], [f"w-{i}" for i in range(cfg.adapters)]


def _write_adapters(cfg: AdaptersConfig, model_dir: Path) -> Path:
    root = cfg.work / "adapters"
    cold, workload = _names(cfg)
    for seed, name in enumerate([WARM, *cold, *workload], start=1):
        tiny_lora.build(root / name, model_dir, seed=seed, rank=MAX_RANK)
    return root


def _prompt(i: int, tag: str) -> dict[str, Any]:
    # Distinct prompts of one length: no prefix-cache hit makes one request cheaper than another.
    return {"messages": [{"role": "user", "content": f"Request {tag}{i:04d}: describe the weather in a short line."}]}


class LoadLog:
    """The gateway's load calls, seen by wrapping its engine call: when, on which replica, for which adapter."""

    def __init__(self, gw: Any):
        self.events: list[tuple[float, str, str, float]] = []  # (start, replica, adapter, seconds)
        inner = gw.adapters.call

        async def call(ep: Any, path: str, doc: dict[str, Any]) -> tuple[int, str]:
            t0 = time.monotonic()
            out: tuple[int, str] = await inner(ep, path, doc)
            if path.endswith("/load_lora_adapter"):
                self.events.append((t0, f"{ep.address}:{ep.port}", doc["lora_name"], time.monotonic() - t0))
            return out

        gw.adapters.call = call

    def between(self, t0: float, t1: float) -> list[tuple[float, str, str, float]]:
        return [e for e in self.events if t0 <= e[0] < t1]


def _metric_loads(gw: Any) -> dict[str, float]:
    """The gateway's own counter of adapter calls to engines, summed over models and adapters, by outcome."""
    out: dict[str, float] = {}
    for family in gw.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == LOADS_METRIC:
                outcome = sample.labels.get("outcome", "")
                out[outcome] = out.get(outcome, 0.0) + sample.value
    return out


def _loads(before: dict[str, float], after: dict[str, float], outcomes: tuple[str, ...] = LOAD_OUTCOMES) -> int:
    return round(sum(after.get(o, 0.0) - before.get(o, 0.0) for o in outcomes))


@contextlib.asynccontextmanager
async def gateway(cfg: AdaptersConfig, backends: list[str], affinity: bool) -> AsyncIterator[tuple[Any, str]]:
    cold, workload = _names(cfg)
    ms = modelservice(MODEL, routing="LeastInFlight")
    ms["spec"]["lora"] = {"claim": CLAIM, "maxLoaded": cfg.max_loaded, "maxRank": MAX_RANK}
    ms["spec"]["adapters"] = [{"name": n, "uri": f"pvc://{CLAIM}/{n}"} for n in cold + workload]
    async with gateway_with(ms, *backend_slices(MODEL, backends)) as (gw, url):
        gw.adapters.affinity = affinity
        yield gw, url


async def _unload_all(s: aiohttp.ClientSession, backends: list[str]) -> None:
    """Every adapter off every replica: each run starts with none registered (the gateway starts with none known)."""
    for b in backends:
        async with s.get(b + "/v1/models") as r:
            models = (await r.json())["data"]
        for m in models:
            if m.get("parent"):
                async with s.post(b + "/v1/unload_lora_adapter", json={"lora_name": m["id"]}) as r:
                    await r.read()


async def warm_up(s: aiohttp.ClientSession, backends: list[str], max_tokens: int) -> list[Optional[float]]:
    """A base request and an adapter request on each replica, straight to it: its first requests (and first LoRA
    request) cost more than any later one, and are not what a cold adapter costs."""
    ttfts = []
    for b in backends:
        ttfts.append((await _checked(s, b, _prompt(0, "warm-base"), max_tokens, MODEL))["ttft"])
        async with s.post(b + "/v1/load_lora_adapter", json={"lora_name": WARM, "lora_path": f"./{WARM}"}) as r:
            if r.status != 200:
                raise RuntimeError(f"{b}: loading {WARM}: {r.status} {await r.text()}")
        ttfts.append((await _checked(s, b, _prompt(0, "warm-lora"), max_tokens, WARM))["ttft"])
    return ttfts


async def _checked(
    s: aiohttp.ClientSession, url: str, req: dict[str, Any], max_tokens: int, model: str
) -> dict[str, Any]:
    r = await one(s, url, req, max_tokens, model=model)
    if r["status"] != 200 or r.get("ttft") is None:
        raise RuntimeError(f"{model}: {r}")
    return r


async def cold_load(s: aiohttp.ClientSession, cfg: AdaptersConfig, backends: list[str]) -> dict[str, Any]:
    cold, _ = _names(cfg)
    await _unload_all(s, backends)
    load0 = os.getloadavg()
    async with gateway(cfg, backends, affinity=True) as (gw, url):
        loads = LoadLog(gw)
        base = await _checked(s, url, _prompt(0, "base"), cfg.max_tokens, MODEL)
        pairs = []
        for i, name in enumerate(cold):
            first = await _checked(s, url, _prompt(i, "cold"), cfg.max_tokens, name)
            again = await _checked(s, url, _prompt(i, "warm"), cfg.max_tokens, name)
            pairs.append((first["ttft"], again["ttft"]))
            log.info("adapters: cold %s: TTFT %.0f ms, loaded %.0f ms", name, first["ttft"] * 1e3, again["ttft"] * 1e3)
    return {
        "samples": len(pairs),
        "base_ttft": base["ttft"],
        "cold_ttft": summary([c for c, _ in pairs]),
        "loaded_ttft": summary([w for _, w in pairs]),
        "cold_minus_loaded": summary([c - w for c, w in pairs]),
        "load_call": summary([e[3] for e in loads.events]),
        "loads": len(loads.events),
        "loadavg": [load0, os.getloadavg()],
    }


async def workload(
    s: aiohttp.ClientSession, cfg: AdaptersConfig, backends: list[str], affinity: bool
) -> dict[str, Any]:
    _, names = _names(cfg)
    rng = random.Random(cfg.seed)
    sequence = [names[rng.randrange(len(names))] for _ in range(cfg.requests)]  # the same in both runs
    await _unload_all(s, backends)
    load0 = os.getloadavg()
    async with gateway(cfg, backends, affinity) as (gw, url):
        loads = LoadLog(gw)
        metric0 = _metric_loads(gw)
        queue = list(enumerate(sequence))
        results: list[dict[str, Any]] = []
        half: list[tuple[float, dict[str, float]]] = []

        async def worker() -> None:
            while queue:
                i, name = queue.pop(0)
                results.append(await one(s, url, _prompt(i, "w"), cfg.max_tokens, model=name))
                if len(results) == cfg.requests // 2:
                    half.append((time.monotonic(), _metric_loads(gw)))

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        t1 = time.monotonic()
        metric1 = _metric_loads(gw)
    ok = [r for r in results if r["status"] == 200]
    errors = [r for r in results if r["status"] != 200]
    th, metric_half = half[0] if half else (t0, metric0)
    pairs = len(names) * len(backends)
    total, steady = _loads(metric0, metric1), _loads(metric_half, metric1)
    per_pair = Counter((e[1], e[2]) for e in loads.events)
    return {
        "affinity": affinity,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_sample": [e.get("error") for e in errors[:3]],
        "seconds": t1 - t0,
        "completed_rps": len(ok) / (t1 - t0),
        "ttft": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "total": summary([r["total"] for r in ok]),
        "loads": total,  # from the gateway's metric
        "evictions": _loads(metric0, metric1, ("evicted",)),
        "load_calls_seen": len(loads.events),  # the bench's own count of the same calls: equal unless a bug
        "steady_load_calls_seen": len(loads.between(th, t1 + 1)),
        "loads_per_min_per_adapter_replica": total / ((t1 - t0) / 60) / pairs,
        "steady_loads": steady,
        "steady_seconds": t1 - th,
        "steady_loads_per_min_per_adapter_replica": steady / ((t1 - th) / 60) / pairs if t1 > th else None,
        "max_loads_one_adapter_one_replica": max(per_pair.values(), default=0),
        "load_call": summary([e[3] for e in loads.events]),
        "loadavg": [load0, os.getloadavg()],
    }


async def run(cfg: AdaptersConfig) -> dict[str, Any]:
    # The gateway runs in this process: its access log would put a line per request on the bench's output and spend
    # the measuring process's CPU on it.
    logging.getLogger("modelservice.gateway.access").setLevel(logging.WARNING)
    model_dir = (await asyncio.to_thread(OfflineModels.build)).model.dir
    root = await asyncio.to_thread(_write_adapters, cfg, model_dir)
    rcfg = RoutingConfig(
        cfg.work,
        vllm_args=(
            "--enable-lora",
            "--max-loras",
            str(cfg.max_loaded),
            "--max-cpu-loras",
            str(cfg.max_loaded),
            "--max-lora-rank",
            str(MAX_RANK),
        ),
        vllm_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        vllm_cwd=root,
    )
    out: dict[str, Any] = {
        "adapters": cfg.adapters,
        "max_loaded": cfg.max_loaded,
        "replicas": rcfg.replicas,
        "requests": cfg.requests,
        "concurrency": cfg.concurrency,
        "max_tokens": cfg.max_tokens,
        "seed": cfg.seed,
        "loads_source": f"{LOADS_METRIC}, outcomes {'+'.join(LOAD_OUTCOMES)}; per (replica, adapter) and load "
        "call time from the bench's wrapper of the gateway's engine call",
    }
    timeout = aiohttp.ClientTimeout(total=VLLM_LOAD)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = time.monotonic()
        async with replicas(rcfg, s) as backends:
            out["start_seconds"] = time.monotonic() - t0
            out["loadavg_ready"] = os.getloadavg()
            log.info("adapters: replicas ready in %.0f s (%s)", out["start_seconds"], out["loadavg_ready"])
            out["warm_up_ttft"] = await warm_up(s, backends, cfg.max_tokens)
            out["cold"] = await cold_load(s, cfg, backends)
            log.info("adapters: cold %s", out["cold"]["cold_minus_loaded"])
            out["runs"] = {}
            for affinity in (True, False):
                label = "affinity" if affinity else "no affinity"
                try:
                    res = await workload(s, cfg, backends, affinity)
                except Exception as e:  # noqa: BLE001 - one run's failure is a row, the other still runs
                    log.exception("adapters: %s failed", label)
                    res = {"error": f"{type(e).__name__}: {e}"}
                out["runs"][label] = res
                log.info(
                    "adapters: %s: %s",
                    label,
                    {k: res.get(k) for k in ("ok", "errors", "completed_rps", "loads", "load_calls_seen", "evictions")}
                    | {"steady": res.get("steady_loads_per_min_per_adapter_replica"), "load": res.get("loadavg")},
                )
    return out


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.0f}ms"


def rows(res: dict[str, Any]) -> list[str]:
    if "error" in res:
        return [f"  failed: {res['error']}"]
    lines = []
    c = res.get("cold") or {}
    if c:
        lines.append(
            f"  cold load ({c['samples']} adapters, one at a time): TTFT cold p50 {_ms(c['cold_ttft']['p50'])}, "
            f"loaded p50 {_ms(c['loaded_ttft']['p50'])}, cold - loaded p50 {_ms(c['cold_minus_loaded']['p50'])} "
            f"(max {_ms(c['cold_minus_loaded']['max'])}); load call p50 {_ms(c['load_call']['p50'])}; "
            f"load {c['loadavg'][0][0]:.1f}->{c['loadavg'][1][0]:.1f}"
        )
    lines += [
        f"  workload: {res.get('adapters')} adapters, maxLoaded {res.get('max_loaded')}, {res.get('replicas')} "
        f"replicas, {res.get('requests')} requests (seed {res.get('seed')}), closed loop {res.get('concurrency')} at "
        f"a time, {res.get('max_tokens')} tokens each",
        f"  {'gateway':<12} {'ok':>4} {'err':>4} {'req/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'loads':>5} "
        f"{'/min/ad/rep':>11} {'steady':>7} {'max/pair':>8}  load",
    ]
    for name, r in (res.get("runs") or {}).items():
        if "error" in r:
            lines.append(f"  {name:<12} failed: {r['error'][:200]}")
            continue
        steady = r["steady_loads_per_min_per_adapter_replica"]
        lines.append(
            f"  {name:<12} {r['ok']:>4} {r['errors']:>4} {r['completed_rps']:>6.2f} {_ms(r['ttft']['p50']):>9} "
            f"{_ms(r['ttft']['p99']):>9} {r['loads']:>5} {r['loads_per_min_per_adapter_replica']:>11.2f} "
            f"{'-' if steady is None else f'{steady:.2f}':>7} {r['max_loads_one_adapter_one_replica']:>8}  "
            f"{r['loadavg'][0][0]:.1f}->{r['loadavg'][1][0]:.1f}"
        )
    return lines

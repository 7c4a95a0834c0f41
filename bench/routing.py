"""Routing benchmark: a multi-turn chat trace replayed open-loop against 2 real vLLM replicas with prefix caching,
through each router in turn (docs/routing.md, docs/benchmarks.md).

    python -m bench --only routing [--routing-policies rr,lif,prefix,vr-cache_aware,vr-power_of_two]

1. Two vLLM CPU processes serve the tiny Llama (tests/cluster/tiny_model.py), prefix caching on, each pinned to one
   core (taskset, and vLLM's own OpenMP binding).
2. Capacity: the trace's first requests, closed loop, round robin straight to the replicas, CAPACITY_CONCURRENCY at a
   time; completed requests per second.
3. Each policy: both replicas' prefix caches are emptied (vLLM's /reset_prefix_cache), then the trace
   (bench/traces/chat-seed1.json, committed before any tuning) is replayed open loop at RATE_SHARE of that capacity:
   every request is sent at its time (conversations arrive whatever the routers do), except that a turn waits for
   the previous turn of its conversation to be answered (a user replies to what they read; "late" in the results
   says by how much that delayed turns), streamed; time to first token is from send to the first content chunk. The
   prefix-cache hit rate is vLLM's own: hits / queries of its prefix-cache token counters, summed over the replicas,
   over the replay.

Routers: `rr` round robin straight to the replicas from the client (what a Kubernetes Service spreads like);
`lif` and `prefix`: our gateway (bench/routing_gateway.py) with spec.routing.policy LeastInFlight / PrefixAffinity;
`prefix-session`: PrefixAffinity with the conversation's id in X-Session-Id, as vllm-router's consistent_hash gets it;
`vr-<policy>`: vllm-router from PyPI (hack/get-vllm-router.sh) with that --policy. Any of ours takes `@F` for
spec.routing.loadFactor F (e.g. `prefix-session@2`; default 1.25), so load bounds compare within one run.

`alone` is not a router but a floor: the trace's requests one at a time, in order, each straight to replica
(conversation id mod replicas) (perfect stickiness, nothing else in flight). No router at any rate gets a lower time to
first token than a request served alone by the replica holding its conversation, so its p50 bounds what "2x better
than least in-flight" can ask of this trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import aiohttp

from bench.stats import counter_delta, parse_prometheus, summary
from tests.cluster.controlplane import find_engines, free_port
from tests.cluster.models_offline import OfflineModels

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent
TRACE = Path(__file__).resolve().parent / "traces" / "chat-seed1.json"
MODEL = "bench"
VLLM_LOAD = 900.0  # seconds a replica may take to load on a busy machine
CAPACITY_CONCURRENCY = 8  # 4 per replica: vLLM's --max-num-seqs
CAPACITY_REQUESTS = 40
RATE_SHARE = 0.7
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
# vllm-router's consistent_hash keys on a session header (X-Session-ID, then user ids, ...): the replay sends the
# conversation's id there, its best case. Our PrefixAffinity is measured both without it (`prefix`: it reads the
# messages) and with the same header (`prefix-session`: our X-Session-Id, the explicit key of docs/routing.md).
SESSION_POLICIES = ("vr-consistent_hash", "prefix-session")
POLICIES = (
    "rr",
    "lif",
    "prefix",
    "prefix-session",
    "vr-cache_aware",
    "vr-consistent_hash",
    "vr-power_of_two",
    "alone",
)
OURS = {"lif": "LeastInFlight", "prefix": "PrefixAffinity", "prefix-session": "PrefixAffinity"}


def ours(policy: str) -> Optional[tuple[str, Optional[str]]]:
    """`prefix-session@2` → ("PrefixAffinity", "2"): our policy and its spec.routing.loadFactor; None if not ours."""
    base, _, factor = policy.partition("@")
    return (OURS[base], factor or None) if base in OURS else None


@dataclass
class RoutingConfig:
    work: Path
    policies: tuple[str, ...] = POLICIES
    requests: Optional[int] = None  # replay only the first N requests of the trace
    trace: Path = TRACE
    rate_share: float = RATE_SHARE
    rounds: int = 1  # replays of every policy, in rotated order; figures pooled over them (pool_rounds)
    replicas: int = 2
    extra: dict[str, Any] = field(default_factory=dict)
    # For other benches on the same replicas (bench/adapters.py: LoRA flags, runtime loading, the adapters' dir).
    vllm_args: tuple[str, ...] = ()
    vllm_env: dict[str, str] = field(default_factory=dict)
    vllm_cwd: Optional[Path] = None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _vllm(
    vllm_python: str,
    model_dir: Path,
    port: int,
    core: int,
    logf: Path,
    extra: tuple[str, ...] = (),
    extra_env: Optional[dict[str, str]] = None,
    cwd: Optional[Path] = None,
) -> subprocess.Popen:
    env = {
        **os.environ,
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOOPBACK_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": str(core),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_SERVER_DEV_MODE": "1",
        **(extra_env or {}),
    }  # /reset_prefix_cache: every policy starts from empty caches
    cmd = [
        vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        "4",
        "--enable-prefix-caching",
        *extra,
    ]
    if os.cpu_count() and os.cpu_count() > core and _has("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    with logf.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def _has(tool: str) -> bool:
    from shutil import which

    return which(tool) is not None


async def _until_healthy(
    s: aiohttp.ClientSession, url: str, proc: subprocess.Popen, logf: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited ({proc.returncode}):\n{logf.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s:\n{logf.read_text(errors='replace')[-3000:]}")


@contextlib.asynccontextmanager
async def replicas(cfg: RoutingConfig, s: aiohttp.ClientSession) -> AsyncIterator[list[str]]:
    vllm_python = (await asyncio.to_thread(find_engines, ("vllm",)))["vllm"]
    model_dir = (await asyncio.to_thread(OfflineModels.build)).model.dir
    procs: list[tuple[subprocess.Popen, str, Path]] = []
    try:
        for i in range(cfg.replicas):
            port, logf = free_port(), cfg.work / f"vllm-{i}.log"
            core = i % (os.cpu_count() or 1)
            proc = _vllm(vllm_python, model_dir, port, core, logf, cfg.vllm_args, cfg.vllm_env, cfg.vllm_cwd)
            procs.append((proc, f"http://127.0.0.1:{port}", logf))
        await asyncio.gather(*(_until_healthy(s, url, p, logf, VLLM_LOAD) for p, url, logf in procs))
        yield [url for _, url, _ in procs]
    finally:
        for p, _, _ in procs:
            await asyncio.to_thread(_stop, p)


@contextlib.asynccontextmanager
async def router(policy: str, backends: list[str], work: Path, s: aiohttp.ClientSession) -> AsyncIterator[list[str]]:
    """The URL(s) the client sends to: the replicas themselves (rr), our gateway, or vllm-router."""
    if policy in ("rr", "alone"):
        yield backends
        return
    logf = work / f"router-{policy}.log"
    mine = ours(policy)
    if mine:
        cmd = [sys.executable, "-m", "bench.routing_gateway", "--model", MODEL, "--policy", mine[0]]
        if mine[1]:
            cmd += ["--load-factor", mine[1]]
        for b in backends:
            cmd += ["--backend", b.removeprefix("http://")]
        with logf.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, start_new_session=True)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
            if not line:
                raise RuntimeError(f"our gateway did not start:\n{logf.read_text(errors='replace')[-3000:]}")
            yield [line.decode().strip()]
        finally:
            await asyncio.to_thread(_stop, proc)
        return
    assert policy.startswith("vr-"), policy
    binary = _vllm_router()
    port = free_port()
    cmd = [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", policy[3:], "--worker-urls", *backends]
    with logf.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vllm-router exited ({proc.returncode}):\n{logf.read_text(errors='replace')[-3000:]}"
                )
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm-router not healthy:\n{logf.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.5)
        yield [url]
    finally:
        await asyncio.to_thread(_stop, proc)


def _vllm_router() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "get-vllm-router.sh")], capture_output=True, text=True, timeout=1800
    )
    if out.returncode != 0:
        raise RuntimeError(f"installing vllm-router failed:\n{out.stderr[-3000:]}")
    return dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)["VLLM_ROUTER"]


async def one(
    s: aiohttp.ClientSession,
    url: str,
    req: dict[str, Any],
    max_tokens: int,
    session: bool = False,
    model: str = MODEL,
) -> dict[str, Any]:
    """One streamed chat completion: status, time to first token, total time, prompt tokens (vLLM's usage)."""
    body = {
        "model": model,
        "messages": req["messages"],
        "stream": True,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    first = None
    prompt_tokens = None
    try:
        headers = {"X-Session-ID": f"conversation-{req['conversation']}"} if session else None
        async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status != 200:
                return {"status": r.status, "error": (await r.text())[:300]}
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                if first is None and b'"content"' in line and b'"content":""' not in line:
                    first = time.monotonic() - t0
                if b'"usage"' in line and b'"prompt_tokens"' in line:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        prompt_tokens = json.loads(line[6:])["usage"]["prompt_tokens"]
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return {"status": 0, "error": f"{type(e).__name__}: {e}"}
    return {"status": 200, "ttft": first, "total": time.monotonic() - t0, "prompt_tokens": prompt_tokens}


async def _metrics(s: aiohttp.ClientSession, backends: list[str]) -> dict:
    out: dict = {}
    for i, b in enumerate(backends):
        async with s.get(b + "/metrics") as r:
            for (name, labels), v in parse_prometheus(await r.text(), (HITS, QUERIES)).items():
                out[(name, labels + (("replica", str(i)),))] = v
    return out


def _hit_rate(delta: dict) -> dict[str, Any]:
    hits = sum(v for (n, _), v in delta.items() if n == HITS)
    queries = sum(v for (n, _), v in delta.items() if n == QUERIES)
    return {"hit_tokens": hits, "query_tokens": queries, "hit_rate": hits / queries if queries else None}


async def _reset(s: aiohttp.ClientSession, backends: list[str]) -> None:
    for b in backends:
        async with s.post(b + "/reset_prefix_cache") as r:
            if r.status != 200:
                raise RuntimeError(f"{b}/reset_prefix_cache: {r.status} {await r.text()}")


async def capacity(s: aiohttp.ClientSession, backends: list[str], reqs: list[dict], max_tokens: int) -> dict:
    """Closed loop, round robin: completed requests per second over the trace's first CAPACITY_REQUESTS requests."""
    await _reset(s, backends)
    queue = list(enumerate(reqs[:CAPACITY_REQUESTS]))
    results: list[dict] = []

    async def worker() -> None:
        while queue:
            i, req = queue.pop(0)
            results.append(await one(s, backends[i % len(backends)], req, max_tokens))

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CAPACITY_CONCURRENCY)))
    took = time.monotonic() - t0
    ok = [r for r in results if r["status"] == 200]
    return {
        "requests": len(results),
        "ok": len(ok),
        "seconds": took,
        "rps": len(ok) / took,
        "ttft": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
    }


async def replay(
    s: aiohttp.ClientSession,
    urls: list[str],
    backends: list[str],
    reqs: list[dict],
    rate: float,
    max_tokens: int,
    session: bool = False,
    alone: bool = False,
) -> dict:
    await _reset(s, backends)
    before = await _metrics(s, backends)
    load0 = os.getloadavg()
    t0 = time.monotonic()

    done: dict[tuple[int, int], asyncio.Event] = {(r["conversation"], r["turn"]): asyncio.Event() for r in reqs}

    async def send(i: int, req: dict) -> dict:
        delay = t0 + req["t"] / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        previous = done.get((req["conversation"], req["turn"] - 1))
        if previous is not None:
            await previous.wait()  # a user answers what they have read: turn n+1 never overtakes turn n
        late = max(0.0, time.monotonic() - (t0 + req["t"] / rate))
        try:
            r = await one(s, urls[i % len(urls)], req, max_tokens, session)
        finally:
            done[(req["conversation"], req["turn"])].set()
        r["late"] = late
        return r

    async def floor() -> list[dict]:
        out = []
        for req in reqs:  # in trace order, so turn n is answered before turn n+1 is sent
            r = await one(s, backends[req["conversation"] % len(backends)], req, max_tokens)
            out.append(r | {"late": 0.0})
        return out

    results = await floor() if alone else await asyncio.gather(*(send(i, r) for i, r in enumerate(reqs)))
    took = time.monotonic() - t0
    delta = counter_delta(before, await _metrics(s, backends))
    ok = [r for r in results if r["status"] == 200]
    errors = [r for r in results if r["status"] != 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_sample": [e.get("error") for e in errors[:3]],
        "seconds": took,
        "completed_rps": len(ok) / took,
        "ttft": summary(ttft),
        "ttft_samples": ttft,  # pooled over rounds by pool_rounds()
        "total": summary([r["total"] for r in ok]),
        "prompt_tokens": summary([r["prompt_tokens"] for r in ok if r.get("prompt_tokens")]),
        "late": summary([r["late"] for r in results]),
        "cache": _hit_rate(delta),
        "loadavg": [load0, os.getloadavg()],
    }


async def run(cfg: RoutingConfig) -> dict[str, Any]:
    trace = json.loads(cfg.trace.read_text())
    reqs = trace["requests"][: cfg.requests] if cfg.requests else trace["requests"]
    max_tokens = trace["max_tokens"]
    out: dict[str, Any] = {
        "trace": cfg.trace.name,
        "requests": len(reqs),
        "rate_share": cfg.rate_share,
        "rounds": cfg.rounds,
        "replicas": cfg.replicas,
        "policies": {},
    }
    timeout = aiohttp.ClientTimeout(total=VLLM_LOAD)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        async with replicas(cfg, s) as backends:
            out["loadavg_ready"] = os.getloadavg()
            warm = await one(s, backends[0], reqs[0], max_tokens)  # first-request costs out of the figures
            warm2 = await one(s, backends[1 % len(backends)], reqs[0], max_tokens)
            log.info(
                "routing: replicas ready (%s, %s); warm-up %s",
                backends,
                out["loadavg_ready"],
                [warm.get("ttft"), warm2.get("ttft")],
            )
            cap = await capacity(s, backends, reqs, max_tokens)
            out["capacity"] = cap
            rate = cfg.rate_share * cap["rps"]
            out["rate"] = rate
            log.info(
                "routing: round-robin capacity %.2f req/s; replaying %d requests at %.2f req/s",
                cap["rps"],
                len(reqs),
                rate,
            )
            per_round: dict[str, list[dict[str, Any]]] = {p: [] for p in cfg.policies}
            for r in range(cfg.rounds):
                # Rotated: no router always runs first after the capacity run, or right after the same other one.
                order = cfg.policies[r % len(cfg.policies) :] + cfg.policies[: r % len(cfg.policies)]
                for policy in order:
                    res = await _one_policy(cfg, s, policy, backends, reqs, rate, max_tokens)
                    per_round[policy].append(res)
                    log.info("routing: round %d: %s", r + 1, policy)
            for policy in cfg.policies:
                res = out["policies"][policy] = pool_rounds(per_round[policy])
                log.info(
                    "routing: %s: %s",
                    policy,
                    {k: res.get(k) for k in ("ok", "errors", "completed_rps")}
                    | {
                        "ttft_p50": (res.get("ttft") or {}).get("p50"),
                        "ttft_p99": (res.get("ttft") or {}).get("p99"),
                        "hit_rate": (res.get("cache") or {}).get("hit_rate"),
                        "load": res.get("loadavg"),
                    },
                )
    return out


async def _one_policy(
    cfg: RoutingConfig,
    s: aiohttp.ClientSession,
    policy: str,
    backends: list[str],
    reqs: list[dict],
    rate: float,
    max_tokens: int,
) -> dict[str, Any]:
    try:
        async with router(policy, backends, cfg.work, s) as urls:
            session = policy.partition("@")[0] in SESSION_POLICIES
            return await replay(s, urls, backends, reqs, rate, max_tokens, session, alone=policy == "alone")
    except Exception as e:  # noqa: BLE001 - one router's failure is a row, the others still run
        log.exception("routing: %s failed", policy)
        return {"error": f"{type(e).__name__}: {e}"}


def pool_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One policy's replays → one row: time to first token over every request of every round, the hit rate of
    all their prompt tokens, completed req/s of all of them; each round's own p50/p99/hit rate kept beside."""
    if not runs:
        return {"error": "not run"}
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"error": failed[0]["error"], "rounds": len(runs)}
    ttft = [t for r in runs for t in r["ttft_samples"]]
    hits = sum(r["cache"]["hit_tokens"] for r in runs)
    queries = sum(r["cache"]["query_tokens"] for r in runs)
    return {
        "rounds": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "ok": sum(r["ok"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "error_sample": [e for r in runs for e in r["error_sample"]][:3],
        "seconds": sum(r["seconds"] for r in runs),
        "completed_rps": sum(r["ok"] for r in runs) / sum(r["seconds"] for r in runs),
        "ttft": summary(ttft),
        "cache": {"hit_tokens": hits, "query_tokens": queries, "hit_rate": hits / queries if queries else None},
        "late_p99": max((r["late"]["p99"] or 0.0) for r in runs),  # the worst round's
        "loadavg": [runs[0]["loadavg"][0], runs[-1]["loadavg"][1]],
        "per_round": [
            {"p50": r["ttft"]["p50"], "p99": r["ttft"]["p99"], "hit_rate": r["cache"]["hit_rate"]} for r in runs
        ],
    }


def rows(res: dict[str, Any]) -> list[str]:
    if "error" in res:
        return [f"  failed: {res['error']}"]
    cap = res.get("capacity", {})
    lines = [
        f"  trace {res.get('trace')}: {res.get('requests')} requests; round-robin capacity "
        f"{cap.get('rps', 0):.2f} req/s (closed loop, {CAPACITY_CONCURRENCY} at a time); replayed at "
        f"{res.get('rate', 0):.2f} req/s ({res.get('rate_share', 0):.0%}); {res.get('rounds', 1)} rounds in rotated "
        "order, pooled",
        f"  {'router':<18} {'ok':>4} {'err':>4} {'req/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'hit rate':>8}  load"
        "       p50 by round",
    ]
    for name, r in res.get("policies", {}).items():
        if "error" in r:
            lines.append(f"  {name:<18} failed: {r['error'][:200]}")
            continue
        t, c = r["ttft"], r["cache"]
        hr = c.get("hit_rate")
        lines.append(
            f"  {name:<18} {r['ok']:>4} {r['errors']:>4} {r['completed_rps']:>6.2f} "
            f"{(t['p50'] or 0) * 1000:>7.0f}ms {(t['p99'] or 0) * 1000:>7.0f}ms "
            f"{'-' if hr is None else f'{hr:.1%}':>8}  {r['loadavg'][0][0]:.1f}->{r['loadavg'][1][0]:.1f}"
            + "   "
            + " ".join(f"{(x['p50'] or 0) * 1000:.0f}" for x in r.get("per_round", []))
        )
    return lines

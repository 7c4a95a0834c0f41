"""Gateway benchmarks on a private local control plane, with the operator and the gateway as real processes.

- Added latency: client → gateway → stub, minus client → stub; beside the same through nginx, vllm-router and Envoy
  (bench/peers.py), and each proxy's requests per CPU-second (its processes' utime + stime from /proc).
- Streaming: tokens/s delivered to 256 concurrent SSE clients, through the gateway vs straight to the stub.
- Scale from zero: first byte of the first request minus the moment the woken pod turned Ready (watch arrival),
  split into the EndpointSlice controller's share and the gateway's own; beside a client that sends straight to the
  pod the moment it sees Ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import aiohttp

from bench import loadgen, nginx, peers, profiler
from bench.cluster import Cluster, run_part
from bench.stats import proc_cpu_seconds, proc_status_kib, summary
from bench.watch import Watch
from modelservice import GROUP, PLURAL, VERSION
from modelservice.labels import MODELSERVICE_LABEL
from tests.cluster import processes
from tests.cluster.controlplane import free_port
from tests.cluster.podspec import STUB_IMAGE, TPS_ANNOTATION
from tests.integration.gateway_process import GatewayProcess
from tests.integration.operator_process import OperatorProcess

log = logging.getLogger("bench")
NS = "bench-gw"
LAT, STREAM, COLD = "lat", "stream", "cold"
PATHS = ("direct", "nginx", "vllm-router", "envoy", "envoy-model", "py-aiohttp", "py-asyncio", "gateway")
PROXIES = PATHS[1:]


@dataclass
class GatewayConfig:
    work: Path
    concurrencies: list[int]
    latency_seconds: float = 8.0
    max_requests: int = 500_000
    rounds: int = 3
    loadgen: str = "auto"
    streams: int = 256
    stream_tokens: int = 200
    stream_tps: float = 100.0
    cold_starts: int = 20
    scale_to_zero_after: str = "2s"
    profile: bool = False
    workers: list[int] = field(default_factory=list)  # --gateway-workers: compare these instead of the usual parts
    workers_concurrency: int = 64
    workers_offered_share: float = 0.5  # paced runs offer this share of 1 worker's closed-loop rate
    latency_only: bool = False  # --gateway-latency-only: the proxy comparison alone (no streaming, no cold starts)


def gateway(
    kubeconfig: Path, log_path: Path, *extra: str, workers: int = 1, pod_name: str = "bench-gateway-0"
) -> GatewayProcess:
    """The product's gateway process as the tests run it, with the bench's timers (1 s activity flushes)."""
    flags = ("--activation-timeout", "60s", "--activity-interval", "1s", "--workers", str(workers), *extra)
    return GatewayProcess(kubeconfig, log_path, *flags, env={"POD_NAME": pod_name})


# The stub of tests/cluster/stub_server.py in a process of its own, with a listen backlog that takes a burst of 256
# connections (the node agent's stubs listen with aiohttp's default of 128; a proxy opening 256 upstream connections
# at once would then wait out 1 s SYN retransmits, which is the stub's artefact, not the proxy's latency).
_STUB_MAIN = (
    "import sys; from aiohttp import web; from tests.cluster.stub_server import make_app; "
    "web.run_app(make_app(sys.argv[1], float(sys.argv[2]), max_concurrency=4096), host=sys.argv[3], "
    "port=int(sys.argv[4]), backlog=4096, access_log=None, print=None)"
)


class StubProcess:
    def __init__(self, model: str, tokens_per_second: float, log_path: Path):
        self.model, self.tps, self.log_path = model, tokens_per_second, log_path
        self.host, self.port = "127.0.0.1", free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "StubProcess":
        log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _STUB_MAIN, self.model, f"{self.tps:g}", self.host, str(self.port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
                ),
            },
        )
        log_file.close()
        for _ in range(100):  # bounded: 10 s
            if self.proc.poll() is not None:
                raise RuntimeError(f"stub exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("stub did not answer within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def endpoint_slice(api_version: str, service: str, host: str, port: int) -> dict[str, Any]:
    """A hand-made EndpointSlice for a Service: the gateway routes to what slices say, whoever wrote them."""
    return {
        "apiVersion": api_version,
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-bench",
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "modelservice-bench",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [host], "conditions": {"ready": True}}],
    }


def modelservice(name: str, annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelService",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "engine": "vllm",
            "model": {"uri": "hf://bench/tiny-model"},
            "image": STUB_IMAGE,
            "podTemplate": {"annotations": annotations},
            **spec,
        },
    }


def chat(model: str, *, stream: bool = False, max_tokens: int = 4) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": max_tokens}
    ).encode()


def pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


async def _wait(predicate, timeout: float, what: str, interval: float = 0.2) -> Any:
    for _ in range(int(timeout / interval) + 1):  # bounded
        try:
            value = await predicate()
        except Exception:  # noqa: BLE001 - not yet
            value = None
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---- latency ---------------------------------------------------------------------------------------------------
def _engine(choice: str) -> str:
    if choice == "auto":
        return "wrk" if loadgen.have_wrk() else "python"
    if choice == "wrk" and not loadgen.have_wrk():
        raise RuntimeError("--loadgen wrk: wrk is not installed (apt-get install -y wrk)")
    return choice


def _median(values: list[float]) -> Optional[float]:
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def combine_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round results of one (concurrency, path) → medians of each percentile; totals of counts."""
    if not runs:
        return {}
    lat = {q: _median([r["latency"].get(q) for r in runs]) for q in ("p50", "p95", "p99", "mean", "max")}
    lat["n"] = sum(r["latency"].get("n") or 0 for r in runs)
    return {
        "rounds": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "throughput_rps": _median([r["throughput_rps"] for r in runs]),
        "cpu_seconds": _median([r.get("cpu_seconds") for r in runs]),
        "requests_per_cpu_second": _median([r.get("requests_per_cpu_second") for r in runs]),
        "latency": lat,
        "per_round": [
            {"p50": r["latency"]["p50"], "p99": r["latency"]["p99"], "rps": r["throughput_rps"]} for r in runs
        ],
    }


def added_latency(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
    """Proxy minus direct, per percentile."""
    direct = paths.get("direct", {}).get("latency", {})
    out: dict[str, dict[str, Optional[float]]] = {}
    for p in PROXIES:
        if p not in paths:
            continue
        lat = paths.get(p, {}).get("latency", {})
        out[p] = {
            q: (lat[q] - direct[q]) if lat.get(q) is not None and direct.get(q) is not None else None
            for q in ("p50", "p95", "p99")
        }
    return out


def cpu_seconds(pids: list[int]) -> Optional[float]:
    got = [x for x in (proc_cpu_seconds(p) for p in pids) if x is not None]
    return sum(got) if got else None


async def latency_part(
    cfg: GatewayConfig,
    urls: dict[str, str],
    gw: GatewayProcess,
    pids: Optional[dict[str, Callable[[], list[int]]]] = None,
) -> dict[str, Any]:
    """pids: each proxy's processes now (nginx forks its worker): their CPU over a run, per request answered."""
    pids = pids or {}
    engine = _engine(cfg.loadgen)
    body = chat(LAT)
    top = max(cfg.concurrencies)
    paths = tuple(p for p in PATHS if p in urls)
    out: dict[str, Any] = {
        "engine": engine,
        "seconds_per_run": cfg.latency_seconds,
        "warmup_seconds": 1,
        "by_concurrency": {},
    }
    for c in cfg.concurrencies:
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
        for r in range(cfg.rounds):
            order = paths[r % len(paths) :] + paths[: r % len(paths)]
            for path in order:
                # Warm-up at this concurrency, unmeasured: every proxy's upstream pool holds `c` open connections
                # (idle ones time out between runs: nginx after 60 s, the gateway's pool after 15 s).
                await asyncio.to_thread(loadgen.latency_run, engine, urls[path], body, c, 1, cfg.max_requests)
                prof = (
                    profiler.start(gw.pid, cfg.work / f"gateway-latency-c{c}", cfg.latency_seconds + 30)
                    if cfg.profile and path == "gateway" and c == top and r == 0
                    else None
                )
                procs = pids[path]() if path in pids else []
                cpu0 = cpu_seconds(procs)
                res = await asyncio.to_thread(
                    loadgen.latency_run, engine, urls[path], body, c, cfg.latency_seconds, cfg.max_requests
                )
                cpu1 = cpu_seconds(procs)
                if prof is not None:
                    out["profile_latency"] = await profiler.stop(prof)
                run = res.as_dict()
                if cpu0 is not None and cpu1 is not None:
                    run["cpu_seconds"] = cpu1 - cpu0
                    run["requests_per_cpu_second"] = res.requests / (cpu1 - cpu0) if cpu1 > cpu0 else None
                runs[path].append(run)
                log.info(
                    "latency c=%d %-11s p50 %.2f ms p99 %.2f ms  %.0f req/s  %s req/CPU-s  errors %d  load %.1f",
                    c,
                    path,
                    (res.latency["p50"] or 0) * 1000,
                    (res.latency["p99"] or 0) * 1000,
                    res.requests / res.seconds if res.seconds else 0,
                    f"{run['requests_per_cpu_second']:.0f}" if run.get("requests_per_cpu_second") else "-",
                    res.errors,
                    os.getloadavg()[0],
                )
        entry = {p: combine_rounds(runs[p]) for p in paths}
        entry["added"] = added_latency(entry)
        out["by_concurrency"][str(c)] = entry
    return out


# ---- streaming -------------------------------------------------------------------------------------------------
async def _sample_rss(pid: int, stop: asyncio.Event) -> float:
    peak = 0
    for _ in range(100_000):  # bounded; 0.1 s apart
        peak = max(peak, proc_status_kib(pid, "VmRSS") or 0)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
            break
        except asyncio.TimeoutError:
            pass
    return peak / 1024


async def streaming_part(cfg: GatewayConfig, direct_url: str, gw: GatewayProcess) -> dict[str, Any]:
    body = chat(STREAM, stream=True, max_tokens=cfg.stream_tokens)
    total = 2 * cfg.streams  # two waves per run
    limit = 60 + 4 * cfg.stream_tokens / cfg.stream_tps
    out: dict[str, Any] = {
        "streams": cfg.streams,
        "tokens_per_stream": cfg.stream_tokens,
        "stub_tokens_per_second": cfg.stream_tps,
        "requests_per_run": total,
        "gateway_rss_idle_mib": (proc_status_kib(gw.pid, "VmRSS") or 0) / 1024,
    }
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
    peak = 0.0
    order = ["direct", "gateway", "gateway", "direct"][: 2 * max(1, min(2, cfg.rounds))]
    for path in order:
        url = direct_url if path == "direct" else gw.url + "/v1/chat/completions"
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(gw.pid, stop)) if path == "gateway" else None
        prof = (
            profiler.start(gw.pid, cfg.work / "gateway-streams", limit)
            if cfg.profile and path == "gateway" and "profile_streams" not in out
            else None
        )
        res = await loadgen.streams(url, body, cfg.streams, total, limit, cfg.stream_tokens)
        if prof is not None:
            out["profile_streams"] = await profiler.stop(prof)
        stop.set()
        if sampler is not None:
            peak = max(peak, await sampler)
        runs[path].append(res)
        log.info(
            "streams %-7s %.0f tokens/s, %d/%d complete, ttft p50 %.0f ms",
            path,
            res["tokens_per_second"],
            res["completed"],
            res["streams"],
            (res["ttft"]["p50"] or 0) * 1000,
        )
    for path, rs in runs.items():
        out[path] = {
            "tokens_per_second": _median([r["tokens_per_second"] for r in rs]),
            "completed": sum(r["completed"] for r in rs),
            "streams": sum(r["streams"] for r in rs),
            "ttft": rs[-1]["ttft"],
            "stream_seconds": rs[-1]["stream_seconds"],
            "per_run_tokens_per_second": [r["tokens_per_second"] for r in rs],
        }
    out["gateway_rss_peak_mib"] = peak
    out["gateway_vmhwm_mib"] = (proc_status_kib(gw.pid, "VmHWM") or 0) / 1024
    return out


# ---- scale from zero -------------------------------------------------------------------------------------------
async def cold_part(cfg: GatewayConfig, cluster: Cluster, gw: GatewayProcess) -> dict[str, Any]:
    kube = cluster.kube
    ready_at: dict[str, float] = {}  # pod uid → arrival of the first Ready=True event
    direct_fb: dict[str, float] = {}  # pod uid → first byte of a direct request sent at that moment
    slice_events: list[tuple[float, bool]] = []
    tasks: set[asyncio.Task] = set()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def direct_probe(uid: str, ip: str) -> None:
        url = f"http://{ip}:8000/v1/chat/completions"
        loadgen.check_loopback(url)
        try:
            async with session.post(url, data=chat(COLD), headers={"Content-Type": "application/json"}) as r:
                direct_fb[uid] = time.monotonic()
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("direct probe of %s: %s", ip, e)

    def on_pod(event: str, pod: dict[str, Any], t: float) -> None:
        uid = pod["metadata"]["uid"]
        if (
            event != "DELETED"
            and uid not in ready_at
            and pod_ready(pod)
            and not pod["metadata"].get("deletionTimestamp")
        ):
            ready_at[uid] = t
            ip = pod["status"].get("podIP")
            if ip:
                task = asyncio.create_task(direct_probe(uid, ip))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    def on_slice(event: str, obj: dict[str, Any], t: float) -> None:
        ready = event != "DELETED" and any(
            (ep.get("conditions") or {}).get("ready") is not False and ep.get("addresses")
            for ep in obj.get("endpoints") or []
        )
        slice_events.append((t, ready))

    slices = await slice_version(kube)
    dep_path = f"/apis/apps/v1/namespaces/{NS}/deployments/{COLD}"
    pods_path = f"/api/v1/namespaces/{NS}/pods"

    async def asleep() -> bool:
        dep = await kube.get(dep_path)
        pods = (await kube.get(pods_path, labelSelector=f"{MODELSERVICE_LABEL}={COLD}"))["items"]
        eps = await asyncio.to_thread(gw.metric, "modelservice_gateway_ready_endpoints", model=f"{NS}/{COLD}")
        return dep["spec"].get("replicas") == 0 and not pods and eps == 0

    rows: list[dict[str, Any]] = []
    failures = forced = 0
    try:
        async with (
            Watch(kube, pods_path, on_pod, label_selector=f"{MODELSERVICE_LABEL}={COLD}"),
            Watch(
                kube,
                f"/apis/{slices}/namespaces/{NS}/endpointslices",
                on_slice,
                label_selector=f"kubernetes.io/service-name={COLD}",
            ),
        ):
            for i in range(cfg.cold_starts):
                try:
                    await _wait(asleep, 60, f"{COLD} scaled to zero by the operator")
                except TimeoutError:
                    forced += 1
                    log.warning("cold start %d: not asleep after 60 s; scaling to zero directly", i)
                    await kube.merge_patch(dep_path + "/scale", {"spec": {"replicas": 0}})
                    await _wait(asleep, 60, f"{COLD} asleep")
                await asyncio.sleep(0.5)  # the gateway's Deployment watch has seen replicas 0
                t_send = time.monotonic()
                try:
                    async with session.post(
                        gw.url + "/v1/chat/completions", data=chat(COLD), headers={"Content-Type": "application/json"}
                    ) as r:
                        t_fb = time.monotonic()
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    status, t_fb = 0, time.monotonic()
                    log.warning("cold start %d: %s", i, e)
                await asyncio.sleep(0.3)  # late watch events and the direct probe
                woke = sorted((t, uid) for uid, t in ready_at.items() if t >= t_send)
                t_slice = next((t for t, ok in slice_events if ok and t >= t_send), None)
                if status != 200 or not woke:
                    failures += 1
                    log.warning("cold start %d: status %d, pod ready seen: %s", i, status, bool(woke))
                    continue
                t_ready, uid = woke[0]
                row = {
                    "total": t_fb - t_send,
                    "overhead": t_fb - t_ready,
                    "direct_overhead": direct_fb[uid] - t_ready if uid in direct_fb else None,
                    "slice_lag": t_slice - t_ready if t_slice else None,
                    "gateway_share": t_fb - t_slice if t_slice else None,
                }
                rows.append(row)
                log.info(
                    "cold start %d: first byte %.0f ms after pod Ready (slice +%.0f ms), %.2f s after send",
                    i,
                    row["overhead"] * 1000,
                    (row["slice_lag"] or 0) * 1000,
                    row["total"],
                )
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()

    def col(k: str) -> list[float]:
        return [r[k] for r in rows if r.get(k) is not None]

    return {
        "cycles": cfg.cold_starts,
        "failures": failures,
        "forced_scale_down": forced,
        "scale_to_zero_after": cfg.scale_to_zero_after,
        "overhead": summary(col("overhead")),
        "direct_overhead": summary(col("direct_overhead")),
        "slice_lag": summary(col("slice_lag")),
        "gateway_share": summary(col("gateway_share")),
        "total": summary(col("total")),
        "rows": rows,
    }


async def slice_version(kube: Any) -> str:
    served = await kube.api_versions("discovery.k8s.io")
    return "discovery.k8s.io/v1" if "discovery.k8s.io/v1" in served else "discovery.k8s.io/v1beta1"


# ---- worker processes (--gateway-workers) ------------------------------------------------------------------------
def paired_ratios(values: list[float], base: list[float]) -> list[float]:
    """values[i] / base[i], round by round (runs side by side); a round whose base is 0 or missing is left out."""
    return [v / b for v, b in zip(values, base) if b]


def children_cpu_seconds() -> float:
    """utime + stime of this process's waited-for children: around one subprocess.run of wrk, wrk's own CPU."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def workers_run(
    url: str, body: bytes, concurrency: int, seconds: float, max_requests: int, delay_ms: int, gw: GatewayProcess
) -> dict[str, Any]:
    """One wrk run against one gateway, with the CPU every gateway process and wrk spent in it."""
    pids = gw.pids()

    def switches() -> tuple[int, int]:  # context switches of every gateway process: (voluntary, involuntary)
        return (
            sum(proc_status_kib(p, "voluntary_ctxt_switches") or 0 for p in pids),
            sum(proc_status_kib(p, "nonvoluntary_ctxt_switches") or 0 for p in pids),
        )

    cpu0, client0, load0 = [proc_cpu_seconds(p) or 0.0 for p in pids], children_cpu_seconds(), os.getloadavg()[0]
    sw0 = switches()
    res = loadgen.wrk_run(url, body, concurrency, seconds, max_requests, delay_ms=delay_ms)
    cpu1, client1, sw1 = [proc_cpu_seconds(p) or 0.0 for p in pids], children_cpu_seconds(), switches()
    per_process = [b - a for a, b in zip(cpu0, cpu1)]
    gw_cpu, n = sum(per_process), max(1, res.requests)
    return {
        **res.as_dict(),
        "gateway_cpu_seconds": gw_cpu,
        "gateway_cpu_per_process": per_process,
        "gateway_cpu_ms_per_request": gw_cpu / n * 1000,
        "loadgen_cpu_seconds": client1 - client0,
        "loadgen_cpu_ms_per_request": (client1 - client0) / n * 1000,
        "gateway_cores_busy": gw_cpu / res.seconds if res.seconds else None,
        "gateway_rss_mib": sum(proc_status_kib(p, "VmRSS") or 0 for p in pids) / 1024,
        "gateway_switches_per_request": [(sw1[0] - sw0[0]) / n, (sw1[1] - sw0[1]) / n],
        "loadavg_1m": [load0, os.getloadavg()[0]],
    }


async def workers_part(cfg: GatewayConfig, direct_url: str, gws: dict[int, GatewayProcess]) -> dict[str, Any]:
    """1 vs N worker processes, interleaved in rotated order each round: closed loop at c=1 (added latency) and at
    c=workers_concurrency (capacity), then paced at one offered rate for all (CPU per request at the same load)."""
    if not loadgen.have_wrk():
        raise RuntimeError("--gateway-workers needs wrk (apt-get install -y wrk): CPU per request at a paced rate")
    body, counts = chat(LAT), sorted(gws)
    c = cfg.workers_concurrency
    modes: list[tuple[str, int, int]] = [("c1", 1, 0), ("closed", c, 0)]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    out: dict[str, Any] = {"workers": counts, "seconds_per_run": cfg.latency_seconds, "concurrency": c}
    direct: list[float] = []
    for r in range(cfg.rounds):
        d = await asyncio.to_thread(loadgen.wrk_run, direct_url, body, 1, cfg.latency_seconds, cfg.max_requests)
        direct.append(d.latency["p50"])
        if r == 0:
            # The paced rate: a share of what 1 worker does closed-loop, so every gateway can keep up with it.
            base = await asyncio.to_thread(
                workers_run,
                gws[counts[0]].url + "/v1/chat/completions",
                body,
                c,
                cfg.latency_seconds,
                cfg.max_requests,
                0,
                gws[counts[0]],
            )
            rate = base["throughput_rps"] * cfg.workers_offered_share
            delay = max(1, int(c / max(rate, 1.0) * 1000))
            modes.append(("paced", c, delay))
            out["paced"] = {
                "offered_rps": c / (delay / 1000),
                "delay_ms": delay,
                "one_worker_closed_loop_rps": base["throughput_rps"],
            }
        for mode, conc, delay in modes:
            order = counts[r % len(counts) :] + counts[: r % len(counts)]
            for n in order:
                gw = gws[n]
                url = gw.url + "/v1/chat/completions"
                await asyncio.to_thread(loadgen.wrk_run, url, body, conc, 1, cfg.max_requests, None, delay)  # warm-up
                res = await asyncio.to_thread(
                    workers_run, url, body, conc, cfg.latency_seconds, cfg.max_requests, delay, gw
                )
                runs.setdefault(mode, {}).setdefault(str(n), []).append(res)
                log.info(
                    "workers=%d %-6s c=%-3d %6.0f req/s  p50 %.2f ms  gateway %.3f ms CPU/req (%s)  "
                    "wrk %.3f ms CPU/req  switches/req %.2f+%.2f  load %.1f",
                    n,
                    mode,
                    conc,
                    res["throughput_rps"],
                    (res["latency"]["p50"] or 0) * 1000,
                    res["gateway_cpu_ms_per_request"],
                    "+".join(f"{x:.1f}" for x in res["gateway_cpu_per_process"]),
                    res["loadgen_cpu_ms_per_request"],
                    *res["gateway_switches_per_request"],
                    res["loadavg_1m"][1],
                )
    out["direct_c1_p50"] = _median(direct)
    for mode, by_n in runs.items():
        out[mode] = {
            **out.get(mode, {}),
            **{
                n: {
                    "rounds": len(rs),
                    "errors": sum(x["errors"] for x in rs),
                    "throughput_rps": _median([x["throughput_rps"] for x in rs]),
                    "p50": _median([x["latency"]["p50"] for x in rs]),
                    "p99": _median([x["latency"]["p99"] for x in rs]),
                    "gateway_cpu_ms_per_request": _median([x["gateway_cpu_ms_per_request"] for x in rs]),
                    "loadgen_cpu_ms_per_request": _median([x["loadgen_cpu_ms_per_request"] for x in rs]),
                    "gateway_cores_busy": _median([x["gateway_cores_busy"] for x in rs]),
                    "gateway_rss_mib": max(x["gateway_rss_mib"] for x in rs),
                    "gateway_switches_per_request": [
                        _median([x["gateway_switches_per_request"][i] for x in rs]) for i in (0, 1)
                    ],
                    "per_round": rs,
                }
                for n, rs in by_n.items()
            },
        }
        # The machine's load drifts over a run: the ratio of runs side by side in one round says more than the
        # ratio of medians over rounds.
        base = [x["gateway_cpu_ms_per_request"] for x in by_n[str(counts[0])]]
        for n, rs in by_n.items():
            ratios = paired_ratios([x["gateway_cpu_ms_per_request"] for x in rs], base)
            out[mode][n]["paired_cpu_ratios"], out[mode][n]["paired_cpu_ratio"] = ratios, _median(ratios)
    return out


async def _run_workers(cluster: Cluster, cfg: GatewayConfig, out: dict[str, Any]) -> None:
    kube = cluster.kube
    await cluster.namespace(NS)
    gws = {
        n: gateway(cluster.kubeconfig, cfg.work / f"gateway-w{n}.log", workers=n, pod_name=f"bench-gateway-{n}w")
        for n in cfg.workers
    }
    stub: Optional[StubProcess] = None
    try:
        stub = await asyncio.to_thread(StubProcess(LAT, 0, cfg.work / "stub-lat.log").start)
        slices = await slice_version(kube)
        await kube.create(f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}", modelservice(LAT, {}, replicas=0))
        await kube.create(
            f"/apis/{slices}/namespaces/{NS}/endpointslices", endpoint_slice(slices, LAT, stub.host, stub.port)
        )
        for n, gw in gws.items():
            await asyncio.to_thread(gw.start)
            await _wait(
                lambda gw=gw: asyncio.to_thread(gw.metric, "modelservice_gateway_ready_endpoints", model=f"{NS}/{LAT}"),
                120,
                f"{LAT} routable ({n} workers)",
            )
        out["loadgen"] = "wrk"
        out["workers"] = await workers_part(cfg, f"{stub.url}/v1/chat/completions", gws)
    finally:
        for gw in gws.values():
            await asyncio.to_thread(gw.stop)
        if stub is not None:
            await asyncio.to_thread(stub.stop)


# ---- the whole part --------------------------------------------------------------------------------------------
async def run(cfg: GatewayConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"nginx_version": nginx.version(), "loadavg_start": os.getloadavg()}
    part = _run_workers if cfg.workers else _run_in
    return await run_part(cfg.work, "gateway", 10, lambda cluster: part(cluster, cfg, out), out)


async def _run_in(cluster: Cluster, cfg: GatewayConfig, out: dict[str, Any]) -> None:
    kube = cluster.kube
    await cluster.namespace(NS)
    op = OperatorProcess(cluster.kubeconfig, cfg.work / "gateway-operator.log", extra_args=["--gateway-enabled"])
    gw = gateway(cluster.kubeconfig, cfg.work / "gateway.log")
    ngx: Optional[nginx.Nginx] = None
    others: list[Any] = []  # vllm-router, Envoy (plain and by model), the Python floors
    stubs: list[StubProcess] = []
    try:
        await asyncio.to_thread(op.start)
        await asyncio.to_thread(gw.start)
        # lat and stream: ModelServices with replicas 0 whose traffic goes to stub processes of our own (one per
        # model, as a model server is in a real cluster), through hand-made EndpointSlices. cold: a real pod of
        # the fake node agent, woken from zero.
        lat_stub = await asyncio.to_thread(StubProcess(LAT, 0, cfg.work / "stub-lat.log").start)  # 0: at once
        stubs.append(lat_stub)
        stream_stub = await asyncio.to_thread(StubProcess(STREAM, cfg.stream_tps, cfg.work / "stub-stream.log").start)
        stubs.append(stream_stub)
        out["stub_pids"] = {"lat": lat_stub.proc.pid if lat_stub.proc else None}
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"
        slices = await slice_version(kube)
        for name, stub in ((LAT, lat_stub), (STREAM, stream_stub)):
            await kube.create(path, modelservice(name, {}, replicas=0))
            await kube.create(
                f"/apis/{slices}/namespaces/{NS}/endpointslices", endpoint_slice(slices, name, stub.host, stub.port)
            )
        await kube.create(
            path,
            modelservice(
                COLD,
                {TPS_ANNOTATION: "0"},
                autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": cfg.scale_to_zero_after},
            ),
        )
        for name in (LAT, STREAM):
            await _wait(
                lambda n=name: asyncio.to_thread(gw.metric, "modelservice_gateway_ready_endpoints", model=f"{NS}/{n}"),
                120,
                f"{name} routable in the gateway",
            )
        urls = {"direct": f"{lat_stub.url}/v1/chat/completions", "gateway": f"{gw.url}/v1/chat/completions"}
        if nginx.binary():
            ngx = await asyncio.to_thread(
                nginx.Nginx(cfg.work / "nginx", free_port(), f"{lat_stub.host}:{lat_stub.port}").start
            )
            urls["nginx"] = f"{ngx.url}/v1/chat/completions"
        else:
            log.warning("nginx is not installed (apt-get install -y nginx-light): no nginx baseline")
        pids: dict[str, Callable[[], list[int]]] = {"gateway": gw.pids}
        if ngx is not None:
            pids["nginx"] = lambda: [ngx.proc.pid, *processes.children(ngx.proc.pid)] if ngx and ngx.proc else []
        for cls in (peers.VllmRouter, peers.Envoy, peers.EnvoyByModel, peers.AiohttpFloor, peers.AsyncioFloor):
            try:
                peer = await asyncio.to_thread(cls(cfg.work / cls.name, f"{lat_stub.host}:{lat_stub.port}").start)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                log.warning("%s baseline left out: %s", cls.name, e)
                out.setdefault("peer_errors", {})[cls.name] = str(e)[-500:]
                continue
            others.append(peer)
            out[f"{cls.name}_version"] = peer.version
            urls[cls.name] = f"{peer.url}/v1/chat/completions"
            pids[cls.name] = lambda p=peer: [p.pid]
        out["loadgen"] = _engine(cfg.loadgen)
        out["gateway_rss_start_mib"] = (proc_status_kib(gw.pid, "VmRSS") or 0) / 1024
        out["latency"] = await latency_part(cfg, urls, gw, pids)
        out["loadavg_after_latency"] = os.getloadavg()
        if not cfg.latency_only:
            out["streaming"] = await streaming_part(cfg, f"{stream_stub.url}/v1/chat/completions", gw)
            out["cold_start"] = await cold_part(cfg, cluster, gw)
        out["gateway_vmhwm_mib"] = (proc_status_kib(gw.pid, "VmHWM") or 0) / 1024
    finally:
        if ngx is not None:
            await asyncio.to_thread(ngx.stop)
        for peer in others:
            await asyncio.to_thread(peer.stop)
        await asyncio.to_thread(gw.stop)
        await asyncio.to_thread(op.stop)
        for stub in stubs:
            await asyncio.to_thread(stub.stop)

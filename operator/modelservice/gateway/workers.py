"""Several gateway processes in one pod (--workers N), so a pod uses the cores it is given (docs/routing.md).

A parent process forks N full gateways before any event loop or API client exists. Each worker binds the client
port with SO_REUSEPORT (the kernel spreads new connections over the workers' sockets by a hash of the connection)
and is a complete gateway of its own: watches, routing table, activator, activity Leases. Per-gateway rules keep
holding because each worker is one gateway to the rest of the system:
- identity <pod>-w<i>: its own activity Lease per model; the operator sums fresh Leases, so in-flight adds up;
- the held-request cap and quota share are divided by N: the pod never exceeds them, and may refuse (429) a little
  early when connections are unevenly spread over the workers;
- a wake-up is one per worker that holds a request for the model: up to N idempotent scale calls per episode;
- /metrics: the parent serves the sum of the workers' registries (each worker serves its own on a Unix socket);
  /engine-metrics: worker 0's (every worker routes to every endpoint);
- /healthz (readiness): 200 only once every worker has synced (flags in shared memory);
- SIGTERM to the parent: every worker drains as a single gateway does; a worker that dies takes the pod down (its
  restart is the kubelet's, with every worker's state fresh).
With N = 1 none of this runs: the gateway is the single process it always was.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from modelservice.gateway.config import Config

log = logging.getLogger("modelservice.gateway.workers")
CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"
CPU_QUOTA_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
SCRAPE_TIMEOUT = 5.0
PR_SET_PDEATHSIG = 1
# Gauges that describe the cluster as every worker sees it (each worker watches it whole): one worker's value, not
# the sum. Every other series is per-worker state (requests, in flight, held, tokens) and adds up.
SAME_IN_EVERY_WORKER = frozenset(
    {
        "modelservice_gateway_ready_endpoints",
        "modelservice_gateway_invalid_modelservices",
        "modelservice_gateway_tenants_aggregated",
    }
)


# ---- pure --------------------------------------------------------------------------------------------------------
def parse_workers(text: str) -> int | str:
    """--workers: a positive count, or "auto" (the CPU limit of the container, rounded up; 1 without a limit)."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--workers {text!r}: a positive number or auto") from None
    if n < 1:
        raise ValueError(f"--workers {n}: at least 1")
    return n


def cpus_from_cgroup(
    cpu_max: Optional[str] = None, quota_v1: Optional[str] = None, period_v1: Optional[str] = None
) -> Optional[float]:
    """The container's CPU limit in cores from the cgroup files' text (v2 cpu.max, else v1); None: no limit."""
    try:
        if cpu_max is not None:
            quota, period = cpu_max.split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if quota_v1 is not None and period_v1 is not None:
            q = int(quota_v1)
            return None if q <= 0 else q / int(period_v1)
    except ValueError:
        return None
    return None


def auto_workers(cpus: Optional[float]) -> int:
    """One worker per core of the limit, rounded up (1.5 cores: 2, the second one half-busy); 1 without a limit:
    a pod with no limit has no stated share of the node, and its request (100m by default) is not a core."""
    return 1 if cpus is None else max(1, math.ceil(cpus - 1e-9))


def read_cpu_limit() -> Optional[float]:
    def text(path: str) -> Optional[str]:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    v2 = text(CPU_MAX)
    return cpus_from_cgroup(v2) if v2 is not None else cpus_from_cgroup(None, *(text(p) for p in CPU_QUOTA_V1))


def worker_identity(pod_name: str, index: int, count: int) -> str:
    """The name a worker writes its activity Leases under: the pod's own with one worker (the Leases of a gateway
    that ran before --workers are reused), <pod>-w<i> with several."""
    return pod_name if count == 1 else f"{pod_name}-w{index}"


def share(total: int, count: int) -> int:
    """A worker's part of a per-pod cap: floor, so the pod's sum stays within it; at least 1, so no worker refuses
    everything (with count > total the pod may hold up to `count`)."""
    return max(1, total // count)


def worker_config(config: Config, index: int, count: int) -> Config:
    """One worker's settings: its identity, its share of the held cap, and quotas split over every worker of every
    gateway replica (quota_share was the replica count). Metrics go to the parent, not to a port of their own."""
    if count == 1:
        return config
    return dataclasses.replace(
        config,
        pod_name=worker_identity(config.pod_name, index, count),
        max_held_per_model=share(config.max_held_per_model, count),
        quota_share=config.quota_share * count,
        metrics_port=0,
    )


def _sample_key(s: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    return s.name, tuple(sorted(s.labels.items()))


def merge_expositions(texts: Sequence[str]) -> list[Metric]:
    """The workers' /metrics pages → one set of families: per-series sums, except gauges in SAME_IN_EVERY_WORKER
    (the largest: a worker whose watch lags a moment does not hide an endpoint) and *_created timestamps (the
    earliest). Histograms add bucket by bucket, which is exact: every worker has the same buckets."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            acc = values[fam.name]
            same = fam.name in SAME_IN_EVERY_WORKER
            for s in fam.samples:
                key = _sample_key(s)
                if key not in acc:
                    acc[key] = s.value
                elif s.name.endswith("_created"):
                    acc[key] = min(acc[key], s.value)
                elif same:
                    acc[key] = max(acc[key], s.value)
                else:
                    acc[key] += s.value
    for name, fam in families.items():
        for (sample, labels), value in values[name].items():
            fam.add_sample(sample, dict(labels), value)
    return list(families.values())


def render(families: Iterable[Metric]) -> bytes:
    class _Fixed:
        def collect(self) -> Iterable[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry)


# ---- the worker's side -------------------------------------------------------------------------------------------
@dataclass
class Slot:
    """What a worker shares with its parent and siblings."""

    index: int
    count: int
    metrics_socket: str  # the worker serves its own registry here; the parent sums them
    synced: Any  # multiprocessing.Array of bytes, one per worker, in shared memory

    def mark_synced(self) -> None:
        self.synced[self.index] = 1

    def all_synced(self) -> bool:
        return all(self.synced)


def _worker_main(config: Config, slot: Slot, parent: int) -> None:
    from modelservice.gateway.cli import serve  # here: cli imports this module

    # A parent killed outright (OOM, SIGKILL) must not leave workers serving on the port: the kernel sends this
    # worker SIGTERM when it goes (Linux prctl PR_SET_PDEATHSIG), and a parent gone before that was set is caught
    # by the ppid check.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return

    # The parent's handlers were not inherited by the new loop; SIGINT from a terminal reaches the whole group, and
    # SIGTERM comes from the parent: both stop this worker through serve()'s own handlers.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, slot=slot))


# ---- the parent's side -------------------------------------------------------------------------------------------
async def _scrape(sessions: list[aiohttp.ClientSession]) -> bytes:
    async def one(s: aiohttp.ClientSession) -> str:
        async with s.get("http://worker/metrics") as r:
            r.raise_for_status()
            return await r.text()

    texts = await asyncio.gather(*(one(s) for s in sessions))
    return render(merge_expositions(texts))


def supervise(config: Config, count: int) -> int:
    """Fork `count` workers, serve their summed metrics, stop them all on SIGTERM; the first to die ends the pod."""
    ctx = multiprocessing.get_context("fork")  # before any thread, loop or socket exists in this process
    sockets = tempfile.mkdtemp(prefix="modelservice-gateway-")  # /tmp: an emptyDir in the chart (read-only root)
    synced = ctx.Array("b", count, lock=False)
    slots = [Slot(i, count, os.path.join(sockets, f"w{i}.sock"), synced) for i in range(count)]
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(worker_config(config, i, count), slot, os.getpid()),
            name=f"gateway-w{i}",
            daemon=False,
        )
        for i, slot in enumerate(slots)
    ]
    for p in procs:
        p.start()
    try:
        return asyncio.run(_parent(config, procs, slots))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        shutil.rmtree(sockets, ignore_errors=True)


async def _parent(config: Config, procs: list[Any], slots: list[Slot]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=s.metrics_socket), timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        )
        for s in slots
    ]

    async def metrics(_: web.Request) -> web.Response:
        try:
            body = await _scrape(sessions)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            # A partial sum would look like counters going backwards (a reset): no answer is the honest one.
            return web.Response(status=503, text=f"a gateway worker did not answer for its metrics: {e}\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def engine_metrics(_: web.Request) -> web.Response:
        # Every worker routes to every endpoint: one of them answers for the engines (engine_metrics.py).
        try:
            async with sessions[0].get("http://worker/engine-metrics") as r:
                return web.Response(
                    status=r.status,
                    body=await r.read(),
                    headers={"Content-Type": r.headers.get("Content-Type", CONTENT_TYPE_LATEST)},
                )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return web.Response(status=503, text=f"gateway worker 0 did not answer for the engines' metrics: {e}\n")

    runner: Optional[web.AppRunner] = None
    if config.metrics_port:
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/engine-metrics", engine_metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, config.host, config.metrics_port, reuse_address=True).start()
    log.info(
        "gateway %s: %d workers (pids %s), summed metrics on :%d",
        config.pod_name,
        len(procs),
        ",".join(str(p.pid) for p in procs),
        config.metrics_port,
    )
    code = 0
    try:
        while not stop.is_set():
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                log.error("gateway worker %s exited (code %s): stopping the others", dead[0].name, dead[0].exitcode)
                code = 1
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)  # each drains its in-flight requests, as one gateway does
        for p in procs:
            await asyncio.to_thread(p.join)
    finally:
        if runner is not None:
            await runner.cleanup()
        for s in sessions:
            await s.close()
    return code

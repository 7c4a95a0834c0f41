"""Engine load signals: each ready replica's own queue and KV-cache figures, read from its metrics endpoint.

The gateway's in-flight counts see only its own requests; an engine's queue sees everyone's (other gateway replicas
and workers, direct callers) and what the engine cannot batch yet. A background task per gateway (per worker with
--workers) fetches every ready endpoint's /metrics (engine_metrics.targets: the engine's metrics port and path) once
per interval (stretched so that the fetches stay under MAX_RATE a second, however many endpoints there are), at
most MAX_CONCURRENT at once, each bounded by a timeout and a body size cap, and never on a request's path. Only the
wanted lines of a page reach the parser (a vLLM page is ~30 KiB, three of its lines are wanted). Routing reads the last figures from memory.

Figures older than STALE_INTERVALS intervals, or from an endpoint that hangs, errs, or answers with garbage or values
no engine can report (negative, NaN, absurd), are not used: the balancer falls back to in-flight counts for that
endpoint, modelservice_gateway_engine_load_errors_total{reason} counts each failure and
modelservice_gateway_engine_load_unknown_endpoints{model} says how many ready endpoints are routed without figures.

Metric names are the engines' own, pinned in the tests against a real llama-server and the installed vLLM (NAMES);
engines not listed there (sglang, tgi, triton, ollama) are routed by in-flight counts only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from modelservice.api import Engine
from modelservice.gateway.engine_metrics import targets
from modelservice.gateway.routes import Endpoint, Key, ModelEntry, RouteTable

log = logging.getLogger("modelservice.gateway.engine_load")

INTERVAL = 1.0  # seconds between two polls of one endpoint by one gateway process
TIMEOUT = 0.5  # a fetch that takes longer is a failure: a slow /metrics must not delay the next poll
STALE_INTERVALS = 3  # figures older than this many intervals are not used
MAX_BODY = 1 << 20  # vLLM's /metrics is ~30 KiB; more is not a metrics page
MAX_QUEUE = 1_000_000  # a queue longer than this is a lie (or a bug), not a figure to route on
USER_AGENT = "modelservice-gateway/engine-load"
MAX_RATE = 50.0  # fetches per second per gateway process, all endpoints together: many endpoints stretch the interval
MAX_CONCURRENT = 16  # fetches open at once


@dataclass(frozen=True)
class Names:
    running: str
    waiting: str
    kv_cache: Optional[str]  # fraction 0..1 (llama-server b11434 exports none)


# Only engines whose names were seen on a real build (tests/unit/test_gateway_engine_load.py).
NAMES: dict[Engine, Names] = {
    Engine.vllm: Names("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"),
    Engine.llamacpp: Names("llamacpp:requests_processing", "llamacpp:requests_deferred", None),
}


@dataclass(frozen=True)
class Load:
    running: int
    waiting: int
    kv_cache: Optional[float]
    at: float  # monotonic time of the fetch


class BadMetrics(ValueError):
    pass


def parse_load(text: str, names: Names, at: float) -> Load:
    """One engine's /metrics → its load. vLLM labels its gauges per model and engine (data parallel): summed."""
    sums: dict[str, float] = {}
    wanted = {names.running, names.waiting} | ({names.kv_cache} if names.kv_cache else set())
    prefixes = tuple(wanted)
    lines = "\n".join(ln for ln in text.splitlines() if ln.startswith(prefixes)) + "\n"
    try:
        for family in text_string_to_metric_families(lines):
            for s in family.samples:
                if s.name in wanted:
                    sums[s.name] = sums.get(s.name, 0.0) + float(s.value)
    except (ValueError, TypeError, IndexError, KeyError) as e:  # the parser's ways of refusing a page
        raise BadMetrics(f"not a Prometheus exposition: {e}") from None
    for name in (names.running, names.waiting):
        if name not in sums:
            raise BadMetrics(f"no {name}")
        v = sums[name]
        if not math.isfinite(v) or v < 0 or v > MAX_QUEUE:
            raise BadMetrics(f"{name} = {v}")
    kv = sums.get(names.kv_cache) if names.kv_cache else None
    if kv is not None and not (math.isfinite(kv) and 0 <= kv <= 1.0001):
        raise BadMetrics(f"{names.kv_cache} = {kv}")
    return Load(running=int(sums[names.running]), waiting=int(sums[names.waiting]), kv_cache=kv, at=at)


class EngineLoad:
    """The last load figures per endpoint, refreshed by run(); read by the balancer and the activity Leases."""

    def __init__(
        self,
        table: RouteTable,
        registry: CollectorRegistry,
        *,
        interval: float = INTERVAL,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.table, self.interval, self.timeout, self._clock = table, interval, min(timeout, interval), clock
        self._loads: dict[Endpoint, Load] = {}
        self.period = interval  # the interval stretched for many endpoints (MAX_RATE): what freshness is judged by
        self._labels: set[str] = set()  # models with an unknown-endpoints series, removed when the model goes
        self.errors = Counter(
            "modelservice_gateway_engine_load_errors",
            "Engine /metrics polls for load figures that failed (timeout, http, garbage); routing "
            "uses in-flight counts for that endpoint until a poll succeeds.",
            ["model", "reason"],
            registry=registry,
        )
        self.unknown = Gauge(
            "modelservice_gateway_engine_load_unknown_endpoints",
            "Ready endpoints routed without fresh engine load figures (by in-flight counts only).",
            ["model"],
            registry=registry,
        )

    # -- what routing reads ----------------------------------------------------------------------------------
    def get(self, ep: Endpoint) -> Optional[Load]:
        load = self._loads.get(ep)
        if load is None or self._clock() - load.at > STALE_INTERVALS * self.period:
            return None
        return load

    def fresh(self, ep: Endpoint) -> bool:
        return self.get(ep) is not None

    def waiting(self, ep: Endpoint) -> Optional[int]:
        load = self.get(ep)
        return load.waiting if load else None

    def model_waiting(self, key: Key) -> Optional[int]:
        """Waiting requests over the model's ready endpoints with fresh figures; None when none has any."""
        got = [w for w in (self.waiting(ep) for ep in self.table.ready(key)) if w is not None]
        return sum(got) if got else None

    # -- polling ---------------------------------------------------------------------------------------------
    async def poll(self, session: aiohttp.ClientSession) -> None:
        found = [
            (entry, ep, port, path, NAMES[Engine(entry.engine)])
            for entry, ep, port, path in targets(self.table)
            if entry.engine in {e.value for e in NAMES}
        ]

        self.period = max(self.interval, len(found) / MAX_RATE)
        gate = asyncio.Semaphore(MAX_CONCURRENT)

        async def one(entry: ModelEntry, ep: Endpoint, port: int, path: str, names: Names) -> None:
            async with gate:
                await fetch(entry, ep, port, path, names)

        async def fetch(entry: ModelEntry, ep: Endpoint, port: int, path: str, names: Names) -> None:
            host = f"[{ep.address}]" if ":" in ep.address else ep.address
            try:
                async with asyncio.timeout(self.timeout):
                    async with session.get(f"http://{host}:{port}{path}") as r:
                        if r.status != 200:
                            raise aiohttp.ClientError(f"HTTP {r.status}")
                        body = await r.content.read(MAX_BODY + 1)
                if len(body) > MAX_BODY:
                    raise BadMetrics("body too large")
                self._loads[ep] = parse_load(body.decode("utf-8"), names, self._clock())
            except (TimeoutError, asyncio.TimeoutError):
                self.errors.labels(entry.label, "timeout").inc()
            except (aiohttp.ClientError, OSError):
                self.errors.labels(entry.label, "http").inc()
            except (BadMetrics, UnicodeDecodeError) as e:
                self.errors.labels(entry.label, "garbage").inc()
                log.debug("engine load %s %s:%s: %s", entry.label, ep.address, port, e)

        await asyncio.gather(*(one(*t) for t in found))
        live = {t[1] for t in found}
        for ep in [ep for ep in self._loads if ep not in live]:
            del self._loads[ep]  # pods come and go: no figures kept for addresses no longer routed to
        unknown: dict[str, int] = {t[0].label: 0 for t in found}
        for entry, ep, *_ in found:
            if not self.fresh(ep):
                unknown[entry.label] += 1
        for label, n in unknown.items():
            self.unknown.labels(label).set(n)
        for label in self._labels - unknown.keys():
            self.unknown.remove(label)
        self._labels = set(unknown)

    async def run(self) -> None:
        """Poll every interval until cancelled; a poll never takes longer than the timeout."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        # Named, so an engine's access log (and a test's recording upstream) tells our polls from client traffic.
        async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT}) as session:
            while True:
                started = self._clock()
                try:
                    await self.poll(session)
                except Exception:  # noqa: BLE001 - a bug here must not stop routing's figures for good
                    log.exception("engine load poll failed")
                await asyncio.sleep(max(0.0, self.period - (self._clock() - started)))

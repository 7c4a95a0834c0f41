"""GPU-seconds per model, split into serving, idle and loading: what each model's GPUs were held for.

From the operator's own watch caches, no new API calls: a model holds the GPUs of its pods that are bound to a node
(`nvidia.com/gpu`, requests or limits); the Deployment's ready replicas are `serving` while the gateway reports a
request in flight (its activity Leases) and `idle` otherwise; the rest are `loading` (bound, not ready yet: pulling,
loading weights, or never getting there). Every INTERVAL the split is sampled and the previous sample's GPUs x the
time since are added to `modelservice_gpu_seconds_total{namespace, modelservice, state}`; `modelservice_gpus` is the
split now.

Accuracy: a state change is seen at the next sample (at most INTERVAL late), and the in-flight figure is the
gateway's, written at most once per activity interval (--activity-interval, 10 s) while requests run, so the boundary
between serving and idle is right to within one activity interval plus INTERVAL per change. The total held
(serving + idle + loading) is right to within INTERVAL per pod start or stop. One exporter: the operator runs as one
replica (standalone, Recreate), so exactly one process reports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable, Optional

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from modelservice.scaling import activity_from_leases

log = logging.getLogger("modelservice.gpuseconds")
STATES = ("serving", "idle", "loading")
INTERVAL = 5.0
Key = tuple[str, str]
Split = dict[str, int]


def split(pods: Iterable[dict[str, Any]], ready_replicas: int, in_flight: int) -> Split:
    """GPUs a model holds now, by state. `pods` as the controller caches them (with `gpus` and `spec.nodeName`)."""
    bound = [p.get("gpus") or 0 for p in pods if (p.get("spec") or {}).get("nodeName") and p.get("gpus")]
    held = sum(bound)
    ready = min(held, ready_replicas * max(bound, default=0))
    return {"serving": ready if in_flight > 0 else 0, "idle": 0 if in_flight > 0 else ready, "loading": held - ready}


class GpuSeconds:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.total = Counter(
            "modelservice_gpu_seconds",
            "GPU-seconds held per model, by state (serving: a request "
            "in flight; idle: ready, none in flight; loading: not ready yet).",
            ["namespace", "modelservice", "state"],
            registry=registry,
        )
        self.now = Gauge(
            "modelservice_gpus",
            "GPUs held per model now, by state.",
            ["namespace", "modelservice", "state"],
            registry=registry,
        )
        self._last: dict[Key, Split] = {}
        self._at: Optional[float] = None

    def sample(self, now: float, splits: dict[Key, Split]) -> None:
        """Credit the previous sample over [previous, now], then remember this one."""
        if self._at is not None and now > self._at:
            dt = now - self._at
            for (ns, name), s in self._last.items():
                for state in STATES:  # every state's series exists (at 0): dashboards join on them
                    self.total.labels(ns, name, state).inc(s.get(state, 0) * dt)
        for key in set(self._last) - set(splits):
            for state in STATES:
                try:
                    self.now.remove(*key, state)
                except KeyError:
                    pass
        for (ns, name), s in splits.items():
            for state in STATES:
                self.now.labels(ns, name, state).set(s.get(state, 0))
        self._last, self._at = splits, now


def observe(store: Any, now: float) -> dict[Key, Split]:
    """Every model's split from the controller's Store (pods, Deployments, activity Leases)."""
    out: dict[Key, Split] = {}
    for key in list(store.modelservices):
        pods = list(store.pods.get(key, {}).values())
        dep = store.children.get(key, {}).get("Deployment") or {}
        ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
        activity = activity_from_leases(list(store.leases.get(key, {}).values()), now)
        s = split(pods, ready, activity.in_flight)
        if any(s.values()) or key in store.pods:
            out[key] = s
    return out


_DEFAULT: list[GpuSeconds] = []


def _default() -> GpuSeconds:
    """One set of series in the process's registry, however many controllers a test process starts."""
    if not _DEFAULT:
        _DEFAULT.append(GpuSeconds())
    return _DEFAULT[0]


async def run(
    store: Any, meter: Optional[GpuSeconds] = None, interval: float = INTERVAL, clock: Callable[[], float] = time.time
) -> None:
    """Sample every interval until cancelled; never raises (a bad sample is logged and skipped)."""
    meter = meter or _default()
    while True:
        try:
            meter.sample(clock(), observe(store, clock()))
        except Exception:  # noqa: BLE001 - metrics must not take the operator down
            log.exception("GPU-seconds sample failed")
        await asyncio.sleep(interval)

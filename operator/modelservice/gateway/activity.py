"""Activity Leases: how the operator learns, per model, when the last request was and how many were in flight.

One coordination.k8s.io/v1 Lease per model per gateway replica, written by a background flusher at most once per
interval and only when something changed, never on the request path: 1,000 requests a second cost the API server
one write per model every 10 s. Two exceptions: the wake-up (activator.py), which writes before it scales so the
operator cannot scale the model back to zero between our scale call and the first request; and a model whose last
Lease said it was busy and that is idle now, written as soon as its last request ends (not at the next tick): the GPU
pool planner parks only idle models, and every moment the operator still takes an idle model for busy is a GPU held
idle while a woken one waits.
At most one such write follows each interval's, so writes stay within two per model per interval.
A Lease also carries the model's engine queue (waiting requests over its ready replicas, engine_load.py) when the
gateway knows it: every gateway sees the same engines, so the operator takes the largest fresh figure, not the sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Optional

from modelservice import GROUP, KIND, VERSION
from modelservice.gateway.routes import Key, ModelEntry
from modelservice.labels import (
    ACTIVITY_LABEL,
    IN_FLIGHT_ANNOTATION,
    IN_FLIGHT_NOW_ANNOTATION,
    LAST_REQUEST_ANNOTATION,
    MODELSERVICE_LABEL,
    WAITING_ANNOTATION,
)

if TYPE_CHECKING:
    from modelservice.gateway.kubeops import ClusterOps

log = logging.getLogger("modelservice.gateway.activity")
MAX_NAME = 253


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def lease_name(model_name: str, pod_name: str) -> str:
    """modelservice-<model>-<hash of pod>: stable per gateway replica, so a restart reuses its Lease."""
    suffix = "-" + short_hash(pod_name)
    name = f"modelservice-{model_name}{suffix}"
    if len(name) <= MAX_NAME:
        return name
    keep = MAX_NAME - len("modelservice-") - len(suffix) - 9  # room for "-" + 8-char hash of the full model name
    return f"modelservice-{model_name[:keep].rstrip('-.')}-{short_hash(model_name)}{suffix}"


def rfc3339_micro(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Model:
    in_flight: int = 0
    peak: int = 0  # highest in_flight since the last write
    last_request: Optional[float] = None  # wall clock
    traffic: bool = False  # a request started or finished since the last write
    written_in_flight: Optional[int] = None
    written_now: int = 0  # in flight when the last Lease was written (IN_FLIGHT_NOW_ANNOTATION)
    written_waiting: Optional[int] = None
    last_write: float = float("-inf")  # monotonic


class ActivityTracker:
    """Counts requests per model (held or proxied: both are demand) and decides when a Lease write is due."""

    def __init__(
        self,
        pod_name: str,
        interval: float,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ):
        self.pod_name = pod_name
        self.interval = interval
        self._wall, self._mono = wall, mono
        self._models: dict[Key, _Model] = {}
        # More annotations for a model's Lease (its adapters' state, adapters.py): the operator reads them.
        self.annotate: Callable[[ModelEntry], dict[str, str]] = lambda entry: {}
        self.waiting: Callable[[Key], Optional[int]] = lambda key: None  # the engines' queue (server.py wires it)
        self._went_idle = asyncio.Event()  # a model whose last Lease said busy has nothing in flight: flush now

    def mark_changed(self, key: Key) -> None:
        """Something the Lease carries besides traffic changed (an adapter loaded): write it at the next tick."""
        self._models.setdefault(key, _Model()).traffic = True

    def in_flight(self, key: Key) -> int:
        m = self._models.get(key)
        return m.in_flight if m else 0

    def started(self, key: Key) -> None:
        m = self._models.setdefault(key, _Model())
        m.in_flight += 1
        m.peak = max(m.peak, m.in_flight)
        m.last_request, m.traffic = self._wall(), True

    def finished(self, key: Key) -> None:
        m = self._models.setdefault(key, _Model())
        m.in_flight = max(0, m.in_flight - 1)
        m.last_request, m.traffic = self._wall(), True
        if m.in_flight == 0 and m.written_now > 0:
            self._went_idle.set()

    def due(self) -> list[Key]:
        """Models whose Lease needs a write: something changed, or requests are in flight (held or streaming), which
        renews the Lease each interval: the operator takes an in-flight figure older than LEASE_FRESH_SECONDS as
        stale, and would take a model whose one request outlives that (a slow load, a long stream) for idle."""
        now = self._mono()
        return [
            k
            for k, m in self._models.items()
            if (
                now - m.last_write >= self.interval
                and (
                    m.traffic
                    or m.peak != m.written_in_flight
                    or m.in_flight > 0
                    or self.waiting(k) != m.written_waiting
                )
            )
            or (m.in_flight == 0 and m.written_now > 0)
        ]  # went idle: say so now (the planner waits on it)

    def lease(self, entry: ModelEntry, *, wake: bool = False) -> dict[str, Any]:
        """The Lease to apply now, and mark it written (the peak window restarts from the current in-flight)."""
        m = self._models.setdefault(entry.key, _Model())
        now = self._wall()
        if wake:
            m.last_request = now
        peak = m.peak
        m.written_in_flight, m.peak, m.traffic, m.last_write = peak, m.in_flight, False, self._mono()
        m.written_now = m.in_flight
        annotations = {
            **self.annotate(entry),
            IN_FLIGHT_ANNOTATION: str(peak),
            IN_FLIGHT_NOW_ANNOTATION: str(m.in_flight),
        }
        m.written_waiting = waiting = self.waiting(entry.key)
        if waiting is not None:
            annotations[WAITING_ANNOTATION] = str(waiting)
        if m.last_request is not None:
            annotations[LAST_REQUEST_ANNOTATION] = rfc3339_micro(m.last_request)
        meta: dict[str, Any] = {
            "name": lease_name(entry.name, self.pod_name),
            "namespace": entry.namespace,
            "labels": {MODELSERVICE_LABEL: entry.name, ACTIVITY_LABEL: "true"},
            "annotations": annotations,
        }
        if entry.uid:
            # Garbage-collected with the ModelService; not a controller reference (the operator owns that role).
            meta["ownerReferences"] = [
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": entry.name, "uid": entry.uid}
            ]
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.pod_name,
                "renewTime": rfc3339_micro(now),
                "leaseDurationSeconds": max(1, int(self.interval * 3)),
            },
        }

    def forget(self, key: Key) -> None:
        m = self._models.get(key)
        if m is not None and m.in_flight == 0:
            del self._models[key]

    async def run(self, ops: "ClusterOps", entries: Callable[[Key], Optional[ModelEntry]], tick: float = 1.0) -> None:
        """Flush due Leases every tick, and at once when a model goes idle, until cancelled. A failed write is
        retried on a later tick (traffic stays marked)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._went_idle.wait(), tick)
            self._went_idle.clear()
            for key in self.due():
                entry = entries(key)
                if entry is None:
                    self.forget(key)  # ModelService deleted: its Lease goes with it (owner reference)
                    continue
                m = self._models[key]
                saved = (m.peak, m.traffic, m.written_in_flight, m.written_now, m.written_waiting)
                body = self.lease(entry)
                try:
                    await ops.write_lease(body)
                except Exception as e:  # noqa: BLE001 - keep flushing other models
                    m.peak, m.traffic, m.written_in_flight, m.written_now, m.written_waiting = (
                        max(saved[0], m.peak),
                        True,
                        *saved[2:],
                    )
                    log.warning("activity Lease %s/%s not written: %s", entry.namespace, body["metadata"]["name"], e)

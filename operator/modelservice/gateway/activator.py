"""Scale from zero: hold requests for a model with no ready endpoint, wake it once, release them when it is ready.

One wake-up per model no matter how many requests arrive: the first held request starts a wake task, the others
wait on the same asyncio.Event. The event is set by the routing table's change callback (an EndpointSlice watch
event), not by polling, so held requests go out the moment the first pod is Ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from modelservice.gateway.activity import ActivityTracker
from modelservice.gateway.errors import GatewayError
from modelservice.gateway.kubeops import ClusterOps
from modelservice.gateway.metrics import Metrics
from modelservice.gateway.routes import Key, ModelEntry, RouteTable

log = logging.getLogger("modelservice.gateway.activator")
SCALE_ATTEMPTS = 3
RETRY_AFTER_SECONDS = 5


@dataclass
class _Episode:
    """From the first held request of a model to its first ready endpoint (or the wake's timeout)."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    wake: Optional[asyncio.Task[None]] = None
    error: Optional[str] = None
    code: str = "no_backend"  # the OpenAI error code that goes with `error`


class Activator:
    def __init__(
        self,
        table: RouteTable,
        ops: ClusterOps,
        activity: ActivityTracker,
        metrics: Metrics,
        *,
        timeout: float,
        max_held: int,
    ):
        self.table, self.ops, self.activity, self.metrics = table, ops, activity, metrics
        self.timeout = timeout
        self.max_held = max_held
        self._episodes: dict[Key, _Episode] = {}
        self.wakes = 0  # wake-ups started, for tests and logs

    def held(self, key: Key) -> int:
        ep = self._episodes.get(key)
        return ep.held if ep else 0

    async def wait(self, entry: ModelEntry) -> None:
        """Return once the model has a ready endpoint; GatewayError 429 (queue full) or 503 (gave up) otherwise."""
        key = entry.key
        if self.table.ready(key):
            return
        replicas = self.table.replicas(key)
        if replicas is None:
            raise GatewayError(
                503,
                f"model {entry.label} has no backend: its Deployment does not exist yet; check "
                f"`kubectl describe modelservice -n {entry.namespace} {entry.name}`",
                "no_backend",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if entry.stalled and replicas:
            raise GatewayError(
                503,
                f"model {entry.label} cannot start: {entry.stalled}",
                "model_not_starting",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if replicas == 0 and not entry.autoscaled:
            raise GatewayError(
                503,
                f"model {entry.label} is scaled to zero (spec.replicas: 0); set spec.replicas, or "
                "spec.autoscaling.minReplicas: 0 to wake it on demand",
                "no_backend",
            )
        ep = self._episodes.setdefault(key, _Episode())
        if ep.held >= self.max_held:
            raise GatewayError(
                429,
                f"too many requests are waiting for model {entry.label} to start ({self.max_held}); retry shortly",
                "too_many_held_requests",
                retry_after=RETRY_AFTER_SECONDS,
            )
        ep.held += 1
        gauge = self.metrics.held.labels(entry.label)
        gauge.inc()
        try:
            self._maybe_wake(entry, ep)
            try:
                await asyncio.wait_for(ep.ready.wait(), self.timeout)
            except asyncio.TimeoutError:
                now = self.table.models.get(key) or entry  # the operator's latest word, not the one at arrival
                if now.capacity:  # waiting for GPUs, not loading: say so, with whom it waits for
                    raise GatewayError(
                        503,
                        f"model {entry.label} did not become ready within {self.timeout:g}s: "
                        f"{now.capacity}; retry later",
                        "awaiting_capacity",
                        retry_after=RETRY_AFTER_SECONDS,
                    ) from None
                raise GatewayError(
                    503,
                    f"model {entry.label} did not become ready within {self.timeout:g}s "
                    "(it may still be loading); retry later",
                    "activation_timeout",
                    retry_after=RETRY_AFTER_SECONDS,
                ) from None
            if not self.table.ready(key):
                raise GatewayError(
                    503,
                    ep.error or f"model {entry.label} has no ready backend",
                    ep.code,
                    retry_after=RETRY_AFTER_SECONDS,
                )
        finally:
            ep.held -= 1
            gauge.dec()
            if ep.held == 0 and (ep.wake is None or ep.wake.done()) and self._episodes.get(key) is ep:
                del self._episodes[key]

    def on_change(self, key: Key) -> None:
        """Called by the routing table on endpoint/Deployment/spec changes."""
        ep = self._episodes.get(key)
        if ep is None:
            return
        if self.table.ready(key):
            ep.ready.set()
            del self._episodes[key]  # the next time the model has no endpoint is a new episode
            return
        entry = self.table.models.get(key)
        if entry is None:  # the ModelService was deleted: nothing is coming up, answer the held requests now
            ep.error = f"model {key[0]}/{key[1]} was deleted"
            ep.ready.set()
            del self._episodes[key]
        elif entry.stalled and self.table.replicas(key):
            # The operator says the model cannot come up (e.g. the engine crash-loops): tell the held requests why
            # now; holding them to the activation timeout would only hide the reason.
            ep.error, ep.code = f"model {entry.label} cannot start: {entry.stalled}", "model_not_starting"
            ep.ready.set()
            del self._episodes[key]
        elif ep.held:
            self._maybe_wake(entry, ep)  # e.g. scaled to zero while requests were waiting for a starting pod

    def _maybe_wake(self, entry: ModelEntry, ep: _Episode) -> None:
        if ep.wake is None and entry.autoscaled and self.table.replicas(entry.key) == 0:
            ep.wake = asyncio.get_running_loop().create_task(self._wake(entry, ep))

    async def _wake(self, entry: ModelEntry, ep: _Episode) -> None:
        self.wakes += 1
        started = time.monotonic()
        log.info("waking %s: scaling to %d replica(s)", entry.label, entry.wake_replicas)
        try:
            # Lease first: the operator must see the request before it can see replicas 1 and decide "idle, zero".
            await self.ops.write_lease(self.activity.lease(entry, wake=True))
        except Exception as e:  # noqa: BLE001 - the wake matters more than the heartbeat
            log.warning("wake of %s: activity Lease not written: %s", entry.label, e)
        error = await self._scale(entry)
        if error is not None:
            ep.error = error
            ep.ready.set()  # release the held requests with the error now rather than at the timeout
            self._end(entry.key, ep)
            return
        try:
            await asyncio.wait_for(ep.ready.wait(), self.timeout)
        except asyncio.TimeoutError:
            log.warning("wake of %s: no ready endpoint after %.0fs", entry.label, self.timeout)
        else:
            took = time.monotonic() - started
            self.metrics.activation.observe(took)
            log.info("woke %s in %.2fs", entry.label, took)
        self._end(entry.key, ep)

    async def _scale(self, entry: ModelEntry) -> Optional[str]:
        last = ""
        for attempt in range(SCALE_ATTEMPTS):  # bounded: a conflict or a restarting API server, not a loop forever
            try:
                self.metrics.scale_requests.labels(entry.label).inc()
                await self.ops.scale(entry.namespace, entry.child, entry.wake_replicas)
                return None
            except Exception as e:  # noqa: BLE001 - reported to the held clients below
                last = str(e)
                if getattr(e, "status", None) in (400, 403, 404, 422):
                    break
                await asyncio.sleep(0.5 * (attempt + 1))
        log.error("wake of %s: scale to %d failed: %s", entry.label, entry.wake_replicas, last)
        return (
            f"model {entry.label} is scaled to zero and the gateway could not scale it up "
            f"({last.splitlines()[0][:200] if last else 'unknown error'}); check the gateway's RBAC and logs"
        )

    def _end(self, key: Key, ep: _Episode) -> None:
        # Waiters keep their own reference and time out on their own; requests from now on start a fresh episode
        # (and may wake again) instead of joining one whose wake has given up.
        if self._episodes.get(key) is ep:
            del self._episodes[key]

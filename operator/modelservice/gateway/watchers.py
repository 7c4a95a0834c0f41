"""Kubernetes watches that keep the routing table current: ModelServices, EndpointSlices, our Deployments.

Each watch lists then streams (Kube.watch). Kube.watch relists after a 410 but reports only what exists, so a
_Mirror remembers what it has reported and deletes, at the next SYNCED, whatever the relist no longer contains.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

from modelservice import GROUP, PLURAL, VERSION
from modelservice.kube import Kube
from modelservice.labels import MANAGED_BY, MANAGED_BY_VALUE
from modelservice.gateway.routes import SERVICE_NAME_LABEL, RouteTable

log = logging.getLogger("modelservice.gateway.watch")
SLICE_VERSIONS = ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1")
MAX_BACKOFF = 30.0


class _Mirror:
    def __init__(self, apply: Callable[[str, dict[str, Any]], None]):
        self.apply = apply
        self.known: dict[tuple[str, str], dict[str, Any]] = {}  # key → just enough metadata to report a DELETED
        self.seen: set[tuple[str, str]] = set()
        self.listed = False

    def feed(self, event: str, obj: dict[str, Any]) -> None:
        if event == "SYNCED":
            if self.listed:
                for key in set(self.known) - self.seen:
                    self.apply("DELETED", self.known.pop(key))
            self.listed, self.seen = True, set()
            return
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if event == "DELETED":
            self.known.pop(key, None)
            self.seen.discard(key)
        else:
            self.known[key] = {"metadata": {"namespace": key[0], "name": key[1], "labels": meta.get("labels") or {}}}
            self.seen.add(key)
        self.apply(event, obj)


def _path(prefix: str, namespace: Optional[str], plural: str) -> str:
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


async def slice_api(kube: Kube) -> str:
    """discovery.k8s.io/v1 where served (1.21+), else v1beta1 (1.19, 1.20)."""
    served = await kube.api_versions("discovery.k8s.io")
    for version in SLICE_VERSIONS:
        if version in served:
            return version
    raise RuntimeError("the API server serves no EndpointSlices (discovery.k8s.io); the gateway needs "
                       "Kubernetes 1.19 or newer")


async def start(kube: Kube, table: RouteTable, namespaces: list[str],
                on_synced: Callable[[], None]) -> list[asyncio.Task]:
    """Start every watch; on_synced() runs once all of them have listed. Cancel the tasks to stop."""
    slices = await slice_api(kube)
    watches = []
    for ns in namespaces or [None]:
        watches += [
            (_path(f"/apis/{GROUP}/{VERSION}", ns, PLURAL), None, table.apply_modelservice),
            # Existence selector: slices of every Service; the table keeps those whose name matches a model.
            (_path(f"/apis/{slices}", ns, "endpointslices"), SERVICE_NAME_LABEL, table.apply_slice),
            (_path("/apis/apps/v1", ns, "deployments"), f"{MANAGED_BY}={MANAGED_BY_VALUE}", table.apply_deployment),
        ]
    pending = set(range(len(watches)))

    def synced(i: int) -> None:
        if i in pending:
            pending.discard(i)
            if not pending:
                log.info("watches synced: %d model(s)", len(table.models))
                on_synced()

    loop = asyncio.get_running_loop()
    return [loop.create_task(_watch(kube, path, selector, _Mirror(apply), lambda i=i: synced(i)), name=path)
            for i, (path, selector, apply) in enumerate(watches)]


async def _watch(kube: Kube, path: str, selector: Optional[str], mirror: _Mirror,
                 synced: Callable[[], None]) -> None:
    """Until cancelled; failures (CRD not installed yet, API server restarting) back off up to MAX_BACKOFF."""
    backoff = 1.0
    while True:
        try:
            async for event, obj in kube.watch(path, label_selector=selector):
                try:
                    mirror.feed(event, obj)
                except Exception:  # noqa: BLE001 - one odd object must not stop routing for all
                    log.exception("watch %s: event %s not applied", path, event)
                if event == "SYNCED":
                    synced()
                    backoff = 1.0
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("watch %s failed (%s); retrying in %.0fs", path, e, backoff)
        await asyncio.sleep(backoff)
        backoff = min(MAX_BACKOFF, backoff * 2)

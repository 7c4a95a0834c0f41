"""Kubernetes watches that keep the routing table current: ModelServices, EndpointSlices, our Deployments.

Each is a list-then-watch loop of watching.py, whose Mirror turns what a relist no longer contains into DELETED.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from modelservice import GROUP, VERSION, watching
from modelservice.gateway.routes import SERVICE_NAME_LABEL, RouteTable
from modelservice.kube import Kube, object_path
from modelservice.labels import MANAGED_BY, MANAGED_BY_VALUE

log = logging.getLogger("modelservice.gateway.watch")
SLICE_VERSIONS = ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1")


async def slice_api(kube: Kube) -> str:
    """discovery.k8s.io/v1 where served (1.21+), else v1beta1 (1.19, 1.20)."""
    served = await kube.api_versions("discovery.k8s.io")
    for version in SLICE_VERSIONS:
        if version in served:
            return version
    raise RuntimeError(
        "the API server serves no EndpointSlices (discovery.k8s.io); the gateway needs Kubernetes 1.19 or newer"
    )


async def start(
    kube: Kube, table: RouteTable, namespaces: list[str], on_synced: Callable[[], None]
) -> list[asyncio.Task[None]]:
    """Start every watch; on_synced() runs once all of them have listed. Cancel the tasks to stop."""
    slices = await slice_api(kube)
    watches: list[tuple[str, Optional[str], watching.Apply]] = []
    all_namespaces: list[Optional[str]] = [None]
    for ns in namespaces or all_namespaces:
        watches += [
            (object_path(f"{GROUP}/{VERSION}", "ModelService", ns), None, table.apply_modelservice),
            # Existence selector: slices of every Service; the table keeps those whose name matches a model.
            (object_path(slices, "EndpointSlice", ns), SERVICE_NAME_LABEL, table.apply_slice),
            (object_path("apps/v1", "Deployment", ns), f"{MANAGED_BY}={MANAGED_BY_VALUE}", table.apply_deployment),
        ]

    def done() -> None:
        log.info("watches synced: %d model(s)", len(table.models))
        on_synced()

    return watching.start(kube, watches, done)

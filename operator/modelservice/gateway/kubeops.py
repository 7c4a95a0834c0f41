"""The gateway's only writes and point reads against the API server, behind a small interface.

Tests swap in a fake (no cluster needed) to count scale calls and simulate pods coming up.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from modelservice.kube import Kube, object_path

FIELD_MANAGER = "modelservice-gateway"


class ClusterOps(Protocol):
    async def write_lease(self, lease: dict[str, Any]) -> None: ...

    async def scale(self, namespace: str, name: str, replicas: int) -> None: ...

    async def get_secret(self, namespace: str, name: str) -> Optional[dict[str, Any]]: ...


class KubeOps:
    def __init__(self, kube: Kube):
        self.kube = kube

    async def write_lease(self, lease: dict[str, Any]) -> None:
        # Server-side apply: create-or-update in one call, and our field manager owns only what we set.
        await self.kube.apply(lease, field_manager=FIELD_MANAGER)

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        path = object_path("apps/v1", "Deployment", namespace, name, "scale")
        await self.kube.merge_patch(path, {"spec": {"replicas": replicas}})

    async def get_secret(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        secret: Optional[dict[str, Any]] = await self.kube.get_or_none(object_path("v1", "Secret", namespace, name))
        return secret

"""The node agent's view of the product's Kubernetes client (modelservice.kube): one client for the product and the
test harness. This layer only keeps the agent's calling conventions: (status, body) answers with allowed statuses,
and raw watch events with BOOKMARKs, one watch call at a time (the agent tracks the resourceVersion itself).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, AsyncIterator

from modelservice.kube import ApiError, Kube, WatchExpired

__all__ = ["ApiError", "KubeApi", "WatchExpired", "JSON", "MERGE_PATCH", "STRATEGIC_PATCH"]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class KubeApi:
    def __init__(self, kube: Kube):
        self.kube = kube

    @property
    def server(self) -> str:
        """The API server's URL (an image pod's KUBERNETES_SERVICE_HOST/PORT point there)."""
        return self.kube.creds.server

    @classmethod
    def from_kubeconfig(cls, path: str | Path | None = None, max_connections: int = 64) -> "KubeApi":
        path = path or os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config"
        return cls(Kube.from_env(str(path), user_agent="modelservice-node-agent", limit=max_connections))

    async def __aenter__(self) -> "KubeApi":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.kube.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        body: Any = None,
        content_type: str = JSON,
        allow: tuple[int, ...] = (),
    ) -> tuple[int, Any]:
        """Returns (status, decoded body), status 200 for any success. Raises ApiError for >= 400 unless the status
        is in `allow`."""
        try:
            return 200, await self.kube.request(method, path, params=params, body=body, content_type=content_type)
        except ApiError as e:
            if e.status in allow:
                return e.status, e.body
            raise

    async def get(self, path: str, **kw: Any) -> Any:
        return (await self.request("GET", path, **kw))[1]

    async def list_all(self, path: str, params: dict | None = None, page: int = 500) -> tuple[list[dict], str]:
        """All items of a list, paginated; returns (items, resourceVersion to watch from)."""
        items: list[dict] = []
        rv = ""
        async for listing in self.kube.pages(path, limit=page, **(params or {})):
            items += listing.get("items") or []
            rv = listing["metadata"]["resourceVersion"]
        return items, rv

    async def watch(
        self, path: str, params: dict, resource_version: str, timeout_seconds: int = 300
    ) -> AsyncIterator[dict]:
        """Events of one watch call (it ends after `timeout_seconds`); BOOKMARKs included so callers track the RV."""
        async for event_type, obj in self.kube.watch_once(
            path, resource_version, timeout_seconds=timeout_seconds, **params
        ):
            yield {"type": event_type, "object": obj}

"""Kubernetes Events about a ModelService.

A repeat of the same Event is counted on the existing object (count, lastTimestamp), as the kubelet does. A Warning
that merely repeats the previous one for the same object (a spec error seen again by a resync) is not re-posted:
nothing new happened, and a resync every few minutes would otherwise bump it forever.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from typing import Any

from modelservice import FIELD_MANAGER, GROUP, KIND, VERSION
from modelservice.kube import ApiError, Kube

log = logging.getLogger(__name__)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    def __init__(self, kube: Kube):
        self.kube = kube
        self._last: dict[str, tuple[str, str, str]] = {}
        self._counts: dict[tuple[str, str], int] = {}  # (owner uid, event name) → count

    def forget(self, uid: str) -> None:
        self._last.pop(uid, None)
        for counted in [c for c in self._counts if c[0] == uid]:
            del self._counts[counted]

    async def record(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        key = (type_, reason, message)
        if type_ == "Warning" and self._last.get(meta["uid"]) == key:
            return
        self._last[meta["uid"]] = key
        digest = hashlib.sha1(f"{meta['uid']}{reason}{message}".encode()).hexdigest()[:10]
        name = f"{meta['name']}.{digest}"
        ts = now_rfc3339()
        path = f"/api/v1/namespaces/{meta['namespace']}/events"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        }
        counted = (meta["uid"], name)
        try:
            if counted not in self._counts:
                try:
                    await self.kube.create(path, event)
                    self._counts[counted] = 1
                    return
                except ApiError as e:
                    if e.status != 409:  # 409: posted before this process started; count on it
                        raise
                    self._counts[counted] = (await self.kube.get(f"{path}/{name}")).get("count", 1)
            self._counts[counted] += 1
            await self.kube.merge_patch(f"{path}/{name}", {"count": self._counts[counted], "lastTimestamp": ts})
        except ApiError as e:  # an Event is best effort: never fail a reconcile over it
            log.warning("could not post Event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], e)

"""Kubernetes Events about a ModelService, deduplicated: one Event per distinct (type, reason, message) in a row,
so a spec error shows once instead of on every resync."""

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

    def forget(self, uid: str) -> None:
        self._last.pop(uid, None)

    async def record(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        key = (type_, reason, message)
        if self._last.get(meta["uid"]) == key:
            return
        self._last[meta["uid"]] = key
        digest = hashlib.sha1(f"{meta['uid']}{reason}{message}".encode()).hexdigest()[:10]
        ts = now_rfc3339()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{digest}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": FIELD_MANAGER}, "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
        }
        try:
            await self.kube.create(f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except ApiError as e:  # an Event is best effort: never fail a reconcile over it
            if e.status != 409:
                log.warning("could not post Event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], e)

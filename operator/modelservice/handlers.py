"""Kopf wiring only: pin the framework's knobs, start the controller, forward ModelService events to it.

Kopf watches ModelServices; the controller watches what it owns itself (controller._watch_owned: why)."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any

import kopf

from modelservice import GROUP, PLURAL, VERSION
from modelservice.controller import Controller, slim
from modelservice.kube import SA_CA, Kube, load_credentials, object_path
from modelservice.metrics import LAST_WATCH_EVENT

# Set by cli.py before kopf starts.
OPTIONS: dict[str, Any] = {"gateway_enabled": False, "workers": 4, "kubeconfig": None, "watch_dead_after": 900,
                           "resync_seconds": 600, "namespaces": [], "network_policy": None,
                           "gpu_pool_policy": "park"}
_last_event = [time.time()]


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Kopf deep-copies every object on every event to diff it for on.update handlers; we have none (the controller
    compares desired with observed itself). `make bench` profiled that copy at a fifth of the operator's CPU."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    # Our own annotation prefix, so we never read or clash with another kopf operator's state on shared objects.
    # We use only event handlers, so kopf writes no progress or diff-base annotations at all.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = _NoDiffBase(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"  # never added: no on.delete handlers (children are GC'd)
    # Watches end server-side every few minutes and resume: a silently dead TCP stream cannot hang us for long.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.WARNING  # our own Events are deduplicated in events.py
    settings.networking.request_timeout = 60
    if OPTIONS["namespaces"]:
        # Named namespaces need no scanning, and a namespaced install may not list namespaces (RBAC is per
        # namespace): without this, kopf retries the forbidden list forever in the log.
        settings.scanning.disabled = True
    kube = Kube.from_env(OPTIONS["kubeconfig"])
    controller = Controller(kube, gateway_enabled=OPTIONS["gateway_enabled"], workers=OPTIONS["workers"],
                            resync_seconds=OPTIONS["resync_seconds"], namespaces=OPTIONS["namespaces"],
                            network_policy=OPTIONS["network_policy"],
                            parking=OPTIONS["gpu_pool_policy"] == "park")
    await controller.start(on_alive=_seen)
    memo.controller = controller
    memo.heartbeat = asyncio.create_task(_heartbeat(kube, controller))


async def _heartbeat(kube: Kube, controller: Controller) -> None:
    """A watch of our own on ModelServices, re-established every window/3: in a quiet cluster the watches carry
    no events for hours, so "no event lately" alone would call a healthy operator dead. This watch proves the API
    server still answers watches; kopf's events prove the same. When it has to relist (410 Gone after a gap), kopf's
    watch did too, and the controller rebuilds its ModelService cache. Reads only: an idle operator writes nothing."""
    window = OPTIONS["watch_dead_after"]
    ns = OPTIONS.get("namespaces") or [None]
    path = object_path(f"{GROUP}/{VERSION}", "ModelService", ns[0])
    lists = 0
    while True:
        try:
            async for event_type, _ in kube.watch(path, timeout_seconds=max(1, int(window / 3)), on_alive=_seen):
                if event_type == "SYNCED":
                    lists += 1
                    if lists > 1:  # our watch had to relist (410 after a gap): kopf's did too; drop what vanished
                        await controller.relist()
        except asyncio.CancelledError:
            raise
        except Exception:  # the API server is away: liveness will say so once the window has passed
            await asyncio.sleep(min(5.0, window / 3))


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The credentials our own client uses (kube.load_credentials): in a pod, the ServiceAccount token for the API
    server that KUBERNETES_SERVICE_HOST/PORT name, as client-go does (kopf's own in-cluster login assumes DNS for
    kubernetes.default.svc, which a cluster without cluster DNS lacks); else the kubeconfig."""
    creds = load_credentials(OPTIONS["kubeconfig"])
    if creds.token_file:
        return kopf.ConnectionInfo(server=creds.server, ca_path=SA_CA, scheme="Bearer", token=creds.token)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    heartbeat: asyncio.Task[None] | None = getattr(memo, "heartbeat", None)
    if heartbeat is not None:
        heartbeat.cancel()
    controller: Controller | None = getattr(memo, "controller", None)
    if controller is not None:
        await controller.stop()
        await controller.kube.close()


def _seen() -> None:  # a watch answered: kopf delivered an event, or our heartbeat watch connected
    _last_event[0] = time.time()
    LAST_WATCH_EVENT.set(_last_event[0])


@kopf.on.event(GROUP, VERSION, PLURAL)
async def modelservice_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _seen()
    memo.controller.on_modelservice(event["type"], copy.deepcopy(slim(event["object"])))


@kopf.on.probe(id="watching")
def watching(**_: Any) -> float:
    """Seconds since a watch last answered. Kopf's liveness endpoint returns 500 if a probe raises."""
    age = time.time() - _last_event[0]
    if age > OPTIONS["watch_dead_after"]:
        raise kopf.PermanentError(f"no watch event for {age:.0f}s: watches look dead")
    return age

"""Kopf wiring only: pin the framework's knobs, start the controller, forward ModelService events to it.

Kopf watches ModelServices; the controller watches what it owns itself (controller._watch_owned: why)."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import kopf

from modelservice import GROUP, PLURAL, VERSION
from modelservice.controller import Controller, slim
from modelservice.kube import Kube, TokenSource, load_credentials
from modelservice.metrics import LAST_WATCH_EVENT
from modelservice.render import PRESTOP_SECONDS

# Set by cli.py before kopf starts.
OPTIONS: dict[str, Any] = {
    "gateway_enabled": False,
    "workers": 4,
    "kubeconfig": None,
    "watch_dead_after": 900,
    "resync_seconds": 600,
    "namespaces": [],
    "network_policy": None,
    "gpu_pool_policy": "park",
    "prestop_seconds": PRESTOP_SECONDS,
}
_last_event = [time.time()]


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Kopf deep-copies every object on every event to diff it for on.update handlers; we have none (the controller
    compares desired with observed itself). `make bench` profiled that copy at a fifth of the operator's CPU.
    build() is kopf's documented storage interface, but that kopf calls it on every event is its internals:
    tests/unit/test_kopf_seam.py fails if either changes."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
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
    # Liveness on a quiet cluster: the controller's own watches (7 per namespace, every namespace we watch) are
    # resumed every window/3, and each resumption is an answer from the API server (on_alive). No event for hours
    # is then no reason to call a healthy operator dead, and no second ModelService watch is needed for it.
    watch_timeout = max(1, min(300, int(OPTIONS["watch_dead_after"] / 3)))
    kube = Kube(_token_source().creds, tokens=_token_source(), watch_timeout=watch_timeout)
    controller = Controller(
        kube,
        gateway_enabled=OPTIONS["gateway_enabled"],
        workers=OPTIONS["workers"],
        resync_seconds=OPTIONS["resync_seconds"],
        namespaces=OPTIONS["namespaces"],
        network_policy=OPTIONS["network_policy"],
        parking=OPTIONS["gpu_pool_policy"] == "park",
        prestop_seconds=OPTIONS["prestop_seconds"],
    )
    await controller.start(on_alive=_seen)
    memo.controller = controller


_TOKENS: list[TokenSource] = []  # the one credentials source of this process, loaded on first use
_GIVEN: list[str | None] = []  # the token kopf was last given


def _token_source() -> TokenSource:
    if not _TOKENS:
        _TOKENS.append(TokenSource(load_credentials(OPTIONS["kubeconfig"])))
    return _TOKENS[0]


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    """Kopf's requests and ours use the same credentials, from the same loader and the same TokenSource: one place
    decides between the service account and the kubeconfig (in a pod, the API server KUBERNETES_SERVICE_HOST/PORT
    name, as client-go does: kopf's own in-cluster login dials kubernetes.default.svc, which needs cluster DNS), and
    a token that expires (exec plugins) or rotates (token files) is fetched again for both. Kopf logs in again when `expiration` passes or after a 401: then
    the token is fetched anew, not handed back unchanged (unless our client already replaced it meanwhile)."""
    tokens = _token_source()
    if _GIVEN and tokens.refreshable:
        token = await tokens.refresh(stale=_GIVEN[0])
    else:
        token = await tokens.get()
    _GIVEN[:] = [token]
    c = tokens.creds
    return kopf.ConnectionInfo(
        server=c.server,
        ca_path=c.ca_path,
        ca_data=c.ca_data,
        insecure=c.insecure or None,
        certificate_path=c.certificate_path,
        certificate_data=c.certificate_data,
        private_key_path=c.private_key_path,
        private_key_data=c.private_key_data,
        token=token,
        default_namespace=c.default_namespace,
        expiration=tokens.expiration,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller | None = getattr(memo, "controller", None)
    if controller is not None:
        await controller.stop()
        await controller.kube.close()


def _seen() -> None:  # a watch answered: kopf delivered an event, or one of the controller's watches
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

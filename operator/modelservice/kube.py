"""A small async Kubernetes client on aiohttp: the few verbs the operator and the gateway use.

Why not the `kubernetes` package for requests: it is synchronous, and the operator and gateway are asyncio programs
that must not block their loop on 1,000 applies. We still use it to *load* credentials (kubeconfig or in-cluster),
so every auth method it knows works here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional
from urllib.parse import quote, urlencode

import aiohttp

from modelservice import FIELD_MANAGER

log = logging.getLogger("modelservice.kube")

SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SA_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
LIST_PAGE = 200

# kind → (plural, namespaced). Only the kinds we touch.
PLURALS = {
    "Deployment": "deployments", "Service": "services", "PersistentVolumeClaim": "persistentvolumeclaims",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers", "PodDisruptionBudget": "poddisruptionbudgets",
    "Pod": "pods", "Event": "events", "Lease": "leases", "EndpointSlice": "endpointslices",
    "ModelService": "modelservices", "Secret": "secrets", "Namespace": "namespaces",
    "CustomResourceDefinition": "customresourcedefinitions", "NetworkPolicy": "networkpolicies",
}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition"}


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else str(body)
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        super().__init__(f"{status} {self.reason}: {msg}")

    @property
    def message(self) -> str:
        return self.body.get("message", "") if isinstance(self.body, dict) else str(self.body)

    @property
    def permanent(self) -> bool:
        """The API server refused the object itself (invalid, immutable field): retrying the same body won't help.
        v1.20's server-side apply answers a body it cannot type (a wrong type inside a pass-through core/v1 field,
        e.g. placement.tolerations) with 500 "failed to create typed patch object": deterministic, so permanent."""
        if self.status == 500 and ("failed to create typed patch object" in self.message
                                   or "request is too large" in self.message):
            return True  # the second: an object past etcd's size limit, refused the same way every time
        return self.status in (400, 413, 422)


def object_path(api_version: str, kind: str, namespace: Optional[str] = None, name: Optional[str] = None,
                subresource: Optional[str] = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base
    if namespace and kind not in CLUSTER_SCOPED:
        path += f"/namespaces/{namespace}"
    path += f"/{PLURALS[kind]}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


@dataclass
class Credentials:
    server: str
    ssl: ssl.SSLContext | bool
    token: Optional[str] = None
    token_file: Optional[str] = None


def load_credentials(kubeconfig: Optional[str] = None) -> Credentials:
    from kubernetes import client as kclient, config as kconfig

    cfg = kclient.Configuration()
    if kubeconfig is None and os.path.exists(SA_TOKEN) and "KUBERNETES_SERVICE_HOST" in os.environ:
        kconfig.load_incluster_config(client_configuration=cfg)
        token_file: Optional[str] = SA_TOKEN  # projected tokens rotate: re-read, never cache forever
    else:
        kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        token_file = None
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.verify_ssl else False
    if ctx and cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    auth = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
    # In-cluster config writes "bearer <token>" (lower case), kubeconfig loading "Bearer <token>".
    token = auth.split(" ", 1)[1] if auth and auth.lower().startswith("bearer ") else auth
    return Credentials(server=cfg.host.rstrip("/"), ssl=ctx, token=token, token_file=token_file)


class Kube:
    def __init__(self, creds: Credentials, *, user_agent: str = FIELD_MANAGER, limit: int = 0):
        """limit: most connections at once (0: no limit). Every watch holds one for its whole life (the operator
        runs 7 per namespace), so a limit would starve requests once enough namespaces are watched; the callers
        bound their own concurrency (the operator's --workers, one wake-up per model in the gateway)."""
        self.creds = creds
        self._token = creds.token
        self._token_read = time.monotonic()
        self._session: Optional[aiohttp.ClientSession] = None
        self.user_agent = user_agent
        self.limit = limit
        self.requests_total = 0  # for tests and benchmarks: how many API calls we made

    @classmethod
    def from_env(cls, kubeconfig: Optional[str] = None, **kw: Any) -> "Kube":
        return cls(load_credentials(kubeconfig or os.environ.get("KUBECONFIG")), **kw)

    def _headers(self) -> dict[str, str]:
        if self.creds.token_file and time.monotonic() - self._token_read > 60:
            with open(self.creds.token_file) as f:
                self._token = f.read().strip()
            self._token_read = time.monotonic()
        h = {"User-Agent": self.user_agent, "Accept": "application/json"}
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        return h

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.creds.ssl, limit=self.limit),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, *, body: Any = None, params: Optional[dict[str, Any]] = None,
                      content_type: str = "application/json", timeout: float = 30) -> Any:
        url = self.creds.server + path + (f"?{urlencode(params)}" if params else "")
        data = json.dumps(body) if body is not None else None
        headers = self._headers()
        if data is not None:
            headers["Content-Type"] = content_type
        self.requests_total += 1
        async with self.session.request(method, url, data=data, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            payload = json.loads(text) if text and resp.content_type == "application/json" else text
            if resp.status >= 400:
                raise ApiError(resp.status, payload)
            return payload

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params=params or None)

    async def get_or_none(self, path: str) -> Any:
        try:
            return await self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def apply(self, obj: dict[str, Any], *, field_manager: str = FIELD_MANAGER, force: bool = True,
                    subresource: Optional[str] = None) -> Any:
        """Server-side apply. force=True: we are the controller of these fields; a conflict means drift to undo."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource)
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        return await self.request("PATCH", path, body=obj, params=params, content_type="application/apply-patch+yaml")

    async def merge_patch(self, path: str, body: Any) -> Any:
        return await self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    async def create(self, path: str, body: Any) -> Any:
        return await self.request("POST", path, body=body)

    async def delete(self, path: str, *, propagation: str = "Background", missing_ok: bool = True) -> Any:
        try:
            return await self.request("DELETE", path, body={"propagationPolicy": propagation})
        except ApiError as e:
            if missing_ok and e.status == 404:
                return None
            raise

    async def api_versions(self, group: str) -> list[str]:
        """Served versions of an API group, newest-preferred first ([] when the group is not served)."""
        doc = await self.get_or_none(f"/apis/{group}")
        if not doc:
            return []
        preferred = doc.get("preferredVersion", {}).get("groupVersion")
        versions = [v["groupVersion"] for v in doc.get("versions", [])]
        return sorted(versions, key=lambda v: v != preferred)

    async def pages(self, path: str, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """A LIST in pages of LIST_PAGE items, all from one snapshot (the continue token's): a LIST of 1,000 pods at
        once would set our peak memory."""
        params = {**params, "limit": LIST_PAGE}
        while True:
            listing = await self.get(path, **params)
            yield listing
            token = listing["metadata"].get("continue")
            if not token:
                return
            params["continue"] = token

    async def watch(self, path: str, *, label_selector: Optional[str] = None, timeout_seconds: int = 300,
                    on_alive: Optional[Callable[[], None]] = None) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """List then watch, forever. Yields ("LISTING", {}) as a list starts, ("ADDED", obj) for what it holds and
        ("SYNCED", {}) when it ends, then the watch's ("ADDED"|"MODIFIED"|"DELETED", obj); relists on expiry (410).
        on_alive() is called whenever the API server answers the list or a watch: the stream is not dead."""
        alive = on_alive or (lambda: None)
        while True:
            params: dict[str, Any] = {}
            if label_selector:
                params["labelSelector"] = label_selector
            yield "LISTING", {}
            async for listing in self.pages(path, **params):
                rv = listing["metadata"]["resourceVersion"]
                alive()
                for item in listing.get("items", []):
                    yield "ADDED", item
            yield "SYNCED", {}
            while True:
                params.update(watch="1", resourceVersion=rv, timeoutSeconds=timeout_seconds,
                              allowWatchBookmarks="true")
                url = self.creds.server + path + "?" + urlencode(params)
                try:
                    async with self.session.get(url, headers=self._headers(),
                                                timeout=aiohttp.ClientTimeout(total=timeout_seconds + 30)) as resp:
                        if resp.status == 410:
                            break
                        if resp.status >= 400:
                            raise ApiError(resp.status, await resp.text())
                        alive()
                        async for line in resp.content:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            obj = event.get("object", {})
                            if event["type"] == "ERROR":
                                if obj.get("code") == 410:
                                    raise _Expired()
                                raise ApiError(obj.get("code", 500), obj)
                            rv = obj.get("metadata", {}).get("resourceVersion", rv)
                            alive()
                            if event["type"] != "BOOKMARK":
                                yield event["type"], obj
                except _Expired:
                    break
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    log.debug("watch %s dropped (%s); resuming from %s", path, type(e).__name__, rv)
                    await asyncio.sleep(1)  # connection dropped (apiserver restart): resume from rv
            # 410 Gone: our resourceVersion is too old; relist.
            log.debug("watch %s expired at %s; relisting", path, rv)


class _Expired(Exception):
    pass

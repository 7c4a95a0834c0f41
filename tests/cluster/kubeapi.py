"""A minimal asyncio Kubernetes API client on aiohttp, for the node agent.

The official client is synchronous; the agent must juggle a watch, hundreds of status patches and hundreds of
stub servers in one event loop on 2 cores, so it speaks the REST API directly.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import yaml

log = logging.getLogger("kubeapi")

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        msg = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: {status} {msg}")
        self.status, self.body = status, body


class WatchExpired(Exception):
    """410 Gone: the resourceVersion is too old, relist."""


def load_kubeconfig(path: str | Path) -> tuple[str, ssl.SSLContext, dict[str, str]]:
    """Server URL, SSL context and auth headers of the kubeconfig's current context."""
    path = Path(path)
    cfg = yaml.safe_load(path.read_text())
    ctx_name = cfg.get("current-context")
    context = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == context["cluster"])
    user = next((u["user"] for u in cfg.get("users", []) if u["name"] == context.get("user")), {})

    def resolve(p: str) -> str:
        return str((path.parent / p).resolve())

    ssl_ctx = ssl.create_default_context()
    if "certificate-authority-data" in cluster:
        ssl_ctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    elif "certificate-authority" in cluster:
        ssl_ctx.load_verify_locations(cafile=resolve(cluster["certificate-authority"]))
    if cluster.get("insecure-skip-tls-verify"):
        ssl_ctx.check_hostname, ssl_ctx.verify_mode = False, ssl.CERT_NONE
    if "client-certificate-data" in user:
        # ssl only loads a key pair from files: write them privately, load, and remove them at once.
        with tempfile.TemporaryDirectory() as d:
            crt, key = Path(d, "c.crt"), Path(d, "c.key")
            crt.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.touch(mode=0o600)
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            ssl_ctx.load_cert_chain(crt, key)
    elif "client-certificate" in user:
        ssl_ctx.load_cert_chain(resolve(user["client-certificate"]), resolve(user["client-key"]))
    headers = {"Accept": JSON}
    if user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    elif user.get("tokenFile"):
        headers["Authorization"] = f"Bearer {Path(resolve(user['tokenFile'])).read_text().strip()}"
    return cluster["server"].rstrip("/"), ssl_ctx, headers


class KubeApi:
    def __init__(self, server: str, ssl_ctx: ssl.SSLContext, headers: dict[str, str], max_connections: int = 64):
        self.server, self._ssl, self._headers, self._limit = server, ssl_ctx, headers, max_connections
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: str | Path | None = None, **kw) -> "KubeApi":
        path = path or os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config"
        return cls(*load_kubeconfig(path), **kw)

    async def __aenter__(self) -> "KubeApi":
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self._limit),
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=30),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session:
            await self._session.close()

    async def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                      content_type: str = JSON, allow: tuple[int, ...] = ()) -> tuple[int, Any]:
        """Returns (status, decoded body). Raises ApiError for >= 400 unless the status is in `allow`."""
        assert self._session is not None, "use `async with KubeApi(...)`"
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else None
        async with self._session.request(method, self.server + path, params=params, data=data, headers=headers) as r:
            raw = await r.read()
            try:
                decoded = json.loads(raw) if raw else None
            except ValueError:
                decoded = raw.decode(errors="replace")
            if r.status >= 400 and r.status not in allow:
                raise ApiError(r.status, decoded, method, path)
            return r.status, decoded

    async def get(self, path: str, **kw) -> Any:
        return (await self.request("GET", path, **kw))[1]

    async def list_all(self, path: str, params: dict | None = None, page: int = 500,
                       max_pages: int = 1000) -> tuple[list[dict], str]:
        """All items of a list, paginated; returns (items, resourceVersion to watch from)."""
        items: list[dict] = []
        params = dict(params or {}, limit=str(page))
        for _ in range(max_pages):
            body = await self.get(path, params=params)
            items += body.get("items", [])
            cont = body["metadata"].get("continue")
            if not cont:
                return items, body["metadata"]["resourceVersion"]
            params["continue"] = cont
        raise RuntimeError(f"list {path}: more than {max_pages} pages")

    async def watch(self, path: str, params: dict, resource_version: str,
                    timeout_seconds: int = 300) -> AsyncIterator[dict]:
        """Events of one watch call (it ends after `timeout_seconds`); BOOKMARKs included so callers track the RV."""
        assert self._session is not None
        q = dict(params, watch="1", resourceVersion=resource_version, allowWatchBookmarks="true",
                 timeoutSeconds=str(timeout_seconds))
        timeout = aiohttp.ClientTimeout(total=timeout_seconds + 30, sock_read=timeout_seconds + 30)
        async with self._session.get(self.server + path, params=q, timeout=timeout) as r:
            if r.status == 410:
                raise WatchExpired()
            if r.status >= 400:
                raise ApiError(r.status, (await r.read()).decode(errors="replace"), "WATCH", path)
            buf = b""
            # Not readline(): its 64 KiB line limit is too small for pods with large annotations.
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        if event.get("object", {}).get("code") == 410:
                            raise WatchExpired()
                        raise ApiError(event["object"].get("code", 500), event["object"], "WATCH", path)
                    yield event

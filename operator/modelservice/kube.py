"""A small async Kubernetes client on aiohttp: the few verbs the operator, the gateway and the test harness use.

Why our own and not the `kubernetes` package (synchronous: the operator and gateway are asyncio programs that must
not block their loop on 1,000 applies) or an async one (kubernetes_asyncio, lightkube, kr8s): docs/benchmarks.md's
figures were measured on this one, and we use a dozen verbs on plain dicts. Credentials come from the kubeconfig or
the service account (load_credentials), with tokens that change (token files, exec plugins) fetched again by a
TokenSource; kopf logs in from the same (handlers.login).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Callable, Optional
from urllib.parse import quote, urlencode

import aiohttp
import yaml

from modelservice import FIELD_MANAGER

log = logging.getLogger("modelservice.kube")

SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
LIST_PAGE = 200

# kind → (plural, namespaced). Only the kinds we touch.
PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Pod": "pods",
    "Event": "events",
    "Lease": "leases",
    "EndpointSlice": "endpointslices",
    "ModelService": "modelservices",
    "Secret": "secrets",
    "Namespace": "namespaces",
    "CustomResourceDefinition": "customresourcedefinitions",
    "NetworkPolicy": "networkpolicies",
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
        if self.status == 500 and (
            "failed to create typed patch object" in self.message or "request is too large" in self.message
        ):
            return True  # the second: an object past etcd's size limit, refused the same way every time
        return self.status in (400, 413, 422)


def object_path(
    api_version: str,
    kind: str,
    namespace: Optional[str] = None,
    name: Optional[str] = None,
    subresource: Optional[str] = None,
) -> str:
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
    """Where the API server is and how to prove who we are: one source for our client and kopf's (handlers.login).
    Field names follow kopf.ConnectionInfo. Paths are absolute; *_data are PEM."""

    server: str
    ca_path: Optional[str] = None
    ca_data: Optional[str] = None
    insecure: bool = False
    certificate_path: Optional[str] = None
    certificate_data: Optional[str] = None
    private_key_path: Optional[str] = None
    private_key_data: Optional[str] = None
    token: Optional[str] = None
    token_file: Optional[str] = None  # re-read: projected service-account tokens rotate
    exec: Optional[dict[str, Any]] = None  # users[].user.exec: a plugin prints short-lived tokens (EKS, GKE, OIDC)
    default_namespace: Optional[str] = None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_path, cadata=self.ca_data)
        if self.insecure:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        if self.certificate_path or self.certificate_data:
            with tempfile.TemporaryDirectory() as d:  # ssl loads a key pair only from files: private, removed at once
                crt = self.certificate_path or _private_file(d, "tls.crt", self.certificate_data or "")
                key = self.private_key_path or _private_file(d, "tls.key", self.private_key_data or "")
                ctx.load_cert_chain(crt, key)
        return ctx


class CredentialsError(Exception):
    """The kubeconfig or the in-cluster files cannot give credentials; the message says what to fix."""


def _private_file(folder: str, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(text)
    return path


def _pem(b64: str) -> str:
    return base64.b64decode(b64).decode()


def load_credentials(kubeconfig: Optional[str] = None) -> Credentials:
    """The kubeconfig named here or in $KUBECONFIG (colon-separated files; the first file that names a context,
    cluster or user wins, as kubectl merges them); else the service account when in a cluster; else ~/.kube/config."""
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
    if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ and os.path.exists(SA_TOKEN):
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        sa_dir = os.path.dirname(SA_TOKEN)
        namespace = None
        if os.path.exists(os.path.join(sa_dir, "namespace")):
            with open(os.path.join(sa_dir, "namespace")) as f:
                namespace = f.read().strip()
        return Credentials(
            server=f"https://{host}:{port}",
            ca_path=os.path.join(sa_dir, "ca.crt"),
            token_file=SA_TOKEN,
            default_namespace=namespace,
        )
    paths = [p for p in (kubeconfig or "").split(os.pathsep) if p]
    paths = paths or [os.path.expanduser("~/.kube/config")]
    merged: dict[str, dict[str, Any]] = {"contexts": {}, "clusters": {}, "users": {}}
    current, base = None, {}  # base: the folder of the file each entry came from (relative paths in it)
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        current = current or cfg.get("current-context")
        for section, merged_section in merged.items():
            for item in cfg.get(section) or []:
                if item.get("name") not in merged_section:
                    merged_section[item["name"]] = item.get(section[:-1]) or {}
                    base[(section, item["name"])] = os.path.dirname(os.path.abspath(path))
    if not current:
        raise CredentialsError(f"no current-context in {os.pathsep.join(paths)} (and not running in a cluster)")
    try:
        context = merged["contexts"][current]
        cluster = merged["clusters"][context["cluster"]]
    except KeyError as e:
        raise CredentialsError(f"kubeconfig: context {current!r} or its cluster {e} is not defined") from e
    user = merged["users"].get(context.get("user", ""), {})
    cdir, udir = base[("clusters", context["cluster"])], base.get(("users", context.get("user", "")), ".")

    def path_in(folder: str, p: Optional[str]) -> Optional[str]:
        return os.path.join(folder, os.path.expanduser(p)) if p else None

    if "auth-provider" in user:
        raise CredentialsError(
            "kubeconfig: users[].user.auth-provider was removed from Kubernetes clients; "
            "use the provider's exec plugin (users[].user.exec)"
        )
    exec_spec = user.get("exec")
    if exec_spec is not None:
        exec_spec = {**exec_spec, "_base_dir": udir, "_cluster": cluster}
    return Credentials(
        server=cluster["server"].rstrip("/"),
        ca_path=path_in(cdir, cluster.get("certificate-authority")),
        ca_data=_pem(cluster["certificate-authority-data"]) if cluster.get("certificate-authority-data") else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        certificate_path=path_in(udir, user.get("client-certificate")),
        certificate_data=_pem(user["client-certificate-data"]) if user.get("client-certificate-data") else None,
        private_key_path=path_in(udir, user.get("client-key")),
        private_key_data=_pem(user["client-key-data"]) if user.get("client-key-data") else None,
        token=user.get("token"),
        token_file=path_in(udir, user.get("tokenFile")),
        exec=exec_spec,
        default_namespace=context.get("namespace"),
    )


EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
TOKEN_FILE_TTL = 60.0  # seconds between re-reads of a token file (kubelet rotates projected tokens well before expiry)
EXPIRY_SKEW = timedelta(seconds=10)  # an exec token this close to its expirationTimestamp is fetched anew
EXEC_TIMEOUT = 60.0


_FORCE = object()


class TokenSource:
    """The bearer token to send, fetched again when it may have changed: a token file every TOKEN_FILE_TTL, an
    exec plugin's token when its expirationTimestamp is near, either of them at once after a 401 (refresh()).
    Shared by our client and kopf's login handler, so both always send the same token."""

    def __init__(
        self,
        creds: Credentials,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ):
        self.creds = creds
        self.clock, self.now = clock, now
        self.token: Optional[str] = creds.token
        self.expiration: Optional[datetime] = None  # of an exec plugin's token
        self._read_at: Optional[float] = None
        self._lock: Optional[asyncio.Lock] = None

    @property
    def refreshable(self) -> bool:
        return bool(self.creds.token_file or self.creds.exec)

    async def get(self) -> Optional[str]:
        if self.creds.exec is not None:
            if self.token is None or (self.expiration is not None and self.now() >= self.expiration - EXPIRY_SKEW):
                await self.refresh(stale=self.token)
        elif self.creds.token_file and (self._read_at is None or self.clock() - self._read_at >= TOKEN_FILE_TTL):
            self._read_file()
        return self.token

    async def refresh(self, stale: Optional[str] | object = _FORCE) -> Optional[str]:
        """Fetch the token anew, unless another caller already replaced the `stale` one while we waited (one plugin
        run for many 401s, or for many first requests)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if stale is not _FORCE and self.token != stale:
                return self.token
            if self.creds.exec is not None:
                self.token, self.expiration = await run_exec_plugin(self.creds.exec)
            elif self.creds.token_file:
                self._read_file()
        return self.token

    def _read_file(self) -> None:
        with open(self.creds.token_file or "") as f:
            self.token = f.read().strip()
        self._read_at = self.clock()


async def run_exec_plugin(spec: dict[str, Any]) -> tuple[str, Optional[datetime]]:
    """Run a kubeconfig exec credential plugin (the protocol of client-go's exec authenticator), non-interactively:
    its token and when it expires (None: never)."""
    api_version = spec.get("apiVersion")
    command = spec.get("command") or ""
    if api_version not in EXEC_API_VERSIONS:
        raise CredentialsError(
            f"exec plugin {command!r}: apiVersion {api_version!r} is not supported "
            f"(supported: {', '.join(EXEC_API_VERSIONS)})"
        )
    if spec.get("interactiveMode") == "Always":
        raise CredentialsError(
            f"exec plugin {command!r} needs a terminal (interactiveMode: Always); "
            "the operator and the gateway have none"
        )
    if os.sep in command and not os.path.isabs(command):  # relative to the kubeconfig's folder, as kubectl does
        command = os.path.join(spec.get("_base_dir", "."), command)
    info: dict[str, Any] = {"interactive": False}
    if spec.get("provideClusterInfo"):
        cluster = spec.get("_cluster") or {}
        info["cluster"] = {
            k: v
            for k, v in (
                ("server", cluster.get("server")),
                ("certificate-authority-data", cluster.get("certificate-authority-data")),
                ("insecure-skip-tls-verify", cluster.get("insecure-skip-tls-verify")),
                ("config", (cluster.get("extensions") or [{}])[0].get("extension")),
            )
            if v is not None
        }
    env = {
        **os.environ,
        **{e["name"]: e["value"] for e in spec.get("env") or []},
        "KUBERNETES_EXEC_INFO": json.dumps({"apiVersion": api_version, "kind": "ExecCredential", "spec": info}),
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            command,
            *(spec.get("args") or []),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:
        hint = f" ({spec['installHint'].strip()})" if spec.get("installHint") else ""
        raise CredentialsError(f"exec plugin {command!r} cannot run: {e}{hint}") from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(), EXEC_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise CredentialsError(f"exec plugin {command!r} gave no answer within {EXEC_TIMEOUT:.0f}s") from None
    if proc.returncode:
        raise CredentialsError(
            f"exec plugin {command!r} exited with {proc.returncode}: {err.decode(errors='replace').strip()[-500:]}"
        )
    try:
        cred = json.loads(out)
        status = cred["status"]
    except (ValueError, KeyError, TypeError) as e:
        raise CredentialsError(f"exec plugin {command!r} printed no ExecCredential with a status") from e
    if cred.get("apiVersion") != api_version:
        raise CredentialsError(f"exec plugin {command!r} answered {cred.get('apiVersion')!r}, asked {api_version!r}")
    if not status.get("token"):
        raise CredentialsError(
            f"exec plugin {command!r} gave no token (client certificates from exec plugins are not supported)"
        )
    expires = status.get("expirationTimestamp")
    return status["token"], datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None


class Kube:
    def __init__(
        self,
        creds: Credentials,
        *,
        user_agent: str = FIELD_MANAGER,
        limit: int = 0,
        tokens: Optional[TokenSource] = None,
        watch_timeout: int = 300,
    ):
        """limit: most connections at once (0: no limit). Every watch holds one for its whole life (the operator
        runs 7 per namespace), so a limit would starve requests once enough namespaces are watched; the callers
        bound their own concurrency (the operator's --workers, one wake-up per model in the gateway).
        watch_timeout: seconds a watch call lasts before it is resumed; each resumption proves the API server
        still answers (on_alive), which is what the operator's liveness probe reads on a quiet cluster."""
        self.creds = creds
        self.tokens = tokens or TokenSource(creds)
        self._session: Optional[aiohttp.ClientSession] = None
        self.user_agent = user_agent
        self.limit = limit
        self.watch_timeout = watch_timeout
        self.retry_delay = 1.0  # after a dropped watch connection, before resuming it

    @classmethod
    def from_env(cls, kubeconfig: Optional[str] = None, **kw: Any) -> "Kube":
        return cls(load_credentials(kubeconfig), **kw)

    async def _headers(self) -> dict[str, str]:
        h = {"User-Agent": self.user_agent, "Accept": "application/json"}
        token = await self.tokens.get()
        if token:
            h["Authorization"] = f"Bearer {token}"
        return h

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            tls = self.creds.ssl_context() if self.creds.server.startswith("https:") else False
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=tls, limit=self.limit),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @contextlib.asynccontextmanager
    async def _send(
        self,
        method: str,
        url: str,
        *,
        data: Optional[str] = None,
        content_type: Optional[str] = None,
        timeout: aiohttp.ClientTimeout,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request; after a 401 with a token that can be fetched anew (file, exec plugin), once more with it."""
        for attempt in (1, 2):
            headers = await self._headers()
            if content_type is not None:
                headers["Content-Type"] = content_type
            async with self.session.request(method, url, data=data, headers=headers, timeout=timeout) as resp:
                if resp.status == 401 and attempt == 1 and self.tokens.refreshable:
                    await resp.read()
                    await self.tokens.refresh(stale=headers.get("Authorization", "")[len("Bearer ") :] or None)
                    log.info("%s %s: 401 Unauthorized; trying once more with a token fetched anew", method, url)
                    continue
                yield resp
                return

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Optional[dict[str, Any]] = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        url = self.creds.server + path + (f"?{urlencode(params)}" if params else "")
        data = json.dumps(body) if body is not None else None
        async with self._send(
            method,
            url,
            data=data,
            content_type=content_type if data is not None else None,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
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

    async def apply(
        self,
        obj: dict[str, Any],
        *,
        field_manager: str = FIELD_MANAGER,
        force: bool = True,
        subresource: Optional[str] = None,
    ) -> Any:
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

    async def pages(self, path: str, *, limit: int = LIST_PAGE, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """A LIST in pages of `limit` items, all from one snapshot (the continue token's): a LIST of 1,000 pods at
        once would set our peak memory."""
        params = {**params, "limit": limit}
        while True:
            listing = await self.get(path, **params)
            yield listing
            token = listing["metadata"].get("continue")
            if not token:
                return
            params["continue"] = token

    async def watch_once(
        self,
        path: str,
        resource_version: str,
        *,
        timeout_seconds: Optional[int] = None,
        on_alive: Optional[Callable[[], None]] = None,
        **params: Any,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """One watch call from resource_version until the server ends it: (type, object), BOOKMARKs included (their
        resourceVersion is where to resume). Raises WatchExpired on 410 Gone (relist), ApiError on other refusals,
        and aiohttp/timeout errors when the connection drops."""
        timeout_seconds = timeout_seconds or self.watch_timeout
        params.update(
            watch="1", resourceVersion=resource_version, timeoutSeconds=timeout_seconds, allowWatchBookmarks="true"
        )
        url = self.creds.server + path + "?" + urlencode(params)
        async with self._send("GET", url, timeout=aiohttp.ClientTimeout(total=timeout_seconds + 30)) as resp:
            if resp.status == 410:
                raise WatchExpired()
            if resp.status >= 400:
                text = await resp.text()
                try:
                    body: Any = json.loads(text)
                except ValueError:
                    body = text
                raise ApiError(resp.status, body)
            if on_alive is not None:
                on_alive()
            # Not `async for line in resp.content`: aiohttp's readline refuses lines past its buffer limit (64 KiB
            # by default), and one watch event carries a whole object (a pod with large annotations, a big CRD).
            buf = bytearray()
            async for chunk in resp.content.iter_any():
                buf += chunk
                start = 0
                while (end := buf.find(b"\n", start)) >= 0:
                    line = bytes(buf[start:end])
                    start = end + 1
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchExpired()
                        raise ApiError(obj.get("code", 500), obj)
                    if on_alive is not None:
                        on_alive()
                    yield event["type"], obj
                del buf[:start]

    async def watch(
        self,
        path: str,
        *,
        label_selector: Optional[str] = None,
        timeout_seconds: Optional[int] = None,
        on_alive: Optional[Callable[[], None]] = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """List then watch, forever. Yields ("LISTING", {}) as a list starts, ("ADDED", obj) for what it holds and
        ("SYNCED", {}) when it ends, then the watch's ("ADDED"|"MODIFIED"|"DELETED", obj); relists on expiry (410).
        A dropped connection is resumed from the last resourceVersion; other errors (ApiError from the list or the
        watch) are raised. on_alive() is called whenever the API server answers the list or a watch."""
        params: dict[str, Any] = {"labelSelector": label_selector} if label_selector else {}
        while True:
            yield "LISTING", {}
            rv = ""
            async for listing in self.pages(path, **params):
                rv = listing["metadata"]["resourceVersion"]
                if on_alive is not None:
                    on_alive()
                for item in listing.get("items", []):
                    yield "ADDED", item
            yield "SYNCED", {}
            try:
                while True:
                    try:
                        async for event_type, obj in self.watch_once(
                            path, rv, timeout_seconds=timeout_seconds, on_alive=on_alive, **params
                        ):
                            rv = obj.get("metadata", {}).get("resourceVersion", rv)
                            if event_type != "BOOKMARK":
                                yield event_type, obj
                    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                        log.debug("watch %s dropped (%s); resuming from %s", path, type(e).__name__, rv)
                        await asyncio.sleep(self.retry_delay)  # connection dropped (apiserver restart): resume
            except WatchExpired:
                # 410 Gone: our resourceVersion is too old; relist.
                log.debug("watch %s expired at %s; relisting", path, rv)


class WatchExpired(Exception):
    """410 Gone: the resourceVersion is older than the API server keeps; list again."""

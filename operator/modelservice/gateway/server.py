"""The gateway's HTTP surface: OpenAI routes by `model`, path routes by namespace/name, /v1/models, /healthz.

Gateway wires the pure parts (routing table, balancer, key store, activity tracker) to the I/O parts (proxy,
activator, ClusterOps). Watches that fill the table live in watchers.py, so tests can fill it by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Callable, Optional

from aiohttp import web
from aiohttp.typedefs import Handler

from modelservice.gateway import metering, paths
from modelservice.gateway import reqstate as rs
from modelservice.gateway.activator import Activator
from modelservice.gateway.activity import ActivityTracker
from modelservice.gateway.adapters import ADAPTERS_ANNOTATION, Adapters, AdapterUse, name_conflicts
from modelservice.gateway.affinity import affinity_key
from modelservice.gateway.auth import ANONYMOUS, KeyStore, bearer_token, key_matches
from modelservice.gateway.balancer import Balancer
from modelservice.gateway.config import Config
from modelservice.gateway.engine_load import EngineLoad
from modelservice.gateway.errors import GatewayError, error_response
from modelservice.gateway.kubeops import ClusterOps
from modelservice.gateway.metering import Metering
from modelservice.gateway.metrics import Metrics
from modelservice.gateway.parsing import model_of, parse_json, read_body, rewrite_model
from modelservice.gateway.proxy import Proxy, make_pool
from modelservice.gateway.quotas import Quotas
from modelservice.gateway.routes import AdapterRef, Endpoint, Key, ModelEntry, RouteTable
from modelservice.gateway.tenants import TenantStore

log = logging.getLogger("modelservice.gateway")
access_log = logging.getLogger("modelservice.gateway.access")
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
SECRET_WAIT = 5.0  # how long a request waits for a just-referenced Secret's first fetch before it is refused


class Gateway:
    def __init__(self, config: Config, ops: ClusterOps, *, metrics: Optional[Metrics] = None):
        self.config, self.ops = config, ops
        self.metrics = metrics or Metrics()
        self.metering = Metering(self.metrics.registry, config.max_metered_tenants)
        self.quotas = Quotas(config.quota_share, config.quota_default_max_tokens)
        self.table = RouteTable(on_change=self._on_change)
        self.metrics.invalid_modelservices.set_function(lambda: len(self.table.invalid))
        self.balancer = Balancer()
        self.keys = KeyStore(config.api_key_secret, TenantStore() if config.tenant_namespace else None)
        self.activity = ActivityTracker(config.pod_name, config.activity_interval)
        self.engine_load = EngineLoad(self.table, self.metrics.registry)  # engines' queues, polled (engine_load.py)
        self.activity.waiting = self.engine_load.model_waiting
        self.balancer.waiting = self.engine_load.waiting
        self.activator = Activator(
            self.table,
            ops,
            self.activity,
            self.metrics,
            timeout=config.activation_timeout,
            max_held=config.max_held_per_model,
        )
        self.adapters = Adapters(
            self._engine_call,
            changed=self.activity.mark_changed,
            wait_timeout=config.activation_timeout,
            count=lambda key, adapter, outcome: self.metrics.child(
                self.metrics.adapter_loads, f"{key[0]}/{key[1]}", adapter, outcome
            ).inc(),
            in_flight=self.balancer.in_flight,
        )
        self.activity.annotate = self._adapter_annotations
        self._adapter_routes: dict[str, tuple[Key, AdapterRef]] = {}
        self._adapter_conflicts: dict[tuple[Key, str], str] = {}
        self.synced = False  # set by watchers.py once every watch has listed
        self.peers_synced: Callable[[], bool] = lambda: True  # the other workers of this pod (workers.py)
        self.proxy: Optional[Proxy] = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        for path in OPENAI_PATHS:
            app.router.add_post(path, self.openai)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_route("*", "/models/{namespace}/{name}", self.by_path)
        app.router.add_route("*", "/models/{namespace}/{name}/{rest:.*}", self.by_path)
        app.router.add_get("/healthz", self.healthz)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    def runner(self, app: web.Application) -> web.AppRunner:
        # keepalive_timeout also bounds the wait for a complete request head on a fresh connection (aiohttp arms
        # it at connection_made), which is our slowloris guard. handler_cancellation: a client that disconnects
        # cancels its handler, and with it the upstream request.
        return web.AppRunner(
            app, handler_cancellation=True, keepalive_timeout=self.config.header_timeout, access_log=None
        )

    async def _start(self, _: web.Application) -> None:
        cfg = self.config
        self.proxy = Proxy(
            make_pool(cfg.connect_timeout, cfg.upstream_timeout),
            self.balancer,
            self.metrics,
            idle_timeout=cfg.idle_timeout,
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.activity.run(self.ops, self.table.models.get), name="activity-leases"),
            loop.create_task(self.engine_load.run(), name="engine-load"),
            loop.create_task(
                self.keys.run(self.ops, lambda: self.table.models.values(), cfg.secret_refresh), name="api-key-secrets"
            ),
        ]

    async def _stop(self, _: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.proxy is not None:
            await self.proxy.pool.close()

    def _on_change(self, key: Key) -> None:
        self.activator.on_change(key)
        entry = self.table.models.get(key)
        if (entry is not None and entry.adapters) or self._adapter_routes or self._adapter_conflicts:
            # O(models): only while some model declares adapters, not on every event of a thousand plain models.
            self._adapter_routes, self._adapter_conflicts = name_conflicts(self.table.models.values())
        for unload in self.adapters.sync(key, entry, self.table.ready(key) if entry else ()):
            asyncio.ensure_future(unload)
        label = f"{key[0]}/{key[1]}"
        if entry is not None:
            self.metrics.ready_endpoints.labels(label).set(len(self.table.ready(key)))
        else:
            with contextlib.suppress(KeyError):
                self.metrics.ready_endpoints.remove(label)
        if entry is not None and self.keys.missing(entry):
            self.keys.kick()

    # -- handlers ----------------------------------------------------------------------------------------------
    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, self.config.max_body_bytes, self.config.idle_timeout)
        doc = parse_json(body)
        adapter: Optional[AdapterUse] = None

        def resolve() -> ModelEntry:
            nonlocal adapter
            try:
                return self.table.resolve(model_of(doc))
            except GatewayError as e:
                route = self._adapter_routes.get(model_of(doc)) if e.status == 404 else None
                base = self.table.models.get(route[0]) if route else None
                if route is None or base is None:
                    raise
                adapter = AdapterUse(self.adapters, base, route[1])  # a LoRA adapter: served by its base
                return base

        entry = self._known(request, resolve)
        await self._authorize(request, entry)
        self._admit(request, len(body), doc, request.path)
        body = self._meter(request, doc, request.path) or body
        if entry.upstream_model and adapter is None:
            body = rewrite_model(doc, entry.upstream_model)
        return await self._serve(request, entry, body, request.raw_path, doc, adapter)

    async def by_path(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["namespace"], request.match_info["name"]

        def lookup() -> ModelEntry:
            entry = self.table.get(ns, name)
            if entry is None:
                raise GatewayError(
                    404, f"no model {ns}/{name}; GET /v1/models lists the models you can use", "model_not_found"
                )
            return entry

        entry = self._known(request, lookup)
        await self._authorize(request, entry)  # before reading the body: strangers don't get to upload 10 MiB
        rest = request.rel_url.raw_path.split("/", 4)
        path = "/" + (rest[4] if len(rest) > 4 else "")
        paths.check(entry.engine, request.method, path)  # engine admin paths are not for clients
        body = await read_body(request, self.config.max_body_bytes, self.config.idle_timeout)
        doc = None
        if request.method == "POST" and path in metering.METERED_PATHS:
            try:
                doc = parse_json(body)
            except GatewayError:
                pass  # not JSON: the engine says what is wrong with it
        self._admit(request, len(body), doc, path)  # every client path counts against a tenant's quota
        if doc is not None:
            body = self._meter(request, doc, path) or body
        if request.rel_url.raw_query_string:
            path += "?" + request.rel_url.raw_query_string
        return await self._serve(request, entry, body, path, doc)

    async def list_models(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        if (
            (self.keys.global_ref or self.keys.tenants is not None)
            and not self.keys.known_tenant(auth)
            and not any(self.keys.permits(e, auth) for e in self.table.models.values())
        ):
            if not key_matches(bearer_token(auth), self.keys.global_keys()):
                raise _unauthorized()
        data = [
            {"id": model_id, "object": "model", "created": e.created, "owned_by": e.namespace}
            for model_id, e in self.table.listing()
            if self.keys.permits(e, auth)
        ]
        return web.json_response({"object": "list", "data": data})

    async def healthz(self, _: web.Request) -> web.Response:
        if not self.synced:
            return web.json_response({"status": "starting: watches have not listed yet"}, status=503)
        if not self.peers_synced():
            return web.json_response({"status": "starting: another worker's watches have not listed yet"}, status=503)
        return web.json_response({"status": "ok", "models": len(self.table.models)})

    # -- the request path --------------------------------------------------------------------------------------
    def _known(self, request: web.Request, lookup: Callable[[], ModelEntry]) -> ModelEntry:
        """Resolve the model; with global or tenant keys, a caller without one learns nothing (401, not 404/400)."""
        try:
            entry = lookup()
        except GatewayError as e:
            auth = request.headers.get("Authorization")
            if (
                e.status in (400, 404)
                and e.code != "missing_model"
                and (self.keys.global_ref or self.keys.tenants is not None)
                and not key_matches(bearer_token(auth), self.keys.global_keys())
                and not self.keys.known_tenant(auth)
            ):
                raise _unauthorized() from None
            raise
        request[rs.MODEL] = entry.label
        return entry

    def _admit(self, request: web.Request, body_len: int, doc: Optional[dict[str, Any]], path: str) -> None:
        """A tenant over its quota gets 429 here, before any engine work (quotas.py)."""
        name: Optional[str] = request.get(rs.TENANT)
        if not name or self.keys.tenants is None:
            return
        tenant = self.keys.tenants.tenants.get(name)
        if tenant is not None and (tenant.rpm or tenant.tpm or tenant.model_limits):
            model = request[rs.MODEL]
            rpm, tpm = tenant.limits_on(model)
            scopes = [
                (name, f"tenant {name}", tenant.rpm, tenant.tpm),
                (f"{name}|{model}", f"tenant {name} on model {model}", rpm, tpm),
            ]
            tokens = self.quotas.estimate(body_len, doc, path) if tenant.tpm or tpm else 0
            request[rs.QUOTA] = self.quotas.admit_all(scopes, tokens)

    def _meter(self, request: web.Request, doc: dict[str, Any], path: str) -> Optional[bytes]:
        """Attach the request's Meter; the body re-encoded when the meter asked the engine for usage (or None)."""
        if not self.config.metering:
            return None
        meter, changed = metering.prepare(doc, path)
        request[rs.METER] = meter
        return json.dumps(doc, separators=(",", ":")).encode() if changed else None

    async def _authorize(self, request: web.Request, entry: ModelEntry) -> None:
        if not self.keys.required(entry):
            request[rs.TENANT] = ANONYMOUS
            return
        await self.keys.wait_loaded(entry, SECRET_WAIT)
        auth = request.headers.get("Authorization")
        tenant = self.keys.identify(entry, auth)
        if tenant is None:
            if self.keys.known_tenant(auth):  # a good key, for another model: as if the model did not exist
                raise GatewayError(
                    404,
                    f"The model {entry.label!r} does not exist or your key may not use it; "
                    "GET /v1/models lists the models you can use",
                    "model_not_found",
                )
            problem = self.keys.unreadable(entry)
            if problem is not None:  # no key can be checked: say so, rather than blame the caller's key
                raise GatewayError(
                    503,
                    f"{problem} (with the Helm chart: gateway.apiKeys.enabled=true lets the gateway read it)",
                    "api_keys_unavailable",
                )
            raise _unauthorized()
        request[rs.TENANT] = tenant
        request[rs.STRIP_AUTHORIZATION] = True  # our key is for us; the model server never sees it

    async def _serve(
        self,
        request: web.Request,
        entry: ModelEntry,
        body: bytes,
        path: str,
        doc: Optional[dict[str, Any]],
        adapter: Optional[AdapterUse] = None,
    ) -> web.StreamResponse:
        """The one place a proxied request starts and ends (held or not): its outcome is known in the finally.
        An adapter's request is its base's activity (scale to zero, parking)."""
        assert self.proxy is not None, "the app has not started"
        key = affinity_key(doc, request.headers) if entry.prefix_affinity else None  # docs/routing.md
        self.activity.started(entry.key)
        try:
            return await self.proxy.forward(
                request,
                entry,
                body,
                path,
                self.table,
                lambda: self.activator.wait(entry),
                strip_authorization=request.get(rs.STRIP_AUTHORIZATION, False),
                affinity=key,
                adapter=adapter,
            )
        finally:
            self.activity.finished(entry.key)

    async def _engine_call(self, ep: Endpoint, path: str, doc: dict[str, Any]) -> tuple[int, str]:
        """The engine's own adapter API, called on the pod (never reachable by clients: paths.py)."""
        assert self.proxy is not None, "the app has not started"
        resp = await self.proxy.pool.request(
            "POST", ep.address, ep.port, path, [("Content-Type", "application/json")], json.dumps(doc).encode()
        )
        try:
            return resp.status, (await resp.read()).decode(errors="replace")
        finally:
            resp.release()

    def _adapter_annotations(self, entry: ModelEntry) -> dict[str, str]:
        if not entry.adapters:
            return {}
        report = self.adapters.report(entry.key, [a.name for a in entry.adapters], self._adapter_conflicts)
        return {ADAPTERS_ANNOTATION: json.dumps(report, separators=(",", ":"), sort_keys=True)}

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        status = 500
        try:
            resp = await handler(request)
            status = 499 if request.get(rs.CLIENT_GONE) else resp.status
            return resp
        except GatewayError as e:
            status = e.status
            return e.response()
        except web.HTTPException as e:
            status = e.status
            return _route_error(request, e)
        except ConnectionResetError:
            status = 499  # the client went away mid-request (nginx's code for it); nobody reads an answer
            return web.Response(status=499)
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            if request.path != "/healthz":
                model = request.get(rs.MODEL, "")
                self.metrics.child(self.metrics.requests, model, str(status)).inc()
                tenant = request.get(rs.TENANT)
                if tenant is not None and self.config.metering:  # known caller and model: tokens, outcome
                    meter, answered = request.get(rs.METER), request.get(rs.ANSWERED, False)
                    self.metering.record(tenant, model, status, meter, answered)
                    reservation = request.get(rs.QUOTA)
                    if reservation is not None:  # settle the reserved tokens to what was used (unknown: it stands)
                        used = (
                            meter.prompt + (meter.completion or 0)
                            if meter is not None and meter.prompt is not None
                            else None
                            if answered
                            else 0
                        )
                        self.quotas.settle(reservation, used)
                access_log.info(
                    "%s %s model=%s tenant=%s status=%d duration=%.3fs",
                    request.method,
                    request.path,
                    model or "-",
                    request.get(rs.TENANT, "-"),
                    status,
                    time.monotonic() - started,
                )


def _unauthorized() -> GatewayError:
    return GatewayError(401, "missing or invalid API key: send `Authorization: Bearer <key>`", "invalid_api_key")


def _route_error(request: web.Request, e: web.HTTPException) -> web.Response:
    if e.status == 405:
        resp = error_response(405, f"{request.method} is not allowed on {request.path}", "method_not_allowed")
        if "Allow" in e.headers:
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    if e.status == 404:
        return error_response(
            404,
            f"no route for {request.path}: use /v1/chat/completions, /v1/completions, "
            "/v1/embeddings, /v1/models or /models/<namespace>/<name>/...",
            "not_found",
        )
    return error_response(e.status, e.reason, "http_error")

"""Forwarding one request to a backend pod and streaming the answer back, chunk by chunk, without buffering.

SSE token streams must reach the client as the engine writes them, so the answer is relayed as its bytes arrive
(upstream.py) into a StreamResponse. A client that goes away cancels the handler (the server runs with
handler_cancellation), which closes the upstream connection, so the engine stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Optional

from aiohttp import web

from modelservice.gateway import reqstate as rs
from modelservice.gateway.balancer import Balancer
from modelservice.gateway.errors import GatewayError
from modelservice.gateway.metering import Meter
from modelservice.gateway.metrics import Metrics
from modelservice.gateway.routes import Endpoint, ModelEntry, RouteTable
from modelservice.gateway.upstream import NotSent, Response, Unread, UpstreamError, UpstreamPool, UpstreamTimeout

if TYPE_CHECKING:
    from modelservice.gateway.adapters import AdapterUse

log = logging.getLogger("modelservice.gateway.proxy")
MAX_ATTEMPTS = 3  # sends per request, whatever their outcome
MAX_WAITS = 2  # waits for a ready endpoint per request: a cold start, then the replacements of dead endpoints
# Answers that say the engine did not take the request on: Ollama's "server busy" (503), TGI's "model is overloaded"
# (429), a server shutting down (503). The head is all the engine wrote, so another endpoint may have it instead.
REFUSAL_STATUSES = frozenset({429, 503})
RETRY_AFTER = 5  # seconds, on our 503s
# Idle pooled connections close before the engines close them (5 s: uvicorn's for vLLM, cpp-httplib's for
# llama.cpp), so a pod rarely closes one just as a request is written to it: that request could not be replayed.
KEEPALIVE = 4.0
SMALL_BODY = 64 * 1024  # answers up to this size are relayed in one write
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)  # we hold the whole body already; a 100-continue handshake upstream only adds a trip


def make_pool(connect_timeout: float, read_timeout: float) -> UpstreamPool:
    return UpstreamPool(connect_timeout=connect_timeout, read_timeout=read_timeout, keepalive_timeout=KEEPALIVE)


def upstream_headers(request: web.BaseRequest, *, strip_authorization: bool) -> list[tuple[str, str]]:
    named = {h.strip().lower() for h in request.headers.get("Connection", "").split(",")}
    out = [
        (k, v)
        for k, v in request.headers.items()
        if k.lower() not in HOP_BY_HOP
        and k.lower() not in named
        and not (strip_authorization and k.lower() == "authorization")
    ]
    prior = request.headers.get("X-Forwarded-For")
    peer = request.remote or ""
    out = [(k, v) for k, v in out if k.lower() not in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")]
    out.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    out.append(("X-Forwarded-Proto", request.scheme))
    if request.host:
        out.append(("X-Forwarded-Host", request.host))
    return out


class Proxy:
    def __init__(self, pool: UpstreamPool, balancer: Balancer, metrics: Metrics, *, idle_timeout: float):
        self.pool, self.balancer, self.metrics = pool, balancer, metrics
        self.idle_timeout = idle_timeout

    async def forward(
        self,
        request: web.Request,
        entry: ModelEntry,
        body: bytes,
        path: str,
        table: RouteTable,
        wait_ready: Callable[[], Awaitable[None]],
        *,
        strip_authorization: bool,
        affinity: Optional[bytes] = None,
        adapter: Optional["AdapterUse"] = None,
    ) -> web.StreamResponse:
        """Serve the request from one of the model's ready endpoints: the gateway's one retry loop.

        One budget per request: at most MAX_ATTEMPTS sends, and at most two waits for a ready endpoint (a cold
        start, and the replacements of endpoints that all stopped listening). A try is replayed on another endpoint
        only when that endpoint provably produced nothing: NotSent (no byte of the request was written) or a refusal
        (REFUSAL_STATUSES before any byte of the body). Anything else is the answer, relayed or turned into 502/504:
        an engine that may have read the request is never sent it twice.
        """
        headers = upstream_headers(request, strip_authorization=strip_authorization)
        key = entry.key
        tried: set[Endpoint] = set()
        unreachable: set[Endpoint] = set()
        failure: Optional[GatewayError] = None  # what the tries so far came to, if nothing answers
        attempts = waits = 0
        # A LoRA adapter's request prefers the replicas that have it loaded (adapters.py).
        ready = table.ready if adapter is None else (lambda k: adapter.candidates(table.ready(k), tried))
        while True:
            ep = (
                self.balancer.pick(ready(key), exclude=tried, key=affinity, load_factor=entry.load_factor)
                if attempts < MAX_ATTEMPTS
                else None
            )
            if ep is None:
                if unreachable:
                    # Not listening: a pod that is going away stops listening before its EndpointSlice drops it.
                    # Out of the table until the slice changes, or the wait below would return at once to them.
                    table.refused(key, frozenset(unreachable))
                    unreachable.clear()
                if attempts == MAX_ATTEMPTS or waits == MAX_WAITS or table.ready(key):
                    raise failure or GatewayError(
                        503, f"model {entry.label} has no ready backend", "no_backend", retry_after=RETRY_AFTER
                    )
                waits += 1
                try:
                    await wait_ready()  # the activator: wakes a model at zero, holds the request until a pod is ready
                except GatewayError:
                    if failure is None:
                        raise
                    raise failure from None  # nothing replaced them: the precise error is what they did
                continue
            attempts += 1
            tried.add(ep)
            gauge = self.metrics.child(self.metrics.in_flight, entry.label)
            gauge.inc()
            self.balancer.acquire(ep)
            release_adapter: Optional[Callable[[], None]] = None
            try:
                started = time.monotonic()
                try:
                    if adapter is not None:  # loaded on this replica first if it is not (one load, others wait)
                        release_adapter = await adapter.acquire(ep)
                    upstream = await self.pool.request(request.method, ep.address, ep.port, path, headers, body)
                except NotSent as e:
                    log.info("%s: %s unreachable: %s", entry.label, ep.base_url, e)
                    reason = "unread" if isinstance(e, Unread) else "not_sent"
                    self.metrics.child(self.metrics.untouched_tries, entry.label, reason).inc()
                    unreachable.add(ep)
                    if failure is None or failure.code == "backend_unreachable":  # a refusal says more
                        failure = GatewayError(
                            502, f"model {entry.label}: no backend accepted the connection ({e})", "backend_unreachable"
                        )
                    continue
                except UpstreamTimeout:
                    raise GatewayError(504, f"model {entry.label} did not answer in time", "upstream_timeout") from None
                except UpstreamError as e:
                    log.warning("%s: %s failed: %s", entry.label, ep.base_url, e)
                    raise GatewayError(502, f"model {entry.label} failed before answering", "bad_gateway") from None
                self.metrics.child(self.metrics.upstream_latency, entry.label).observe(time.monotonic() - started)
                if adapter is not None and attempts < MAX_ATTEMPTS and adapter.lost(ep, upstream.status):
                    upstream.release()  # the engine lost the adapter and did nothing: load it again, send again
                    tried.discard(ep)
                    continue
                if (
                    upstream.status in REFUSAL_STATUSES
                    and attempts < MAX_ATTEMPTS
                    and self.balancer.pick(table.ready(key), exclude=tried) is not None
                ):
                    log.info(
                        "%s: %s refused the request (%d), trying another endpoint",
                        entry.label,
                        ep.base_url,
                        upstream.status,
                    )
                    upstream.release()  # unread: the connection closes; the next endpoint's answer replaces it
                    self.metrics.child(self.metrics.untouched_tries, entry.label, "refused").inc()
                    failure = GatewayError(
                        503,
                        f"model {entry.label} is busy: its backends refused the request "
                        f"({upstream.status} {upstream.reason})",
                        "backend_busy",
                        retry_after=RETRY_AFTER,
                    )
                    continue
                try:
                    return await self._relay(request, upstream, entry)
                finally:
                    upstream.release()  # pools a fully read connection; mid-stream it drops it, stopping the engine
            finally:
                if release_adapter is not None:
                    release_adapter()
                self.balancer.release(ep)
                gauge.dec()

    async def _relay(self, request: web.Request, upstream: Response, entry: ModelEntry) -> web.StreamResponse:
        request[rs.ANSWERED] = True
        meter: Optional[Meter] = request.get(rs.METER)  # token metering (metering.py): reads, may drop its event
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY and not upstream.chunked:
            # A small complete answer (non-streaming completion, /v1/models): one write carries headers and body,
            # instead of a syscall for the headers and another for the body.
            try:
                body = await upstream.read()
            except UpstreamError as e:
                log.warning("%s: upstream failed mid-response: %s", entry.label, e)
                raise GatewayError(502, f"model {entry.label} failed: {type(e).__name__}", "bad_gateway") from None
            if meter is not None:
                meter.whole(body)
            small = web.Response(status=upstream.status, reason=upstream.reason, body=body)
            for k, v in upstream.headers:
                if k.lower() not in HOP_BY_HOP:
                    small.headers.add(k, v)
            return small
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers:
            if k.lower() not in HOP_BY_HOP:
                resp.headers.add(k, v)
        if upstream.content_length is not None and not upstream.chunked:
            resp.content_length = upstream.content_length
            if meter is not None:
                meter.strip = False  # a declared length: the bytes go out as they came
        try:
            await resp.prepare(request)
            async for chunk in upstream.chunks():
                if meter is not None:
                    chunk = meter.feed(chunk)
                    if not chunk:
                        continue
                if not await self._write(request, resp, chunk):
                    return resp
            if meter is not None:
                rest = meter.finish()
                if rest and not await self._write(request, resp, rest):
                    return resp
            await resp.write_eof()
        except ConnectionResetError:
            _client_gone(request)
        except UpstreamError as e:
            # The backend died or went silent mid-stream. Closing the client connection (no final chunk) tells the
            # client the answer is truncated; a clean end would pass a half answer off as whole. An event stream
            # first gets an error event in OpenAI's shape: SDKs raise on it, where a bare cut reads as a network blip.
            log.warning("%s: upstream failed mid-response: %s", entry.label, type(e).__name__)
            if _is_event_stream(upstream):
                with contextlib.suppress(ConnectionResetError, asyncio.TimeoutError):
                    async with asyncio.timeout(self.idle_timeout):
                        await resp.write(_stream_error(entry, e))
            _drop(request)
        return resp

    async def _write(self, request: web.Request, resp: web.StreamResponse, chunk: bytes) -> bool:
        try:
            async with asyncio.timeout(self.idle_timeout):  # a client that stops reading must not pin us forever
                await resp.write(chunk)
            return True
        except (ConnectionResetError, asyncio.TimeoutError):
            _client_gone(request)
            return False


def _is_event_stream(upstream: Response) -> bool:
    return any(k.lower() == "content-type" and v.lower().startswith("text/event-stream") for k, v in upstream.headers)


def _stream_error(entry: ModelEntry, e: Exception) -> bytes:
    """The SSE event OpenAI's API sends when a stream fails after it began: `data: {"error": {...}}`."""
    detail = "it stopped answering" if isinstance(e, UpstreamTimeout) else "its connection closed"
    return (
        b"data: "
        + json.dumps(
            {
                "error": {
                    "message": f"model {entry.label} failed mid-stream ({detail}); the answer above is incomplete",
                    "type": "server_error",
                    "param": None,
                    "code": "upstream_failed_mid_stream",
                }
            }
        ).encode()
        + b"\n\n"
    )


def _client_gone(request: web.Request) -> None:
    # Returning (not raising) lets aiohttp finish quietly; the caller's finally drops the upstream connection.
    request[rs.CLIENT_GONE] = True
    _drop(request)


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()

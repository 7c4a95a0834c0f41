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
from typing import Callable, Sequence

from aiohttp import web

from modelservice.gateway.balancer import Balancer
from modelservice.gateway.deadline import within
from modelservice.gateway import reqstate as rs
from modelservice.gateway.errors import GatewayError
from modelservice.gateway.metrics import Metrics
from modelservice.gateway.routes import Endpoint, ModelEntry
from modelservice.gateway.upstream import ConnectError, Response, UpstreamError, UpstreamPool, UpstreamTimeout

log = logging.getLogger("modelservice.gateway.proxy")
MAX_ATTEMPTS = 3
SMALL_BODY = 64 * 1024  # answers up to this size are relayed in one write
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "host", "content-length",
                        "expect"})  # we hold the whole body already; a 100-continue handshake upstream only adds a trip


def make_pool(connect_timeout: float, read_timeout: float) -> UpstreamPool:
    return UpstreamPool(connect_timeout=connect_timeout, read_timeout=read_timeout, keepalive_timeout=15)


def upstream_headers(request: web.BaseRequest, *, strip_authorization: bool) -> list[tuple[str, str]]:
    named = {h.strip().lower() for h in request.headers.get("Connection", "").split(",")}
    out = [(k, v) for k, v in request.headers.items()
           if k.lower() not in HOP_BY_HOP and k.lower() not in named
           and not (strip_authorization and k.lower() == "authorization")]
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

    async def forward(self, request: web.Request, entry: ModelEntry, body: bytes, path: str,
                      endpoints: Callable[[], Sequence[Endpoint]], *, strip_authorization: bool) -> web.StreamResponse:
        """Send to the least-loaded ready endpoint; on a connect failure try another (nothing was sent yet)."""
        headers = upstream_headers(request, strip_authorization=strip_authorization)
        tried: set[Endpoint] = set()
        last_error = "no ready endpoint"
        for _ in range(MAX_ATTEMPTS):
            ep = self.balancer.pick(endpoints(), exclude=tried)
            if ep is None:
                break
            tried.add(ep)
            self.balancer.acquire(ep)
            try:
                started = time.monotonic()
                try:
                    upstream = await self.pool.request(request.method, ep.address, ep.port, path, headers, body)
                except ConnectError as e:
                    last_error = str(e)
                    log.info("%s: %s unreachable, trying another endpoint: %s", entry.label, ep.base_url, last_error)
                    continue
                except UpstreamTimeout:
                    raise GatewayError(504, f"model {entry.label} did not answer in time", "upstream_timeout") from None
                except UpstreamError as e:
                    log.warning("%s: %s failed: %s", entry.label, ep.base_url, e)
                    raise GatewayError(502, f"model {entry.label} failed before answering", "bad_gateway") from None
                self.metrics.child(self.metrics.upstream_latency, entry.label).observe(time.monotonic() - started)
                request[rs.ENDPOINT] = ep
                try:
                    return await self._relay(request, upstream, entry)
                finally:
                    upstream.release()  # pools a fully read connection; mid-stream it drops it, stopping the engine
            finally:
                self.balancer.release(ep)
        if tried:
            request[rs.REFUSED] = frozenset(tried)  # every one refused: the caller may wait for replacements
            raise GatewayError(502, f"model {entry.label}: no backend accepted the connection ({last_error})",
                               "backend_unreachable")
        raise GatewayError(503, f"model {entry.label} has no ready backend", "no_backend", retry_after=5)

    async def _relay(self, request: web.Request, upstream: Response, entry: ModelEntry) -> web.StreamResponse:
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY and not upstream.chunked:
            # A small complete answer (non-streaming completion, /v1/models): one write carries headers and body,
            # instead of a syscall for the headers and another for the body.
            try:
                body = await upstream.read()
            except UpstreamError as e:
                log.warning("%s: upstream failed mid-response: %s", entry.label, e)
                raise GatewayError(502, f"model {entry.label} failed: {type(e).__name__}", "bad_gateway") from None
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
        try:
            await resp.prepare(request)
            async for chunk in upstream.chunks():
                if not await self._write(request, resp, chunk):
                    return resp
            await resp.write_eof()
        except ConnectionResetError:
            _client_gone(request)
        except UpstreamError as e:
            # The backend died or went silent mid-stream. Closing the client connection (no final chunk) tells the
            # client the answer is truncated; a clean end would pass a half answer off as whole. An event stream
            # first gets an error event in OpenAI's shape: SDKs raise on it, where a bare cut reads as a network blip.
            log.warning("%s: upstream failed mid-response: %s", entry.label, type(e).__name__)
            request[rs.UPSTREAM_ABORTED] = True
            if _is_event_stream(upstream):
                with contextlib.suppress(ConnectionResetError, asyncio.TimeoutError):
                    async with within(self.idle_timeout):
                        await resp.write(_stream_error(entry, e))
            _drop(request)
        return resp

    async def _write(self, request: web.Request, resp: web.StreamResponse, chunk: bytes) -> bool:
        try:
            async with within(self.idle_timeout):  # a client that stops reading must not pin us forever
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
    return b"data: " + json.dumps({"error": {
        "message": f"model {entry.label} failed mid-stream ({detail}); the answer above is incomplete",
        "type": "server_error", "param": None, "code": "upstream_failed_mid_stream"}}).encode() + b"\n\n"


def _client_gone(request: web.Request) -> None:
    # Returning (not raising) lets aiohttp finish quietly; the caller's finally drops the upstream connection.
    request[rs.CLIENT_GONE] = True
    _drop(request)


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()

"""The floor of a Python data plane: the least a proxy in front of one model can do, for the data-plane decision.

    python -m bench.proxy_floor {aiohttp,asyncio} PORT UPSTREAM_HOST:PORT

Each request: read the body, parse it as JSON (a model router must read `model`), send it upstream with the
product's own upstream client (modelservice.gateway.upstream: pooled keep-alive connections, answers parsed by
httptools), relay the answer in one write (headers and body), dropping the hop-by-hop headers the gateway drops. Nothing
else: no routing table, no auth, metering, activity, metrics or access log. The gateway bench (bench/gateway_bench.py) runs both beside the gateway, vllm-router and Envoy, so the
same run says how far the gateway's own work is from the floor, and whether any Python proxy could reach
vllm-router's requests per CPU-second (issue 14; docs/benchmarks.md, "The data-plane decision").

- `aiohttp`: aiohttp's web server (what the gateway runs on) with one handler.
- `asyncio`: asyncio.Protocol with httptools' request parser, no web framework (what uvicorn's fast path is made of).

A measuring instrument, not a product: small non-streaming answers only (Content-Length, no chunked relay), no
pipelining, errors close the connection.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, Optional

import httptools

from modelservice.gateway.proxy import HOP_BY_HOP
from modelservice.gateway.upstream import UpstreamPool


def _pool() -> UpstreamPool:
    return UpstreamPool(connect_timeout=5.0, read_timeout=60.0, keepalive_timeout=4.0)


async def _exchange(
    pool: UpstreamPool, upstream: tuple[str, int], path: str, headers: list[tuple[str, str]], body: bytes
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """The upstream exchange both floors share: (status, reason, headers to relay, body)."""
    json.loads(body).get("model")  # the one thing a model router must read
    hs = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    r = await pool.request("POST", upstream[0], upstream[1], path, hs, body)
    try:
        data = await r.read()
    finally:
        r.release()
    return r.status, r.reason, [(k, v) for k, v in r.headers if k.lower() not in HOP_BY_HOP], data


class _Connection(asyncio.Protocol):
    """One client connection of the asyncio floor: parse a request, forward it, write the answer, read the next."""

    def __init__(self, pool: UpstreamPool, upstream: tuple[str, int]):
        self.pool, self.upstream = pool, upstream
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()  # one request at a time per connection
        url, headers, body = self.url.decode("latin-1"), self.headers, b"".join(self.body)
        self.url, self.headers, self.body = b"", [], []
        asyncio.get_running_loop().create_task(self._answer(url, headers, body))

    async def _answer(self, url: str, headers: list[tuple[str, str]], body: bytes) -> None:
        assert self.transport is not None
        try:
            status, reason, relay, data = await _exchange(self.pool, self.upstream, url, headers, body)
            head = [f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")]
            head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in relay]
            head.append(b"Content-Length: %d\r\n\r\n" % len(data))
            self.transport.write(b"".join(head) + data)  # one write, as the gateway's small answers
            self.transport.resume_reading()
        except Exception:  # noqa: BLE001 - an instrument: a failed request closes its connection, the run counts it
            self.transport.close()


async def serve_asyncio(port: int, upstream: tuple[str, int]) -> None:
    pool = _pool()
    server = await asyncio.get_running_loop().create_server(
        lambda: _Connection(pool, upstream), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def serve_aiohttp(port: int, upstream: tuple[str, int]) -> None:
    from aiohttp import web

    state: dict[str, Any] = {}

    async def start(_: web.Application) -> None:
        state["pool"] = _pool()

    async def handler(request: web.Request) -> web.Response:
        # As the gateway relays a small answer: one web.Response, headers and body in one write.
        status, reason, headers, body = await _exchange(
            state["pool"], upstream, request.raw_path, list(request.headers.items()), await request.read()
        )
        resp = web.Response(status=status, reason=reason, body=body)
        for k, v in headers:
            resp.headers.add(k, v)
        return resp

    app = web.Application()
    app.router.add_post("/{path:.*}", handler)
    app.on_startup.append(start)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


def main(argv: list[str]) -> None:
    mode, port, target = argv[0], int(argv[1]), argv[2]
    host, _, up_port = target.rpartition(":")
    upstream = (host, int(up_port))
    if mode == "asyncio":
        asyncio.run(serve_asyncio(port, upstream))
    elif mode == "aiohttp":
        serve_aiohttp(port, upstream)
    else:
        raise SystemExit(f"unknown mode {mode!r}: aiohttp or asyncio")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The hop to model pods: keep-alive HTTP/1.1 connections per endpoint, answers parsed by httptools (llhttp, C).

aiohttp's ClientSession was about half of the gateway's CPU per proxied request in `make bench` (a multidict of
headers rebuilt per request, a payload registry, tracing hooks, a timer per read). This hop needs none of that: the
gateway already holds the request body, so it sends head and body in one write and relays the answer's bytes as
they arrive. Pooling, flow control and timeouts are all there is to it.
"""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict, deque
from typing import AsyncIterator, Optional, cast

import httptools

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info (linux/tcp.h)
HIGH_WATER = 256 * 1024  # unread answer bytes at which we stop reading from the pod (a slow client)
LOW_WATER = 64 * 1024
MAX_IDLE_PER_ENDPOINT = 256


class UpstreamError(Exception):
    """The pod failed while answering; the client may have seen part of the answer."""


class NotSent(UpstreamError):
    """No byte of the request left the gateway: the connection could not be made, or the first write failed. The pod
    cannot have seen the request, so it may go to another endpoint (docs/reliability.md, "One replay rule")."""


class Unread(NotSent):
    """The pod reset the connection before any byte of an answer. Linux resets (RST) a connection closed with bytes
    still unread in its receive queue, and closes it (FIN) otherwise: the engine dropped the request without reading
    all of it, as a server shutting down does with a connection it has not started on. So it cannot have acted on it
    either, and it may go to another endpoint like NotSent. (An engine that read a request and then closed with
    SO_LINGER 0 would be mistaken for this; none of the engines we render does.)"""


class UpstreamTimeout(UpstreamError):
    """The pod went silent for longer than the read timeout."""


class Response:
    """One answer. Read it with read() or chunks(), then release() it (always: it returns or drops the connection)."""

    def __init__(self, conn: "_Conn", method: str, read_timeout: float):
        self._conn, self._method, self._read_timeout = conn, method, read_timeout
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: Optional[int] = None
        self.chunked = False
        self.received = False  # any byte of the answer arrived
        self.done = False
        self._reason = bytearray()
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_done = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._error: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future[None]] = None

    # -- fed by the connection's parser ------------------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self.received = True
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._conn.parser.get_status_code()
        self.reason = self._reason.decode("latin-1")
        for name, value in self._raw_headers:
            k, v = name.decode("latin-1"), value.decode("utf-8", "replace")
            low = k.lower()
            if low == "content-length" and v.strip().isdigit():
                self.content_length = int(v)
            elif low == "transfer-encoding" and "chunked" in v.lower():
                self.chunked = True
            self.headers.append((k, v))
        self._head_done = True
        if self._method == "HEAD":  # no body follows, whatever Content-Length says; the parser can't know that
            self.done = True
            self._conn.keep_alive = False
        self._wake()

    def on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self._conn.keep_alive = self._conn.keep_alive and self._conn.parser.should_keep_alive()
        self._wake()

    def lost(self, exc: Optional[BaseException]) -> None:
        if self.done:
            return
        if self._head_done and self.content_length is None and not self.chunked:
            self.done = True  # an answer delimited by the connection's end (HTTP/1.0 style) is complete
        elif not self.received and isinstance(exc, ConnectionResetError):
            self._error = Unread(f"the pod reset the connection with the request unread ({exc})")
        elif not self.received:
            # The request was written: the pod may have read it and died working on it. Not NotSent.
            self._error = UpstreamError(f"the pod closed the connection before answering ({exc or 'EOF'})")
        else:
            self._error = UpstreamError(f"the pod closed the connection mid-answer ({exc or 'EOF'})")
        self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- read by the proxy -------------------------------------------------------------------------------------
    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(self._read_timeout, self._timed_out, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._error = UpstreamTimeout(f"the pod sent nothing for {self._read_timeout:g}s")
            waiter.set_result(None)

    async def head(self) -> None:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked encoding removed), until the end of the answer."""
        while True:
            while self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._paused and self._buffered < LOW_WATER:
                    self._paused = False
                    self._conn.transport.resume_reading()
                yield data
            if self.done:
                return
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        """A fully read answer leaves its connection in the pool; anything else closes it (an unfinished stream:
        closing is how the engine learns that nobody is listening any more)."""
        self._conn.finished(reusable=self.done and self._error is None and not self._chunks)


class _Conn(asyncio.Protocol):
    def __init__(self, pool: "UpstreamPool", key: tuple[str, int]):
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.parser = httptools.HttpResponseParser(self)
        self.response: Optional[Response] = None
        self.keep_alive = True
        self.closed = False
        self.idle_timer: Optional[asyncio.TimerHandle] = None

    # parser callbacks, forwarded to the answer in progress. The parser runs only inside data_received, which feeds
    # it only while self.response is set: hence the union-attr ignores (no check on the per-chunk path).
    def on_status(self, reason: bytes) -> None:
        self.response.on_status(reason)  # type: ignore[union-attr]  # set: see above

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.on_header(name, value)  # type: ignore[union-attr]  # set: see above

    def on_headers_complete(self) -> None:
        self.response.on_headers_complete()  # type: ignore[union-attr]  # set: see above

    def on_body(self, data: bytes) -> None:
        self.response.on_body(data)  # type: ignore[union-attr]  # set: see above

    def on_message_complete(self) -> None:
        self.response.on_message_complete()  # type: ignore[union-attr]  # set: see above

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's: asyncio types it as the base

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None or resp.done:  # bytes nobody asked for: this connection can't be trusted any more
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            resp.fail(UpstreamError(f"the pod sent a malformed answer: {e}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.response is not None:
            self.response.lost(exc)
        else:
            self.pool.discard(self)

    def close(self) -> None:
        self.keep_alive = False
        if not self.closed:
            self.closed = True
            self.transport.close()

    def peer_gone(self) -> bool:
        """The pod closed (FIN) or reset this idle connection, as the kernel knows it now: asyncio learns of it only
        on the loop's next poll, and a request written in between would be lost with no way to tell whether the pod
        read it. Linux only (TCP_INFO); elsewhere what asyncio has seen (`closed`) is all we know."""
        if self.closed:
            return True
        if _TCP_INFO is None:
            return False
        try:
            return bool(
                self.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
                != _TCP_ESTABLISHED
            )
        except (OSError, AttributeError):
            return False

    def send(self, data: bytes, method: str, read_timeout: float) -> Response:
        self.response = Response(self, method, read_timeout)
        self.transport.write(data)
        if self.transport.is_closing():
            # write() tries send() at once; only its failure closes the transport, and a failed send() took no byte.
            self.closed = True
            raise NotSent("the pod's connection failed before the request was written")
        return self.response

    def finished(self, *, reusable: bool) -> None:
        if reusable and self.keep_alive and not self.closed:
            self.response = None
            self.pool.put(self)
        else:
            self.close()


class UpstreamPool:
    def __init__(self, *, connect_timeout: float, read_timeout: float, keepalive_timeout: float = 15.0):
        self.connect_timeout, self.read_timeout, self.keepalive_timeout = (
            connect_timeout,
            read_timeout,
            keepalive_timeout,
        )
        self._idle: dict[tuple[str, int], list[_Conn]] = defaultdict(list)

    async def request(
        self, method: str, host: str, port: int, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> Response:
        """Send the request once and wait for the answer's head. NotSent: the pod cannot have seen it; any other
        UpstreamError: it may have. Never retries: that is the proxy's one decision (proxy.py)."""
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {netloc}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
        key = (host, port)
        conn = self._take(key) or await self._connect(key)
        return await self._exchange(conn, data, method)

    async def _exchange(self, conn: _Conn, data: bytes, method: str) -> Response:
        try:
            resp = conn.send(data, method, self.read_timeout)
            await resp.head()
        except BaseException:
            conn.close()
            raise
        return resp

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self, key), *key), self.connect_timeout
            )
        except asyncio.TimeoutError:
            raise NotSent(f"connect to {key[0]}:{key[1]} timed out after {self.connect_timeout:g}s") from None
        except OSError as e:
            raise NotSent(f"connect to {key[0]}:{key[1]} failed: {e.strerror or e}") from None
        return conn

    def _take(self, key: tuple[str, int]) -> Optional[_Conn]:
        """An idle connection the pod has not closed, if any: one it closed while idle (its keep-alive timeout) is
        dropped here, before a byte is written to it, so its loss costs no attempt."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if not conn.peer_gone():
                return conn
            conn.close()
        return None

    def put(self, conn: _Conn) -> None:
        idle = self._idle[conn.key]
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        idle.append(conn)
        conn.idle_timer = asyncio.get_running_loop().call_later(self.keepalive_timeout, self._expire, conn)

    def _expire(self, conn: _Conn) -> None:
        conn.idle_timer = None
        self.discard(conn)
        conn.close()

    def discard(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    async def close(self) -> None:
        for idle in list(self._idle.values()):
            for conn in idle:
                if conn.idle_timer is not None:
                    conn.idle_timer.cancel()
                conn.close()
        self._idle.clear()

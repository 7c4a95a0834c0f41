"""The gateway's hop to pods (upstream.py) against raw sockets that misbehave on purpose: stale keep-alive
connections, answers delimited by EOF, HEAD, garbage, silence, a slow reader, a port nobody listens on.

The pool never retries: each branch here says whether the pod can have seen the request (NotSent or not), which is
what the proxy's one replay rule decides on (test_gateway_replay.py)."""

import asyncio
import contextlib
import select
import socket
import threading
import time

import pytest

from modelservice.gateway import upstream
from modelservice.gateway.upstream import NotSent, Unread, UpstreamError, UpstreamPool, UpstreamTimeout
from tests.unit.loop_clock import FrozenLoopClock, settle, until


@contextlib.asynccontextmanager
async def raw_server(handler):
    """handler(reader, writer, n): n counts connections from 1."""
    count = 0

    async def on_conn(reader, writer):
        nonlocal count
        count += 1
        try:
            await handler(reader, writer, count)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], lambda: count
    finally:
        server.close()


async def read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def pool(**kw) -> UpstreamPool:
    return UpstreamPool(connect_timeout=kw.get("connect", 2.0), read_timeout=kw.get("read", 5.0))


async def fetch(p: UpstreamPool, port: int, method: str = "POST", body: bytes = b"{}") -> tuple[int, bytes]:
    resp = await p.request(method, "127.0.0.1", port, "/v1/x?q=1", [("X-Test", "1")], body)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


async def test_keep_alive_connection_is_reused_and_request_is_sent_whole():
    seen = []

    async def handler(reader, writer, n):
        while True:
            seen.append(await read_request(reader))
            writer.write(ok(b"hello"))
            await writer.drain()

    async def scenario():
        async with raw_server(handler) as (port, conns):
            p = pool()
            assert await fetch(p, port) == (200, b"hello")
            assert await fetch(p, port) == (200, b"hello")
            assert conns() == 1
            await p.close()
        return port

    port = await scenario()
    assert seen[0] == (
        b"POST /v1/x?q=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Test: 1\r\nContent-Length: 2\r\n\r\n{}" % port
    )


class BlockingPod:
    """A pod on a plain socket in a thread, so the test decides when it closes a connection while the event loop is
    not running (asyncio then cannot have noticed the close: only the kernel knows)."""

    def __init__(self, how: str = "fin"):
        self.how = how  # after one answer: "fin" closes, "rst" resets (SO_LINGER 0)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.close_now, self.closed = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while b"{}" not in data:  # every request here carries the body {}
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if not data:
                    continue
                self.requests.append(data)
                conn.sendall(ok(b"answer%d" % len(self.requests)))
                if not self.close_now.wait(10):
                    continue
                if self.how == "rst":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.closed.set()
            self.close_now.clear()

    def close_pooled(self, p: UpstreamPool) -> "upstream._Conn":
        """Close the pod's side of the one pooled connection and block (the loop does not run) until our kernel
        knows; returns that connection, which asyncio still takes for open."""
        (conn,) = [c for idle in p._idle.values() for c in idle]
        self.close_now.set()
        assert self.closed.wait(10)
        for _ in range(1000):  # bounded; the kernel usually knows by the time close() returned
            if conn.peer_gone():
                break
            time.sleep(0.01)
        assert conn.peer_gone() and not conn.closed
        return conn

    def stop(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_pooled_connection_the_pod_closed_is_never_written_to(how):
    """The pod closed an idle keep-alive connection (its keep-alive timeout is shorter than ours) and asyncio has
    not noticed yet: the pool must not write the request into it (the pod could not be shown not to have read it);
    it takes a fresh connection, and the pod gets the request exactly once."""
    pod = BlockingPod(how)

    async def scenario():
        p = pool()
        assert await fetch(p, pod.port) == (200, b"answer1")
        pod.close_pooled(p)
        assert await fetch(p, pod.port) == (200, b"answer2")  # a new connection, the same single try
        await p.close()

    try:
        await scenario()
    finally:
        pod.stop()
    assert len(pod.requests) == 2


async def test_a_connection_reset_before_the_write_is_not_sent():
    """The first write fails at once (the socket was reset): no byte left, so NotSent, whatever asyncio knew."""
    pod = BlockingPod("rst")

    async def scenario():
        p = pool()
        assert await fetch(p, pod.port) == (200, b"answer1")
        conn = pod.close_pooled(p)
        p._idle.clear()
        with pytest.raises(NotSent):
            await p._exchange(conn, b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", "POST")
        await p.close()

    try:
        await scenario()
    finally:
        pod.stop()
    assert len(pod.requests) == 1


async def test_a_pod_that_reads_the_request_and_closes_may_have_seen_it():
    """Closed after the request was written, before any byte of an answer: not NotSent (the pod may have started on
    it), and the pool does not send it again."""

    async def handler(reader, writer, n):
        await read_request(reader)

    async with raw_server(handler) as (port, conns):
        p = pool()
        with pytest.raises(UpstreamError) as e:
            await fetch(p, port)
        assert not isinstance(e.value, NotSent)
        assert conns() == 1
        await p.close()


async def test_a_pod_that_closes_with_the_request_unread_cannot_have_seen_it():
    """An engine shutting down closes the connections it has not started on, with our request in its receive queue:
    its kernel resets the connection (RST), which says the engine never read all of it. Unread, a NotSent: the proxy
    may send it elsewhere. (The test before this one is the other side: read, then closed, so FIN, so not NotSent.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    closed = threading.Event()

    def drop_unread() -> None:
        conn, _ = listener.accept()
        select.select([conn], [], [], 10)  # the request has arrived; not a byte of it is read
        conn.close()
        closed.set()

    threading.Thread(target=drop_unread, daemon=True).start()
    p = pool()
    try:
        with pytest.raises(Unread, match="reset the connection with the request unread"):
            await fetch(p, listener.getsockname()[1])
        assert closed.wait(10)  # the reset came from that close (its thread may not have run its next line yet)
    finally:
        await p.close()
        listener.close()


async def test_answer_delimited_by_eof_and_chunked_answer():
    async def handler(reader, writer, n):
        await read_request(reader)
        if n == 1:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        await writer.drain()

    async with raw_server(handler) as (port, _):
        p = pool()
        assert await fetch(p, port) == (200, b"until the end")
        resp = await p.request("GET", "127.0.0.1", port, "/", [], b"")
        assert resp.chunked and resp.content_length is None
        assert await resp.read() == b"abcde"
        resp.release()
        await p.close()


async def test_head_answer_does_not_wait_for_a_body():
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async with raw_server(handler) as (port, _):
        p = pool(read=3)
        resp = await p.request("HEAD", "127.0.0.1", port, "/", [], b"")
        assert resp.status == 200 and resp.content_length == 100
        assert await resp.read() == b""
        resp.release()
        await p.close()


async def test_garbage_silence_and_refusal_are_distinct_errors():
    """On a frozen loop clock (loop_clock.py), so garbage is told from silence by what the pod sent, never by how
    fast a busy machine delivered it: the read timeout fires only when the test moves the clock past it."""
    silent_got_request = asyncio.Event()

    async def garbage(reader, writer, n):
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()  # then nothing, until the client hangs up

    async def silent(reader, writer, n):
        await read_request(reader)
        silent_got_request.set()
        await reader.read()

    async with FrozenLoopClock() as clock:
        p = pool(read=0.3)
        async with raw_server(garbage) as (port, _):
            with pytest.raises(UpstreamError) as e:
                await fetch(p, port)  # the clock stands still: only the answer can end this
            assert not isinstance(e.value, (NotSent, UpstreamTimeout))
        async with raw_server(silent) as (port, _):
            answer = asyncio.ensure_future(fetch(p, port))
            await until(silent_got_request.is_set, message="the silent pod to read the request")
            await settle()  # the client is waiting for the head, its read timer armed
            await clock.advance(0.29)
            assert not answer.done()
            await clock.advance(0.02)
            with pytest.raises(UpstreamTimeout):
                await answer
        with socket.socket() as s:  # a port that was free a moment ago: nobody listens
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        with pytest.raises(NotSent):
            await fetch(p, free)
        await p.close()


async def test_death_mid_answer_is_an_error_not_a_short_answer():
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async with raw_server(handler) as (port, _):
        p = pool()
        with pytest.raises(UpstreamError) as e:
            await fetch(p, port)
        assert not isinstance(e.value, NotSent)  # the pod saw the request: not safe to send elsewhere
        await p.close()


async def test_slow_reader_pauses_the_pod_instead_of_buffering_everything():
    total = 8 * 1024 * 1024

    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()

    async def scenario():
        async with raw_server(handler) as (port, _):
            p = pool()
            resp = await p.request("GET", "127.0.0.1", port, "/", [], b"")
            got, peak = 0, 0
            async for chunk in resp.chunks():
                got += len(chunk)
                peak = max(peak, resp._buffered)
                await asyncio.sleep(0.001)
            resp.release()
            await p.close()
            return got, peak

    got, peak = await scenario()
    assert got == total
    # Bounded by the high-water mark plus what the socket hands over in the read that crosses it.
    assert peak < upstream.HIGH_WATER + 512 * 1024

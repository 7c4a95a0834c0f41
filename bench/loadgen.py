"""Load generators, loopback only, every loop bounded in count and in time.

- wrk (Debian package `wrk`, C, microsecond histogram): closed loop on `concurrency` keep-alive connections for a
  fixed time (-d); each thread also stops after its share of a request cap (Lua), so both count and time are bounded.
- an asyncio/aiohttp client: the same closed loop, for machines without wrk, and for SSE streams (token counting).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import aiohttp

from bench.stats import summary

LOOPBACK_PREFIXES = ("127.", "localhost", "[::1]")


def check_loopback(url: str) -> None:
    """Refuse any target that is not on this machine's loopback range."""
    host = urlsplit(url).hostname or ""
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        raise ValueError(f"refusing to send load to {url}: benchmarks target loopback addresses only")


@dataclass
class LoadResult:
    engine: str
    requests: int  # completed with a 2xx
    errors: int
    seconds: float
    latency: dict[str, Optional[float]]  # summary(): p50/p95/p99/mean/max in seconds
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.seconds,
            "throughput_rps": self.requests / self.seconds if self.seconds else 0.0,
            "latency": self.latency,
            **self.extra,
        }


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


_WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
%(headers)s
local limit = %(limit)d
local count = 0
%(delay)s
function response(status, headers, body)
  count = count + 1
  if count >= limit then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,' ..
    '"p50":%%d,"p95":%%d,"p99":%%d,"mean":%%f,"max":%%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_run(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    max_requests: int,
    headers: Optional[dict[str, str]] = None,
    delay_ms: int = 0,
) -> LoadResult:
    """wrk -c concurrency -d seconds; a thread that reaches its share of max_requests stops early. delay_ms: each
    connection waits that long after a response before its next request (wrk's delay() hook): an offered load of
    about concurrency / (delay + latency) requests per second, the same whatever the proxy's capacity."""
    check_loopback(url)
    threads = max(1, min(2, concurrency))
    per_thread = max(1, max_requests // threads)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
        delay = f"function delay() return {int(delay_ms)} end" if delay_ms > 0 else ""
        f.write(_WRK_SCRIPT % {"body": body.decode(), "limit": per_thread, "headers": extra, "delay": delay})
        script = f.name
    try:
        cmd = [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(concurrency),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            script,
            url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    finally:
        Path(script).unlink(missing_ok=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line[len("BENCH ") :])
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    us = 1e-6
    lat = {
        "n": r["requests"],
        "p50": r["p50"] * us,
        "p95": r["p95"] * us,
        "p99": r["p99"] * us,
        "mean": r["mean"] * us,
        "max": r["max"] * us,
    }
    return LoadResult("wrk", r["requests"] - r["status"], errors, r["duration_us"] * us, lat)


async def closed_loop(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    max_requests: int,
    extra_headers: Optional[dict[str, str]] = None,
) -> LoadResult:
    """`concurrency` workers on keep-alive connections send POSTs for `seconds` (at most `max_requests`)."""
    check_loopback(url)
    latencies: list[float] = []
    errors = 0
    issued = 0
    total = max_requests
    deadline = time.monotonic() + seconds
    headers = {"Content-Type": "application/json", **(extra_headers or {})}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:

        async def worker() -> None:
            nonlocal issued, errors
            while issued < total and time.monotonic() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    async with s.post(url, data=body, headers=headers) as r:
                        await r.read()
                        ok = 200 <= r.status < 300
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.monotonic() - t0
    return LoadResult("python", len(latencies), errors, seconds, summary(latencies))


def latency_run(
    engine: str,
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    max_requests: int,
    headers: Optional[dict[str, str]] = None,
) -> LoadResult:
    if engine == "wrk":
        return wrk_run(url, body, concurrency, seconds, max_requests, headers)
    return asyncio.run(closed_loop(url, body, concurrency, seconds, max_requests, headers))


@dataclass
class StreamStats:
    started: float
    first: Optional[float] = None  # first token's arrival
    ended: Optional[float] = None
    tokens: int = 0
    ok: bool = False


def count_tokens(data: bytes) -> int:
    """Tokens in an SSE body from the stub: each token's text is `token<k>` (see tests/cluster/stub_server.py)."""
    return data.count(b"token")


async def streams(
    url: str,
    body: bytes,
    concurrency: int,
    total: int,
    max_seconds: float,
    expected_tokens: int,
    headers: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """`total` streaming requests, `concurrency` at a time; tokens/s delivered over the whole window. A stream is
    complete when all `expected_tokens` arrived."""
    check_loopback(url)
    stats: list[StreamStats] = []
    issued = 0
    deadline = time.monotonic() + max_seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=max_seconds + 10, sock_read=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:

        async def worker() -> None:
            nonlocal issued
            while issued < total and time.monotonic() < deadline:
                issued += 1
                st = StreamStats(time.monotonic())
                stats.append(st)
                tail = b""
                try:
                    async with s.post(
                        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
                    ) as r:
                        if r.status != 200:
                            await r.read()
                            continue
                        async for chunk in r.content.iter_any():
                            data = tail + chunk
                            n = count_tokens(data)  # the 4-byte tail cannot hold a whole "token" by itself
                            if n and st.first is None:
                                st.first = time.monotonic()
                            st.tokens += n
                            tail = data[-4:]  # "token" split across reads is counted once the rest arrives
                        st.ok = st.tokens >= expected_tokens
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    st.ok = False
                st.ended = time.monotonic()

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        t1 = time.monotonic()
    tokens = sum(s.tokens for s in stats)
    return {
        "streams": len(stats),
        "completed": sum(1 for s in stats if s.ok),
        "tokens": tokens,
        "seconds": t1 - t0,
        "tokens_per_second": tokens / (t1 - t0) if t1 > t0 else 0.0,
        "ttft": summary([s.first - s.started for s in stats if s.first is not None]),
        "stream_seconds": summary([s.ended - s.started for s in stats if s.ended is not None]),
    }

"""Quotas: requests and tokens per minute per tenant, enforced before a request reaches an engine.

Each gateway replica enforces its share: limit / `share` (the number of gateway replicas, from the chart), with a
token bucket per tenant for requests and one for tokens (capacity: one minute's share; refilled continuously). No
shared state, no write per request: a load balancer that spreads a tenant's requests evenly gives it the whole limit;
an uneven spread throttles it early (under-serving), never past the limit. A replica that restarts starts with full
buckets: at most one minute's share more per restart.

Tokens are known only at the end, so the gateway reserves at admission (a prompt estimate, the body's bytes / 4, plus
`max_tokens` or `max_completion_tokens`, else --quota-default-max-tokens) and settles to the engine's usage when the
answer ends (refund or debt: the bucket may go below zero, and the next requests wait for it). Over a minute the
tenant gets its tokens per minute; the overshoot at any moment is bounded by what in-flight requests under-reserved
(a prompt denser than 4 bytes per token, an answer past the default when the client set no max).

Over quota: 429 in OpenAI's shape with Retry-After and OpenAI's x-ratelimit-* headers; nothing is sent to an engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from aiohttp import web

from modelservice.gateway.errors import GatewayError, error_response

BYTES_PER_TOKEN = 4


@dataclass
class Bucket:
    rate: float  # units per second
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self.at) * self.rate)
        self.at = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` (at most the capacity: a request bigger than a minute's share still passes once
        the bucket is full) is available."""
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate

    def reset(self) -> float:
        return max(0.0, self.capacity - self.level) / self.rate


@dataclass
class Reservation:
    tokens: list[tuple[str, float]]  # (bucket key, tokens reserved from it)


def _duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: 1s, 6m0s, 250ms."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class QuotaExceeded(GatewayError):
    def __init__(self, message: str, retry_after: int, headers: dict[str, str]):
        super().__init__(429, message, "rate_limit_exceeded", retry_after=retry_after)
        self.headers = headers

    def response(self) -> web.Response:
        resp = error_response(self.status, self.message, self.code, retry_after=self.retry_after)
        resp.headers.update(self.headers)
        return resp


class Quotas:
    def __init__(self, share: int = 1, default_max_tokens: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.share = max(1, share)
        self.default_max_tokens = default_max_tokens
        self.clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def _bucket(self, table: dict[str, Bucket], tenant: str, per_minute: int, now: float) -> Bucket:
        capacity = per_minute / self.share
        b = table.get(tenant)
        if b is None or b.capacity != capacity:  # new, or the limit changed: keep what was used, not more
            level = capacity if b is None else min(b.level, capacity)
            b = table[tenant] = Bucket(rate=capacity / 60.0, capacity=capacity, level=level, at=now)
        b.refill(now)
        return b

    def estimate(self, body_len: int, doc: Optional[dict[str, Any]], path: str) -> int:
        """Tokens reserved at admission: the prompt estimated from the body, plus the answer's maximum."""
        prompt = math.ceil(body_len / BYTES_PER_TOKEN)
        if path.endswith("/embeddings") or doc is None:
            return prompt
        most = doc.get("max_completion_tokens") or doc.get("max_tokens")
        return prompt + (most if isinstance(most, int) and most > 0 else self.default_max_tokens)

    def admit(self, tenant: str, rpm: Optional[int], tpm: Optional[int], tokens: int) -> Optional[Reservation]:
        return self.admit_all([(tenant, f"tenant {tenant}", rpm, tpm)], tokens)

    def admit_all(
        self, scopes: list[tuple[str, str, Optional[int], Optional[int]]], tokens: int
    ) -> Optional[Reservation]:
        """Take one request and `tokens` from the buckets of every scope (bucket key, what to call it, requests and
        tokens per minute: the tenant, and the tenant on this model), or raise QuotaExceeded for the scope that
        makes the client wait longest. Nothing is taken unless every scope has room."""
        scopes = [s for s in scopes if s[2] or s[3]]
        if not scopes:
            return None
        now = self.clock()
        buckets = []
        worst: Optional[tuple[float, str, Optional[int], Optional[int], Optional[Bucket], Optional[Bucket]]] = None
        for key, what, rpm, tpm in scopes:
            req = self._bucket(self._requests, key, rpm, now) if rpm else None
            tok = self._bucket(self._tokens, key, tpm, now) if tpm else None
            buckets.append((key, req, tok))
            wait = max(b.wait(n) for b, n in ((req, 1), (tok, tokens)) if b is not None)
            if wait > 0 and (worst is None or wait > worst[0]):
                worst = (wait, what, rpm, tpm, req, tok)
        if worst is not None:
            wait, what, rpm, tpm, req, tok = worst
            retry = max(1, math.ceil(wait))
            raise QuotaExceeded(
                f"{what} is over its quota ({self._limits(rpm, tpm)}); retry in {retry}s",
                retry,
                self._headers(req, tok, rpm, tpm),
            )
        reserved = []
        for key, req, tok in buckets:
            if req is not None:
                req.level -= 1
            if tok is not None:
                take = min(tokens, tok.capacity)
                tok.level -= take
                reserved.append((key, take))
        return Reservation(reserved)

    def settle(self, reservation: Optional[Reservation], used: Optional[int]) -> None:
        """The answer ended: each tokens bucket gets back what was reserved and pays what was used (unknown: the
        reservation stands)."""
        if reservation is None or used is None:
            return
        now = self.clock()
        for key, reserved in reservation.tokens:
            b = self._tokens.get(key)
            if b is not None:
                b.refill(now)
                b.level = min(b.capacity, b.level + reserved - used)

    def _limits(self, rpm: Optional[int], tpm: Optional[int]) -> str:
        return ", ".join(p for p in (f"{rpm} requests/min" if rpm else "", f"{tpm} tokens/min" if tpm else "") if p)

    def _headers(
        self, req: Optional[Bucket], tok: Optional[Bucket], rpm: Optional[int], tpm: Optional[int]
    ) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, b, limit in (("requests", req, rpm), ("tokens", tok, tpm)):
            if b is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(b.level * self.share)))
                out[f"x-ratelimit-reset-{kind}"] = _duration(b.reset())
        return out

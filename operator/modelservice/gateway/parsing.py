"""Reading and inspecting request bodies: size limit while reading, the `model` field, the ollama rewrite."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from modelservice.gateway.errors import GatewayError

READ_CHUNK = 64 * 1024
# A whole body within this, however steadily it trickles: the idle timeout alone would let a client pin a request
# for hours at one byte per idle period. 10 MiB in 5 minutes is 35 KB/s, slower than any real client.
BODY_DEADLINE = 300.0


async def read_body(request: web.Request, max_bytes: int, idle_timeout: float) -> bytes:
    """The whole body, refusing past max_bytes *while* reading: a 1 GB upload costs us at most max_bytes."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise _too_large(max_bytes)
    parts: list[bytes] = []
    size = 0
    if declared:
        # A small JSON body usually arrives with the head: take it without a wait (most requests end here).
        first = request.content.read_nowait(max_bytes + 1)
        if len(first) == declared:
            return first
        size = len(first)
        parts.append(first)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BODY_DEADLINE
    # Bounded: each pass reads >= 1 byte or ends (at most max_bytes + 1 passes), all within BODY_DEADLINE.
    while True:
        wait = min(idle_timeout, deadline - loop.time())
        try:
            async with asyncio.timeout(max(0.0, wait)):
                chunk = await request.content.read(READ_CHUNK)
        except asyncio.TimeoutError:
            raise GatewayError(
                408,
                f"request body too slow: nothing for {idle_timeout:g}s, or not complete within {BODY_DEADLINE:g}s",
                "request_timeout",
            ) from None
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(chunk)


def _too_large(max_bytes: int) -> GatewayError:
    return GatewayError(413, f"request body is larger than {max_bytes} bytes", "request_too_large")


def parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise GatewayError(400, "request body is empty: send a JSON object with a `model` field", "invalid_json")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise GatewayError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(doc, dict):
        raise GatewayError(400, "request body must be a JSON object", "invalid_json")
    return doc


def model_of(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "the `model` field is missing: set it to a name from GET /v1/models", "missing_model")
    return model


def rewrite_model(doc: dict[str, Any], upstream_model: str) -> bytes:
    """ollama knows models by its own tag, not by our served name."""
    return json.dumps({**doc, "model": upstream_model}, separators=(",", ":")).encode()

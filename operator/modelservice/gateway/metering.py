"""Token metering: prompt and completion tokens per tenant and model, from the engine's own `usage`.

Non-streaming answers carry `usage` in their body. A stream carries it only when asked: `prepare` adds
`stream_options.include_usage` to a streaming chat/completions request whose client did not ask, and the Meter then
drops the usage-only event (`"choices": []`) before the client sees it; a client that asked gets it as sent. A stream
cut short (client gone, engine died) has no usage event: its completion tokens are counted as the content events it
carried (engines stream one token per event by default), its prompt tokens as unknown. An answer with no usage at
all is counted as unknown too, never invented (`modelservice_gateway_unmetered_requests_total{reason}`).

The scan is cheap on the hot path: a substring test per chunk; JSON is parsed only for the one event holding usage.
Cardinality: `model` is a known ModelService; `tenant` is one of at most `max_tenants` names (first come), the rest
are summed under `_other` and counted in modelservice_gateway_tenants_aggregated.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("modelservice.gateway.metering")

METERED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
STREAMING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
OTHER_TENANTS = "_other"
_USAGE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')  # usage holds at most one nested object
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')  # not json.loads: ints are all we need from it
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
MAX_CARRY = 64 * 1024  # an incomplete trailing event kept to find a usage object split across chunks
TAIL = 1024  # of a non-streamed body: longer than any usage object


class Meter:
    """What one request's answer said about tokens. feed() each streamed chunk (returns what to pass on)."""

    __slots__ = ("stream", "strip", "prompt", "completion", "events", "done", "_carry")

    def __init__(self, stream: bool, strip: bool = False):
        self.stream, self.strip = stream, strip
        self.prompt: Optional[int] = None
        self.completion: Optional[int] = None
        self.events = 0  # data events seen: the completion tokens of a stream cut before its usage event
        self.done = False  # the answer ended normally (not cut)
        self._carry = b""

    def whole(self, body: bytes) -> None:
        """A complete non-streamed body."""
        self._usage(body)
        self.done = True

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk if self._carry else chunk
        if not self.stream:
            self._usage(data)
            self._carry = data[-TAIL:]  # a usage object split across two chunks is whole in the next scan
            return chunk
        self.events += chunk.count(b"data: {")
        if data is chunk and chunk.endswith(b"\n\n") and b'"usage"' not in chunk:
            return chunk  # the common case (whole events, no usage): no copy, nothing held
        end = data.rfind(b"\n\n")
        complete, rest = (data[: end + 2], data[end + 2 :]) if end >= 0 else (b"", data)
        if self.strip:
            # An incomplete event waits for its end: it may be the usage event the client must not get. (Past
            # MAX_CARRY it is no usage event: it goes on as it is.)
            self._carry, rest = (rest, b"") if len(rest) <= MAX_CARRY else (b"", rest)
            return (self._events(complete) if b'"usage"' in complete else complete) + rest
        self._carry = rest[-MAX_CARRY:]
        if b'"usage"' in complete:
            self._events(complete)
        return chunk

    def finish(self) -> bytes:
        """The stream ended normally: what is still held back (an event without its blank line) goes out."""
        self.done = True
        rest, self._carry = self._carry, b""
        if not self.stream or not rest:
            return b""
        out = self._events(rest) if b'"usage"' in rest else rest
        return out if self.strip else b""  # not stripping: it went out as it came

    def _events(self, data: bytes) -> bytes:
        out = []
        for event in data.split(b"\n\n"):
            if b'"usage"' in event and self._usage(event) and self.strip and _NO_CHOICES.search(event):
                continue  # the client did not ask for the usage event
            out.append(event)
        return b"\n\n".join(out)

    def _usage(self, data: bytes) -> bool:
        found = False
        for m in _USAGE.finditer(data):  # the last usage object wins (a stream's final one)
            usage = m.group(1)
            prompt, completion = _PROMPT.search(usage), _COMPLETION.search(usage)
            if prompt is not None:
                self.prompt = int(prompt.group(1))
                self.completion = int(completion.group(1)) if completion is not None else 0
                found = True
        return found


def prepare(doc: dict[str, Any], path: str) -> tuple[Optional[Meter], bool]:
    """(the request's Meter or None when the path is not metered, whether doc was changed: send it re-encoded)."""
    if path not in METERED_PATHS:
        return None, False
    if doc.get("stream") is not True or path not in STREAMING_PATHS:
        return Meter(stream=False), False
    options = doc.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return Meter(stream=True), False  # the client asked: the usage event is theirs
    if options is not None and not isinstance(options, dict):
        return Meter(stream=True), False  # not ours to fix: the engine says what is wrong with it
    doc["stream_options"] = {**(options or {}), "include_usage": True}
    return Meter(stream=True, strip=True), True


class Metering:
    def __init__(self, registry: CollectorRegistry, max_tenants: int = 100):
        self.max_tenants = max_tenants
        self._labels: set[str] = set()
        labels = ["tenant", "model", "outcome"]
        self.requests = Counter(
            "modelservice_gateway_tenant_requests",
            "Requests by tenant, model and outcome (ok, error, rate_limited, cut).",
            labels,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "modelservice_gateway_prompt_tokens", "Prompt tokens, from the engine's usage.", labels, registry=registry
        )
        self.completion_tokens = Counter(
            "modelservice_gateway_completion_tokens",
            "Completion tokens, from the engine's usage (a cut stream: its content events).",
            labels,
            registry=registry,
        )
        self.unmetered = Counter(
            "modelservice_gateway_unmetered_requests",
            "Requests answered without token counts: no_usage (the engine sent none), "
            "cut (stream cut before its usage: prompt tokens unknown), other_path (not an "
            "OpenAI completion or embedding path).",
            ["tenant", "model", "reason"],
            registry=registry,
        )
        self.aggregated = Gauge(
            "modelservice_gateway_tenants_aggregated",
            f"Tenants past the metrics limit, counted under tenant={OTHER_TENANTS}.",
            registry=registry,
        )
        self._seen_over: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), remembered: labels() takes a lock and builds a key on every call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def tenant_label(self, tenant: str) -> str:
        if tenant in self._labels:
            return tenant
        if len(self._labels) < self.max_tenants:
            self._labels.add(tenant)
            return tenant
        if tenant not in self._seen_over:
            self._seen_over.add(tenant)
            self.aggregated.set(len(self._seen_over))
            if len(self._seen_over) == 1:
                log.warning(
                    "more than %d tenants: the rest are counted as tenant=%s (raise --max-metered-tenants)",
                    self.max_tenants,
                    OTHER_TENANTS,
                )
        return OTHER_TENANTS

    def record(self, tenant: str, model: str, status: int, meter: Optional[Meter], reached_engine: bool) -> None:
        label = self.tenant_label(tenant)
        cut = reached_engine and meter is not None and not meter.done
        outcome = (
            "cut" if cut or status == 499 else "rate_limited" if status == 429 else "ok" if status < 400 else "error"
        )
        self._child(self.requests, label, model, outcome).inc()
        if not reached_engine:
            return
        if meter is None:
            self._child(self.unmetered, label, model, "other_path").inc()
        elif meter.prompt is not None:
            self._child(self.prompt_tokens, label, model, outcome).inc(meter.prompt)
            self._child(self.completion_tokens, label, model, outcome).inc(meter.completion or 0)
        elif cut or status == 499:
            self._child(self.completion_tokens, label, model, outcome).inc(max(0, meter.events))
            self._child(self.unmetered, label, model, "cut").inc()
        elif status < 400:
            self._child(self.unmetered, label, model, "no_usage").inc()

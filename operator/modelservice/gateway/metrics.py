"""Prometheus metrics of the gateway, in their own registry (several gateways can live in one test process).

The `model` label is always namespace/name of a known ModelService, or "" for requests we could not route:
labelling by the client's `model` string would let any caller create unbounded series.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ACTIVATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# Why a try went elsewhere (modelservice_gateway_untouched_tries' reason label; proxy.forward counts them).
UNTOUCHED_REASONS = ("not_sent", "unread", "refused")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "modelservice_gateway_requests",
            "Requests answered, by model and HTTP status.",
            ["model", "code"],
            registry=r,
        )
        self.in_flight = Gauge(
            "modelservice_gateway_in_flight", "Requests being proxied to a backend now.", ["model"], registry=r
        )
        self.held = Gauge(
            "modelservice_gateway_held_requests",
            "Requests waiting for a backend (scale from zero, or no ready endpoint).",
            ["model"],
            registry=r,
        )
        self.scale_requests = Counter(
            "modelservice_gateway_scale_requests",
            "Scale-from-zero calls sent to the API server (one per wake-up, plus retries).",
            ["model"],
            registry=r,
        )
        self.ready_endpoints = Gauge(
            "modelservice_gateway_ready_endpoints",
            "Ready backends the gateway routes to, from EndpointSlices.",
            ["model"],
            registry=r,
        )
        self.invalid_modelservices = Gauge(
            "modelservice_gateway_invalid_modelservices",
            "ModelServices not routed: their spec is invalid (the operator reports them Stalled).",
            registry=r,
        )
        self.activation = Histogram(
            "modelservice_gateway_activation_seconds",
            "Time from a wake-up (scale from zero) to the first ready endpoint.",
            buckets=ACTIVATION_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "modelservice_gateway_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.untouched_tries = Counter(
            "modelservice_gateway_untouched_tries",
            "Tries an endpoint provably did nothing with, so the request may go to another endpoint or wait for a new "
            "one (the one replay rule, docs/reliability.md), by model and why: not_sent (no connection, or the first "
            "write failed), unread (reset with the request unread: an engine stopping), refused (503 or 429).",
            ["model", "reason"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "modelservice_gateway_adapter_loads",
            "LoRA adapter calls to engines, by base model, adapter and outcome: loaded, failed (the engine refused "
            "or could not be reached), evicted (unloaded for room, least recently used), unloaded (the spec removed "
            "it or moved its uri).",
            ["model", "adapter", "outcome"],
            registry=r,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), remembered: labels() takes a lock and builds a key on every request. Not for
        series that get removed (ready_endpoints), whose children would outlive their removal here."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

"""Engines' own metrics through the gateway: GET /engine-metrics on the gateway's metrics port.

With the NetworkPolicy per model (netpol.py) only the gateway's pods reach an engine, so a Prometheus cannot scrape
the engines itself (and should not: the engines serve /metrics on the port they serve inference on). The gateway
fetches /metrics of every ready endpoint it routes to, at the engine's metrics port and path (engines.py), adds
`modelservice_namespace`, `modelservice` and `modelservice_endpoint` labels to every sample, and merges the families
(Prometheus' text format wants each family's samples together, under one HELP and TYPE). Endpoints that do not
answer within the timeout are left out and counted in modelservice_gateway_engine_scrape_errors_total.

Fetched when scraped, concurrently, nothing cached: the cost is the scrape's, not the request path's.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Optional

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from modelservice.api import Engine
from modelservice.engines import ENGINES
from modelservice.gateway.routes import Endpoint, ModelEntry, RouteTable

TIMEOUT = 5.0
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?(\s.*)")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def relabel(line: str, extra: str) -> Optional[str]:
    """One sample line with our labels first; None for a line that is not a sample."""
    m = _SAMPLE.fullmatch(line)
    if m is None:
        return None
    name, labels, rest = m.groups()
    inner = labels[1:-1].strip().rstrip(",") if labels else ""
    return f"{name}{{{extra}{',' + inner if inner else ''}}}{rest}"


def merge(texts: list[tuple[str, str]]) -> str:
    """(extra labels, exposition text) per endpoint → one exposition, families merged in first-seen order."""
    families: dict[str, dict[str, Any]] = {}
    for extra, text in texts:
        current: Optional[str] = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    fam = families.setdefault(current, {"HELP": None, "TYPE": None, "samples": []})
                    fam[parts[1]] = fam[parts[1]] or line
                continue
            sample = relabel(line, extra)
            if sample is None:
                continue
            name = sample.split("{", 1)[0]
            family = current if current is not None and name.startswith(current) else name
            families.setdefault(family, {"HELP": None, "TYPE": None, "samples": []})["samples"].append(sample)
    out = []
    for fam in families.values():
        out += [h for h in (fam["HELP"], fam["TYPE"]) if h] + fam["samples"]
    return "\n".join(out) + "\n"


def targets(table: RouteTable) -> list[tuple[ModelEntry, Endpoint, int, str]]:
    """(model, endpoint, metrics port, path) of every ready endpoint whose engine serves metrics."""
    out = []
    for key, entry in sorted(table.models.items()):
        try:
            eng = ENGINES[Engine(entry.engine)]
        except ValueError:
            continue
        if not eng.metrics_path:
            continue
        for ep in table.ready(key):
            out.append((entry, ep, eng.metrics_port or ep.port, eng.metrics_path))
    return out


class EngineMetrics:
    def __init__(self, table: RouteTable, registry: CollectorRegistry) -> None:
        self.table = table
        self.errors = Counter(
            "modelservice_gateway_engine_scrape_errors",
            "Engine /metrics fetches that failed or timed out (left out of /engine-metrics).",
            ["model"],
            registry=registry,
        )

    async def handle(self, _: web.Request) -> web.Response:
        found = targets(self.table)
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def fetch(entry: ModelEntry, ep: Endpoint, port: int, path: str) -> Optional[tuple[str, str]]:
                host = f"[{ep.address}]" if ":" in ep.address else ep.address
                try:
                    async with session.get(f"http://{host}:{port}{path}") as r:
                        if r.status != 200:
                            raise aiohttp.ClientError(f"HTTP {r.status}")
                        text = await r.text()
                except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
                    self.errors.labels(entry.label).inc()
                    return None
                extra = (
                    f'modelservice_namespace="{_escape(entry.namespace)}",modelservice="{_escape(entry.name)}",'
                    f'modelservice_endpoint="{_escape(ep.address)}:{ep.port}"'
                )
                return extra, text

            got = await asyncio.gather(*(fetch(*t) for t in found))
        return web.Response(
            body=merge([g for g in got if g is not None]).encode(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

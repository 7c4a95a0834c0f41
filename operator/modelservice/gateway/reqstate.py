"""Typed keys for per-request state shared by the handlers, the proxy and the access-log middleware."""

from __future__ import annotations

from typing import Any

from aiohttp import web


def _key(name: str, t: type) -> Any:
    # web.RequestKey is new in aiohttp 3.12-ish; plain string keys work everywhere (with a warning on new versions).
    return web.RequestKey(name, t) if hasattr(web, "RequestKey") else name


MODEL = _key("model", str)  # namespace/name, once resolved
METER = _key("meter", object)  # metering.Meter of a metered path (its answer's token counts)
ANSWERED = _key("answered", bool)  # an engine's answer is being relayed (the request reached an engine)
QUOTA = _key("quota", object)  # quotas.Reservation: tokens reserved at admission, settled at the end
TENANT = _key("tenant", str)  # whom the request is billed to (auth.py: a tenant, or _anonymous/_model-key)
STRIP_AUTHORIZATION = _key("strip_authorization", bool)
CLIENT_GONE = _key("client_gone", bool)

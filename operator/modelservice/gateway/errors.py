"""Errors a client sees, in OpenAI's shape, so SDKs show the message instead of a parse failure."""

from __future__ import annotations

import json
from typing import Any, Optional

from aiohttp import web

# status → OpenAI error "type"; SDKs map these to exception classes.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


class GatewayError(Exception):
    def __init__(self, status: int, message: str, code: str, *, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.code, retry_after=self.retry_after)


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "code": code}}


def error_response(status: int, message: str, code: str, *, retry_after: Optional[int] = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(
        status=status,
        text=json.dumps(error_body(status, message, code)),
        content_type="application/json",
        headers=headers,
    )

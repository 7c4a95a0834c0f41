"""The one kubelet endpoint `kubectl logs` needs: GET /containerLogs/{namespace}/{pod}/{container}.

The API server proxies `kubectl logs` to the node's kubelet at its InternalIP and `daemonEndpoints.kubeletEndpoint`
port over HTTPS; the node agent serves this for all its nodes on one port. Query parameters as the kubelet's:
`previous` (the log of the container's instance before the last restart), `tailLines`, `limitBytes`, `follow`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Optional

from aiohttp import web

FOLLOW_POLL = 0.2
FOLLOW_LIMIT = 3600.0  # a followed log ends after an hour: every loop here is bounded


def _tail(data: bytes, lines: Optional[int]) -> bytes:
    if lines is None:
        return data
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


def make_app(find_logs: Callable[[str, str, str], Optional[list[Path]]]) -> web.Application:
    """find_logs(namespace, pod, container) → that container's log files, oldest first; None: no such container."""

    async def container_logs(request: web.Request) -> web.StreamResponse:
        ns, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        logs = find_logs(ns, pod, container)
        if logs is None:
            raise web.HTTPNotFound(text=f"container {container} of pod {ns}/{pod} is not on this node\n")
        q = request.query
        if not logs and q.get("previous") != "true":
            return web.Response(text="")  # the stub model server: it writes no log
        if q.get("previous") == "true":
            if len(logs) < 2:
                raise web.HTTPBadRequest(text=f'previous terminated container "{container}" in pod "{pod}" not found\n')
            path = logs[-2]
        else:
            path = logs[-1]
        data = await asyncio.to_thread(path.read_bytes)
        data = _tail(data, int(q["tailLines"]) if q.get("tailLines") else None)
        if q.get("limitBytes"):
            data = data[: int(q["limitBytes"])]
        if q.get("follow") != "true":
            return web.Response(body=data, content_type="text/plain")
        resp = web.StreamResponse()
        resp.content_type = "text/plain"
        await resp.prepare(request)
        await resp.write(data)
        offset = path.stat().st_size
        loop = asyncio.get_running_loop()
        end = loop.time() + FOLLOW_LIMIT
        while loop.time() < end:
            await asyncio.sleep(FOLLOW_POLL)
            current = find_logs(ns, pod, container)
            if not current or current[-1] != path:
                break  # the container restarted or the pod went away: a kubelet ends the stream too
            with open(path, "rb") as f:
                f.seek(offset)
                more = f.read()
            if more:
                offset += len(more)
                await resp.write(more)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", container_logs)
    return app

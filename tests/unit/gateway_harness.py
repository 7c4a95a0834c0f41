"""The gateway over real sockets on 127.0.0.x, for unit tests (test_gateway_http.py, _streaming, _activator, ...):
stub model servers, a gateway whose table is filled by hand, and a small OpenAI client."""

import contextlib
import json

from modelservice.gateway.testing import endpointslice, gateway_with, serving
from tests.cluster.stub_server import make_app as stub_app

gateway = gateway_with


@contextlib.asynccontextmanager
async def upstreams(app_for, *hosts):
    """One aiohttp app per loopback address, app_for(host) each (a test's own upstream); yields [(host, port)]."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for h in hosts:
            url = await stack.enter_async_context(serving(app_for(h), host=h))
            out.append((h, int(url.rsplit(":", 1)[1])))
        yield out


def stubs(*hosts, model="m", tps=1000.0):
    """One stub model server per loopback address; yields [(host, port)]."""
    return upstreams(lambda h: stub_app(model, tps), *hosts)


def slice_for(name, addrs, ns="default"):
    """All stubs must share one port number for one slice; so one slice per address here."""
    return [endpointslice(name, [(h, True)], p, ns, name=f"{name}-{i}") for i, (h, p) in enumerate(addrs)]


def chat(model, stream=False, max_tokens=4):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": max_tokens}


async def post(session, url, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with session.post(url + "/v1/chat/completions", data=data, **kw) as r:
        return r.status, await r.read(), r.headers

"""Engine admin paths never reach an engine from a client: the allow list (paths.py) and the gateway over sockets."""

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import web

from modelservice.gateway import engine_load, paths
from modelservice.gateway.errors import GatewayError
from modelservice.gateway.testing import endpointslice, gateway_with, modelservice, serving

pytestmark = pytest.mark.unit

# Admin calls of each engine, as its documentation names them: each must be refused, whatever the method.
ADMIN = {
    "ollama": [
        ("POST", "/api/pull"),
        ("POST", "/api/create"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/copy"),
        ("POST", "/api/push"),
        ("POST", "/api/blobs/sha256:abc"),
    ],
    "vllm": [
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/sleep"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
        ("POST", "/reset_prefix_cache"),
        ("POST", "/start_profile"),
        ("POST", "/stop_profile"),
        ("POST", "/collective_rpc"),
        ("GET", "/metrics"),
    ],
    "sglang": [("POST", "/flush_cache"), ("POST", "/update_weights_from_disk"), ("POST", "/start_profile")],
    "llamacpp": [("GET", "/slots"), ("POST", "/slots/0"), ("POST", "/lora-adapters"), ("GET", "/metrics")],
    "triton": [
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/m/load"),
        ("POST", "/v2/repository/models/m/unload"),
        ("GET", "/v2/models/stats"),
        ("POST", "/v2/logging"),
        ("POST", "/v2/models/m/trace/setting"),
        ("POST", "/v2/systemsharedmemory/region/r/register"),
    ],
    "tgi": [("GET", "/metrics")],
    "custom": [("GET", "/metrics"), ("POST", "/admin")],
}
CLIENT = {
    "ollama": [
        ("POST", "/api/chat"),
        ("POST", "/api/generate"),
        ("GET", "/api/tags"),
        ("POST", "/v1/chat/completions"),
    ],
    "vllm": [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("POST", "/tokenize"),
        ("GET", "/health"),
    ],
    "llamacpp": [("POST", "/completion"), ("GET", "/props"), ("POST", "/v1/chat/completions")],
    "triton": [
        ("POST", "/v2/models/resnet/infer"),
        ("POST", "/v2/models/m/versions/2/infer"),
        ("GET", "/v2/models/m/ready"),
        ("GET", "/v2/health/ready"),
    ],
    "tgi": [("POST", "/generate_stream"), ("GET", "/info")],
    "custom": [("POST", "/v1/chat/completions"), ("HEAD", "/v1/models")],
}


@pytest.mark.parametrize("engine", sorted(ADMIN))
def test_admin_paths_are_not_found(engine):
    for method, path in ADMIN[engine]:
        with pytest.raises(GatewayError) as e:
            paths.check(engine, method, path)
        assert e.value.status == 404 and e.value.code == "not_found", (method, path)


@pytest.mark.parametrize("engine", sorted(CLIENT))
def test_client_paths_pass(engine):
    for method, path in CLIENT[engine]:
        paths.check(engine, method, path)


def test_known_path_with_another_method_is_405():
    with pytest.raises(GatewayError) as e:
        paths.check("vllm", "DELETE", "/v1/models")
    assert e.value.status == 405 and "GET" in e.value.message
    with pytest.raises(GatewayError) as e:
        paths.check("llamacpp", "POST", "/props")  # POST /props changes the server's settings
    assert e.value.status == 405


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions/../../api/pull",
        "/v1/%2e%2e/api/pull",
        "/v1//chat/completions",
        "/v1/chat/completions/",
        "/V1/chat/completions",
        "/v1/chat%2Fcompletions",
        "/v2/models/../repository/index/infer",
        "/",
        "",
        "/v2/models/./infer",
    ],
)
def test_encoded_dotted_or_odd_paths_match_nothing(path):
    for engine in ("vllm", "ollama", "triton", "custom"):
        assert paths.allowed_methods(engine, path) == (), (engine, path)


def test_triton_speaks_no_openai_and_unknown_engines_only_openai():
    assert paths.allowed_methods("triton", "/v1/chat/completions") == ()
    assert paths.allowed_methods("newengine", "/v1/chat/completions") == ("POST",)
    assert paths.allowed_methods("newengine", "/api/pull") == ()


async def test_gateway_forwards_client_paths_and_refuses_admin_paths():
    """Over sockets: a recording upstream sees the client paths and not one admin call."""
    seen: list[tuple[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        if (
            request.headers.get("User-Agent") != engine_load.USER_AGENT
        ):  # the gateway's own queue polls are not clients'
            seen.append((request.method, request.raw_path))
        return web.json_response({"ok": True})

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", record)
    async with serving(upstream) as up:
        port = int(up.rsplit(":", 1)[1])
        objs = []
        for engine in sorted(ADMIN):
            objs += [modelservice(engine, engine=engine), endpointslice(engine, [("127.0.0.1", True)], port)]
        async with gateway_with(*objs) as (_, url), aiohttp.ClientSession() as s:
            for engine, calls in ADMIN.items():
                for method, path in calls:
                    async with s.request(method, f"{url}/models/default/{engine}{path}", json={}) as r:
                        err = (await r.json())["error"]
                        assert r.status == 404 and err["code"] == "not_found", (engine, method, path)
                        assert err["type"] == "invalid_request_error"
            # aiohttp's client would normalise these; send them raw.
            for raw in ("/models/default/ollama/v1/%2e%2e/api/pull", "/models/default/ollama/x/../api/pull"):
                reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
                writer.write(
                    f"POST {raw} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode()
                )
                status = (await reader.readline()).split()[1]
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                assert status == b"404", raw
            assert seen == []
            want = []
            for engine, calls in CLIENT.items():
                for method, path in calls:
                    async with s.request(method, f"{url}/models/default/{engine}{path}?a=1", json={}) as r:
                        assert r.status == 200, (engine, method, path, await r.text())
                    want.append((method, path + "?a=1"))
            assert seen == want

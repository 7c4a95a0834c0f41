"""The stub model server on its own, over a real socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time

from aiohttp.test_utils import TestClient, TestServer

from tests.cluster.stub_server import make_app
from tests.cluster.wait import async_wait_for


@contextlib.asynccontextmanager
async def serving(**kw):
    kw.setdefault("model_name", "m")
    kw.setdefault("tokens_per_second", 0)  # as fast as possible unless a test is about the rate
    async with TestClient(TestServer(make_app(**kw), host="127.0.0.1")) as c:
        yield c


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    return [block[len("data: ") :] for block in raw.split("\n\n") if block]


async def _metric(c: TestClient, name: str) -> float:
    text = await (await c.get("/metrics")).text()
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def test_health_is_503_during_startup_delay_then_200() -> None:
    async def main():
        async with serving(startup_delay=0.5) as c:
            for path in ("/health", "/healthz", "/ready", "/v2/health/ready", "/", "/api/tags", "/v1/models"):
                assert (await c.get(path)).status == 503, path
            await async_wait_for(lambda: _ok(c, "/health"), timeout=5, interval=0.05, message="/health 200")
            for path in ("/healthz", "/ready", "/v2/health/ready", "/"):
                assert (await c.get(path)).status == 200, path

    async def _ok(c, path):
        return (await c.get(path)).status == 200

    await main()


async def test_models_and_ollama_tags_name_the_model() -> None:
    async with serving(model_name="org/tiny") as c:
        models = await (await c.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["org/tiny"]
        tags = await (await c.get("/api/tags")).json()
        assert tags["models"][0]["name"] == "org/tiny"


async def test_chat_completion_json_honours_max_tokens_and_reports_usage() -> None:
    async with serving() as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "one two three four"}]},
        )
        body = await r.json()
        assert r.status == 200
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "token0 token1 token2"}
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
        default = await (await c.post("/v1/chat/completions", json={"messages": [{"content": "x"}]})).json()
        assert default["usage"]["completion_tokens"] == 16


async def test_chat_completion_streams_sse_chunks_then_done() -> None:
    async with serving() as c:
        r = await c.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 4,
                "stream_options": {"include_usage": True},
            },
        )
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await r.text())
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
        assert text == "token0 token1 token2 token3"
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_completions_stream_and_json() -> None:
    async with serving() as c:
        events = sse_events(
            await (await c.post("/v1/completions", json={"prompt": "a b", "stream": True, "max_tokens": 2})).text()
        )
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "token0 token1"
        body = await (await c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2})).json()
        assert body["choices"][0]["text"] == "token0 token1"
        assert body["usage"]["prompt_tokens"] == 2


async def test_token_rate_is_respected() -> None:
    async with serving(tokens_per_second=100) as c:
        t0 = time.monotonic()
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 20})
        await r.text()
        assert time.monotonic() - t0 >= 0.19  # 20 tokens at 100/s


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    async with serving(embedding_dim=8) as c:
        a = await (await c.post("/v1/embeddings", json={"input": ["hello", "world"]})).json()
        b = await (await c.post("/v1/embeddings", json={"input": "hello"})).json()
        va, vb = a["data"][0]["embedding"], a["data"][1]["embedding"]
        assert len(va) == 8 and va == b["data"][0]["embedding"] and va != vb
        assert math.isclose(math.sqrt(sum(x * x for x in va)), 1.0, rel_tol=1e-4)


async def test_bad_requests_get_400() -> None:
    async with serving() as c:
        for path, data in (
            ("/v1/chat/completions", b"{not json"),
            ("/v1/completions", b"[1,"),
            ("/v1/embeddings", b"nope"),
            ("/v1/chat/completions", b"[]"),
        ):
            r = await c.post(path, data=data, headers={"Content-Type": "application/json"})
            assert r.status == 400, (path, data)
            assert "error" in await r.json()
        for body in (
            {"messages": []},
            {"messages": [{"content": "x"}], "max_tokens": -1},
            {"messages": [{"content": "x"}], "max_tokens": "3"},
        ):
            assert (await c.post("/v1/chat/completions", json=body)).status == 400, body
        assert (await c.post("/v1/completions", json={"max_tokens": 1})).status == 400


async def test_strict_model_rejects_other_names() -> None:
    async with serving(model_name="a", strict_model=True) as c:
        r = await c.post("/v1/completions", json={"model": "b", "prompt": "x"})
        assert r.status == 404


async def test_metrics_count_running_and_waiting_requests() -> None:
    async def main():
        async with serving(tokens_per_second=20, max_concurrency=1) as c:
            body = {"messages": [{"content": "x"}], "stream": True, "max_tokens": 200}  # 10 s if left alone
            first = await c.post("/v1/chat/completions", json=body)  # headers sent: it holds the one slot
            second = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            await async_wait_for(lambda: _both(c), timeout=5, interval=0.02, message="running=1 and waiting=1")
            first.close()  # client disconnect frees the slot for the waiting request
            second_resp = await second
            await async_wait_for(lambda: _waiting_zero(c), timeout=5, interval=0.02, message="waiting=0")
            second_resp.close()
            await async_wait_for(lambda: _idle(c), timeout=5, interval=0.02, message="running=0")
            text = await (await c.get("/metrics")).text()
            assert "# TYPE vllm:num_requests_running gauge" in text

    async def _both(c):
        return await _metric(c, "vllm:num_requests_running") == 1 and await _metric(c, "vllm:num_requests_waiting") == 1

    async def _waiting_zero(c):
        return await _metric(c, "vllm:num_requests_waiting") == 0

    async def _idle(c):
        return await _metric(c, "vllm:num_requests_running") == 0

    await main()

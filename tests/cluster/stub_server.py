"""An OpenAI-compatible stub model server (the bits of vLLM, SGLang, TGI and Ollama the gateway and operator touch).

Deterministic output ("token0 token1 ..."), a configurable token rate, a startup delay during which every path
answers 503 (weights loading), and vLLM's queue gauges on /metrics counted from real in-flight requests.

It is cheap per request: SSE chunks are pre-encoded string templates and tokens that come due together are
written in one batch, so one process carries hundreds of concurrent streams and the node agent hosts one app
per fake pod in a single event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import struct
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

MIN_TICK = 0.02  # seconds between writes of one stream after the first token: batches tokens at high rates
MAX_TOKENS_LIMIT = 100_000  # bounds every generation loop
HEALTH_PATHS = ("/", "/health", "/healthz", "/ready", "/v2/health/ready")


@dataclass
class StubState:
    model: str
    tokens_per_second: float
    startup_delay: float
    strict_model: bool
    embedding_dim: int
    max_concurrency: int
    sem: asyncio.Semaphore | None = None  # made in on_startup, bound to the serving loop
    ready_at: float = math.inf  # loop time; set when the app starts
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    success: dict[str, int] = field(default_factory=dict)

    def is_ready(self) -> bool:
        return asyncio.get_running_loop().time() >= self.ready_at


STATE = web.AppKey("stub_state", StubState)


def stub_state(app: web.Application) -> StubState:
    return app[STATE]


def _error(status: int, message: str, type_: str = "BadRequestError") -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": None, "code": status}}, status=status
    )


@web.middleware
async def _loading_gate(request: web.Request, handler):
    state = request.app[STATE]
    if request.path != "/metrics" and not state.is_ready():
        return _error(503, "model is loading", "ServiceUnavailableError")
    return await handler(request)


def _count_words(value) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):  # chat message or content part
        return _count_words(value.get("content", "")) + _count_words(value.get("text", ""))
    return 0


async def _read_body(request: web.Request) -> dict | web.Response:
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "request body must be a JSON object")
    return body


def _max_tokens(body: dict) -> int | web.Response:
    raw = body.get("max_completion_tokens", body.get("max_tokens"))
    if raw is None:
        return 16
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        return _error(400, "max_tokens must be a non-negative integer")
    return min(raw, MAX_TOKENS_LIMIT)


def _token(k: int) -> str:
    return f"token{k}" if k == 0 else f" token{k}"


class _Generation:
    """Holds a request's slot in the engine: counts it as waiting, then running, like vLLM's scheduler."""

    def __init__(self, state: StubState) -> None:
        self.state = state

    async def __aenter__(self) -> "_Generation":
        self.state.waiting += 1
        try:
            await self.state.sem.acquire()  # type: ignore[union-attr]
        finally:
            self.state.waiting -= 1
        self.state.running += 1
        return self

    async def __aexit__(self, *exc) -> None:
        self.state.running -= 1
        self.state.sem.release()  # type: ignore[union-attr]


async def _completion(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    if chat:
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "messages must be a non-empty list")
        prompt_tokens = _count_words(body["messages"])
    else:
        if "prompt" not in body:
            return _error(400, "prompt is required")
        prompt_tokens = _count_words(body["prompt"])
    n = _max_tokens(body)
    if isinstance(n, web.Response):
        return n
    requested = body.get("model")
    if state.strict_model and requested not in (None, state.model):
        return _error(404, f"The model `{requested}` does not exist.", "NotFoundError")

    kind = "chat.completion" if chat else "text_completion"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    async with _Generation(state):
        state.prompt_tokens += prompt_tokens
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await _stream(request, state, chat, kind, rid, created, n, prompt_tokens, include_usage)
        if n and state.tokens_per_second > 0:
            await asyncio.sleep(n / state.tokens_per_second)
        state.generation_tokens += n
        text = "".join(_token(k) for k in range(n))
        choice = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        state.success["length"] = state.success.get("length", 0) + 1
        return web.json_response(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": state.model,
                "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n},
            }
        )


async def _stream(
    request,
    state: StubState,
    chat: bool,
    kind: str,
    rid: str,
    created: int,
    n: int,
    prompt_tokens: int,
    include_usage: bool,
) -> web.StreamResponse:
    head = json.dumps(
        {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": state.model}
    )[:-1]
    if chat:
        prefix = "data: " + head + ', "choices": [{"index": 0, "delta": {"content": "'
        suffix = '"}, "logprobs": null, "finish_reason": null}]}\n\n'
        first = (
            "data: " + head + ', "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, '
            '"logprobs": null, "finish_reason": null}]}\n\n'
        )
        last = (
            "data: "
            + head
            + ', "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}]}\n\n'
        )
    else:
        prefix = "data: " + head + ', "choices": [{"index": 0, "text": "'
        suffix = '", "logprobs": null, "finish_reason": null}]}\n\n'
        first = ""
        last = (
            "data: "
            + head
            + ', "choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": "length"}]}\n\n'
        )

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    tps = state.tokens_per_second
    start = loop.time()
    sent = 0
    try:
        if first:
            await resp.write(first.encode())
        while sent < n:  # bounded: each pass sends >= 1 token (or sleeps until one is due)
            if tps > 0:
                due = min(n, int((loop.time() - start) * tps + 1e-9))
                if due <= sent:
                    wait = start + (sent + 1) / tps - loop.time()
                    await asyncio.sleep(max(wait, MIN_TICK if sent else 0.0))
                    continue
            else:
                due = n
            await resp.write("".join(prefix + _token(k) + suffix for k in range(sent, due)).encode())
            state.generation_tokens += due - sent
            sent = due
        tail = last
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            tail += "data: " + head + ', "choices": [], "usage": ' + json.dumps(usage) + "}\n\n"
        await resp.write((tail + "data: [DONE]\n\n").encode())
        await resp.write_eof()
        state.success["length"] = state.success.get("length", 0) + 1
    except (ConnectionError, asyncio.CancelledError):
        state.success["abort"] = state.success.get("abort", 0) + 1
        raise
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=False)


def _embed(text: str, dim: int) -> list[float]:
    raw = b""
    counter = 0
    while len(raw) < dim * 4:  # bounded by dim
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    ints = struct.unpack(f"<{dim}i", raw[: dim * 4])
    vec = [i / 2**31 for i in ints]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        return _error(400, "input must be a string or a non-empty list")
    texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
    tokens = _count_words(texts)
    state.prompt_tokens += tokens
    return web.json_response(
        {
            "object": "list",
            "model": state.model,
            "data": [
                {"object": "embedding", "index": i, "embedding": _embed(t, state.embedding_dim)}
                for i, t in enumerate(texts)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def models(request: web.Request) -> web.Response:
    m = request.app[STATE].model
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "stub", "root": m, "max_model_len": 4096}],
        }
    )


async def ollama_tags(request: web.Request) -> web.Response:
    m = request.app[STATE].model
    return web.json_response({"models": [{"name": m, "model": m, "modified_at": "1970-01-01T00:00:00Z", "size": 0}]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    s = request.app[STATE]
    lbl = f'model_name="{s.model}"'
    lines = [
        "# HELP vllm:num_requests_running Number of requests currently running on GPU.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{lbl}}} {float(s.running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{lbl}}} {float(s.waiting)}",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{lbl}}} {min(1.0, s.running / max(1, s.max_concurrency)):.4f}",
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{lbl}}} {float(s.prompt_tokens)}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{lbl}}} {float(s.generation_tokens)}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    lines += [
        f'vllm:request_success_total{{finished_reason="{r}",{lbl}}} {float(c)}' for r, c in sorted(s.success.items())
    ]
    return web.Response(
        text="\n".join(lines) + "\n",
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Prometheus-Format": "0.0.4"},
    )


def make_app(
    model_name: str,
    tokens_per_second: float = 200.0,
    startup_delay: float = 0.0,
    *,
    max_concurrency: int = 256,
    strict_model: bool = False,
    embedding_dim: int = 16,
) -> web.Application:
    """The stub as an aiohttp app. The startup delay counts from when the app is started (AppRunner.setup()).

    max_concurrency plays vLLM's max_num_seqs: requests past it wait, and show up as vllm:num_requests_waiting.
    strict_model answers 404 to a request naming another model, as vLLM does.
    """
    app = web.Application(middlewares=[_loading_gate])

    async def on_startup(app: web.Application) -> None:
        st = app[STATE]
        st.sem = asyncio.Semaphore(max_concurrency)
        st.ready_at = asyncio.get_running_loop().time() + max(0.0, startup_delay)

    app[STATE] = StubState(
        model_name, float(tokens_per_second), float(startup_delay), strict_model, embedding_dim, max_concurrency
    )
    app.on_startup.append(on_startup)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/api/tags", ollama_tags)
    app.router.add_get("/metrics", metrics)
    for path in HEALTH_PATHS:
        app.router.add_get(path, health)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible stub model server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="stub-model")
    p.add_argument("--tokens-per-second", type=float, default=200.0)
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--max-concurrency", type=int, default=256)
    args = p.parse_args(argv)
    app = make_app(args.model, args.tokens_per_second, args.startup_delay, max_concurrency=args.max_concurrency)
    web.run_app(app, host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()

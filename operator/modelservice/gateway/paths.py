"""Which engine paths a client may reach through `/models/{namespace}/{name}/...`: an allow list, per engine.

Engines serve their admin API on the same port as inference: Ollama's /api/pull, /api/create and /api/delete, vLLM's
/v1/load_lora_adapter, /sleep, /wake_up, /reset_prefix_cache and /start_profile, SGLang's /flush_cache and
/update_weights_from_disk, llama.cpp's /slots (other users' prompts) and POST /props, Triton's /v2/repository
control. A gateway that forwarded every path would hand them to any caller with a key. So only what a client needs
for inference and discovery passes (docs/tenants.md lists it); everything else is 404 in OpenAI's shape, and a known
path with another method is 405.

Matching is on the raw path, exactly, before any decoding: a pattern holds no `%`, `.` segment or `//`, so an
encoded or dotted path (`/v1/%2e%2e/api/pull`) matches nothing and never reaches an engine to be decoded there.
"""

from __future__ import annotations

import re

from modelservice.gateway.errors import GatewayError

_SEG = r"(?!\.\.?(?:/|$))[A-Za-z0-9_.:-]+"  # one path segment (a Triton model name), never "." or ".."

# Every engine that speaks OpenAI's API (all but Triton): the inference and discovery calls of OpenAI's SDKs and the
# compute-only helpers the engines add (tokenize, score, rerank). GET /health lets a client check the model itself.
_OPENAI: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("POST", "/v1/rerank"),
    ("POST", "/v1/score"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", f"/v1/models/{_SEG}"),
    ("GET", "/health"),
)

_ENGINE: dict[str, tuple[tuple[str, str], ...]] = {
    "vllm": (
        ("POST", "/pooling"),
        ("POST", "/classify"),
        ("POST", "/score"),
        ("POST", "/rerank"),
        ("POST", "/v2/rerank"),
        ("GET", "/version"),
    ),
    "sglang": (("POST", "/generate"), ("POST", "/encode"), ("POST", "/classify"), ("GET", "/get_model_info")),
    "tgi": (("POST", "/generate"), ("POST", "/generate_stream"), ("GET", "/info")),
    "ollama": (
        ("POST", "/api/generate"),
        ("POST", "/api/chat"),
        ("POST", "/api/embed"),
        ("POST", "/api/embeddings"),
        ("POST", "/api/show"),
        ("GET", "/api/tags"),
        ("GET", "/api/ps"),
        ("GET", "/api/version"),
    ),
    "llamacpp": (
        ("POST", "/completion"),
        ("POST", "/completions"),
        ("POST", "/embedding"),
        ("POST", "/embeddings"),
        ("POST", "/infill"),
        ("POST", "/rerank"),
        ("POST", "/reranking"),
        ("POST", "/apply-template"),
        ("GET", "/props"),
        ("GET", "/models"),
        ("GET", "/v1/health"),
    ),
    # KServe's v2 protocol: inference and metadata, per model and version; not /v2/repository, trace, logging,
    # shared-memory or statistics (which show other tenants' traffic).
    "triton": (
        ("GET", "/v2"),
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/health/live"),
        # /v2/models/stats is Triton's statistics of every model (other tenants' traffic), not a model name.
        ("GET", f"/v2/models/(?!stats$){_SEG}(?:/versions/{_SEG})?(?:/ready)?"),
        ("POST", f"/v2/models/{_SEG}(?:/versions/{_SEG})?/(?:infer|generate|generate_stream)"),
    ),
}


def _compile(rules: tuple[tuple[str, str], ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    return tuple((method, re.compile(pattern)) for method, pattern in rules)


_RULES = {
    engine: _compile(_ENGINE.get(engine, ()) + (() if engine == "triton" else _OPENAI))
    for engine in (*_ENGINE, "custom")
}
_DEFAULT = _compile(_OPENAI)  # an engine name we do not know (a newer operator): OpenAI's paths only


def allowed_methods(engine: str, path: str) -> tuple[str, ...]:
    """The methods a client may use on this raw path (query string excluded); () when the path is not for clients."""
    methods = []
    for method, pattern in _RULES.get(engine, _DEFAULT):
        if pattern.fullmatch(path) and method not in methods:
            methods.append(method)
    return tuple(methods)


def check(engine: str, method: str, path: str) -> None:
    """Raise the client's error for a path it may not call; return for one it may. HEAD goes with GET."""
    methods = allowed_methods(engine, path)
    wanted = "GET" if method == "HEAD" else method
    if wanted in methods:
        return
    if not methods:
        raise GatewayError(
            404,
            f"{path} is not a client path of a {engine or 'custom'} model: the gateway forwards "
            "inference and model-listing paths only (docs/tenants.md)",
            "not_found",
        )
    raise GatewayError(405, f"{method} is not allowed on {path}; use {', '.join(methods)}", "method_not_allowed")

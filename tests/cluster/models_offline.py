"""Offline model resolution for native engines (native.py, translation 4): every hub model a pod asks for is answered
by our generated tiny model, laid into the engine's own download cache under the name the pod asked for.

No hub is reachable here, and none is needed: vLLM reads the Hugging Face cache layout with HF_HUB_OFFLINE=1, and
llama.cpp's `-hf org/repo:quant --offline` reads the same layout in LLAMA_CACHE (tiny_model.py says how each was
checked). The model is built once per machine from a fixed seed, in the cache beside the engines.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tests.cluster import tiny_model

CACHE = Path(
    os.environ.get(
        "MODELSERVICE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelservice"
    )
)
# Room for the longest context a pod may ask for (`--max-model-len 8192` in examples/vllm.yaml): rotary positions
# cost no weights, so a long maximum is free.
MAX_POSITIONS = 32768


@dataclass
class OfflineModels:
    model: tiny_model.TinyModel
    _lock: threading.Lock = field(
        default_factory=threading.Lock
    )  # pods starting together must not copy into one cache at once

    @classmethod
    def build(cls, model_dir: Optional[Path] = None) -> "OfflineModels":
        out = model_dir or CACHE / "models" / "tiny-llama"
        return cls(tiny_model.build(out, max_pos=MAX_POSITIONS))

    def prefill(self, kind: str, cache_dir: Path, ref: str) -> Path:
        """Lay the tiny model into `cache_dir` (the engine's HF_HOME or LLAMA_CACHE) as `ref` (org/repo[:quant])."""
        repo, _, quant = ref.partition(":")
        with self._lock:
            if kind == "hf":
                return tiny_model.install_hf_cache(cache_dir, repo, self.model.dir)
            if kind == "gguf":
                # llama.cpp's default quant when the ref names none is Q4_K_M.
                return tiny_model.install_llamacpp_cache(cache_dir, repo, quant or "Q4_K_M", self.model.gguf)
        raise ValueError(f"unknown model layout {kind!r}")

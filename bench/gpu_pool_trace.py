"""The GPU-pool trace: which model is asked for when, from a fixed seed (issue #13's benchmark).

More models than GPUs, Zipf-distributed popularity, Poisson arrivals. Generated once and committed (bench/traces/)
before any tuning, so both policies and every later run replay exactly the same requests:

    python -m bench.gpu_pool_trace > bench/traces/gpu-pool-seed1.json

Pure: `generate(seed, ...)` returns the trace; nothing here touches a cluster.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_SEED = 1


@dataclass(frozen=True)
class TraceSpec:
    seed: int = DEFAULT_SEED
    models: int = 12  # ModelServices, one GPU each
    duration: float = 600.0  # seconds of arrivals
    rate: float = 0.4  # requests per second over all models (Poisson)
    zipf_s: float = 1.1  # popularity of rank k ∝ 1 / k^s
    max_tokens: int = 16
    real_engine_rank: int = 3  # this model (by popularity rank, 1 = most popular) runs llama.cpp for real


@dataclass
class Trace:
    spec: TraceSpec
    model_names: list[str]
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"t": seconds from start, "model": name}

    def to_json(self) -> str:
        return json.dumps({"spec": asdict(self.spec), "models": self.model_names, "requests": self.requests}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Trace":
        doc = json.loads(text)
        return cls(TraceSpec(**doc["spec"]), doc["models"], doc["requests"])

    def counts(self) -> dict[str, int]:
        out = {m: 0 for m in self.model_names}
        for r in self.requests:
            out[r["model"]] += 1
        return out


def zipf_weights(n: int, s: float) -> list[float]:
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def generate(spec: TraceSpec = TraceSpec()) -> Trace:
    """Poisson arrivals at `rate` for `duration` seconds; each picks a model by Zipf popularity (rank 1 first)."""
    rng = random.Random(spec.seed)
    names = [f"model-{k:02d}" for k in range(1, spec.models + 1)]
    weights = zipf_weights(spec.models, spec.zipf_s)
    t, requests = 0.0, []
    while True:
        t += rng.expovariate(spec.rate)
        if t >= spec.duration:
            break
        model = rng.choices(names, weights)[0]
        requests.append({"t": round(t, 3), "model": model})
    return Trace(spec, names, requests)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--models", type=int, default=TraceSpec.models)
    p.add_argument("--duration", type=float, default=TraceSpec.duration)
    p.add_argument("--rate", type=float, default=TraceSpec.rate)
    a = p.parse_args(argv)
    sys.stdout.write(
        generate(TraceSpec(seed=a.seed, models=a.models, duration=a.duration, rate=a.rate)).to_json() + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

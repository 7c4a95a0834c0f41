"""Tiny LoRA adapters for the tiny Llama (tiny_model.py), made locally from a seed, in the PEFT layout vLLM loads.

No registry ships adapters for a model that exists only here, so tests make their own: an adapter directory holds
- adapter_config.json: what PEFT's LoraConfig.save_pretrained writes and vLLM's PEFTHelper reads (peft_type LORA,
  r, lora_alpha, target_modules, base_model_name_or_path, bias "none", ...), and
- adapter_model.safetensors: `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A,B}.weight`,
  A of shape [r, in] and B of shape [out, r] (PEFT's nn.Linear layouts), float32.

PEFT initialises B to zero (a fresh adapter changes nothing); here B is drawn too, and large enough that the adapter's
delta (alpha/r * B @ A) is as big as the base weight it adds to: greedy decoding with the adapter then differs from the
base's and from another seed's adapter, which is how a test sees that the engine really applied it.

    python -m tests.cluster.tiny_lora OUT_DIR --base MODEL_DIR [--seed N] [--rank R] [--alpha A]
        [--targets q_proj,v_proj]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's PeftModel wraps the LlamaForCausalLM: its names gain this prefix
DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default targets for Llama
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BaseShape:
    """What an adapter needs to know of its base: the linear layers' sizes, from the base's config.json."""

    hidden: int
    layers: int
    kv: int  # kv_heads * head_dim: the out size of k_proj and v_proj
    intermediate: int

    @classmethod
    def of(cls, model_dir: str | Path) -> "BaseShape":
        c = json.loads((Path(model_dir) / "config.json").read_text())
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            kv=c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim,
            intermediate=c["intermediate_size"],
        )

    def linear(self, module: str) -> tuple[str, int, int]:
        """(parent, out, in) of a Llama decoder layer's linear module. A name the base does not have is placed under
        self_attn as hidden x hidden: the adapter of a test that wants target modules the base lacks."""
        h, kv, ff = self.hidden, self.kv, self.intermediate
        shapes = {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (ff, h),
            "up_proj": (ff, h),
            "down_proj": (h, ff),
        }
        out, inp = shapes.get(module, (h, h))
        return ("mlp" if module in MLP else "self_attn"), out, inp


@dataclass(frozen=True)
class TinyAdapter:
    dir: Path
    seed: int
    rank: int
    alpha: int
    targets: tuple[str, ...]


def build(
    out_dir: str | Path,
    base_dir: str | Path,
    *,
    seed: int = 0,
    rank: int = 8,
    alpha: int | None = None,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    base_name: str | None = None,
) -> TinyAdapter:
    """Write a LoRA adapter for the model in base_dir into out_dir. The same arguments give the same bytes."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if not targets:
        raise ValueError("an adapter needs at least one target module")
    alpha = 2 * rank if alpha is None else alpha
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = BaseShape.of(base_dir)
    save_file(lora_weights(shape, seed, rank, alpha, targets), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(
        json.dumps(adapter_config(base_name or str(base_dir), rank, alpha, targets), indent=2, sort_keys=True) + "\n"
    )
    return TinyAdapter(out, seed, rank, alpha, tuple(targets))


def adapter_config(base_name: str, rank: int, alpha: int, targets: tuple[str, ...]) -> dict:
    """The fields PEFT writes for a plain LoRA (the ones vLLM reads, and the defaults it checks for features it lacks)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def lora_weights(shape: BaseShape, seed: int, rank: int, alpha: int, targets: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A and B of every target in every layer, drawn in a fixed order from one seeded generator.

    A ~ N(0, 1/in) (as a dense layer's weight), B ~ N(0, 1/r) scaled by r/alpha: the delta alpha/r * B @ A then has
    the spread of a base weight (1/sqrt(in)), whatever rank and alpha are asked for."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(shape.layers):
        for module in sorted(targets):
            parent, rows, cols = shape.linear(module)
            name = f"{PREFIX}model.layers.{i}.{parent}.{module}"
            a = rng.standard_normal((rank, cols), dtype=np.float32) * np.float32(1 / np.sqrt(cols))
            b = rng.standard_normal((rows, rank), dtype=np.float32) * np.float32(1 / np.sqrt(rank) * rank / alpha)
            out[f"{name}.lora_A.weight"] = a
            out[f"{name}.lora_B.weight"] = b
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster.tiny_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--base", required=True, help="the base model's directory (its config.json gives the shapes)")
    ap.add_argument("--base-name", help="base_model_name_or_path to record (default: --base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names")
    args = ap.parse_args(argv)
    adapter = build(
        args.out_dir,
        args.base,
        seed=args.seed,
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(t for t in args.targets.split(",") if t),
        base_name=args.base_name,
    )
    size = (adapter.dir / WEIGHTS).stat().st_size
    print(
        f"{adapter.dir}: LoRA r={adapter.rank} alpha={adapter.alpha} on {','.join(adapter.targets)}, "
        f"seed {adapter.seed}, {WEIGHTS} {size:,} bytes"
    )


if __name__ == "__main__":
    main()

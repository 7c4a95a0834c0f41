"""Tiny LoRA adapters: the PEFT layout (names, shapes, config), deterministic from a seed, and big enough to change what
the base computes. vLLM's own check of them is tests/integration/test_vllm_lora.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from tests.cluster import tiny_lora as tl
from tests.cluster import tiny_model as tm

# GQA (kv_heads < heads) so that k_proj/v_proj are narrower than q_proj, and an intermediate size unlike hidden.
SMALL = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 96, "vocab": 300, "max_pos": 512}
ALL = tl.ATTENTION + tl.MLP
PEFT_NAME = re.compile(r"base_model\.model\.(model\.layers\.\d+\.(self_attn|mlp)\.\w+)\.lora_([AB])\.weight")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tm.TinyModel:
    return tm.build(tmp_path_factory.mktemp("base"), seed=3, **SMALL)


@pytest.fixture(scope="module")
def base_weights(base: tm.TinyModel) -> dict[str, np.ndarray]:
    return load_file(str(base.dir / "model.safetensors"))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_every_target_of_every_layer_has_a_and_b_that_fit_the_base_weight(base, base_weights, tmp_path) -> None:
    adapter = tl.build(tmp_path, base.dir, seed=1, rank=4, targets=ALL)
    tensors = load_file(str(adapter.dir / tl.WEIGHTS))
    assert len(tensors) == 2 * len(ALL) * SMALL["layers"]
    for name, t in tensors.items():
        m = PEFT_NAME.fullmatch(name)
        assert m, name
        base_weight = base_weights[m.group(1) + ".weight"]  # the module exists in the base, under the same name
        rows, cols = base_weight.shape
        assert t.dtype == np.float32
        assert t.shape == ((4, cols) if m.group(3) == "A" else (rows, 4)), (name, t.shape, base_weight.shape)
    # B @ A is a delta of the base weight's own shape (k/v narrower under GQA, mlp's own sizes).
    for i in range(SMALL["layers"]):
        for module, parent in [("k_proj", "self_attn"), ("down_proj", "mlp"), ("gate_proj", "mlp")]:
            p = f"model.layers.{i}.{parent}.{module}"
            delta = tensors[f"base_model.model.{p}.lora_B.weight"] @ tensors[f"base_model.model.{p}.lora_A.weight"]
            assert delta.shape == base_weights[p + ".weight"].shape


def test_the_config_is_a_plain_peft_lora(base, tmp_path) -> None:
    adapter = tl.build(tmp_path, base.dir, seed=1, rank=8, targets=("v_proj", "q_proj"), base_name="org/tiny")
    config = json.loads((adapter.dir / tl.CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16, ["q_proj", "v_proj"])
    assert config["base_model_name_or_path"] == "org/tiny"
    # Nothing vLLM refuses (its PEFTHelper rejects bias, DoRA, modules_to_save, other inits).
    assert config["bias"] == "none" and not config["use_dora"] and config["modules_to_save"] is None
    assert config["init_lora_weights"] is True
    with safe_open(str(adapter.dir / tl.WEIGHTS), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # what PEFT writes; transformers refuses safetensors without it


def test_same_seed_same_bytes_and_another_seed_other_weights(base, tmp_path) -> None:
    one = tl.build(tmp_path / "one", base.dir, seed=5)
    assert _files(tl.build(tmp_path / "again", base.dir, seed=5).dir) == _files(one.dir)
    other = tl.build(tmp_path / "other", base.dir, seed=6)
    assert (other.dir / tl.WEIGHTS).read_bytes() != (one.dir / tl.WEIGHTS).read_bytes()
    assert (other.dir / tl.CONFIG).read_bytes() == (one.dir / tl.CONFIG).read_bytes()


@pytest.mark.parametrize("rank,alpha", [(2, None), (8, 8), (16, 64)])
def test_the_delta_is_as_big_as_the_base_weight_whatever_the_rank(base, base_weights, tmp_path, rank, alpha) -> None:
    """B is not zero (PEFT's fresh init would change nothing) and alpha/r * B @ A has a base weight's spread: the
    adapter visibly changes what the model computes."""
    adapter = tl.build(tmp_path, base.dir, seed=2, rank=rank, alpha=alpha, targets=("v_proj",))
    t = load_file(str(adapter.dir / tl.WEIGHTS))
    p = "model.layers.0.self_attn.v_proj"
    delta = (
        adapter.alpha
        / adapter.rank
        * t[f"base_model.model.{p}.lora_B.weight"]
        @ t[f"base_model.model.{p}.lora_A.weight"]
    )
    ratio = np.linalg.norm(delta) / np.linalg.norm(base_weights[p + ".weight"])
    assert 0.3 < ratio < 3, ratio


def test_a_target_the_base_lacks_is_written_as_asked(base, tmp_path) -> None:
    """For the engine's refusal of target modules the base does not have."""
    adapter = tl.build(tmp_path, base.dir, seed=1, targets=("qkv_fused",))
    names = set(load_file(str(adapter.dir / tl.WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.qkv_fused.lora_A.weight" in names
    assert json.loads((adapter.dir / tl.CONFIG).read_text())["target_modules"] == ["qkv_fused"]


def test_bad_arguments_are_refused(base, tmp_path) -> None:
    with pytest.raises(ValueError, match="rank"):
        tl.build(tmp_path, base.dir, rank=0)
    with pytest.raises(ValueError, match="target"):
        tl.build(tmp_path, base.dir, targets=())


def test_cli_writes_an_adapter(base, tmp_path, capsys) -> None:
    tl.main([str(tmp_path / "a"), "--base", str(base.dir), "--seed", "9", "--rank", "4", "--targets", "q_proj,o_proj"])
    assert "r=4" in capsys.readouterr().out
    config = json.loads((tmp_path / "a" / tl.CONFIG).read_text())
    assert (config["r"], config["target_modules"]) == (4, ["o_proj", "q_proj"])

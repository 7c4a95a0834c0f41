"""The tiny random Llama: deterministic, well-formed in both layouts, its GGUF a faithful conversion, its caches
laid out the way the engines look them up. No engine runs here (the engines' own check is greedy decoding)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from huggingface_hub import hf_hub_download, snapshot_download
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.numpy import load_file
from tokenizers import Tokenizer, pre_tokenizers

from tests.cluster import tiny_model as tm

# Small but not degenerate: GQA (kv_heads < heads) exercises the K permutation with its own head count.
SMALL = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 96, "vocab": 300, "max_pos": 512}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tm.TinyModel:
    return tm.build(tmp_path_factory.mktemp("tiny"), seed=7, **SMALL)


@pytest.fixture(scope="module")
def weights(model: tm.TinyModel) -> dict[str, np.ndarray]:
    return load_file(str(model.dir / "model.safetensors"))


@pytest.fixture(scope="module")
def tokenizer(model: tm.TinyModel) -> Tokenizer:
    return Tokenizer.from_file(str(model.dir / "tokenizer.json"))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_same_bytes(model: tm.TinyModel, tmp_path: Path) -> None:
    again = tm.build(tmp_path / "again", seed=7, **SMALL)
    assert _files(again.dir) == _files(model.dir)
    other = tm.build(tmp_path / "other", seed=8, **SMALL)
    assert (other.dir / "model.safetensors").read_bytes() != (model.dir / "model.safetensors").read_bytes()
    assert (other.dir / "tokenizer.json").read_bytes() == (model.dir / "tokenizer.json").read_bytes()


def test_a_finished_build_is_reused_and_a_changed_one_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tm.build(tmp_path, **SMALL)

    def no_writes(*_args: object) -> None:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(tm, "write_gguf", no_writes)
    assert tm.build(tmp_path, **SMALL).n_params == tm.parameter_count(tm.ModelSpec(**SMALL))
    with pytest.raises(AssertionError, match="rebuilt"):
        tm.build(tmp_path, **{**SMALL, "layers": 3})


def test_config_and_tensor_shapes(model: tm.TinyModel, weights: dict[str, np.ndarray]) -> None:
    config = json.loads((model.dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
        config["vocab_size"],
    ) == (64, 2, 4, 2, 96, 300)
    kv = 2 * 16
    assert weights["model.embed_tokens.weight"].shape == (300, 64)
    assert weights["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (kv, 64)
    assert weights["model.layers.1.self_attn.v_proj.weight"].shape == (kv, 64)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (64, 96)
    assert weights["lm_head.weight"].shape == (300, 64)
    assert all(w.dtype == np.float32 for w in weights.values())
    assert sum(w.size for w in weights.values()) == model.n_params


def test_tokenizer_round_trip(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == 300
    assert [tokenizer.token_to_id(t) for t in tm.SPECIALS] == [0, 1, 2]
    for text in ("Hello, how are you?", "  two spaces\nand a line", "bytes: héllo wörld ✓ 🦙"):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_byte_table_is_the_tokenizers_alphabet() -> None:
    assert set(tm._byte_decoder()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_chat_template_renders_chatml(model: tm.TinyModel, tokenizer: Tokenizer) -> None:
    config = json.loads((model.dir / "tokenizer_config.json").read_text())
    # How transformers renders chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(config["chat_template"]).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        add_generation_prompt=True,
    )
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text).ids
    assert ids[0] == tokenizer.token_to_id(tm.IM_START)
    assert ids.count(tokenizer.token_to_id(config["eos_token"])) == 2


def test_output_layer_reaches_printable_tokens_only(weights: dict[str, np.ndarray], tokenizer: Tokenizer) -> None:
    lm_head = weights["lm_head.weight"]
    spelled = tm.token_bytes(tokenizer)
    reachable = np.flatnonzero(np.abs(lm_head).sum(axis=1))
    assert len(reachable) > 100
    for i in reachable:
        assert spelled[i] and all(0x20 <= b < 0x7F for b in spelled[i]), (i, spelled[i])
    assert tokenizer.token_to_id(tm.EOS) not in reachable
    # What the final norm hands the output layer: unit-RMS vectors. The best logit is always a printable token.
    h = np.random.default_rng(0).standard_normal((2000, lm_head.shape[1]), dtype=np.float32)
    logits = h @ lm_head.T
    assert set(logits.argmax(axis=1)) <= set(reachable)
    assert logits.max(axis=1).min() > 10  # far above the zeroed rows' 0, even when sampled


def _rope_hf(x: np.ndarray, pos: int) -> np.ndarray:
    """Hugging Face Llama's RoPE on one head: rotates the pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    angle = pos * tm.ROPE_THETA ** (-np.arange(half) / half)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], axis=-1)


def _rope_llamacpp(x: np.ndarray, pos: int) -> np.ndarray:
    """llama.cpp's RoPE for Llama (LLAMA_ROPE_TYPE_NORM) on one head: rotates adjacent pairs (2i, 2i + 1)."""
    half = x.shape[-1] // 2
    angle = pos * tm.ROPE_THETA ** (-np.arange(half) / half)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)
    return out


def _scores(q_w: np.ndarray, k_w: np.ndarray, heads: int, kv_heads: int, rope, x: np.ndarray) -> np.ndarray:
    """Attention logits q(t)·k(s) of every head for every pair of positions."""
    n, d = len(x), q_w.shape[0] // heads
    q = np.stack([rope((x[t] @ q_w.T).reshape(heads, d), t) for t in range(n)])
    k = np.stack([rope((x[s] @ k_w.T).reshape(kv_heads, d), s) for s in range(n)])
    k = np.repeat(k, heads // kv_heads, axis=1)
    return np.einsum("thd,shd->hts", q, k)


def test_qk_permutation_round_trips_and_matches_llamacpp_rope(weights: dict[str, np.ndarray]) -> None:
    q_w = weights["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    k_w = weights["model.layers.0.self_attn.k_proj.weight"].astype(np.float64)
    assert np.array_equal(tm.unpermute_qk(tm.permute_qk(q_w, 4), 4), q_w)
    assert np.array_equal(tm.unpermute_qk(tm.permute_qk(k_w, 2), 2), k_w)
    x = np.random.default_rng(1).standard_normal((6, q_w.shape[1]))
    hf = _scores(q_w, k_w, 4, 2, _rope_hf, x)
    converted = _scores(tm.permute_qk(q_w, 4), tm.permute_qk(k_w, 2), 4, 2, _rope_llamacpp, x)
    unconverted = _scores(q_w, k_w, 4, 2, _rope_llamacpp, x)
    assert np.allclose(converted, hf)
    assert not np.allclose(unconverted, hf)  # the trap: without the permutation llama.cpp attends elsewhere


def test_gguf_reads_back(model: tm.TinyModel, weights: dict[str, np.ndarray], tokenizer: Tokenizer) -> None:
    reader = gguf.GGUFReader(model.gguf)

    def value(key: str) -> object:
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert (
        value("llama.embedding_length"),
        value("llama.block_count"),
        value("llama.attention.head_count"),
        value("llama.attention.head_count_kv"),
        value("llama.feed_forward_length"),
    ) == (64, 2, 4, 2, 96)
    assert value("llama.rope.dimension_count") == 16
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.tokens") == tm.vocab_list(tokenizer)
    assert value("tokenizer.ggml.merges") == tm.merges(tokenizer)
    assert value("tokenizer.ggml.token_type")[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL]
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.token_to_id(tm.EOS)
    assert value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.chat_template") == tm.CHAT_TEMPLATE
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(weights)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    k = tensors["blk.1.attn_k.weight"]
    assert list(k.shape) == [64, 32]  # GGUF lists dimensions innermost first
    assert np.array_equal(k.data, tm.permute_qk(weights["model.layers.1.self_attn.k_proj.weight"], 2))
    assert np.array_equal(tensors["output.weight"].data, weights["lm_head.weight"])


def test_hf_cache_resolves_offline(model: tm.TinyModel, tmp_path: Path) -> None:
    snapshot = tm.install_hf_cache(tmp_path, "tiny-org/tiny-llama", model.dir)
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    assert (repo / "refs" / "main").read_text() == snapshot.name
    # huggingface_hub (a dependency of tokenizers) resolves through refs/main, as vLLM does with HF_HUB_OFFLINE=1.
    found = snapshot_download("tiny-org/tiny-llama", cache_dir=tmp_path / "hub", local_files_only=True)
    assert Path(found) == snapshot
    config = hf_hub_download("tiny-org/tiny-llama", "config.json", cache_dir=tmp_path / "hub", local_files_only=True)
    assert Path(config).read_bytes() == (model.dir / "config.json").read_bytes()


def _llamacpp_picks(files: list[str], quant: str) -> str | None:
    """llama.cpp's choice for `-hf org/repo:QUANT` (common/download.cpp, find_best_model): the first .gguf whose path
    has QUANT followed by "." or "-", case-insensitive."""
    return next((f for f in files if f.endswith(".gguf") and re.search(re.escape(quant) + "[.-]", f, re.I)), None)


@pytest.mark.parametrize("quant", ["Q4_K_M", "q8_0", "F32"])
def test_llamacpp_cache_layout_matches_the_quant(model: tm.TinyModel, tmp_path: Path, quant: str) -> None:
    path = tm.install_llamacpp_cache(tmp_path, "tiny-org/tiny-llama-GGUF", quant, model.gguf)
    repo = tmp_path / "models--tiny-org--tiny-llama-GGUF"
    commit = (repo / "refs" / "main").read_text()
    assert re.fullmatch("[0-9a-f]{40}", commit)  # llama.cpp skips refs that are not 40 hex digits
    assert path.parent == repo / "snapshots" / commit
    assert path.read_bytes() == model.gguf.read_bytes()
    assert _llamacpp_picks([path.name], quant) == path.name
    assert _llamacpp_picks([path.name], "Q5_K_S") is None


def test_hf_and_gguf_installs_of_one_repo_share_a_snapshot(model: tm.TinyModel, tmp_path: Path) -> None:
    hf = tm.install_hf_cache(tmp_path, "tiny-org/tiny-llama", model.dir)
    gguf_path = tm.install_llamacpp_cache(tmp_path / "hub", "tiny-org/tiny-llama", "model.gguf", model.gguf)
    assert gguf_path == hf / "model.gguf" and (hf / "config.json").exists()


def test_cli_builds_installs_and_prints_the_parameter_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tm.main(
        [
            str(tmp_path / "m"),
            "--hidden",
            "32",
            "--heads",
            "2",
            "--kv-heads",
            "2",
            "--vocab",
            "280",
            "--hf-home",
            str(tmp_path / "hf"),
            "--hf-repo",
            "o/r",
            "--llama-cache",
            str(tmp_path / "ll"),
            "--llama-repo",
            "o/r-GGUF:Q8_0",
        ]
    )
    out = capsys.readouterr().out
    n = tm.parameter_count(
        tm.ModelSpec(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=128, vocab=280, max_pos=4096)
    )
    assert f"{n:,} parameters" in out and "model.gguf" in out
    assert list((tmp_path / "ll" / "models--o--r-GGUF" / "snapshots").glob("*/r-GGUF-Q8_0.gguf"))
    assert list((tmp_path / "hf" / "hub" / "models--o--r" / "snapshots").glob("*/model.safetensors"))


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even size"):
        tm.build(tmp_path, hidden=60, heads=4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        tm.build(tmp_path, heads=4, kv_heads=3)

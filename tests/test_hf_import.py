"""Every family and every source format reproduces transformers' logits in float32."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import rtpurbo_jax
from rtpurbo_jax.config import ModelConfig
from tests import hf_models

PARITY = 1e-5  # max |ours - ref| / max |ref|, float32


def _relative_error(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    # 40 tokens: longer than the Mistral test model's 16-token sliding window.
    return np.random.default_rng(1).integers(0, hf_models.VOCAB, (2, 40))


@pytest.mark.parametrize("family", sorted(hf_models.FAMILIES))
def test_safetensors_and_gguf_match_transformers(family, ids, tmp_path):
    model = hf_models.build(family)
    model.save_pretrained(tmp_path)
    ref = hf_models.reference_logits(model, ids)
    gguf_path = hf_models.write_gguf(model, tmp_path / "model.gguf")
    for source in (tmp_path, gguf_path):
        error = _relative_error(rtpurbo_jax.load(source)(ids), ref)
        print(f"parity {family} {source.suffix or 'safetensors'}: {error:.2e}")  # pytest -s
        assert error <= PARITY


def test_sharded_safetensors(ids, tmp_path):
    model = hf_models.build("qwen3")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ref = hf_models.reference_logits(model, ids)
    assert _relative_error(rtpurbo_jax.load(tmp_path)(ids), ref) <= PARITY


def test_config_parses_transformers4_layout():
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "rope_theta": 500000.0, "max_position_embeddings": 1024,
          "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    config = ModelConfig.from_hf(hf)
    assert config.rope_theta == 500000.0
    assert config.rope_type == "llama3"
    assert config.head_dim == 4
    assert ModelConfig.from_json(config.to_json()) == config


def test_param_axes_cover_every_param():
    model = hf_models.build("llama_yarn_bias")
    config = ModelConfig.from_hf(model.config.to_dict())
    params = rtpurbo_jax.model.init_params(config, jax.random.key(0))
    axes = rtpurbo_jax.model.param_axes(config)
    flat_params = jax.tree.leaves(params)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_params) == len(flat_axes)
    for p, a in zip(flat_params, flat_axes, strict=True):
        assert p.ndim == len(a)


# Bad inputs: one clear error each.

def test_unknown_architecture(tmp_path):
    model = hf_models.build("llama")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rtpurbo_jax.ConfigError, match="unsupported model_type 'gpt2'"):
        rtpurbo_jax.load(tmp_path)


def test_missing_path():
    with pytest.raises(rtpurbo_jax.CheckpointError, match="no such file or directory"):
        rtpurbo_jax.load("./does/not/exist")


def test_directory_without_config(tmp_path):
    with pytest.raises(rtpurbo_jax.CheckpointError, match="has no config.json"):
        rtpurbo_jax.load(tmp_path)


def test_directory_without_weights(tmp_path):
    hf_models.build("llama").config.save_pretrained(tmp_path)
    with pytest.raises(rtpurbo_jax.CheckpointError, match="no weights in"):
        rtpurbo_jax.load(tmp_path)


def test_missing_shard(tmp_path):
    hf_models.build("qwen3").save_pretrained(tmp_path, max_shard_size="40KB")
    sorted(tmp_path.glob("*.safetensors"))[0].unlink()
    with pytest.raises(rtpurbo_jax.CheckpointError, match="shard files that are missing"):
        rtpurbo_jax.load(tmp_path)


def test_config_weights_mismatch_names_file_and_tensor(tmp_path):
    hf_models.build("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rtpurbo_jax.CheckpointError) as err:
        rtpurbo_jax.load(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "mlp.gate_proj.weight has shape (112, 64), the config implies (64, 128)" in str(
        err.value)


def test_extra_layers_in_weights(tmp_path):
    hf_models.build("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rtpurbo_jax.CheckpointError, match="tensors the config does not use"):
        rtpurbo_jax.load(tmp_path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(rtpurbo_jax.CheckpointError, match="not a .gguf"):
        rtpurbo_jax.load(path)


def test_invalid_config_values():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2}
    with pytest.raises(rtpurbo_jax.ConfigError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf(base)
    with pytest.raises(rtpurbo_jax.ConfigError, match="missing the required field"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(rtpurbo_jax.ConfigError, match="unsupported rope type"):
        ModelConfig.from_hf({**base, "num_attention_heads": 2,
                             "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})

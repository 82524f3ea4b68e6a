"""An exported model is a Hugging Face directory that transformers and `load` both read."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import rtpurbo_jax
from rtpurbo_jax.checkpoint import SparseCheckpointError, load_sparse
from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig
from rtpurbo_jax.export import hf_config, hf_state_dict
from rtpurbo_jax.hf import convert_state_dict
from rtpurbo_jax.indexer import init_indexer
from tests import hf_models
from tests.test_hf_import import PARITY, _relative_error

FAMILIES = sorted(hf_models.FAMILIES)


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(1).integers(0, hf_models.VOCAB, (2, 40))


def _imported(family, tmp_path):
    """(transformers model, our model read from its save_pretrained directory)."""
    model = hf_models.build(family)
    model.save_pretrained(tmp_path / "base")
    return model, rtpurbo_jax.load(tmp_path / "base")


def _origin(base) -> dict:
    return {"base": {"name": base.config.name, "fingerprint": base.fingerprint},
            "stages": ["indexer", "self_distill"], "steps": {"indexer": 3, "self_distill": 2}}


def _fine_tuned(params):
    """Stand-in for stage 2: every weight moved a little."""
    return jax.tree.map(lambda x: x * 1.01, params)


def _transformers(path, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family, tmp_path):
    config = _imported(family, tmp_path)[1].config
    assert ModelConfig.from_hf(hf_config(config), name=config.name) == config


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip(family, tmp_path):
    hf_model, model = _imported(family, tmp_path)
    tensors = hf_state_dict(model.params, model.config)
    expected = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]  # transformers' copy of the tied embedding
    assert tensors.keys() == expected.keys()
    for name, array in tensors.items():
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    back = convert_state_dict(tensors, model.config, jnp.float32, "exported")
    assert jax.tree.structure(back) == jax.tree.structure(model.params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_export_matches_transformers(family, ids, tmp_path):
    _, base = _imported(family, tmp_path)
    params = _fine_tuned(base.params)
    out = rtpurbo_jax.export_model(tmp_path / "out", params, base.config, origin=_origin(base),
                                   dtype="float32")
    ours = rtpurbo_jax.load(out)
    assert ours.sparse is None  # no sparse.json: a dense model
    assert ours.fingerprint == json.loads((out / "rtpurbo.json").read_text())["weights"][
        "fingerprint"]
    ref = hf_models.reference_logits(_transformers(out), ids)
    error = _relative_error(ours(ids), ref)
    print(f"export parity {family}: {error:.2e}")  # pytest -s
    assert error <= PARITY


def test_bfloat16_export_loads_in_transformers(ids, tmp_path):
    _, base = _imported("qwen3", tmp_path)
    out = rtpurbo_jax.export_model(tmp_path / "out", _fine_tuned(base.params), base.config,
                                   origin=_origin(base))  # bfloat16 by default
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    native = _transformers(out, dtype="auto")
    assert {p.dtype for p in native.parameters()} == {torch.bfloat16}
    # Both sides widen the same bfloat16 weights to float32.
    ref = hf_models.reference_logits(_transformers(out), ids)
    ours = rtpurbo_jax.load(out)
    assert _relative_error(ours(ids), ref) <= PARITY
    assert ours.fingerprint == json.loads((out / "rtpurbo.json").read_text())["weights"][
        "fingerprint"]


def _sparse_design(model):
    """A small design-"indexer" SparseConfig and indexer for the tiny Llama (2 KV heads)."""
    sparse = SparseConfig(((True, False), (False, False)), rank=4, top_p=0.8, block_q=16,
                          block_k=16, local_blocks=1)
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(32, 4, 16)) for _ in range(2)]
    return sparse, init_indexer(queries, model.config, sparse)


def test_sparse_export_attaches_on_load(tmp_path):
    _, base = _imported("llama", tmp_path)
    sparse, indexer = _sparse_design(base)
    out = rtpurbo_jax.export_model(tmp_path / "out", _fine_tuned(base.params), base.config,
                                   sparse=sparse, indexer=indexer, origin=_origin(base))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "indexer.safetensors", "model.safetensors", "rtpurbo.json", "sparse.json"]
    model = rtpurbo_jax.load(out)
    assert model.sparse == sparse
    for a, b in zip(jax.tree.leaves(model.indexer), jax.tree.leaves(indexer), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, _, meta = load_sparse(out)
    assert meta["fingerprint"] == model.fingerprint
    assert meta["derived_from"] == _origin(base)["base"]
    dense = rtpurbo_jax.load(out, dense=True)
    assert dense.sparse is None
    ids = np.random.default_rng(1).integers(0, hf_models.VOCAB, (1, 70))
    np.testing.assert_array_equal(np.asarray(model(ids)),
                                  np.asarray(dense.with_sparse(sparse, indexer)(ids)))
    record = json.loads((out / "rtpurbo.json").read_text())
    assert record == {"format": "rtpurbo_jax.model/1", "design": "indexer", **_origin(base),
                      "weights": {"fingerprint": model.fingerprint, "dtype": "bfloat16"}}
    with pytest.raises(ValueError, match="not both"):
        rtpurbo_jax.load(out, sparse=out, dense=True)


def test_original_base_refuses_the_exported_sparse_checkpoint(tmp_path):
    _, base = _imported("llama", tmp_path)
    sparse, indexer = _sparse_design(base)
    out = rtpurbo_jax.export_model(tmp_path / "out", _fine_tuned(base.params), base.config,
                                   sparse=sparse, indexer=indexer, origin=_origin(base))
    with pytest.raises(SparseCheckpointError,
                       match=r"belongs to the fine-tuned \(stage-2\) model in .*out.*load that "
                             "directory instead"):
        rtpurbo_jax.load(tmp_path / "base", sparse=out)


def test_tokenizer_is_saved(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(hf_models.VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")
    _, base = _imported("llama", tmp_path)
    out = rtpurbo_jax.export_model(tmp_path / "out", base.params, base.config, tokenizer,
                                   origin=_origin(base))
    reloaded = rtpurbo_jax.load(out).tokenizer
    assert reloaded("w3 w7 w5").input_ids == tokenizer("w3 w7 w5").input_ids == [3, 7, 5]


def test_bad_exports(tmp_path):
    _, base = _imported("llama", tmp_path)
    with pytest.raises(ValueError, match='origin must hold "base"'):
        rtpurbo_jax.export_model(tmp_path / "a", base.params, base.config, origin={})
    with pytest.raises(ValueError, match="dtype must be one of"):
        rtpurbo_jax.export_model(tmp_path / "a", base.params, base.config,
                                 origin=_origin(base), dtype="float16")
    with pytest.raises(FileExistsError, match="not empty"):
        rtpurbo_jax.export_model(tmp_path / "base", base.params, base.config,
                                 origin=_origin(base))
    with pytest.raises(ConfigError, match="rope type 'factors'"):
        hf_config(dataclasses.replace(base.config, rope_scaling=(("factors", (1.0,) * 8),
                                                                 ("rope_type", "factors"))))
    with pytest.raises(ConfigError, match="qk_norm=True"):
        hf_config(dataclasses.replace(base.config, qk_norm=True))

"""The sparse checkpoint round-trips exactly and refuses another base model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import rtpurbo_jax
from rtpurbo_jax.checkpoint import SparseCheckpointError, load_sparse
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.indexer import init_indexer
from tests import hf_models


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    hf_models.build("llama").save_pretrained(path)
    return path


def _sparse_model(base_dir):
    model = rtpurbo_jax.load(base_dir)
    mask = ((True, False), (False, False))
    sparse = SparseConfig(mask, rank=4, top_p=0.8, block_q=16, block_k=16, local_blocks=1)
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(32, 4, 16)) for _ in range(2)]
    return model.with_sparse(sparse, init_indexer(queries, model.config, sparse))


@pytest.mark.parametrize("safetensors", [False, True])
def test_round_trip_is_exact(base_dir, tmp_path, safetensors):
    model = _sparse_model(base_dir)
    model.save_sparse(tmp_path / "sparse", safetensors=safetensors)
    sparse, indexer, base = load_sparse(tmp_path / "sparse")
    assert sparse == model.sparse
    assert base == {"name": model.config.name, "fingerprint": model.fingerprint}
    flat = jax.tree.leaves(indexer)
    assert len(flat) == len(jax.tree.leaves(model.indexer)) == 4
    for a, b in zip(flat, jax.tree.leaves(model.indexer), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reloaded = rtpurbo_jax.load(base_dir, sparse=tmp_path / "sparse")
    ids = np.random.default_rng(1).integers(0, hf_models.VOCAB, (1, 70))
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(model(ids)))


def test_mismatched_base_is_refused(base_dir, tmp_path):
    _sparse_model(base_dir).save_sparse(tmp_path / "sparse")
    other = tmp_path / "other"
    hf_models.build("llama", seed=1).save_pretrained(other)
    with pytest.raises(SparseCheckpointError, match="was made for base model"):
        rtpurbo_jax.load(other, sparse=tmp_path / "sparse")


def test_bad_checkpoints(base_dir, tmp_path):
    with pytest.raises(SparseCheckpointError, match="no sparse.json"):
        load_sparse(tmp_path)
    model = _sparse_model(base_dir)
    model.save_sparse(tmp_path / "s", safetensors=True)
    (tmp_path / "s" / "indexer.safetensors").unlink()
    with pytest.raises(SparseCheckpointError, match="no indexer weights"):
        load_sparse(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "sparse.json").read_text())
    (tmp_path / "s" / "sparse.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(SparseCheckpointError, match="format"):
        load_sparse(tmp_path / "s")
    with pytest.raises(ValueError, match="dense"):
        rtpurbo_jax.load(base_dir).save_sparse(tmp_path / "x")


def test_mask_of_wrong_model_is_refused(base_dir):
    model = rtpurbo_jax.load(base_dir)
    with pytest.raises(rtpurbo_jax.ConfigError, match="the model has"):
        model.with_sparse(SparseConfig(((True, False, False),)), {"layers": [{}]})
    assert isinstance(model.config, ModelConfig)

"""Per-head routing: the sparse model reduces to the dense one when nothing is dropped, and
its prefill and decode paths agree with each other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax import generate as gen
from rtpurbo_jax.api import SparseModel, right_pad
from rtpurbo_jax.config import ConfigError, SparseConfig
from rtpurbo_jax.indexer import init_indexer
from tests.tiny import TINY, tiny_model

TOL = 1e-5  # float32, relative to max |logit|
ROWS = [list(np.random.default_rng(3).integers(2, 96, 150)),
        list(np.random.default_rng(4).integers(2, 96, 77))]
MIXED = ((True, False), (False, False))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def indexer():
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(64, TINY.num_heads, TINY.head_dim)) for _ in range(2)]
    return init_indexer(queries, TINY, SparseConfig(MIXED, rank=8))


def _sparse(**kw):
    return SparseConfig(MIXED, **{"rank": 8, "block_q": 16, "block_k": 16, **kw})


def _err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / np.abs(a).max()


def test_all_retrieval_heads_is_dense(model, indexer):
    all_dense = SparseConfig(((True, True), (True, True)))
    np.testing.assert_array_equal(np.asarray(model.with_sparse(all_dense, indexer)(ROWS)),
                                  np.asarray(model(ROWS)))


@pytest.mark.parametrize("scorer", ["indexer", "oracle"])
def test_p_one_without_cap_is_dense(model, indexer, scorer):
    sparse_model = model.with_sparse(_sparse(top_p=1.0, scorer=scorer), indexer)
    assert _err(model(ROWS), sparse_model(ROWS)) <= TOL
    np.testing.assert_array_equal(sparse_model.generate(ROWS, 6, eos_token_id=()),
                                  model.generate(ROWS, 6, eos_token_id=()))


def test_sparse_decode_logits_equal_dense_at_p_one(model, indexer):
    """Prefill + decode steps through the sparse cache layout equal the dense forward pass."""
    sparse = _sparse(top_p=1.0)
    tokens, lengths = right_pad(ROWS)
    prefill = jax.jit(gen.prefill, static_argnames=("config", "max_len", "backend", "sparse"))
    decode = jax.jit(gen.decode_step, static_argnames=("config", "backend", "sparse"))
    logits, cache, stats = prefill(model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                   config=TINY, max_len=200, backend="reference", sparse=sparse,
                                   indexer=indexer)
    assert float(stats[0]) == float(stats[1]) > 0  # every candidate block selected
    steps = [[11, 12], [21, 22]]
    for s in range(2):
        logits, cache, _ = decode(model.params, cache, jnp.asarray([r[s] for r in steps]),
                               config=TINY, backend="reference", sparse=sparse, indexer=indexer)
    for b, row in enumerate(ROWS):
        ref = np.asarray(model([row + steps[b]]))[0, -1]
        assert _err(ref, logits[b]) <= TOL


def test_selection_drops_blocks_and_reports_density(model, indexer):
    tokens, lengths = right_pad(ROWS)
    stats = {}
    for name, sparse in {"p0.5": _sparse(top_p=0.5), "none": _sparse(scorer="none"),
                         "topk": _sparse(selection="top_k", top_k_blocks=4)}.items():
        _, s = gen.forward(model.params, jnp.asarray(tokens), jnp.asarray(lengths), TINY,
                           "reference", sparse, indexer)
        stats[name] = float(s[0] / s[1])
    assert all(0 < d < 1 for d in stats.values())
    assert stats["none"] < stats["topk"]


def test_sparse_config_validation():
    with pytest.raises(ConfigError, match="top_p must be in"):
        SparseConfig(MIXED, top_p=0.0)
    with pytest.raises(ConfigError, match="top_p must be in"):
        SparseConfig(MIXED, top_p=1.5)
    with pytest.raises(ConfigError, match="rank must be positive"):
        SparseConfig(MIXED, rank=0)
    with pytest.raises(ConfigError, match="power of two"):
        SparseConfig(MIXED, block_k=48)
    with pytest.raises(ConfigError, match="non-empty"):
        SparseConfig(((True,), (True, False)))
    with pytest.raises(ConfigError, match="max_blocks"):
        SparseConfig(MIXED, max_blocks=2)
    with pytest.raises(ConfigError, match="top_k_blocks"):
        SparseConfig(MIXED, selection="top_k")
    with pytest.raises(ConfigError, match="scorer"):
        SparseConfig(MIXED, scorer="magic")
    with pytest.raises(ConfigError, match="the model has"):
        SparseConfig(((True, False, False),)).check_model(TINY)


def test_pallas_backend_matches_reference(model, indexer):
    """The whole sparse model through the Pallas kernels (interpreted on CPU) equals the
    reference path: prefill logits and cached decoding."""
    sparse = _sparse(top_p=0.7)
    ref = model.with_sparse(sparse, indexer)
    pallas = SparseModel(model.config, model.params, backend="pallas").with_sparse(sparse,
                                                                                 indexer)
    assert _err(ref(ROWS), pallas(ROWS)) <= TOL
    np.testing.assert_array_equal(pallas.generate(ROWS, 4, eos_token_id=()),
                                  ref.generate(ROWS, 4, eos_token_id=()))


def test_indexer_quality_bounds(model, indexer):
    """Selecting every block captures all the true mass at density 1; top-p 0.5 drops blocks
    (and the mass in them)."""
    from rtpurbo_jax.convert import indexer_quality

    tokens = np.stack([ROWS[0][:144], ROWS[0][6:150]])
    full = indexer_quality(model, _sparse(top_p=1.0), indexer, tokens)["mean"]
    assert full["captured_mass"] == pytest.approx(1.0, abs=1e-5)
    assert full["density"] == pytest.approx(1.0) and full["oracle_density"] == pytest.approx(1.0)
    half = indexer_quality(model, _sparse(top_p=0.5), indexer, tokens)["mean"]
    assert 0.0 < half["captured_mass"] < 1.0 and half["density"] < 1.0

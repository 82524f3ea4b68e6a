"""The whole sparse model through the Mosaic (TPU) kernels, forced with backend="mosaic" and
interpreted on the CPU, equals the jnp reference path: prompt logits and greedy generation, in
both designs, with ragged rows and GQA (2 query heads per KV head). Shapes follow TPU tiling:
head_dim 64 and 128-key blocks."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from rtpurbo_jax.config import SparseConfig
from rtpurbo_jax.indexer import init_indexer
from tests.tiny import TINY, tiny_model

TOL = 1e-5  # float32, relative to max |logit| (test_sparse_model's)
CONFIG = dataclasses.replace(TINY, head_dim=64, max_position_embeddings=512)
ROWS = [list(np.random.default_rng(5).integers(2, CONFIG.vocab_size, 270)),
        list(np.random.default_rng(6).integers(2, CONFIG.vocab_size, 141))]
BLOCKS = dict(rank=8, block_q=128, block_k=128, top_p=0.6)
DESIGNS = {
    # KV groups [layers][groups]: one dense group in layer 0, the rest select blocks.
    "indexer": SparseConfig(((True, False), (False, False)), **BLOCKS),
    # Query heads [layers][heads]: a whole retrieval group, then one retrieval head beside a
    # local one; local heads on 4 sinks + a 128-token window.
    "paper": SparseConfig(((True, True, False, False), (False, True, False, False)),
                          design="paper", group_size=CONFIG.group_size, sink_tokens=4,
                          window=128, local_blocks=1, **BLOCKS),
}


@functools.cache
def _models(design: str):
    sparse = DESIGNS[design]
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(64, CONFIG.num_heads, CONFIG.head_dim))
               for _ in range(CONFIG.num_layers)]
    indexer = init_indexer(queries, CONFIG, sparse)
    base = tiny_model(config=CONFIG)
    ref = base.with_sparse(sparse, indexer)
    mosaic = tiny_model(config=CONFIG, backend="mosaic").with_sparse(sparse, indexer)
    return ref, mosaic


def _err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


@pytest.mark.parametrize("design", list(DESIGNS))
def test_tpu_kernels_in_the_model_match_reference(design):
    ref, mosaic = _models(design)
    assert _err(ref(ROWS), mosaic(ROWS)) <= TOL
    np.testing.assert_array_equal(mosaic.generate(ROWS, 2, eos_token_id=()),
                                  ref.generate(ROWS, 2, eos_token_id=()))


def test_tpu_backend_refuses_shapes_it_cannot_tile():
    """The tiny test model's head_dim (16) is no TPU tile: one clear error, no fallback."""
    sparse = SparseConfig(((True, False), (False, False)), rank=4, block_q=16, block_k=16)
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(32, TINY.num_heads, TINY.head_dim)) for _ in range(2)]
    model = tiny_model(backend="mosaic").with_sparse(sparse, init_indexer(queries, TINY, sparse))
    with pytest.raises(ValueError, match="head_dim"):
        model([[5, 9, 12, 40, 7, 3, 8, 22]])

"""Chunked prefill: running the prompt a chunk of queries at a time against the growing cache
gives what one pass gives (last-token logits, every cache array, the selection and its stats,
the next decode step), for a dense model and both sparse designs, ragged rows, a chunk that does
not divide the prompt (its padding running past the cache's end), a chunk as long as the prompt,
and GQA (the tiny model has 2 query heads per KV head)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax import generate as gen
from rtpurbo_jax.api import right_pad
from rtpurbo_jax.cache import RING_PARTS
from rtpurbo_jax.config import SparseConfig
from rtpurbo_jax.indexer import indexer_keys, init_indexer
from rtpurbo_jax.paper_attention import chunk_kernel_fits
from rtpurbo_jax.selection import select_prefill
from tests.tiny import TINY, tiny_model

# float32, relative to the largest |value| compared (the convention of test_buckets and
# test_paper_design): the chunks attend over a longer, masked key axis, which reorders sums;
# the tiny model's logits reach ~9, so reordering alone moves them by ~1e-5 absolute.
TOL = 1e-5
L = 128  # the prompt width; rows L and L - 37 tokens
ROWS = [list(np.random.default_rng(11).integers(2, TINY.vocab_size, L)),
        list(np.random.default_rng(12).integers(2, TINY.vocab_size, L - 37))]
MAX_LEN = L + 8  # a 48-token chunk pads the prompt to 144: its last writes fall past the cache
STEP = [17, 23]  # one decode token per row
PAPER = dict(design="paper", group_size=TINY.group_size, rank=4, block_q=16, block_k=16,
             sink_tokens=4, window=32, local_blocks=1, top_p=0.5)
PAPER_SPARSE = SparseConfig(((True,) * 4, (False,) * 4), **PAPER)
DESIGNS = {
    "dense": None,
    # KV groups [layers][groups]: one retrieval (dense) group in layer 0, the rest selected.
    "indexer": SparseConfig(((True, False), (False, False)), rank=8, block_q=16, block_k=16,
                            top_p=0.5),
    # Query heads [layers][heads]: whole retrieval groups (ring buffers for the rest) ...
    "paper_kv_routed": SparseConfig(((True, True, False, False), (False,) * 4), **PAPER),
    # ... and retrieval heads that share a group with local ones.
    "paper_head_routed": SparseConfig(((True, False, False, True), (False, True, False, False)),
                                      **PAPER),
}
prefill = jax.jit(gen.prefill, static_argnames=("config", "max_len", "backend", "sparse"))
prefill_chunked = jax.jit(gen.prefill_chunked,
                          static_argnames=("config", "max_len", "backend", "sparse", "chunk"))
decode = jax.jit(gen.decode_step, static_argnames=("config", "backend", "sparse"))
select = jax.jit(select_prefill, static_argnames=("sparse", "backend"))


@functools.cache
def _model():
    return tiny_model()


@functools.cache
def _indexer(design: str):
    sparse = DESIGNS[design]
    if sparse is None:
        return None
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(64, TINY.num_heads, TINY.head_dim)) for _ in range(2)]
    return init_indexer(queries, TINY, sparse)


@functools.cache
def _prefill_and_step(design: str, backend: str, chunk: int | None):
    """(last-token logits, cache, stats, the next decode step's logits) of one-pass (chunk None)
    or chunked prefill. The decode step runs the reference whatever filled the cache: one
    compiled step per design."""
    tokens, lengths = right_pad(ROWS)
    sparse, indexer, params = DESIGNS[design], _indexer(design), _model().params
    kw = dict(config=TINY, max_len=MAX_LEN, backend=backend, sparse=sparse, indexer=indexer)
    args = (params, jnp.asarray(tokens), jnp.asarray(lengths))
    if chunk is None:
        logits, cache, stats = prefill(*args, **kw)
    else:
        logits, cache, stats = prefill_chunked(*args, chunk=chunk, **kw)
    step, _, _ = decode(params, cache, jnp.asarray(STEP), config=TINY, backend="reference",
                        sparse=sparse, indexer=indexer)
    return logits, cache, stats, step


def _assert_close(actual, expected, what: str = "") -> None:
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0,
                               atol=TOL * np.abs(expected).max(), err_msg=what)


def _assert_same_cache(chunked, one_pass):
    lengths = np.asarray(one_pass["lengths"])
    np.testing.assert_array_equal(np.asarray(chunked["lengths"]), lengths)
    for layer_c, layer_o in zip(chunked["layers"], one_pass["layers"], strict=True):
        assert layer_c.keys() == layer_o.keys()
        for name in layer_o:
            c, o = np.asarray(layer_c[name]), np.asarray(layer_o[name])
            assert c.shape == o.shape, name
            if name in RING_PARTS:  # every slot, the empty ones zero in both
                _assert_close(c, o, name)
                continue
            for b, n in enumerate(lengths):  # positions past a row's length are padding
                _assert_close(c[b, :n], o[b, :n], name)


@pytest.mark.parametrize("chunk", [48, L])  # 48: does not divide L; L: one chunk
@pytest.mark.parametrize("design", list(DESIGNS))
def test_chunked_prefill_equals_one_pass(design, chunk):
    logits, cache, stats, step = _prefill_and_step(design, "reference", None)
    c_logits, c_cache, c_stats, c_step = _prefill_and_step(design, "reference", chunk)
    _assert_close(c_logits, logits)
    _assert_same_cache(c_cache, cache)
    # Integer counts summed in float32: equal, so the same number of blocks was selected.
    np.testing.assert_array_equal(np.asarray(c_stats), np.asarray(stats))
    _assert_close(c_step, step)


@pytest.mark.parametrize("design", ["indexer", "paper_kv_routed", "paper_head_routed"])
def test_chunked_prefill_pallas_interpret(design):
    """The Pallas kernels (interpreted) with a traced query offset: the sparse groups' kernel,
    the dense heads' causal lists and the local heads' sinks + window through it (a 48-token
    chunk holds the sink and window regions: the first chunk as a prompt, later ones over the
    ring or the cache)."""
    assert chunk_kernel_fits(48, PAPER_SPARSE) and not chunk_kernel_fits(32, PAPER_SPARSE)
    logits, cache, stats, step = _prefill_and_step(design, "reference", None)
    c_logits, c_cache, c_stats, c_step = _prefill_and_step(design, "pallas", 48)
    _assert_close(c_logits, logits)
    _assert_same_cache(c_cache, cache)
    np.testing.assert_array_equal(np.asarray(c_stats), np.asarray(stats))
    _assert_close(c_step, step)


@pytest.mark.parametrize("scorer", ["indexer", "oracle"])
def test_chunks_select_the_blocks_of_one_pass(scorer):
    """Given the same queries and keys, each chunk's lists are exactly the one-pass lists of its
    query blocks, though the cache past the chunk holds no keys yet."""
    sparse = DESIGNS["indexer"].replace(scorer=scorer)
    rng = np.random.default_rng(1)
    b, t, groups, g_size, d = 2, L, 2, TINY.group_size, TINY.head_dim
    q = jnp.asarray(rng.normal(size=(b, t, groups * g_size, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, groups, d)), jnp.float32)
    wk = jnp.asarray(rng.normal(size=(groups, d, sparse.rank)), jnp.float32)
    layer_indexer = {"wq": jnp.asarray(rng.normal(size=(groups, g_size, d, sparse.rank)),
                                       jnp.float32), "wk": wk}
    ki = indexer_keys(k, wk)
    lengths = jnp.asarray([L, L - 37])
    indices, counts = select(q, k, ki, lengths, sparse, layer_indexer)
    chunk, bq = 32, sparse.block_q
    for offset in range(0, t, chunk):
        written = (jnp.arange(t) < offset + chunk)[None, :, None, None]
        c_idx, c_cnt = select(q[:, offset:offset + chunk], jnp.where(written, k, 0.0),
                              jnp.where(written, ki, 0.0), lengths, sparse, layer_indexer,
                              q_offset=jnp.int32(offset))
        blocks = slice(offset // bq, (offset + chunk) // bq)
        np.testing.assert_array_equal(np.asarray(c_cnt), np.asarray(counts[:, :, blocks]))
        np.testing.assert_array_equal(np.asarray(c_idx), np.asarray(indices[:, :, blocks]))


def test_generate_and_call_take_a_prefill_chunk():
    model = _model()
    np.testing.assert_array_equal(model.generate(ROWS, 4, eos_token_id=(), prefill_chunk=48),
                                  model.generate(ROWS, 4, eos_token_id=()))
    _assert_close(model(ROWS, prefill_chunk=32), model(ROWS))


def test_bad_chunk_is_refused():
    model = _model().with_sparse(DESIGNS["indexer"], _indexer("indexer"))
    with pytest.raises(ValueError, match="multiple of the sparse config's block_q"):
        model.generate(ROWS, 2, prefill_chunk=24)
    with pytest.raises(ValueError, match="positive"):
        gen.check_prefill_chunk(0, None)
    gen.check_prefill_chunk(24, None)  # a dense model takes any chunk

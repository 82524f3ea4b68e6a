"""Mosaic (TPU) kernels on the CPU: local attention and indexer block scoring + selection.

Every kernel runs in Pallas' TPU interpret mode (pltpu.InterpretParams: SMEM/VMEM, scalar
prefetch and block copies simulated, out-of-bounds block reads raise, scratch starts as NaN)
against the jnp references, with the tolerances of tests/test_local_attention.py and
tests/test_indexer_topp_kernel.py. The lowering tests run the Pallas -> Mosaic lowering (and
Mosaic's IR verifier) at real sizes without a TPU; Mosaic's own compiler passes need libtpu.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer_topp import (
    RULE_ARGS,
    block_logits_reference,
    indexer_topp_reference,
    pool_queries,
    query_block_extent,
    select_blocks_bisect,
    select_blocks_reference,
)
from pallas_kernels.local_attention import local_attention_reference, window_block_lists
from pallas_kernels.tpu_indexer_topp import block_logits_tpu, indexer_topp_tpu, select_blocks_tpu
from pallas_kernels.tpu_local_attention import _block_span, _slot_block, local_attention_tpu
from tests import test_indexer_topp_kernel as indexer_tests
from tests import test_local_attention as local_tests


def _lowers_to_mosaic(fn, *shapes) -> bool:
    """Lowers fn for a TPU without one: Pallas -> Mosaic IR (verified) runs on the CPU."""
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
    return "tpu_custom_call" in text


# ----------------------------------------------------------------------------------------------
# Local attention
# ----------------------------------------------------------------------------------------------


# Query blocks and slots the list test evaluates (enough for its largest case).
SPAN_BLOCKS, SPAN_SLOTS = 72, 8


def test_tpu_block_span_lists_exactly_the_visible_blocks():
    """The index maps' per-step lists: window_block_lists' lists at full length, and exactly
    the blocks holding a key some valid query sees at any shorter length."""
    seqs, windows, sinks, blocks = (1, 300, 520), (1, 129, 700), (0, 4, 200), ((8, 128), (64, 256))
    for seq, window, sink, (block_q, block_k) in itertools.product(seqs, windows, sinks, blocks):
        ids, counts = window_block_lists(seq, seq, sink_tokens=sink, window=window,
                                         block_q=block_q, block_k=block_k)
        nq, max_sel = ids.shape
        assert nq <= SPAN_BLOCKS and max_sel <= SPAN_SLOTS
        lengths = np.array([0, 1, seq // 3, seq])
        # One evaluation for every (length, query block, slot), always [4, SPAN_BLOCKS,
        # SPAN_SLOTS]: one shape, so each eager op compiles once for the whole test.
        _, n_sink, lo, count = (np.asarray(x)[:, :nq] for x in _block_span(
            np.arange(SPAN_BLOCKS)[None, :, None], lengths[:, None, None], block_q=block_q,
            block_k=block_k, sink_tokens=sink, window=window))
        got = np.asarray(_slot_block(np.arange(SPAN_SLOTS), n_sink, lo, count))
        np.testing.assert_array_equal(got[-1, :, :max_sel], ids)
        np.testing.assert_array_equal(count[-1, :, 0], counts)
        assert np.all(count <= max_sel)
        t = np.arange(seq)[:, None]
        k = np.arange(seq)[None, :]
        local = (k <= t) & ((k < sink) | (k > t - window))
        for li, length in enumerate(lengths[:-1]):
            seen = local & (t < length) & (k < length)
            for qb in range(nq):
                rows = seen[qb * block_q:(qb + 1) * block_q].any(axis=0)
                expected = np.unique(np.nonzero(rows)[0] // block_k)
                n = count[li, qb, 0]
                msg = f"{seq=} {window=} {sink=} {block_q=} {length=} block {qb}"
                np.testing.assert_array_equal(got[li, qb, :n], expected, err_msg=msg)
                assert np.all(got[li, qb, n:] == (got[li, qb, n - 1] if n else 0)), msg


LOCAL_CASES = [
    # G = 1, head_dim 64, float32; window 1 (each query sees itself and the sinks), a row of
    # length 0 (every query masked).
    local_tests.Case(30, 2, 200, 2, 2, 64, window=1, sink_tokens=4, lengths=(200, 0),
                     block_q=32, block_k=128),
    # G = 4, head_dim 128, bfloat16; a window one key past a block, sinks past one key block,
    # ragged rows.
    local_tests.Case(31, 2, 270, 8, 2, 128, window=129, sink_tokens=130, lengths=(270, 97),
                     dtype=jnp.bfloat16, block_q=16, block_k=128),
    # G = 8, head_dim 128, float32, block_q 8; window >= seq (plain causal), a row of length 1.
    local_tests.Case(32, 2, 260, 8, 1, 128, window=300, sink_tokens=3, lengths=(260, 1),
                     block_q=8, block_k=256),
]


@pytest.mark.parametrize("case", LOCAL_CASES, ids=local_tests.case_id)
def test_tpu_local_attention_matches_reference(case):
    q, k, v, lengths = local_tests.make_inputs(case)
    kw = dict(sink_tokens=case.sink_tokens, window=case.window)
    ref = local_attention_reference(q, k, v, lengths, **kw)
    out = local_attention_tpu(q, k, v, lengths, block_q=case.block_q, block_k=case.block_k,
                              interpret=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    local_tests.assert_close(out, ref, case.dtype)
    local_tests.assert_padding_rows_zero(out, lengths)


@pytest.mark.parametrize("kwargs,dtype,head_dim,match", [
    (dict(block_q=16, block_k=64), jnp.float32, 64, "block_k"),
    (dict(block_q=12, block_k=128), jnp.float32, 64, "block_q"),
    (dict(block_q=16, block_k=128), jnp.float32, 96, "head_dim"),
    (dict(block_q=16, block_k=128), jnp.float16, 64, "dtype"),
])
def test_tpu_local_attention_rejects_unsupported(kwargs, dtype, head_dim, match):
    q = jnp.zeros((1, 32, 2, head_dim), dtype)
    kv = jnp.zeros((1, 32, 1, head_dim), dtype)
    with pytest.raises(ValueError, match=match):
        local_attention_tpu(q, kv, kv, jnp.array([32], jnp.int32), sink_tokens=4, window=8,
                            interpret=True, **kwargs)


@pytest.mark.parametrize("seq,heads,kv_heads,head_dim,dtype,window,sinks,block_q", [
    (32768, 32, 8, 128, jnp.bfloat16, 8192, 4, 128),  # Llama-3-8B shapes
    (300, 6, 2, 64, jnp.float32, 33, 140, 8),  # ragged, G = 3, sinks > block_k
])
def test_tpu_local_attention_lowers_to_mosaic(seq, heads, kv_heads, head_dim, dtype, window,
                                              sinks, block_q):
    spec = jax.ShapeDtypeStruct
    kv = spec((1, seq, kv_heads, head_dim), dtype)
    assert _lowers_to_mosaic(
        lambda q, k, v, n: local_attention_tpu(q, k, v, n, sink_tokens=sinks, window=window,
                                               block_q=block_q, block_k=128),
        spec((1, seq, heads, head_dim), dtype), kv, kv, spec((1,), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Indexer scoring + selection
# ----------------------------------------------------------------------------------------------

IndexerCase = indexer_tests.Case
SINK, LOCAL = indexer_tests.SINK, indexer_tests.LOCAL
# The references as one compiled program each: eagerly, every op compiles per new shape.
ref_logits = jax.jit(block_logits_reference, static_argnames=("block_k", "scale"))
ref_select = jax.jit(select_blocks_reference, static_argnames=RULE_ARGS)
ref_topp = jax.jit(indexer_topp_reference,
                   static_argnames=("block_q", "block_k", "scale", *RULE_ARGS))

INDEXER_CASES = [
    # bfloat16 keys, rank 8, block_q < block_k; a row of length 0 (no candidate, empty lists).
    (IndexerCase(41, 130, 130, (130, 0), 2, 8, 16, 16, jnp.bfloat16), dict(top_p=0.5)),
    # Decode (one query per row), bfloat16, three key chunks; top-k.
    (IndexerCase(42, 1, 300, (300, 129, 1), 2, 16, 16, 16, jnp.bfloat16, decode=True),
     dict(top_p=0.9, top_k=5)),
    # top_p = 1: every candidate block (full selections); ragged lengths, kv_len not a multiple
    # of block_k, 138 query blocks (two query tiles) and two key chunks.
    (IndexerCase(43, 1100, 1100, (1100, 650), 1, 16, 8, 128), dict(top_p=1.0)),
]

@pytest.mark.parametrize("case,rule", INDEXER_CASES, ids=lambda x: (
    f"seed{x.seed}" if isinstance(x, IndexerCase) else indexer_tests._rule_id(x)))
def test_tpu_block_logits_and_selection_match_reference(case, rule):
    """block_logits_tpu to float32 rounding; the selection on its logits (the Mosaic kernel,
    the bisection in XLA, the reference) exactly."""
    qi, ki, q_start, lengths = indexer_tests.make_inputs(case)
    valid, last = query_block_extent(q_start, lengths, case.q_len, case.block_q)
    pooled = pool_queries(qi, valid)
    kw = dict(block_k=case.block_k, scale=0.6)
    ref = np.asarray(ref_logits(pooled, ki, lengths, last, **kw))
    logits = block_logits_tpu(pooled, ki, lengths, last, interpret=True, **kw)
    out = np.asarray(logits)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert finite.any() and (~finite).any()
    err = np.max(np.abs(out[finite] - ref[finite])) / np.max(np.abs(ref[finite]))
    assert err <= indexer_tests.LOGIT_TOLERANCE, f"relative error {err:.2e}"

    rule_kw = dict(sink_blocks=SINK, local_blocks=LOCAL, **rule)
    last_block = jnp.where(last >= 0, last // case.block_k, -1)
    # indexer_topp_reference's own last step, on the reference logits.
    ref_idx, ref_cnt = ref_select(jnp.asarray(ref), last_block, **rule_kw)
    for select in (functools.partial(select_blocks_tpu, interpret=True), select_blocks_bisect,
                   ref_select):
        idx, cnt = select(logits, last_block, **rule_kw)
        np.testing.assert_array_equal(np.asarray(cnt), np.asarray(ref_cnt))
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    assert (np.asarray(ref_cnt) > LOCAL + SINK).any()


def test_tpu_indexer_topp_matches_reference():
    """The entry point (pooling, the Mosaic scoring and selection kernels) on a later prefill
    chunk: rows past the length (empty query blocks), a row of length 0, clamps,
    G = 3, block_q > block_k."""
    case = IndexerCase(44, 40, 100, (100, 70, 0), 3, 16, 32, 16, q_start=50)
    qi, ki, q_start, lengths = indexer_tests.make_inputs(case)
    kw = dict(block_q=case.block_q, block_k=case.block_k, scale=0.6, sink_blocks=SINK,
              local_blocks=LOCAL, top_p=0.99, min_blocks=4, max_blocks=6)
    ref_idx, ref_cnt = ref_topp(qi, ki, q_start, lengths, **kw)
    idx, cnt = indexer_topp_tpu(qi, ki, q_start, lengths, interpret=True, **kw)
    np.testing.assert_array_equal(np.asarray(cnt), np.asarray(ref_cnt))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    assert (np.asarray(ref_cnt) == 0).any() and (np.asarray(ref_cnt) > LOCAL + SINK).any()


@pytest.mark.parametrize("block_k,dtype,selection,match", [
    (12, jnp.float32, "pallas", "block_k"),
    (8, jnp.bfloat16, "pallas", "block_k"),
    (16, jnp.float16, "pallas", "dtype"),
    (16, jnp.float32, "mosaic", "selection"),
])
def test_tpu_indexer_rejects_unsupported(block_k, dtype, selection, match):
    qi = jnp.zeros((1, 32, 1, 16), dtype)
    n = jnp.array([32], jnp.int32)
    with pytest.raises(ValueError, match=match):
        indexer_topp_tpu(qi, qi, jnp.zeros((1,), jnp.int32), n, block_q=16, block_k=block_k,
                         scale=1.0, top_p=0.9, sink_blocks=1, local_blocks=1, interpret=True,
                         selection=selection)


@pytest.mark.parametrize("nq,kv_len,rank,dtype", [
    (2048, 131072, 16, jnp.bfloat16),  # 128K prefill, 7 sparse groups
    (1, 524288, 16, jnp.bfloat16),  # 512K decode
    (5, 300, 8, jnp.float32),  # ragged everything, rank 8
])
def test_tpu_block_logits_lower_to_mosaic(nq, kv_len, rank, dtype):
    spec = jax.ShapeDtypeStruct
    assert _lowers_to_mosaic(
        lambda p, k, n, last: block_logits_tpu(p, k, n, last, block_k=64, scale=1.0),
        spec((1, nq, 7, rank), jnp.float32), spec((1, kv_len, 7, rank), dtype),
        spec((1,), jnp.int32), spec((1, nq), jnp.int32))


# (rule, tied logits, nk, logits dtype, tile_rows): 30 rows of (batch 3, groups 2, 5 query
# blocks), the blocks padded to whole 128-lane chunks (nk 300: three prefix-count chunks).
SELECTION_CASES = [
    # Ties split at the top-p threshold; rows in tiles of 8, the last one padded.
    (dict(top_p=0.9), True, 300, jnp.float32, 8),
    # The clamps' tie rule (the keep-th largest probability), one chunk mostly padding.
    (dict(top_p=0.99, min_blocks=6, max_blocks=9), True, 37, jnp.float32, None),
    # top-k over ties.
    (dict(top_p=0.9, top_k=6), True, 130, jnp.float32, None),
    # bfloat16 logits (selected as float32), 6 chunks, a 10-step compaction.
    (dict(top_p=0.5), False, 700, jnp.bfloat16, None),
    # Every candidate: full lists, the compaction moves nothing.
    (dict(top_p=1.0), False, 300, jnp.float32, 16),
]


@pytest.mark.parametrize("rule,tied,nk,dtype,tile_rows", SELECTION_CASES,
                         ids=lambda x: indexer_tests._rule_id(x) if isinstance(x, dict) else None)
def test_tpu_selection_kernel_matches_reference(rule, tied, nk, dtype, tile_rows):
    """select_blocks_tpu equals the reference exactly (on the logits as float32): ragged and
    empty rows (last block -1), ties, clamps, top-k, GQA groups sharing a last block."""
    batch, groups, nq = 3, 2, 5
    logits = indexer_tests._random_logits(nk + len(str(rule)), (batch, groups, nq, nk), tied)
    logits = logits.astype(dtype)
    last_block = indexer_tests._random_last_block(nk, batch, nq, nk)
    kw = dict(sink_blocks=SINK, local_blocks=LOCAL, **rule)
    ref_idx, ref_cnt = ref_select(logits.astype(jnp.float32), last_block, **kw)
    idx, cnt = select_blocks_tpu(logits, last_block, interpret=True, tile_rows=tile_rows, **kw)
    np.testing.assert_array_equal(np.asarray(cnt), np.asarray(ref_cnt))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    assert (np.asarray(ref_cnt) == 0).any() and (np.asarray(ref_cnt) > SINK + LOCAL).any()
    if tied:  # some selections end inside a tie group, and take its first blocks
        assert indexer_tests.split_tie_groups(logits, last_block, idx, cnt) > 0


def test_tpu_selection_rejects_unsupported_tile_rows():
    logits = jnp.zeros((1, 1, 4, 10), jnp.float32)
    with pytest.raises(ValueError, match="tile_rows"):
        select_blocks_tpu(logits, jnp.zeros((1, 4), jnp.int32), top_p=0.9, sink_blocks=1,
                          local_blocks=1, tile_rows=12, interpret=True)


SELECTION_LOWERING_RULES = [dict(top_p=0.9), dict(top_p=0.9, min_blocks=4, max_blocks=64),
                            dict(top_p=1.0, top_k=8)]


@pytest.mark.parametrize("rule", SELECTION_LOWERING_RULES, ids=indexer_tests._rule_id)
@pytest.mark.parametrize("nq,nk", [
    (2048, 2048),  # 128K prefill, 64-token blocks
    (1, 2048),  # 128K decode
    (1, 16384),  # 1M decode
    (3, 24),  # ragged everything
])
def test_tpu_selection_lowers_to_mosaic(rule, nq, nk):
    spec = jax.ShapeDtypeStruct
    assert _lowers_to_mosaic(
        lambda logits, last: select_blocks_tpu(logits, last, sink_blocks=SINK,
                                               local_blocks=LOCAL, **rule),
        spec((1, 7, nq, nk), jnp.float32), spec((1, nq), jnp.int32))


@pytest.mark.parametrize("q_len", [131072, 1])  # 128K prefill, 128K decode
def test_tpu_indexer_topp_lowers_to_mosaic(q_len):
    """The entry point: pooling in XLA around the scoring and the selection kernel."""
    spec = jax.ShapeDtypeStruct
    fn = functools.partial(indexer_topp_tpu, block_q=64, block_k=64, scale=1.0, top_p=0.95,
                           sink_blocks=SINK, local_blocks=LOCAL)
    text = jax.jit(fn).trace(
        spec((1, q_len, 7, 16), jnp.bfloat16), spec((1, 131072, 7, 16), jnp.bfloat16),
        spec((1,), jnp.int32), spec((1,), jnp.int32)).lower(lowering_platforms=("tpu",)).as_text()
    for kernel in ("indexer_block_logits_tpu", "indexer_select_blocks_tpu"):
        assert f'kernel_name = "{kernel}"' in text

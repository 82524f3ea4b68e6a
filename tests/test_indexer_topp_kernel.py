"""Indexer scoring + top-p selection: Pallas kernels (interpret mode) vs the jnp reference.

Block logits must match the reference to float32 rounding (and exactly in where they are
-inf); block lists and counts must match exactly, ties at the threshold included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer_topp import (
    block_logits,
    block_logits_reference,
    indexer_topp,
    indexer_topp_reference,
    pool_queries,
    query_block_extent,
    select_blocks,
    select_blocks_bisect,
    select_blocks_reference,
)

# Largest |kernel - reference| of finite block logits, relative to max |reference logit|.
LOGIT_TOLERANCE = 1e-5
SINK, LOCAL = 1, 2


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    q_len: int
    kv_len: int
    lengths: tuple[int, ...]  # one per row
    groups: int
    rank: int
    block_q: int
    block_k: int
    dtype: type = jnp.float32
    decode: bool = False  # q_start = lengths - 1 (q_len must be 1)
    q_start: int = 0  # for prefill chunks
    kernel_kwargs: tuple[tuple[str, object], ...] = ()


def make_inputs(case: Case):
    """(qi, ki, q_start, lengths); ki past each row's length is NaN, which must never leak."""
    rng = np.random.default_rng(case.seed)
    batch = len(case.lengths)
    qi = rng.normal(size=(batch, case.q_len, case.groups, case.rank))
    ki = rng.normal(size=(batch, case.kv_len, case.groups, case.rank))
    lengths = np.asarray(case.lengths, np.int32)
    ki[np.arange(case.kv_len)[None, :] >= lengths[:, None]] = np.nan
    q_start = lengths - 1 if case.decode else np.full((batch,), case.q_start, np.int32)
    return (jnp.asarray(qi, case.dtype), jnp.asarray(ki, case.dtype), jnp.asarray(q_start),
            jnp.asarray(lengths))


# (case, selection rule): every case runs both kernels against the reference.
CASES = [
    # Ragged prompt lengths, block_q > block_k, kv_len not a multiple of block_k.
    (Case(1, 150, 150, (150, 97), 3, 16, 32, 16), dict(top_p=0.9)),
    # bfloat16 indexer inputs, rank 8 (zero-padded to the smallest dot), block_q < block_k.
    (Case(2, 130, 130, (130, 61), 2, 8, 16, 32, jnp.bfloat16), dict(top_p=0.5)),
    # A later prefill chunk: q_start > 0, rows past the length (empty query blocks), clamps.
    (Case(3, 40, 100, (100, 70), 2, 16, 16, 16, q_start=50),
     dict(top_p=0.99, min_blocks=4, max_blocks=6)),
    # Decode: one query per row at position lengths - 1.
    (Case(4, 1, 300, (300, 129, 1), 2, 16, 16, 64, jnp.bfloat16, decode=True),
     dict(top_p=0.9)),
    # Small tiles and chunks: every program mixes unmasked, masked and dead key blocks.
    (Case(5, 200, 200, (200,), 1, 16, 16, 16,
          kernel_kwargs=(("tile_q", 16), ("chunk_blocks", 4))), dict(top_p=1.0)),
]


def _rule_id(rule: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in rule.items())


@pytest.mark.parametrize("case,rule", CASES, ids=lambda x: (
    f"seed{x.seed}" if isinstance(x, Case) else _rule_id(x)))
def test_kernels_match_reference(case, rule):
    """block_logits to float32 rounding, then select_blocks on its logits exactly."""
    qi, ki, q_start, lengths = make_inputs(case)
    valid, last = query_block_extent(q_start, lengths, case.q_len, case.block_q)
    pooled = pool_queries(qi, valid)
    kw = dict(block_k=case.block_k, scale=0.6)
    ref = np.asarray(block_logits_reference(pooled, ki, lengths, last, **kw))
    logits = block_logits(pooled, ki, lengths, last, interpret=True, **kw,
                          **dict(case.kernel_kwargs))
    out = np.asarray(logits)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert finite.any() and (~finite).any()
    err = np.max(np.abs(out[finite] - ref[finite])) / np.max(np.abs(ref[finite]))
    assert err <= LOGIT_TOLERANCE, f"relative error {err:.2e}"

    rule_kw = dict(sink_blocks=SINK, local_blocks=LOCAL, **rule)
    ref_idx, ref_cnt = indexer_topp_reference(qi, ki, q_start, lengths, block_q=case.block_q,
                                              **kw, **rule_kw)
    last_block = jnp.where(last >= 0, last // case.block_k, -1)
    idx, cnt = select_blocks(logits, last_block, interpret=True, **rule_kw)
    np.testing.assert_array_equal(np.asarray(cnt), np.asarray(ref_cnt))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    assert (np.asarray(cnt) > LOCAL + SINK).any()


@pytest.mark.parametrize("selection", ["pallas", "bisect"])
def test_indexer_topp_matches_reference(selection):
    case, rule = CASES[0]
    qi, ki, q_start, lengths = make_inputs(case)
    kw = dict(block_q=case.block_q, block_k=case.block_k, scale=0.6, sink_blocks=SINK,
              local_blocks=LOCAL, **rule)
    ref_idx, ref_cnt = indexer_topp_reference(qi, ki, q_start, lengths, **kw)
    idx, cnt = indexer_topp(qi, ki, q_start, lengths, interpret=True, selection=selection, **kw)
    np.testing.assert_array_equal(np.asarray(cnt), np.asarray(ref_cnt))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))


def _random_logits(seed: int, shape, tied: bool):
    """Block logits with peaked and flat rows, -inf entries, and (tied) many exact ties."""
    rng = np.random.default_rng(seed)
    spread = rng.choice([0.5, 3.0], shape[:-1] + (1,))
    # Tied: few distinct values, so tie groups straddle the top-p threshold.
    logits = rng.choice([0.0, 0.37, 1.1, 2.3], shape) if tied else rng.normal(size=shape) * spread
    logits[rng.random(shape) < 0.03] = -np.inf  # candidate blocks with no mass
    return jnp.asarray(logits, jnp.float32)


def _random_last_block(seed: int, batch: int, nq: int, nk: int):
    rng = np.random.default_rng(seed)
    last = rng.integers(-1, nk, (batch, nq))
    last[0, 0] = -1  # an empty query block (past the length)
    last[0, 1] = 0  # a single candidate
    last[-1, -1] = nk - 1  # every block a candidate
    return jnp.asarray(last, jnp.int32)


RULES = [
    dict(top_p=0.5),
    dict(top_p=0.9),
    dict(top_p=0.99),
    dict(top_p=1.0),
    dict(top_p=0.9, top_k=6),
    dict(top_p=0.9, min_blocks=8),
    dict(top_p=0.5, max_blocks=5),
    dict(top_p=0.99, min_blocks=6, max_blocks=9),
    dict(top_p=1.0, max_blocks=7),
    dict(top_p=1.0, top_k=3, max_blocks=3),  # the "none" scorer: forced blocks only
]


# Each rule once, with distinct logits or (every other rule) many exact ties.
@pytest.mark.parametrize("rule,tied", [(rule, i % 2 == 1) for i, rule in enumerate(RULES)],
                         ids=lambda x: _rule_id(x) if isinstance(x, dict) else f"tied{x}")
def test_selection_matches_reference(rule, tied):
    batch, groups, nq, nk = 3, 2, 6, 37
    logits = _random_logits(len(str(rule)), (batch, groups, nq, nk), tied)
    last_block = _random_last_block(11, batch, nq, nk)
    kw = dict(sink_blocks=SINK, local_blocks=LOCAL, **rule)
    ref = select_blocks_reference(logits, last_block, **kw)
    for out in (select_blocks(logits, last_block, interpret=True, **kw),
                select_blocks_bisect(logits, last_block, **kw)):
        np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ref[1]))
        np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))


def test_selection_tiles_of_several_rows():
    """Tiles of several rows, the last one partial, span batch rows and query blocks: each row
    reads its own (batch row, query block) last block."""
    batch, groups, nq, nk = 3, 2, 5, 23
    logits = _random_logits(3, (batch, groups, nq, nk), tied=False)
    last_block = _random_last_block(4, batch, nq, nk)
    kw = dict(top_p=0.9, sink_blocks=SINK, local_blocks=LOCAL)
    ref = select_blocks_reference(logits, last_block, **kw)
    out = select_blocks(logits, last_block, interpret=True, tile_rows=8, **kw)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ref[1]))
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))


def test_single_query_row_extent_and_pooling():
    """One query row (decode) takes no reduction; its block holds that row when the row is
    before the length (pooled = the row, last = its position) and nothing otherwise (pooled 0,
    even from a NaN row, last -1)."""
    q_start = jnp.asarray([5, 0, 9, 3], jnp.int32)
    lengths = jnp.asarray([6, 1, 9, 2], jnp.int32)  # rows 2 and 3 are past their length
    qi = np.random.default_rng(0).normal(size=(4, 1, 3, 8)).astype(np.float32)
    qi[2] = np.nan
    valid, last = query_block_extent(q_start, lengths, 1, 16)
    np.testing.assert_array_equal(np.asarray(last), [[5], [0], [-1], [-1]])
    pooled = np.asarray(pool_queries(jnp.asarray(qi, jnp.bfloat16), valid))
    assert pooled.dtype == np.float32
    expected = np.asarray(jnp.asarray(qi, jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(pooled[:2], expected[:2])
    np.testing.assert_array_equal(pooled[2:], 0.0)


def test_ties_at_the_threshold_resolve_by_block_index():
    """The tied case really splits tie groups at the threshold, and the kernel splits them as the
    reference does (lowest block indices first)."""
    batch, groups, nq, nk = 4, 2, 8, 29
    logits = _random_logits(5, (batch, groups, nq, nk), tied=True)
    last_block = _random_last_block(6, batch, nq, nk)
    kw = dict(top_p=0.9, sink_blocks=SINK, local_blocks=LOCAL)
    ref_idx, ref_cnt = (np.asarray(x) for x in select_blocks_reference(logits, last_block, **kw))
    idx, cnt = (np.asarray(x) for x in select_blocks(logits, last_block, interpret=True, **kw))
    np.testing.assert_array_equal(cnt, ref_cnt)
    np.testing.assert_array_equal(idx, ref_idx)
    assert split_tie_groups(logits, last_block, idx, cnt) > 0


def split_tie_groups(logits, last_block, idx, cnt) -> int:
    """How many rows' selections take part of the tie group at their weakest kept free block
    (asserting that they take its lowest block indices). Shapes as `select_blocks`' in/outputs,
    rule with SINK and LOCAL forced blocks."""
    lg, lb, idx, cnt = (np.asarray(x) for x in (logits, last_block, idx, cnt))
    split_groups = 0
    for b, g, i in np.ndindex(cnt.shape):
        last = lb[b, i]
        free = [j for j in range(last + 1) if SINK <= j <= last - LOCAL]
        chosen = set(idx[b, g, i, :cnt[b, g, i]].tolist())
        kept = [j for j in free if j in chosen]
        if not kept or len(kept) == len(free):
            continue
        weakest = min(lg[b, g, i, j] for j in kept)
        tied = [j for j in free if lg[b, g, i, j] == weakest]
        taken = [j for j in tied if j in chosen]
        if 0 < len(taken) < len(tied):
            split_groups += 1
            assert taken == tied[:len(taken)], "ties are taken in block order"
    return split_groups


def _lowers_to_triton(fn, *shapes) -> bool:
    """Lowers fn for a CUDA GPU without one: the Pallas -> Triton IR step runs on the CPU."""
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    return "xla.gpu.triton" in text


@pytest.mark.parametrize("nq,kv_len,rank,dtype", [
    (2048, 131072, 16, jnp.bfloat16),  # 128K prefill, 7 sparse groups
    (1, 524288, 16, jnp.bfloat16),  # 512K decode
    (5, 300, 8, jnp.float32),  # ragged everything, rank padded
])
def test_block_logits_lower_to_triton(nq, kv_len, rank, dtype):
    spec = jax.ShapeDtypeStruct
    assert _lowers_to_triton(
        lambda p, k, n, last: block_logits(p, k, n, last, block_k=64, scale=1.0),
        spec((1, nq, 7, rank), jnp.float32), spec((1, kv_len, 7, rank), dtype),
        spec((1,), jnp.int32), spec((1, nq), jnp.int32))


@pytest.mark.parametrize("rule", [dict(top_p=0.9), dict(top_p=0.9, min_blocks=4, max_blocks=64),
                                  dict(top_p=1.0, top_k=8)], ids=_rule_id)
@pytest.mark.parametrize("nq,nk", [(2048, 2048), (1, 8192), (3, 24)])
def test_selection_lowers_to_triton(rule, nq, nk):
    spec = jax.ShapeDtypeStruct
    assert _lowers_to_triton(
        lambda logits, last: select_blocks(logits, last, sink_blocks=SINK, local_blocks=LOCAL,
                                           **rule),
        spec((2, 7, nq, nk), jnp.float32), spec((2, nq), jnp.int32))

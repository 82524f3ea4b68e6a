"""Sparse decode attention: reference vs naive dense; split-K kernel (interpret) vs reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_decode import sparse_decode, sparse_decode_reference

# Largest |kernel - reference| allowed, relative to max |reference|, per input dtype.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# How one (row, KV head) list is drawn.
EMPTY, FULL, RANDOM, WITH_LAST = range(4)


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    lengths: tuple[int, ...]  # one per row
    max_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_k: int
    dtype: type
    num_splits: int | None


def draw_selection(rng, case: Case, batch: int):
    """Random lists over each row's valid blocks, cycling through the drawing modes.

    Returns block_indices [B, K, nk] (padded with the last valid entry, 0 when empty) and
    block_counts [B, K].
    """
    nk = -(-case.max_len // case.block_k)
    idx = np.zeros((batch, case.num_kv_heads, nk), np.int32)
    cnt = np.zeros((batch, case.num_kv_heads), np.int32)
    modes = rng.permutation(np.arange(cnt.size) % 4).reshape(cnt.shape)
    for b, g in np.ndindex(cnt.shape):
        last = (case.lengths[b] - 1) // case.block_k  # block of the newest token
        mode = modes[b, g]
        if mode == EMPTY:
            sel = np.zeros(0, np.int32)
        elif mode == FULL:
            sel = np.arange(last + 1)
        else:
            sel = rng.choice(last + 1, size=rng.integers(1, last + 2), replace=False)
            if mode == WITH_LAST:
                sel = np.union1d(sel, [last])
        sel = np.sort(sel).astype(np.int32)
        cnt[b, g] = len(sel)
        idx[b, g, : len(sel)] = sel
        idx[b, g, len(sel) :] = sel[-1] if len(sel) else 0
    return jnp.asarray(idx), jnp.asarray(cnt)


def make_inputs(case: Case):
    batch = len(case.lengths)
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(case.seed), 3)
    q = jax.random.normal(kq, (batch, case.num_heads, case.head_dim))
    cache_shape = (batch, case.max_len, case.num_kv_heads, case.head_dim)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    # Poison the cache past each row's length: it must never leak into an output.
    past = jnp.arange(case.max_len)[None, :, None, None] >= lengths[:, None, None, None]
    k = jnp.where(past, jnp.nan, jax.random.normal(kk, cache_shape))
    v = jnp.where(past, jnp.nan, jax.random.normal(kv, cache_shape))
    idx, cnt = draw_selection(np.random.default_rng(case.seed), case, batch)
    return q.astype(case.dtype), k.astype(case.dtype), v.astype(case.dtype), idx, cnt, lengths


def naive_decode(q, k, v, idx, cnt, lengths, block_k):
    """Dense masked softmax over the whole cache in float64 numpy, mask built per key."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.nan_to_num(k), np.nan_to_num(v)  # masked anyway; keeps 0 * NaN out of the sums
    batch, max_len, kv_heads, _ = k.shape
    group = q.shape[1] // kv_heads
    mask = np.zeros((batch, kv_heads, max_len), bool)
    for b, g in np.ndindex(batch, kv_heads):
        for j in np.asarray(idx[b, g, : cnt[b, g]]):
            mask[b, g, j * block_k : (j + 1) * block_k] = True
    mask &= np.arange(max_len)[None, None, :] < np.asarray(lengths)[:, None, None]
    mask = np.repeat(mask, group, axis=1)  # [B, H, S]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bhd,bshd->bhs", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(row_max), row_max, 0)), 0)
    denom = p.sum(-1, keepdims=True)
    return np.einsum("bhs,bshd->bhd", p / np.where(denom > 0, denom, 1), v), ~mask.any(-1)


def test_reference_matches_naive_dense():
    case = Case(1, (100, 37, 64), 100, 8, 2, 16, 16, jnp.float32, None)
    q, k, v, idx, cnt, lengths = make_inputs(case)
    ref = sparse_decode_reference(q, k, v, idx, cnt, lengths, block_k=case.block_k)
    naive, empty = naive_decode(q, k, v, idx, cnt, lengths, case.block_k)
    np.testing.assert_allclose(np.asarray(ref), naive, rtol=1e-5, atol=1e-5)
    assert empty.any() and np.all(np.asarray(ref)[empty] == 0)


KERNEL_CASES = [
    # G = 1, smallest blocks, ragged cache, lengths cutting blocks, a one-token row.
    Case(10, (200, 77, 1), 200, 4, 4, 64, 16, jnp.float32, 1),
    # G = 4, head_dim 128, uneven splits.
    Case(11, (256, 100), 256, 8, 2, 128, 32, jnp.bfloat16, 3),
    # G = 8, largest blocks, automatic split count.
    Case(12, (300, 129), 300, 8, 1, 64, 128, jnp.float32, None),
    # G = 3 (padded up to the smallest dot), more splits than some lists have blocks.
    Case(13, (192, 70, 150), 192, 6, 2, 64, 64, jnp.bfloat16, 4),
    # One split (the kernel writes the output, no merge): G = 3 padded, 4 KV heads whose padded
    # rows overlap the next head's, ragged lengths with a one-token row, bf16.
    Case(14, (130, 1, 64, 97), 160, 12, 4, 32, 16, jnp.bfloat16, 1),
    # G = 16 fills the score tile (no padded rows to mask), one split and several.
    Case(15, (100, 64), 128, 32, 2, 32, 16, jnp.float32, 1),
    Case(16, (100, 64), 128, 32, 2, 32, 16, jnp.bfloat16, 5),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"seed{c.seed}")
def test_kernel_matches_reference(case):
    q, k, v, idx, cnt, lengths = make_inputs(case)
    ref = sparse_decode_reference(q, k, v, idx, cnt, lengths, block_k=case.block_k)
    out = sparse_decode(
        q, k, v, idx, cnt, lengths, block_k=case.block_k, num_splits=case.num_splits,
        interpret=True,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    out32 = np.asarray(jnp.asarray(out, jnp.float32))
    ref32 = np.asarray(jnp.asarray(ref, jnp.float32))
    assert not np.isnan(out32).any()
    err = np.max(np.abs(out32 - ref32)) / np.max(np.abs(ref32))
    assert err <= TOLERANCE[case.dtype], f"relative error {err:.2e}"
    # Heads whose list is empty have no visible key: exactly 0.
    group = case.num_heads // case.num_kv_heads
    empty = np.repeat(np.asarray(cnt) == 0, group, axis=1)  # [B, H]
    assert empty.any()
    assert np.all(out32[empty] == 0)


def test_one_split_runs_the_kernel_alone():
    """With one split the kernel's output is the result: no merge (or any other op) follows."""
    case = KERNEL_CASES[4]
    args = make_inputs(case)
    jaxpr = jax.make_jaxpr(lambda *a: sparse_decode(
        *a, block_k=case.block_k, num_splits=1, interpret=True))(*args)
    (call,) = jaxpr.eqns  # the jitted sparse_decode
    assert [e.primitive.name for e in call.params["jaxpr"].eqns] == ["pallas_call"]


@pytest.mark.parametrize("num_splits", [1, 8])
def test_lowers_to_triton(num_splits):
    """Both output paths lower for a CUDA GPU without one (the Pallas -> Triton IR step runs on
    the CPU): 128K, batch 1, 7 KV heads of 4 query heads, bf16."""
    spec = jax.ShapeDtypeStruct
    cache = spec((1, 131072, 7, 128), jnp.bfloat16)
    text = jax.jit(lambda *a: sparse_decode(*a, block_k=64, num_splits=num_splits)).trace(
        spec((1, 28, 128), jnp.bfloat16), cache, cache, spec((1, 7, 2048), jnp.int32),
        spec((1, 7), jnp.int32), spec((1,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


def test_default_splits_follow_the_sm_count():
    """More SMs or fewer rows -> more splits, never past MIN_BLOCKS_PER_SPLIT blocks a split and
    never fewer than keep a full list's walk within MAX_BLOCKS_PER_SPLIT blocks; a device that
    reports no SMs splits as far as MIN_BLOCKS_PER_SPLIT allows."""
    from pallas_kernels.sparse_decode import (
        MAX_BLOCKS_PER_SPLIT,
        MIN_BLOCKS_PER_SPLIT,
        default_num_splits,
    )

    most = 256 // MIN_BLOCKS_PER_SPLIT
    assert default_num_splits(1, 8, 256, sms=132) == min(-(-264 // 8), most)
    assert default_num_splits(16, 8, 256, sms=132) == 256 // MAX_BLOCKS_PER_SPLIT
    assert default_num_splits(16, 8, 256, sms=132, max_walk=None) == 3  # the SM fill alone
    assert default_num_splits(16, 7, 2048, sms=132) == 2048 // MAX_BLOCKS_PER_SPLIT
    assert default_num_splits(1, 8, 256, sms=16) == 4
    assert default_num_splits(1, 1, 2, sms=132) == 1
    assert default_num_splits(1, 8, 256, sms=0) == most
    # Rows enough to fill every SM and short lists: one split, so no merge.
    assert default_num_splits(64, 8, MAX_BLOCKS_PER_SPLIT, sms=132) == 1

"""Block-sparse prefill attention: reference vs naive dense; kernel (interpret) vs reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference

# Largest |kernel - reference| allowed, relative to max |reference|, per input dtype.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# How one (row, KV head, query block) list is drawn.
EMPTY, FULL, RANDOM, WITH_DIAGONAL, WITH_FUTURE = range(5)


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    batch: int
    q_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_q: int
    block_k: int
    dtype: type
    lengths: tuple[int, ...] | None = None  # None: every row has kv_len keys
    q_offset: int = 0
    kv_len: int | None = None  # None: q_offset + q_len
    kernel_kwargs: tuple[tuple[str, object], ...] = ()
    window: int | None = None  # None: no sink/window mask
    sink_tokens: int = 0

    @property
    def keys(self) -> int:
        return self.q_offset + self.q_len if self.kv_len is None else self.kv_len


def draw_selection(rng, case: Case):
    """Random block lists, one drawing mode per list, cycling so every mode occurs.

    Returns block_indices [B, K, nq, nk] (padded with the last valid entry, 0 when empty) and
    block_counts [B, K, nq].
    """
    nq = -(-case.q_len // case.block_q)
    nk = -(-case.keys // case.block_k)
    idx = np.zeros((case.batch, case.num_kv_heads, nq, nk), np.int32)
    cnt = np.zeros((case.batch, case.num_kv_heads, nq), np.int32)
    modes = rng.permutation(np.arange(idx[..., 0].size) % 5).reshape(cnt.shape)
    for pos in np.ndindex(cnt.shape):
        i = pos[2]
        last_q = case.q_offset + min((i + 1) * case.block_q, case.q_len) - 1
        diag = min(last_q // case.block_k, nk - 1)  # last block with a causal key
        mode = modes[pos]
        if mode == EMPTY:
            sel = np.zeros(0, np.int32)
        elif mode == FULL:
            sel = np.arange(diag + 1)
        elif mode == WITH_FUTURE:
            sel = rng.choice(nk, size=rng.integers(1, nk + 1), replace=False)
        else:
            sel = rng.choice(diag + 1, size=rng.integers(1, diag + 2), replace=False)
            if mode == WITH_DIAGONAL:
                sel = np.union1d(sel, [diag])
        sel = np.sort(sel).astype(np.int32)
        cnt[pos] = len(sel)
        idx[pos][: len(sel)] = sel
        idx[pos][len(sel) :] = sel[-1] if len(sel) else 0
    return jnp.asarray(idx), jnp.asarray(cnt)


def make_inputs(case: Case):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(case.seed), 3)
    q = jax.random.normal(kq, (case.batch, case.q_len, case.num_heads, case.head_dim))
    kv_shape = (case.batch, case.keys, case.num_kv_heads, case.head_dim)
    k = jax.random.normal(kk, kv_shape)
    v = jax.random.normal(kv, kv_shape)
    lengths = jnp.full((case.batch,), case.keys, jnp.int32)
    if case.lengths is not None:
        lengths = jnp.asarray(case.lengths, jnp.int32)
        # Poison the cache past each row's length: it must never leak into an output.
        past = jnp.arange(case.keys)[None, :, None, None] >= lengths[:, None, None, None]
        k, v = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
    idx, cnt = draw_selection(np.random.default_rng(case.seed), case)
    cast = [x.astype(case.dtype) for x in (q, k, v)]
    return (*cast, idx, cnt, lengths)


def dense_mask(idx, cnt, lengths, case: Case):
    """Naive [B, K, T, S] visibility mask built token by token from the block lists."""
    nk = idx.shape[-1]
    listed = np.zeros((*cnt.shape, nk), bool)  # [B, K, nq, nk]
    for pos in np.ndindex(cnt.shape):
        listed[pos][np.asarray(idx[pos][: cnt[pos]])] = True
    t = np.arange(case.q_len)
    s = np.arange(case.keys)
    visible = listed[:, :, t // case.block_q][..., s // case.block_k]
    q_pos = case.q_offset + t
    lens = np.asarray(lengths)[:, None, None, None]
    mask = (
        visible
        & (s[None, None, None, :] <= q_pos[None, None, :, None])
        & (s[None, None, None, :] < lens)
        & (q_pos[None, None, :, None] < lens)
    )
    if case.window is not None:
        mask &= (s < case.sink_tokens)[None, :] | (s[None, :] > q_pos[:, None] - case.window)
    return mask


def naive_attention(q, k, v, mask):
    """Dense masked softmax in float64 numpy.

    q: [B, T, H, D]; k, v: [B, S, K, D]; mask: [B, K, T, S] -> [B, T, H, D].
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.nan_to_num(k), np.nan_to_num(v)  # masked anyway; keeps 0 * NaN out of the sums
    group = q.shape[2] // k.shape[2]
    mask = np.repeat(mask, group, axis=1)  # [B, H, T, S]
    s = np.einsum("bthd,bshd->bhts", q, np.repeat(k, group, axis=2)) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(row_max), row_max, 0)), 0)
    denom = p.sum(-1, keepdims=True)
    p = p / np.where(denom > 0, denom, 1)
    return np.einsum("bhts,bshd->bthd", p, np.repeat(v, group, axis=2))


def assert_close(out, ref, dtype):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert not np.isnan(out).any()
    err = np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


REFERENCE_CASES = [
    Case(1, 2, 70, 4, 2, 16, 16, 16, jnp.float32, lengths=(70, 45)),
    Case(2, 1, 40, 8, 2, 32, 32, 16, jnp.float32, lengths=(75,), q_offset=37, kv_len=90),
    # Sinks + sliding window over random lists, in a later chunk.
    Case(3, 1, 60, 4, 2, 16, 16, 16, jnp.float32, lengths=(90,), q_offset=30, kv_len=90,
         window=23, sink_tokens=5),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: f"seed{c.seed}")
def test_reference_matches_naive_dense(case):
    q, k, v, idx, cnt, lengths = make_inputs(case)
    ref = sparse_attention_reference(
        q, k, v, idx, cnt, block_q=case.block_q, block_k=case.block_k, lengths=lengths,
        q_offset=case.q_offset, window=case.window, sink_tokens=case.sink_tokens,
    )
    mask = dense_mask(idx, cnt, lengths, case)
    naive = naive_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(ref), naive, rtol=1e-5, atol=1e-5)
    empty_rows = ~mask.any(-1)  # [B, K, T]
    assert empty_rows.any() and (~empty_rows).any()


def test_reference_with_all_causal_blocks_is_causal_attention():
    batch, q_len, heads, kv_heads, dim, block_q, block_k = 2, 96, 8, 2, 32, 32, 16
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(kq, (batch, q_len, heads, dim))
    k = jax.random.normal(kk, (batch, q_len, kv_heads, dim))
    v = jax.random.normal(kv, (batch, q_len, kv_heads, dim))
    nq, nk = q_len // block_q, q_len // block_k
    diag = ((np.arange(nq) + 1) * block_q - 1) // block_k
    idx = np.minimum(np.arange(nk)[None, :], diag[:, None])  # padded with the last entry
    idx = jnp.broadcast_to(jnp.asarray(idx, jnp.int32), (batch, kv_heads, nq, nk))
    cnt = jnp.broadcast_to(jnp.asarray(diag + 1, jnp.int32), (batch, kv_heads, nq))
    ref = sparse_attention_reference(q, k, v, idx, cnt, block_q=block_q, block_k=block_k)
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(dense), rtol=1e-5, atol=1e-5)


KERNEL_CASES = [
    # G = 1, smallest blocks, ragged q_len, a length cutting a block, rows past the length.
    Case(10, 2, 100, 2, 2, 64, 16, 16, jnp.float32, lengths=(100, 77)),
    # G = 4, block_q > block_k, head_dim 128.
    Case(11, 2, 90, 8, 2, 128, 32, 16, jnp.bfloat16, lengths=(90, 41)),
    # G = 8, block_q < block_k.
    Case(12, 1, 130, 8, 1, 64, 16, 64, jnp.float32, lengths=(111,)),
    # Largest blocks; query blocks split into several program tiles sharing one list.
    Case(13, 1, 300, 8, 2, 64, 128, 128, jnp.bfloat16, lengths=(260,)),
    # A later chunk: q_offset > 0, ragged kv_len, some rows past the length.
    Case(14, 2, 50, 8, 2, 64, 32, 32, jnp.float32, lengths=(120, 144), q_offset=80, kv_len=144),
    # G = 3 (not a power of 2): per-head loop instead of the folded tile.
    Case(15, 1, 128, 6, 2, 64, 64, 32, jnp.bfloat16),
    # Per-head loop forced for G = 4, with an explicit program tile.
    Case(16, 1, 96, 8, 2, 64, 64, 32, jnp.float32, lengths=(90,),
         kernel_kwargs=(("fold_heads", False), ("tile_q", 16))),
    # Sinks (> block_k) + a window over random lists (blocks partly or wholly outside it), in a
    # later chunk: the window is on absolute positions.
    Case(17, 2, 64, 8, 2, 64, 32, 16, jnp.float32, lengths=(150, 100), q_offset=96, kv_len=160,
         window=50, sink_tokens=20),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"seed{c.seed}")
def test_kernel_matches_reference(case):
    q, k, v, idx, cnt, lengths = make_inputs(case)
    kwargs = dict(block_q=case.block_q, block_k=case.block_k, lengths=lengths,
                  q_offset=case.q_offset, window=case.window, sink_tokens=case.sink_tokens)
    ref = sparse_attention_reference(q, k, v, idx, cnt, **kwargs)
    out = sparse_attention(q, k, v, idx, cnt, interpret=True, **kwargs, **dict(case.kernel_kwargs))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, case.dtype)
    # Rows with no visible key (empty list, missed diagonal, past the length) are exactly 0.
    empty = ~dense_mask(idx, cnt, lengths, case).any(-1)  # [B, K, T]
    group = case.num_heads // case.num_kv_heads
    empty = np.repeat(empty, group, axis=1).transpose(0, 2, 1)  # [B, T, H]
    assert empty.any()
    assert np.all(np.asarray(out)[empty] == 0)

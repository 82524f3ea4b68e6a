"""Mosaic (TPU) block-sparse prefill and sparse decode kernels vs their references.

The kernels run in Pallas TPU interpret mode (pltpu.InterpretParams) on the CPU; the input
drawing, tolerances and checks are the Triton kernel tests' own. Sizes are tiny: every grid step
costs ~15 ms interpreted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.sparse_attention import sparse_attention_reference
from pallas_kernels.sparse_decode import sparse_decode_reference
from pallas_kernels.tpu_sparse_attention import sparse_attention_tpu
from pallas_kernels.tpu_sparse_decode import sparse_decode_tpu
from tests import test_sparse_decode_kernel as decode_tests
from tests.test_sparse_attention_kernel import Case, assert_close, dense_mask, make_inputs

# Jitted: one compile instead of dozens of eager op compiles per shape keeps the file fast.
prefill_reference = jax.jit(
    sparse_attention_reference,
    static_argnames=("block_q", "block_k", "sm_scale", "window", "sink_tokens"),
)
decode_reference = jax.jit(sparse_decode_reference, static_argnames=("block_k", "sm_scale"))


def poison_unlisted(x, idx, cnt, block_k: int):
    """x [B, S, K, D] with NaN in every key block that no list of its (row, KV head) holds: the
    references never gather those, and a kernel that read one into a result would output NaN.

    idx: [B, K, ..., max_sel]; cnt: [B, K, ...] (prefill: one list per query block; decode: one).
    """
    batch, kv_len, num_kv_heads, _ = x.shape
    cnt = np.asarray(cnt).reshape(batch, num_kv_heads, -1)
    idx = np.asarray(idx).reshape(*cnt.shape, -1)
    listed = np.zeros((batch, num_kv_heads, -(-kv_len // block_k)), bool)
    for b, h, i in np.ndindex(cnt.shape):
        listed[b, h, idx[b, h, i, : cnt[b, h, i]]] = True
    keep = np.repeat(listed, block_k, axis=-1)[..., :kv_len].transpose(0, 2, 1)  # [B, S, K]
    return jnp.where(jnp.asarray(keep)[..., None], x, jnp.nan).astype(x.dtype)

PREFILL_CASES = [
    # G = 1, head_dim 64 with K = 2 (head-major K/V copy), ragged q_len, a length cutting a
    # block, rows past the length.
    Case(20, 1, 40, 2, 2, 64, 16, 16, jnp.float32, lengths=(29,)),
    # G = 4, bf16, head_dim 128 (free lane view of K/V), block_q > block_k, kv_len not a
    # multiple of block_k (a partial edge block).
    Case(21, 1, 60, 8, 2, 128, 32, 16, jnp.bfloat16, lengths=(50,)),
    # G = 8, K = 1, a later chunk: q_offset > 0, kv_len > q_offset + q_len.
    Case(22, 1, 32, 8, 1, 64, 16, 16, jnp.float32, lengths=(70,), q_offset=48, kv_len=80),
    # bf16 G = 4 per-head matmuls, two program tiles per list, sinks + window in a later chunk.
    Case(23, 1, 64, 4, 1, 64, 32, 16, jnp.bfloat16, lengths=(90,), q_offset=32, kv_len=96,
         kernel_kwargs=(("fold_heads", False), ("tile_q", 16)), window=30, sink_tokens=8),
]


def _prefill_kwargs(case: Case, lengths) -> dict:
    return dict(block_q=case.block_q, block_k=case.block_k, lengths=lengths,
                q_offset=case.q_offset, window=case.window, sink_tokens=case.sink_tokens)


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"seed{c.seed}")
def test_tpu_prefill_matches_reference(case):
    q, k, v, idx, cnt, lengths = make_inputs(case)
    k, v = (poison_unlisted(x, idx, cnt, case.block_k) for x in (k, v))
    kwargs = _prefill_kwargs(case, lengths)
    ref = prefill_reference(q, k, v, idx, cnt, **kwargs)
    out = sparse_attention_tpu(q, k, v, idx, cnt, interpret=True, **kwargs,
                               **dict(case.kernel_kwargs))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, case.dtype)
    # Rows with no visible key (empty list, missed diagonal, past the length) are exactly 0.
    empty = ~dense_mask(idx, cnt, lengths, case).any(-1)  # [B, K, T]
    group = case.num_heads // case.num_kv_heads
    empty = np.repeat(empty, group, axis=1).transpose(0, 2, 1)  # [B, T, H]
    assert empty.any()
    assert np.all(np.asarray(out)[empty] == 0)


def test_tpu_prefill_empty_and_full_selections():
    """Every list empty: exactly 0 everywhere. Every list holding all its causal blocks:
    the reference (same shapes, so one compiled kernel serves both)."""
    case = Case(24, 2, 48, 4, 1, 64, 16, 16, jnp.float32, lengths=(48, 37))
    q, k, v, idx, cnt, lengths = make_inputs(case)
    kwargs = _prefill_kwargs(case, lengths)
    out = sparse_attention_tpu(q, k, v, idx, jnp.zeros_like(cnt), interpret=True, **kwargs)
    assert np.all(np.asarray(out) == 0)

    nq, nk = idx.shape[2:]
    diag = np.arange(1, nq + 1) * case.block_q // case.block_k - 1  # block of each last query
    full_idx = jnp.asarray(np.minimum(np.arange(nk), diag[:, None]), jnp.int32)
    full_idx = jnp.broadcast_to(full_idx, idx.shape)
    full_cnt = jnp.broadcast_to(jnp.asarray(diag + 1, jnp.int32), cnt.shape)
    ref = prefill_reference(q, k, v, full_idx, full_cnt, **kwargs)
    out = sparse_attention_tpu(q, k, v, full_idx, full_cnt, interpret=True, **kwargs)
    assert_close(out, ref, case.dtype)


DECODE_CASES = [
    # G = 1, head_dim 64 with K = 2 (head-major cache copy), a one-token row.
    decode_tests.Case(20, (64, 33, 1), 64, 2, 2, 64, 16, jnp.float32, None),
    # G = 4, bf16, head_dim 128 (free lane view of the cache).
    decode_tests.Case(21, (96, 40), 96, 8, 2, 128, 32, jnp.bfloat16, None),
    # G = 8, K = 1, max_len not a multiple of block_k (a partial edge block).
    decode_tests.Case(22, (100, 45, 17, 80), 100, 8, 1, 64, 16, jnp.float32, None),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"seed{c.seed}")
def test_tpu_decode_matches_reference(case):
    q, k, v, idx, cnt, lengths = decode_tests.make_inputs(case)
    k, v = (poison_unlisted(x, idx, cnt, case.block_k) for x in (k, v))
    ref = decode_reference(q, k, v, idx, cnt, lengths, block_k=case.block_k)
    out = sparse_decode_tpu(q, k, v, idx, cnt, lengths, block_k=case.block_k, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, case.dtype)
    # Heads whose list is empty have no visible key: exactly 0. draw_selection cycles through
    # the modes, so these cases also hold full lists.
    group = case.num_heads // case.num_kv_heads
    empty = np.repeat(np.asarray(cnt) == 0, group, axis=1)  # [B, H]
    assert empty.any()
    assert np.all(np.asarray(out)[empty] == 0)


def test_tpu_kernels_lower_to_mosaic():
    """Lowering for the TPU platform (jax.export, no TPU needed) runs the Pallas -> Mosaic
    lowering: its block-shape tiling checks and its per-primitive rules. Both K/V layouts,
    folded and per-head prefill, with a window."""
    for case in (PREFILL_CASES[0], PREFILL_CASES[1], PREFILL_CASES[3]):
        q, k, v, idx, cnt, lengths = make_inputs(case)
        fn = functools.partial(sparse_attention_tpu, block_q=case.block_q, block_k=case.block_k,
                               window=case.window, sink_tokens=case.sink_tokens,
                               **dict(case.kernel_kwargs))
        exported = export.export(jax.jit(fn), platforms=["tpu"])(
            q, k, v, idx, cnt, lengths=lengths, q_offset=case.q_offset)
        assert "tpu_custom_call" in exported.mlir_module()
    for case in DECODE_CASES[:2]:
        args = decode_tests.make_inputs(case)
        fn = functools.partial(sparse_decode_tpu, block_k=case.block_k)
        exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
        assert "tpu_custom_call" in exported.mlir_module()


def test_tpu_kernels_reject_untileable_inputs():
    """Shapes, dtypes and GPU-only options the TPU kernels cannot honour raise ValueError."""
    case = PREFILL_CASES[0]
    q, k, v, idx, cnt, lengths = make_inputs(case)
    prefill = functools.partial(sparse_attention_tpu, block_q=16, lengths=lengths)
    bad_prefill = [
        (dict(q=q, k=k, v=v, block_k=12), "block_k=12 must be a multiple of 8"),
        (dict(q=q.astype(jnp.bfloat16), k=k.astype(jnp.bfloat16), v=v.astype(jnp.bfloat16),
              block_k=8), "multiple of 16"),
        (dict(q=q.astype(jnp.float16), k=k.astype(jnp.float16), v=v.astype(jnp.float16),
              block_k=16), "float32 or bfloat16"),
        (dict(q=q[..., :32], k=k[..., :32], v=v[..., :32], block_k=16), "head_dim=32"),
        (dict(q=q, k=k, v=v, block_k=16, tile_q=12), "tile_q=12"),
        (dict(q=q, k=k, v=v, block_k=16, num_warps=4), "Triton launch parameters"),
    ]
    for kwargs, message in bad_prefill:
        with pytest.raises(ValueError, match=message):
            prefill(block_indices=idx, block_counts=cnt, **kwargs)
    with pytest.raises(ValueError, match="block_q=20"):  # 2 query blocks of 20 rows
        prefill(q, k, v, idx[:, :, :2], cnt[:, :, :2], block_k=16, block_q=20)

    dq, dk, dv, didx, dcnt, dlen = decode_tests.make_inputs(DECODE_CASES[0])
    with pytest.raises(ValueError, match="does not split"):
        sparse_decode_tpu(dq, dk, dv, didx, dcnt, dlen, block_k=16, num_splits=2)
    with pytest.raises(ValueError, match="multiple of 8"):
        sparse_decode_tpu(dq, dk, dv, didx, dcnt, dlen, block_k=4)

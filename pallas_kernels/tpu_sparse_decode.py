"""Sparse decode attention as a Pallas Mosaic (TPU) kernel, paged-attention style.

Same contract as `pallas_kernels.sparse_decode.sparse_decode_reference`: one new query token per
row attends to the listed key blocks of its cache. The block lists and their live counts travel
by scalar prefetch into SMEM; the grid is (batch, KV head, list slot) and the K/V index maps read
the slot's listed block, so only listed blocks are ever DMA'd (the next one is prefetched while
the current one is processed, the pipelining split-K buys on a GPU). The G query heads of one KV
head form the rows of one tile (padded to the sublane tile) and their online-softmax state lives
in float32 VMEM scratch across the slot axis; the output is written on the last slot.

Layout (as in tpu_sparse_attention): heads must not sit between the sequence and head_dim in a
TPU block, so the cache [B, max_len, K, D] is read through a free [B, max_len, K * D] view when
head_dim is a multiple of 128 or K == 1, and otherwise copied head-major to [B, K, max_len, D]
(a pass over the whole cache per call: a TPU serving stack should keep its cache head-major).

Shapes (batch = B, num_heads = H, num_kv_heads = K, G = H // K):
  q:                [B, H, D]
  k_cache, v_cache: [B, max_len, K, D]
  block_indices:    [B, K, max_sel] int32, strictly ascending key block ids
  block_counts:     [B, K] int32
  lengths:          [B] int32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import MASK_VALUE, _default_sm_scale
from pallas_kernels.sparse_decode import _check_shapes
from pallas_kernels.tpu_sparse_attention import (
    NUM_LANES,
    check_tpu_inputs,
    finalize,
    kv_block_spec,
    kv_layout,
    online_softmax_update,
    sublane_multiple,
)


def _decode_kernel(
    idx_ref, live_ref, len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *,
    num_kv_heads: int, max_sel: int, block_k: int, sm_scale: float, precision,
):
    """One grid step: list slot `slot` of (row b, KV head h).

    Scalar prefetch (SMEM, flat): idx_ref [B * K * max_sel]; live_ref [B * K], the live prefix
    of each list (blocks starting below the length); len_ref [B].
    q_ref, o_ref: [rows, D] (the G heads padded to the sublane tile); k_ref, v_ref: [block_k, D];
    scratch m_ref, l_ref: [rows, NUM_LANES] f32; acc_ref: [rows, D] f32.
    """
    b, h, slot = (pl.program_id(i) for i in range(3))
    n_live = live_ref[b * num_kv_heads + h]
    length = len_ref[b]
    j = idx_ref[(b * num_kv_heads + h) * max_sel + slot]

    @pl.when(slot == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def compute(masked: bool):
        v = v_ref[...]
        mask = None
        if masked:
            shape = (q_ref.shape[0], block_k)
            mask = j * block_k + lax.broadcasted_iota(jnp.int32, shape, 1) < length
            # Past the length the cache may hold garbage (even NaN): zero those V rows so that
            # p == 0 times V stays 0.
            v_pos = j * block_k + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where(v_pos < length, v, jnp.zeros_like(v))
        online_softmax_update(
            q_ref[...], k_ref[...], v, m_ref, l_ref, acc_ref, sm_scale=sm_scale,
            precision=precision, mask=mask,
        )

    # Only a block crossing the length needs the mask (at most one per list).
    live = slot < n_live
    crosses = (j + 1) * block_k > length

    @pl.when(live & crosses)
    def _masked():
        compute(masked=True)

    @pl.when(live & jnp.logical_not(crosses))
    def _unmasked():
        compute(masked=False)

    @pl.when(slot == max_sel - 1)
    def _store():
        o_ref[...] = finalize(l_ref, acc_ref).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("block_k", "sm_scale", "num_splits", "interpret", "num_warps", "num_stages"),
)
def sparse_decode_tpu(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    lengths: jax.Array,
    *,
    block_k: int,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Sparse decode (Pallas, Mosaic TPU lowering); same contract as sparse_decode_reference and
    the same arguments as sparse_decode.

    Args:
      q: [batch, num_heads, head_dim], float32 or bfloat16, head_dim a multiple of 64.
      k_cache, v_cache: [batch, max_len, num_kv_heads, head_dim], q's dtype.
      block_indices: [batch, num_kv_heads, max_sel] int32, ascending;
        block_counts: [batch, num_kv_heads] int32.
      lengths: [batch] int32, valid keys per row (<= max_len).
      block_k: key positions per block, a multiple of 8 (float32) or 16 (bfloat16).
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).
      num_splits: split-K factor of the GPU kernel; the TPU kernel walks each list in one
        sequential grid axis, so only None or 1 is accepted.
      interpret: run in Pallas TPU interpret mode (pltpu.InterpretParams) instead of Mosaic.
      num_warps, num_stages: Triton launch parameters; must be None.

    Returns:
      [batch, num_heads, head_dim] in q's dtype.
    """
    group = _check_shapes(q, k_cache, v_cache, block_indices, block_counts, lengths)
    check_tpu_inputs(q, k_cache, v_cache, block_k)
    if num_splits not in (None, 1):
        raise ValueError(f"{num_splits=}: the TPU decode kernel does not split lists (None or 1)")
    if num_warps is not None or num_stages is not None:
        raise ValueError("num_warps and num_stages are Triton launch parameters; pass None on TPU")
    batch, num_heads, head_dim = q.shape
    _, max_len, num_kv_heads, _ = k_cache.shape
    max_sel = block_indices.shape[-1]
    if max_sel == 0:
        return jnp.zeros_like(q)

    num_blocks = pl.cdiv(max_len, block_k)
    lengths = lengths.astype(jnp.int32)
    # Clipped as the reference clips them; the pipeline must never DMA outside the cache.
    ids = jnp.clip(block_indices.astype(jnp.int32), 0, num_blocks - 1)
    # Ascending lists: the entries whose block starts below the length form a prefix; the rest
    # hold no visible key and are neither fetched nor computed.
    listed = jnp.arange(max_sel) < block_counts.astype(jnp.int32)[..., None]
    n_live = jnp.sum(listed & (ids * block_k < lengths[:, None, None]), axis=-1, dtype=jnp.int32)

    # The G heads of a KV head are the rows of one tile, padded to the sublane tile: decode's q
    # is tiny, so the padding copy is free and every tile is layout-native.
    rows = pl.cdiv(group, sublane_multiple(q.dtype)) * sublane_multiple(q.dtype)
    qg = jnp.pad(q.reshape(batch, num_kv_heads, group, head_dim),
                 ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    kv_k, lane_view = kv_layout(k_cache, block_k)
    kv_v, _ = kv_layout(v_cache, block_k)

    def block_of(b, h, s, idx_ref, live_ref, len_ref):
        # Slots past the live prefix re-read the last live block: an unchanged block index, so
        # the pipeline issues no DMA (the compute is skipped with pl.when).
        slot = jnp.minimum(s, jnp.maximum(live_ref[b * num_kv_heads + h] - 1, 0))
        return b, h, idx_ref[(b * num_kv_heads + h) * max_sel + slot]

    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s, *_: (b, h, 0, 0))
    kv_spec = kv_block_spec(lane_view, block_k, head_dim, block_of)
    kernel = functools.partial(
        _decode_kernel, num_kv_heads=num_kv_heads, max_sel=max_sel, block_k=block_k,
        sm_scale=_default_sm_scale(head_dim, sm_scale),
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, num_kv_heads, max_sel),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((rows, NUM_LANES), jnp.float32),
                pltpu.VMEM((rows, NUM_LANES), jnp.float32),
                pltpu.VMEM((rows, head_dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        # The slot axis carries the softmax state: sequential. Rows and heads are independent.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="sparse_decode_tpu",
    )(ids.reshape(-1), n_live.reshape(-1), lengths, qg, kv_k, kv_v)
    return out[:, :, :group].reshape(batch, num_heads, head_dim)

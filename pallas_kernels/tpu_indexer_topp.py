"""Indexer block scoring as a Pallas Mosaic (TPU) kernel, then the top-p / top-k selection.

The contract is that of `pallas_kernels.indexer_topp` (see its module docstring): block logits
L_j = logsumexp over the candidate keys s of block j of scale * <pooled qi, ki_s>, then the
selection rule of `select_blocks_reference`.

What runs where:
  * Pooling of the indexer queries: jnp (`query_block_extent`, `pool_queries`), as in the
    Triton entry point.
  * Block logits: the Mosaic kernel `block_logits_tpu` (same outputs as
    `block_logits_reference`).
  * Selection: a jnp (XLA) step after the kernel, not a Mosaic kernel: `select_blocks_bisect`
    (the sort-free bisection rule of the Triton selection kernel, vectorised) by default, or
    `select_blocks_reference` (a sort per row). The bisection rule needs row prefix sums and a
    scatter for the compaction, which Mosaic does not lower.

Kernel layout. TPU blocks tile the last two dimensions (sublanes x lanes), and the indexer rank
r (16) is far below the 128 lanes, so the kernel works on transposed scores: a key block's
scores against a tile of pooled queries are [block_k, tile_q] (keys on sublanes, queries on
lanes), each block's logsumexp is a reduction over sublanes giving one [1, tile_q] row, and the
kernel writes logits as [batch, groups, nk, nq] (the wrapper transposes them back). The grid is
(batch, group, key chunk, query tile) with the query tile innermost, so each key chunk is read
from HBM once; chunks past every query of a tile (causality) only write -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.indexer_topp import (
    MASK_VALUE,
    NEG_INF,
    RULE_ARGS,
    _scores,
    _split_bf16,
    pooled_block_logits,
    select_blocks_bisect,
    select_blocks_reference,
)

# TPU vector registers are 8 sublanes x 128 lanes (32-bit); bfloat16 packs 16 rows per vreg.
LANES = 128
SUBLANES = 8
# Key blocks per grid step: the output block's sublane extent (a multiple of SUBLANES, or all
# of nk when nk is smaller).
CHUNK_BLOCKS = SUBLANES
# Selection steps indexer_topp_tpu offers (both jnp after the Mosaic scoring kernel).
TPU_SELECTIONS = ("bisect", "sort")


def _logits_kernel(bounds_ref, q_ref, k_ref, last_ref, o_ref, *, block_k: int,
                   chunk_blocks: int, num_tiles: int, split_q: bool, precision):
    """One grid step (row b, group g, key chunk c, query tile t).

    bounds_ref: [batch * num_tiles * 2] int32 (SMEM, scalar prefetch), per query tile the
    smallest and largest last candidate key position of its queries (-1: none);
    q_ref: [tile_q, r] float32 pooled queries pre-scaled by `scale`; k_ref:
    [chunk_blocks * block_k, r] indexer keys; last_ref: [1, tile_q] int32 last candidate key
    per query (-1: none); o_ref: [chunk_blocks, tile_q] float32 block logits (row j: key block
    c * chunk_blocks + j).
    """
    b, c, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    tile_q = q_ref.shape[0]
    lo_last = bounds_ref[2 * (b * num_tiles + t)]
    hi_last = bounds_ref[2 * (b * num_tiles + t) + 1]
    first_key = c * (chunk_blocks * block_k)
    last_key = first_key + chunk_blocks * block_k - 1

    def score_blocks(masked: bool):
        q = q_ref[...]
        # bf16 keys: the float32 queries as three bf16 terms give float32-accurate scores in
        # native bf16 products (see _split_bf16).
        q_parts = _split_bf16(q) if split_q else (q,)
        last = last_ref[...]  # [1, tile_q]
        for j in range(chunk_blocks):
            k = k_ref[j * block_k:(j + 1) * block_k, :]
            if not split_q:
                k = k.astype(jnp.float32)
            s = _scores((k,), q_parts[0], precision)  # [block_k, tile_q] = k @ q.T
            for part in q_parts[1:]:
                s = s + _scores((k,), part, precision)
            if masked:
                k_pos = first_key + j * block_k + lax.broadcasted_iota(
                    jnp.int32, (block_k, tile_q), 0)
                # A select, not arithmetic: keys past the length may hold garbage, even NaN.
                visible = k_pos <= last
                s = jnp.where(visible, s, MASK_VALUE)
                m = jnp.max(s, axis=0, keepdims=True)
                total = jnp.sum(jnp.where(visible, jnp.exp(s - m), 0.0), axis=0, keepdims=True)
                row = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)),
                                NEG_INF)
            else:
                m = jnp.max(s, axis=0, keepdims=True)
                row = m + jnp.log(jnp.sum(jnp.exp(s - m), axis=0, keepdims=True))
            o_ref[j:j + 1, :] = row

    # Every key of the chunk is a candidate of every query of the tile: no mask, no select.
    pl.when(last_key <= lo_last)(functools.partial(score_blocks, False))
    pl.when((first_key <= hi_last) & (last_key > lo_last))(functools.partial(score_blocks, True))

    @pl.when(first_key > hi_last)
    def _dead():  # no query of the tile has a candidate in this chunk
        o_ref[...] = jnp.full(o_ref.shape, NEG_INF, jnp.float32)


@functools.partial(jax.jit, static_argnames=("block_k", "scale", "interpret"))
def block_logits_tpu(
    pooled: jax.Array,
    ki: jax.Array,
    lengths: jax.Array,
    last: jax.Array,
    *,
    block_k: int,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """Block logits (Pallas, Mosaic lowering); same contract as `block_logits_reference`.

    Args:
      pooled: [batch, nq, groups, r] pooled indexer queries.
      ki: [batch, kv_len, groups, r] indexer keys, bfloat16 or float32 (scores are float32).
      lengths: [batch] int32; last: [batch, nq] int32 last valid query position (-1: none).
      block_k: keys per block, a multiple of 8 (float32 keys) or 16 (bfloat16 keys).
      scale: score scale.
      interpret: run in Pallas' TPU interpret mode (pltpu.InterpretParams) on the CPU.

    Returns:
      [batch, groups, nq, nk] float32, -inf for blocks with no candidate key.
    """
    batch, kv_len, groups, rank = ki.shape
    nq = pooled.shape[1]
    if pooled.shape != (batch, nq, groups, rank):
        raise ValueError(f"pooled {pooled.shape} must be [{batch}, nq, {groups}, {rank}]")
    if ki.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"ki dtype {ki.dtype} is not supported: use float32 or bfloat16")
    packing = 4 // ki.dtype.itemsize  # rows per sublane: key blocks start on a vreg row
    if block_k < 1 or block_k % (SUBLANES * packing):
        raise ValueError(f"{block_k=} must be a positive multiple of {SUBLANES * packing} for "
                         f"{ki.dtype} keys (TPU sublane tiling)")
    nk = pl.cdiv(kv_len, block_k)
    chunk_blocks = nk if nk <= CHUNK_BLOCKS else CHUNK_BLOCKS
    num_chunks = pl.cdiv(nk, chunk_blocks)
    # Query tiles are the lane dimension: LANES queries, or all of nq (fewer) padded to a
    # multiple of SUBLANES: Mosaic lowers a one-column product (decode, nq = 1) as a
    # matrix-vector special case that fails to verify for bfloat16 keys.
    tile_q = LANES if nq > LANES else pl.cdiv(nq, SUBLANES) * SUBLANES
    num_tiles = pl.cdiv(nq, tile_q)
    nq_pad = num_tiles * tile_q

    # Keys past the length are never candidates: fold that into the last candidate position.
    last = jnp.minimum(last, lengths[:, None] - 1).astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    tiles = jnp.pad(last, ((0, 0), (0, nq_pad - nq)), constant_values=-1)
    tiles = tiles.reshape(batch, num_tiles, tile_q)
    real = (jnp.arange(nq_pad) < nq).reshape(num_tiles, tile_q)
    bounds = jnp.stack([jnp.min(jnp.where(real, tiles, big), axis=-1),
                        jnp.max(tiles, axis=-1)], axis=-1).reshape(-1)  # 1-D: compact in SMEM

    q = pooled.astype(jnp.float32) * scale
    q = jnp.pad(q, ((0, 0), (0, nq_pad - nq), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    k = jnp.pad(ki, ((0, 0), (0, num_chunks * chunk_blocks * block_k - kv_len), (0, 0), (0, 0)))
    k = k.transpose(0, 2, 1, 3)  # [batch, groups, kv_pad, r]

    kernel = functools.partial(
        _logits_kernel, block_k=block_k, chunk_blocks=chunk_blocks, num_tiles=num_tiles,
        split_q=ki.dtype == jnp.bfloat16,
        precision=lax.Precision.DEFAULT if ki.dtype == jnp.bfloat16 else lax.Precision.HIGHEST,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, groups, num_chunks, num_tiles),
            in_specs=[
                pl.BlockSpec((None, None, tile_q, rank), lambda b, g, c, t, _: (b, g, t, 0)),
                pl.BlockSpec((None, None, chunk_blocks * block_k, rank),
                             lambda b, g, c, t, _: (b, g, c, 0)),
                pl.BlockSpec((None, 1, tile_q), lambda b, g, c, t, _: (b, 0, t)),
            ],
            out_specs=pl.BlockSpec((None, None, chunk_blocks, tile_q),
                                   lambda b, g, c, t, _: (b, g, c, t)),
        ),
        out_shape=jax.ShapeDtypeStruct((batch, groups, num_chunks * chunk_blocks, nq_pad),
                                       jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel"),
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="indexer_block_logits_tpu",
    )(bounds, q, k, tiles.reshape(batch, 1, nq_pad))
    return out[:, :, :nk, :nq].transpose(0, 1, 3, 2)


@functools.partial(
    jax.jit,
    static_argnames=("block_q", "block_k", "scale", *RULE_ARGS, "interpret", "selection"),
)
def indexer_topp_tpu(
    qi: jax.Array,
    ki: jax.Array,
    q_start: jax.Array,
    lengths: jax.Array,
    *,
    block_q: int,
    block_k: int,
    scale: float,
    top_p: float,
    sink_blocks: int,
    local_blocks: int,
    min_blocks: int = 0,
    max_blocks: int | None = None,
    top_k: int | None = None,
    interpret: bool = False,
    selection: str = "bisect",
) -> tuple[jax.Array, jax.Array]:
    """Indexer queries and keys -> block lists; same contract as `indexer_topp_reference`.

    qi: [batch, q_len, groups, r], rows at positions q_start[b] + t; ki: [batch, kv_len, groups, r]
    (bfloat16 or float32); q_start, lengths: [batch] int32. Pooling in jnp, block logits by the
    Mosaic kernel `block_logits_tpu`, then the selection in jnp by `selection` (one of
    TPU_SELECTIONS: "bisect" the sort-free rule, "sort" the reference). interpret: Pallas' TPU
    interpret mode (CPU). Returns (indices [batch, groups, nq, max_sel] int32, counts
    [batch, groups, nq]).
    """
    if selection not in TPU_SELECTIONS:
        raise ValueError(f"selection must be one of {TPU_SELECTIONS} on TPU (there is no Mosaic "
                         f"selection kernel), got {selection!r}")
    logits, last_block = pooled_block_logits(block_logits_tpu, qi, ki, q_start, lengths,
                                             block_q=block_q, block_k=block_k, scale=scale,
                                             interpret=interpret)
    select = select_blocks_bisect if selection == "bisect" else select_blocks_reference
    return select(logits, last_block, top_p=top_p, sink_blocks=sink_blocks,
                  local_blocks=local_blocks, min_blocks=min_blocks, max_blocks=max_blocks,
                  top_k=top_k)

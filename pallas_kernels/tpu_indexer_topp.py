"""Indexer block scoring and the top-p / top-k block selection as Pallas Mosaic (TPU) kernels.

The contract is that of `pallas_kernels.indexer_topp` (see its module docstring): block logits
L_j = logsumexp over the candidate keys s of block j of scale * <pooled qi, ki_s>, then the
selection rule of `select_blocks_reference`.

What runs where:
  * Pooling of the indexer queries: jnp (`query_block_extent`, `pool_queries`), as in the
    Triton entry point.
  * Block logits: the Mosaic kernel `block_logits_tpu` (same outputs as
    `block_logits_reference`).
  * Selection: the Mosaic kernel `select_blocks_tpu` (same outputs as
    `select_blocks_reference`), by default; `indexer_topp_tpu` can run the selection as jnp
    instead (`select_blocks_bisect` or the reference), as the Triton entry point can.

Scoring layout. TPU blocks tile the last two dimensions (sublanes x lanes), and the indexer rank
r (16) is far below the 128 lanes, so the kernel works on transposed scores: a key block's
scores against a tile of pooled queries are [block_k, tile_q] (keys on sublanes, queries on
lanes), each block's logsumexp is a reduction over sublanes giving one [1, tile_q] row, and the
kernel writes logits as [batch, groups, nk, nq] (the wrapper transposes them back). The grid is
(batch, group, key chunk, query tile) with the query tile innermost, so each key chunk is read
from HBM once; chunks past every query of a tile (causality) only write -inf.

Selection layout. A grid step takes a tile of whole rows (rows = (batch, group, query block),
on sublanes; key blocks on lanes, padded to a multiple of 128): the threshold needs every block
of its row. The rule is the Triton kernel's (`_selection_mask`: the threshold by bisection over
probability bit patterns, whose steps are masked row sums), with two replacements for what
Mosaic does not lower:
  * the row prefix count (ties at the threshold, compaction) is a matmul on the MXU: each chunk
    of PREFIX_CHUNK blocks times a strictly upper-triangular 0/1 matrix (bfloat16, exact),
    plus the running count of the chunks before it;
  * the compaction into ascending lists is a shift network instead of a scatter: a selected
    block must move left by d = the unselected blocks before it, and moving every block by the
    bits of d in turn, lowest first (log2 of the padded row length steps, each a lane roll and
    two selects), never puts two blocks on one slot.
A step's VMEM grows with its rows x padded blocks: the logits and index blocks (double-buffered)
and a handful of [rows, blocks] intermediates of 32 bits, 256 KiB each at 2048 key blocks
(32 rows a step) and 512 KiB at 16384 (8 rows).
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
    _selection_mask,
    _split_bf16,
    max_selected,
    scored_selection,
)

# TPU vector registers are 8 sublanes x 128 lanes (32-bit); bfloat16 packs 16 rows per vreg.
LANES = 128
SUBLANES = 8
# Key blocks per grid step: the output block's sublane extent (a multiple of SUBLANES, or all
# of nk when nk is smaller).
CHUNK_BLOCKS = SUBLANES
# Selection: about SELECT_TILE_ELEMS logits per grid step, in whole rows (a multiple of
# SUBLANES of them): 32 rows at 2048 key blocks, 8 (the least) at 16384.
SELECT_TILE_ELEMS = 1 << 16
# Key blocks per prefix-count matmul: one MXU tile ([128, 128] bfloat16, 32 KiB).
PREFIX_CHUNK = LANES
# An empty slot in the compaction's shift network: no bit below 30 set, so it never moves.
EMPTY_SLOT = 1 << 30


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


def _prefix_count(mask: jax.Array) -> jax.Array:
    """[R, N] bool -> [R, N] int32: how many True entries precede each entry in its row.

    N a multiple of PREFIX_CHUNK. Per chunk, a matmul with the strictly upper-triangular 0/1
    matrix counts the entries before each one within the chunk (0/1 products, sums < 2^24:
    exact in bfloat16 with float32 accumulation), and a running count adds the chunks before.
    """
    rows, n = mask.shape
    c = PREFIX_CHUNK
    before = (lax.broadcasted_iota(jnp.int32, (c, c), 0)
              < lax.broadcasted_iota(jnp.int32, (c, c), 1))
    upper = jnp.where(before, 1.0, 0.0).astype(jnp.bfloat16)
    ones = jnp.where(mask, 1.0, 0.0)
    carry = jnp.zeros((rows, 1), jnp.float32)
    parts = []
    for k in range(n // c):
        chunk = ones[:, k * c:(k + 1) * c]
        within = lax.dot_general(chunk.astype(jnp.bfloat16), upper, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        parts.append(carry + within)
        carry = carry + jnp.sum(chunk, axis=1, keepdims=True)
    return jnp.concatenate(parts, axis=1).astype(jnp.int32)


def _compact(selected: jax.Array, counts: jax.Array) -> jax.Array:
    """Each row's selected block indices in ascending order, without a scatter.

    selected: [R, N] bool (N a multiple of PREFIX_CHUNK, < 2^30); counts: [R] int32. Returns
    [R, N] int32: slot s < counts holds the s-th selected index, the slots after it the last
    selected index (0 when none). The network carries, per slot, the shift d of the block on it
    (EMPTY_SLOT: none); the block's index is then slot + d.
    """
    n = selected.shape[1]
    j = lax.broadcasted_iota(jnp.int32, selected.shape, 1)
    shift = jnp.where(selected, j - _prefix_count(selected), EMPTY_SLOT)
    step = 1
    while step < n:
        # Blocks whose shift has this bit move left by `step`. Lower bits first, nothing
        # collides (block order is kept and the gaps between blocks only close), and nothing
        # wraps around: a block with this bit set is at slot >= step.
        incoming = pltpu.roll(shift, n - step, 1)  # incoming[x] = shift[x + step]
        shift = jnp.where((incoming & step) != 0, incoming,
                          jnp.where((shift & step) != 0, EMPTY_SLOT, shift))
        step *= 2
    last_index = jnp.max(jnp.where(selected, j, 0), axis=1, keepdims=True)
    return jnp.where(j < counts[:, None], j + shift, last_index)


def _select_kernel(l_ref, last_ref, idx_ref, cnt_ref, *, rule: dict):
    """One grid step: the selection of a tile of R rows.

    l_ref: [R, N] float32 block logits (N padded to a multiple of LANES); last_ref: [R, 1]
    int32 last candidate block (-1: none); idx_ref: [R, max_sel] int32; cnt_ref: [R, 1] int32.
    """
    selected, counts = _selection_mask(l_ref[...], last_ref[...][:, 0],
                                       exclusive_rank=_prefix_count, **rule)
    idx_ref[...] = _compact(selected, counts)[:, :idx_ref.shape[1]]
    cnt_ref[...] = counts[:, None]


@functools.partial(jax.jit, static_argnames=(*RULE_ARGS, "interpret", "tile_rows"))
def select_blocks_tpu(
    logits: jax.Array,
    last_block: jax.Array,
    *,
    top_p: float,
    sink_blocks: int,
    local_blocks: int,
    min_blocks: int = 0,
    max_blocks: int | None = None,
    top_k: int | None = None,
    interpret: bool = False,
    tile_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block lists from block logits (Pallas, Mosaic lowering); same contract as
    `select_blocks_reference`.

    logits: [batch, groups, nq, nk] (float32, or bfloat16: selected as float32);
    last_block: [batch, nq] int32, shared by the groups. interpret: Pallas' TPU interpret mode
    (CPU). tile_rows: rows (batch, group, query block) per grid step, a multiple of 8; None:
    about SELECT_TILE_ELEMS logits. Returns (indices [batch, groups, nq, max_sel] int32,
    counts [batch, groups, nq] int32).
    """
    b, g, nq, nk = logits.shape
    max_sel = max_selected(nk, max_blocks, top_k, sink_blocks + local_blocks, min_blocks)
    rows = b * g * nq
    nk_pad = pl.cdiv(nk, LANES) * LANES
    if tile_rows is None:
        tile = max(SUBLANES, SELECT_TILE_ELEMS // nk_pad // SUBLANES * SUBLANES)
        tile = min(tile, pl.cdiv(rows, SUBLANES) * SUBLANES)
    elif tile_rows < 1 or tile_rows % SUBLANES:
        raise ValueError(f"{tile_rows=} must be a positive multiple of {SUBLANES}")
    else:
        tile = tile_rows
    rows_pad = pl.cdiv(rows, tile) * tile
    # Padding: blocks past nk and rows past `rows` are no candidates (last block -1).
    flat = jnp.pad(logits.reshape(rows, nk).astype(jnp.float32),
                   ((0, rows_pad - rows), (0, nk_pad - nk)), constant_values=NEG_INF)
    last = jnp.broadcast_to(last_block[:, None], (b, g, nq)).reshape(rows, 1)
    last = jnp.pad(last.astype(jnp.int32), ((0, rows_pad - rows), (0, 0)), constant_values=-1)
    rule = dict(top_p=top_p, sink_blocks=sink_blocks, local_blocks=local_blocks,
                min_blocks=min_blocks, max_blocks=max_blocks, top_k=top_k)
    indices, counts = pl.pallas_call(
        functools.partial(_select_kernel, rule=rule),
        grid=(rows_pad // tile,),
        in_specs=[pl.BlockSpec((tile, nk_pad), lambda i: (i, 0)),
                  pl.BlockSpec((tile, 1), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((tile, max_sel), lambda i: (i, 0)),
                   pl.BlockSpec((tile, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows_pad, max_sel), jnp.int32),
                   jax.ShapeDtypeStruct((rows_pad, 1), jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="indexer_select_blocks_tpu",
    )(flat, last)
    return (indices[:rows].reshape(b, g, nq, max_sel),
            counts[:rows, 0].reshape(b, g, nq))


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
    selection: str = "pallas",
) -> tuple[jax.Array, jax.Array]:
    """Indexer queries and keys -> block lists; same contract as `indexer_topp_reference`.

    qi: [batch, q_len, groups, r], rows at positions q_start[b] + t; ki: [batch, kv_len, groups, r]
    (bfloat16 or float32); q_start, lengths: [batch] int32. Pooling in jnp, block logits by the
    Mosaic kernel `block_logits_tpu`, then the selection by `selection` (one of SELECTIONS:
    "pallas" the Mosaic kernel `select_blocks_tpu`, "bisect" the same rule in XLA, "sort" the
    reference). interpret: Pallas' TPU interpret mode (CPU). Returns (indices [batch, groups,
    nq, max_sel] int32, counts [batch, groups, nq]).
    """
    return scored_selection(block_logits_tpu, select_blocks_tpu, qi, ki, q_start, lengths,
                            block_q=block_q, block_k=block_k, scale=scale, interpret=interpret,
                            selection=selection, top_p=top_p, sink_blocks=sink_blocks,
                            local_blocks=local_blocks, min_blocks=min_blocks,
                            max_blocks=max_blocks, top_k=top_k)

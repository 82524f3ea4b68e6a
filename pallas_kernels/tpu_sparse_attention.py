"""Block-sparse flash attention for prefill as a Pallas Mosaic (TPU) kernel.

Same contract as `pallas_kernels.sparse_attention.sparse_attention_reference` (block lists per
(row, KV head, query block), causal, ragged lengths, GQA, q_offset, optional sinks/window), written
the way JAX's splash attention is: the block lists travel by scalar prefetch into SMEM, and the
grid (batch, KV head, query tile, list slot) has K/V index maps that read the slot's listed block,
so the pipeline DMAs only listed blocks and never touches the others. Slots past a tile's live
prefix of the list map to the block already resident (no new DMA) and skip their compute. The
online-softmax state lives in float32 VMEM scratch across the slot axis; the output tile is
written on the last slot.

TPU blocks tile the last two dimensions of an array (second-to-last a multiple of 8, last a
multiple of 128 lanes, or the full dimension), so heads must not sit between the sequence and
head_dim. The wrapper therefore moves heads ahead of the sequence:
  q, out:  [B, T, H, D] -> [B, K, G, T_pad, D]  (one extra pass each, fused with the padding)
  k, v:    [B, S, K, D] viewed as [B, S, K * D] (free) when head_dim is a multiple of 128 or
           K == 1, else copied to [B, K, S_pad, D].
A caller that keeps a head-major K/V layout would avoid that copy for head_dim 64.

Shapes (batch = B, q_len = T, kv_len = S, num_heads = H, num_kv_heads = K, G = H // K):
  q:             [B, T, H, D]
  k, v:          [B, S, K, D]
  block_indices: [B, K, ceil(T / block_q), max_sel] int32, strictly ascending key block ids
  block_counts:  [B, K, ceil(T / block_q)] int32
  lengths:       [B] int32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import (
    MASK_VALUE,
    _check_shapes,
    _default_sm_scale,
    _tile_ranges,
    validate_window,
    window_visible,
)

# The m and l softmax statistics are kept lane-replicated ([rows, 128]), as splash attention
# does: a [rows] vector would need a lane-sparse layout and relayouts on every update.
NUM_LANES = 128
# Float32 sublanes per vreg; packed dtypes hold 32 // bits rows per sublane.
NUM_SUBLANES = 8
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# head_dim is the lane (minor) dimension of every tile; only these widths are exercised.
HEAD_DIM_MULTIPLE = 64


def sublane_multiple(dtype) -> int:
    """Rows per native (sublane x lane) tile of dtype: 8 for float32, 16 for bfloat16. Row
    counts that are multiples of this make the head-folding reshapes free relabellings."""
    return NUM_SUBLANES * (4 // jnp.dtype(dtype).itemsize)


def check_tpu_inputs(q: jax.Array, k: jax.Array, v: jax.Array, block_k: int) -> None:
    """Raises ValueError for dtypes, head_dim or block_k the TPU kernels do not tile."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must all be float32 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    head_dim = q.shape[-1]
    if head_dim % HEAD_DIM_MULTIPLE:
        raise ValueError(f"{head_dim=} must be a multiple of {HEAD_DIM_MULTIPLE} on TPU")
    rows = sublane_multiple(q.dtype)
    if block_k % rows:
        raise ValueError(f"{block_k=} must be a multiple of {rows} for {q.dtype} TPU tiles")


def kv_layout(k: jax.Array, block_k: int) -> tuple[jax.Array, bool]:
    """A TPU-tileable view of a [B, S, K, D] cache and whether it is the lane view.

    Lane view: [B, S, K * D], one head = one lane block of width D (needs D % 128 == 0 or
    K == 1; free reshape). Otherwise head-major [B, K, S_pad, D] with S padded to whole key
    blocks (one copy).
    """
    batch, kv_len, num_kv_heads, head_dim = k.shape
    if head_dim % NUM_LANES == 0 or num_kv_heads == 1:
        return k.reshape(batch, kv_len, num_kv_heads * head_dim), True
    pad = pl.cdiv(kv_len, block_k) * block_k - kv_len
    return jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3), False


def kv_block_spec(lane_view: bool, block_k: int, head_dim: int, block_of) -> pl.BlockSpec:
    """BlockSpec reading key block block_of(*grid, *prefetch) -> (batch, kv head, block id) as a
    [block_k, head_dim] tile of the layout kv_layout chose."""
    if lane_view:
        def index_map(*args):
            b, h, j = block_of(*args)
            return b, j, h

        return pl.BlockSpec((None, block_k, head_dim), index_map)

    def index_map(*args):
        b, h, j = block_of(*args)
        return b, h, j, 0

    return pl.BlockSpec((None, None, block_k, head_dim), index_map)


def _where_rows(mask: jax.Array, x: jax.Array, fill: float) -> jax.Array:
    """where(mask, x, fill) for x [copies * n, m] stacked from copies of the [n, m] mask's rows
    (the G heads folded into one tile share the token mask)."""
    n = mask.shape[0]
    if x.shape[0] == n:
        return jnp.where(mask, x, fill)
    x3 = x.reshape(x.shape[0] // n, n, x.shape[1])  # free: n is a multiple of the sublane tile
    return jnp.where(mask[None], x3, fill).reshape(x.shape)


def online_softmax_update(
    q: jax.Array, k: jax.Array, v: jax.Array, m_ref, l_ref, acc_ref, *,
    sm_scale: float, precision, mask: jax.Array | None,
) -> None:
    """One key block of the flash-attention recurrence, state in VMEM scratch refs.

    q: [rows, D]; k, v: [block_k, D]; m_ref, l_ref: [rows, NUM_LANES] f32 (running max and sum,
    lane-replicated); acc_ref: [rows, D] f32. mask: [n, block_k] bool shared by the rows // n
    row groups of q, or None when every key is visible to every row (no selects).
    """
    s = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    ) * sm_scale
    if mask is not None:
        s = _where_rows(mask, s, MASK_VALUE)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, :1])
    if mask is not None:
        # A row with no visible key yet has m_next == MASK_VALUE and exp(0) == 1: zero it.
        p = _where_rows(mask, p, 0.0)
    m_ref[...] = m_next
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32,
    )
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv


def finalize(l_ref, acc_ref) -> jax.Array:
    """acc / l as float32, exactly 0 for rows that saw no key (l == 0)."""
    row_sum = l_ref[...][:, :1]
    has_key = row_sum > 0
    return jnp.where(has_key, acc_ref[...] / jnp.where(has_key, row_sum, 1.0), 0.0)


def _prefill_kernel(
    idx_ref, range_ref, len_ref, off_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *,
    num_kv_heads: int, num_tiles: int, tiles_per_block: int, max_sel: int, num_ranges: int,
    tile_q: int, block_k: int, fold_heads: bool, sm_scale: float, precision,
    window: int | None, sink_tokens: int,
):
    """One grid step: list slot `slot` of query tile t of (row b, KV head h).

    Scalar prefetch (SMEM, flat): idx_ref [B * K * nq * max_sel]; range_ref
    [B * K * num_tiles * num_ranges] = per tile (n_full, n_live[, n_head, _]) from _tile_ranges;
    len_ref [B]; off_ref [1] (q_offset, read at run time so chunks share one compiled kernel).
    q_ref, o_ref: [G, tile_q, D]; k_ref, v_ref: [block_k, D] = the slot's listed block.
    Scratch m_ref, l_ref: [units, rows, NUM_LANES] f32; acc_ref: [units, rows, D] f32, where
    (units, rows) = (1, G * tile_q) with fold_heads, else (G, tile_q).
    """
    b, h, t, slot = (pl.program_id(i) for i in range(4))
    tile = (b * num_kv_heads + h) * num_tiles + t
    # lax.div, not //: floor division lowers to sign fix-ups (the indices are never negative).
    list_start = ((b * num_kv_heads + h) * (num_tiles // tiles_per_block)
                  + lax.div(t, tiles_per_block)) * max_sel
    n_full = range_ref[tile * num_ranges]
    n_live = range_ref[tile * num_ranges + 1]
    n_head = range_ref[tile * num_ranges + 2] if window is not None else 0
    length = len_ref[b]
    p_first = off_ref[0] + t * tile_q
    group = q_ref.shape[0]
    units = 1 if fold_heads else group

    @pl.when(slot == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def unit_q(u):
        if fold_heads:  # [G, tile_q, D] -> [G * tile_q, D]: row r = head r // tile_q
            return q_ref[...].reshape(group * tile_q, q_ref.shape[-1])
        return q_ref[u]

    def compute(masked: bool):
        k = k_ref[...]
        v = v_ref[...]
        mask = None
        if masked:
            j = idx_ref[list_start + slot]
            shape = (tile_q, block_k)
            q_pos = p_first + lax.broadcasted_iota(jnp.int32, shape, 0)
            k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
            mask = (k_pos <= q_pos) & (k_pos < length)
            if window is not None:
                mask &= window_visible(k_pos, q_pos, window=window, sink_tokens=sink_tokens)
            # Past the length the cache may hold garbage (even NaN), and p == 0 times NaN is
            # NaN in P @ V: zero those V rows.
            v_pos = j * block_k + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where(v_pos < length, v, jnp.zeros_like(v))
        for u in range(units):
            online_softmax_update(
                unit_q(u), k, v, m_ref.at[u], l_ref.at[u], acc_ref.at[u],
                sm_scale=sm_scale, precision=precision, mask=mask,
            )

    # _tile_ranges orders the live prefix as [0, n_head) masked (older than some row's window),
    # [n_head, n_full) causal and visible for every row (no mask), [n_full, n_live) masked.
    live = slot < n_live
    needs_mask = (slot >= n_full) | (slot < n_head)

    @pl.when(live & needs_mask)
    def _masked():
        compute(masked=True)

    @pl.when(live & jnp.logical_not(needs_mask))
    def _unmasked():
        compute(masked=False)

    @pl.when(slot == max_sel - 1)
    def _store():
        # Query rows at or past the length output 0, as in the reference.
        row_ok = p_first + lax.broadcasted_iota(jnp.int32, (tile_q, o_ref.shape[-1]), 0) < length
        for u in range(units):
            o = _where_rows(row_ok, finalize(l_ref.at[u], acc_ref.at[u]), 0.0)
            if fold_heads:
                o_ref[...] = o.reshape(o_ref.shape).astype(o_ref.dtype)
            else:
                o_ref[u] = o.astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_q", "block_k", "sm_scale", "interpret", "num_warps", "num_stages",
        "tile_q", "fold_heads", "window", "sink_tokens",
    ),
)
def sparse_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    *,
    block_q: int,
    block_k: int,
    lengths: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    sm_scale: float | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tile_q: int | None = None,
    fold_heads: bool | None = None,
    window: int | None = None,
    sink_tokens: int = 0,
) -> jax.Array:
    """Block-sparse flash attention (Pallas, Mosaic TPU lowering); same contract as
    sparse_attention_reference and the same arguments as sparse_attention.

    Args:
      q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim];
        float32 or bfloat16 (all the same), head_dim a multiple of 64.
      block_indices: [batch, num_kv_heads, num_q_blocks, max_sel] int32, ascending.
      block_counts: [batch, num_kv_heads, num_q_blocks] int32.
      block_q, block_k: selection granularity; block_k a multiple of 8 (float32) or 16
        (bfloat16), the sublane tile.
      lengths: [batch] int32, valid keys per row (<= kv_len); defaults to kv_len.
      q_offset: absolute position of query 0, an int or a traced int32 scalar.
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).
      interpret: run in Pallas TPU interpret mode (pltpu.InterpretParams) instead of Mosaic.
      num_warps, num_stages: Triton launch parameters; the TPU kernel has none, so they must
        be None.
      tile_q: query tokens per grid step, dividing block_q and a multiple of the sublane tile;
        defaults to block_q.
      fold_heads: stack the G heads into one [G * tile_q, D] tile (one matmul per block) instead
        of G matmuls of tile_q rows; defaults to True.
      window, sink_tokens: static local mask as in the reference (None: no window).

    Returns:
      [batch, q_len, num_heads, head_dim] in q's dtype.
    """
    group, num_q_blocks = _check_shapes(q, k, v, block_indices, block_counts, block_q)
    validate_window(window, sink_tokens)
    check_tpu_inputs(q, k, v, block_k)
    if num_warps is not None or num_stages is not None:
        raise ValueError("num_warps and num_stages are Triton launch parameters; pass None on TPU")
    batch, q_len, num_heads, head_dim = q.shape
    _, kv_len, num_kv_heads, _ = k.shape
    max_sel = block_indices.shape[-1]
    tile_q = block_q if tile_q is None else tile_q
    fold_heads = True if fold_heads is None else fold_heads
    rows = sublane_multiple(q.dtype)
    if block_q % rows:
        raise ValueError(f"{block_q=} must be a multiple of {rows} for {q.dtype} TPU tiles")
    if block_q % tile_q or tile_q % rows:
        raise ValueError(
            f"tile_q={tile_q} must divide block_q={block_q} and be a multiple of {rows} for "
            f"{q.dtype} TPU tiles"
        )
    if lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    if max_sel == 0:
        return jnp.zeros_like(q)

    tiles_per_block = block_q // tile_q
    num_tiles = num_q_blocks * tiles_per_block
    num_k_blocks = pl.cdiv(kv_len, block_k)
    lengths = lengths.astype(jnp.int32)
    # Clipped as the reference clips them; the pipeline must never DMA outside the cache.
    block_indices = jnp.clip(block_indices.astype(jnp.int32), 0, num_k_blocks - 1)
    ranges = _tile_ranges(
        block_indices, block_counts.astype(jnp.int32), lengths, tile_q=tile_q,
        tiles_per_block=tiles_per_block, block_k=block_k, q_len=q_len, q_offset=q_offset,
        window=window,
    )
    num_ranges = ranges.shape[-1]
    offsets = jnp.full((1,), q_offset, jnp.int32)

    t_pad = num_tiles * tile_q
    qt = jnp.pad(q, ((0, 0), (0, t_pad - q_len), (0, 0), (0, 0)))
    qt = qt.reshape(batch, t_pad, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    kv_k, lane_view = kv_layout(k, block_k)
    kv_v, _ = kv_layout(v, block_k)

    def block_of(b, h, t, s, idx_ref, range_ref, len_ref, off_ref):
        # Slots past the live prefix re-read the last live block: the pipeline sees an
        # unchanged block index and issues no DMA (the compute is skipped with pl.when).
        n_live = range_ref[((b * num_kv_heads + h) * num_tiles + t) * num_ranges + 1]
        slot = jnp.minimum(s, jnp.maximum(n_live - 1, 0))
        list_start = ((b * num_kv_heads + h) * num_q_blocks + lax.div(t, tiles_per_block)) * max_sel
        return b, h, idx_ref[list_start + slot]

    def q_map(b, h, t, s, *_):
        return b, h, 0, t, 0

    q_spec = pl.BlockSpec((None, None, group, tile_q, head_dim), q_map)
    kv_spec = kv_block_spec(lane_view, block_k, head_dim, block_of)
    units, unit_rows = (1, group * tile_q) if fold_heads else (group, tile_q)
    kernel = functools.partial(
        _prefill_kernel, num_kv_heads=num_kv_heads, num_tiles=num_tiles,
        tiles_per_block=tiles_per_block, max_sel=max_sel, num_ranges=num_ranges, tile_q=tile_q,
        block_k=block_k, fold_heads=fold_heads, sm_scale=_default_sm_scale(head_dim, sm_scale),
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT,
        window=window, sink_tokens=sink_tokens,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, num_kv_heads, num_tiles, max_sel),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((units, unit_rows, NUM_LANES), jnp.float32),
                pltpu.VMEM((units, unit_rows, NUM_LANES), jnp.float32),
                pltpu.VMEM((units, unit_rows, head_dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        # The slot axis carries the softmax state: sequential. The others are independent.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="sparse_attention_prefill_tpu",
    )(block_indices.reshape(-1), ranges.reshape(-1), lengths, offsets, qt, kv_k, kv_v)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, t_pad, num_heads, head_dim)
    return out[:, :q_len]

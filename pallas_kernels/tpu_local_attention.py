"""Local attention (attention sinks + a sliding window) as a Pallas Mosaic (TPU) kernel.

Same contract as `pallas_kernels.local_attention.local_attention` (see that module for the
mask): a query at position t of row b (valid iff t < lengths[b]) sees key s iff s <= t,
s < lengths[b] and (s < sink_tokens or s > t - window); invalid query rows output exactly 0.

Shapes (batch = B, seq = T, num_heads = H, num_kv_heads = K, head_dim = D, G = H // K):
  q:       [B, T, H, D]
  k, v:    [B, T, K, D]
  lengths: [B] int32, valid tokens per row (<= T)

Kernel layout. TPU blocks tile the last two dimensions of an array (sublanes x lanes), so the
wrapper moves the heads in front of the sequence: q becomes [B, K, T_pad * G, D] (row
t * G + g is token t, head g of the group, so one [block_q * G, D] tile holds all G heads of a
KV head and one matrix product per key block serves the whole group) and k, v become
[B, K, S_pad, D]. The grid is (B, K, query block, key-block slot): the slots of query block i
are its sink blocks, then its window blocks up to the diagonal, the list `window_block_lists`
builds, evaluated per grid step from the scalar-prefetched row length (`_block_span`), so each
BlockSpec index map fetches exactly the listed K/V blocks and nothing past the row's length.
Slots past a row's count repeat the last block's index, so the pipeline fetches nothing new
for them, and the body skips them. The online softmax keeps its running max, sum and output in
float32 VMEM scratch; the last slot writes the output tile.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.local_attention import _check_inputs, window_block_lists
from pallas_kernels.sparse_attention import MASK_VALUE, validate_window, window_visible

# TPU vector registers are 8 sublanes x 128 lanes: the last dimension of a block (and of the
# score tile [rows, block_k]) is a multiple of LANES, the second-to-last of SUBLANES.
LANES = 128
SUBLANES = 8
# head_dim values the kernel supports: 64 (half a lane row, the full dimension of the block)
# or a multiple of LANES.
SMALL_HEAD_DIM = 64


def _block_span(
    i: jax.Array, length: jax.Array, *, block_q: int, block_k: int, sink_tokens: int,
    window: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The key-block list of query block i of a row with `length` valid tokens (int32 scalars).

    The rule of `window_block_lists` (sink blocks, then the window blocks up to the diagonal,
    each block once), with the block's last query clamped to the row's last valid one, so the
    list also stops at the length; with length = seq it is that function's list exactly
    (tests/test_tpu_kernels_local_select.py checks it). Scalar code: it runs in the BlockSpec
    index maps and the kernel body, where a table per query block would take SMEM.

    Returns (last, n_sink, lo, count): the block's last valid query position (< the first
    position when it has none), how many sink blocks lead the list, the first window block,
    and the list length (0 for a block with no valid query). Slot s < count holds block
    s if s < n_sink, else lo + s - n_sink.
    """
    first = i * block_q
    last = jnp.minimum(first + block_q, length) - 1
    # Sinks: keys [0, min(sink_tokens, last + 1)), causal for the block's last query.
    sink_end = jnp.clip(last + 1, 0, sink_tokens)
    n_sink = lax.div(sink_end + block_k - 1, block_k)
    # Window: keys [first - window + 1, last]; blocks already listed as sinks come once.
    lo = jnp.maximum(lax.div(jnp.maximum(first - window + 1, 0), block_k), n_sink)
    hi = lax.div(jnp.maximum(last, 0), block_k)
    count = jnp.where(last >= first, n_sink + jnp.maximum(hi - lo + 1, 0), 0)
    return last, n_sink, lo, count


def _slot_block(s: jax.Array, n_sink: jax.Array, lo: jax.Array, count: jax.Array) -> jax.Array:
    """Key block of slot s; slots past the count repeat the last block (0 for an empty list),
    so consecutive grid steps keep the same block index and the pipeline skips the copy."""
    s = jnp.clip(s, 0, jnp.maximum(count - 1, 0))
    return jnp.where(count > 0, jnp.where(s < n_sink, s, lo + s - n_sink), 0)


def _local_kernel(
    len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *,
    block_q: int, block_k: int, group: int, sink_tokens: int, window: int, max_sel: int,
    sm_scale: float, precision,
):
    """One grid step (row b, KV head h, query block i, slot s): one key block of i's list.

    len_ref: [B] int32 (SMEM, scalar prefetch); q_ref, o_ref: [block_q * G, D], row r is
    token i * block_q + r // G; k_ref, v_ref: [block_k, D]; m_ref, l_ref: [block_q * G, LANES]
    float32 running max / sum, replicated across lanes (a lane-dense layout); acc_ref:
    [block_q * G, D] float32 unnormalised output.
    """
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    rows, head_dim = q_ref.shape
    length = len_ref[b]
    span = functools.partial(_block_span, block_q=block_q, block_k=block_k,
                             sink_tokens=sink_tokens, window=window)
    last, n_sink, lo, count = span(i, length)
    first = i * block_q

    @pl.when(s == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    k_start = _slot_block(s, n_sink, lo, count) * block_k

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * sm_scale
        if masked:
            q_pos = first + lax.div(lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), group)
            k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
            mask = (k_pos <= q_pos) & (k_pos < length) & window_visible(
                k_pos, q_pos, window=window, sink_tokens=sink_tokens)
            # A select, not arithmetic: keys past the length may hold garbage, even NaN.
            scores = jnp.where(mask, scores, MASK_VALUE)
            v_ok = k_start + lax.broadcasted_iota(jnp.int32, v.shape, 0) < length
            v = jnp.where(v_ok, v, jnp.zeros_like(v))  # p == 0 times NaN is still NaN
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))  # [rows, LANES]
        p = jnp.exp(scores - jnp.tile(m_next, (1, block_k // LANES)))
        if masked:
            # A row with no visible key yet has m_next == MASK_VALUE and exp(0) == 1: zero it.
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        # bf16 inputs: P rounds to bf16 for the MXU, as in the Triton kernel.
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        acc_ref[...] = acc_ref[...] * _lanes(alpha, head_dim) + pv

    # Every key of the block is visible to every valid query of the tile: inside the length,
    # causal for the first query, and all sinks or inside the last query's window. Then the
    # masks (and their selects) are skipped; rows past the length are zeroed at the end.
    all_visible = (
        (k_start + block_k <= length)
        & (k_start + block_k - 1 <= first)
        & ((k_start + block_k <= sink_tokens) | (k_start > last - window))
    )
    live = s < count
    pl.when(live & all_visible)(functools.partial(step, False))
    pl.when(live & jnp.logical_not(all_visible))(functools.partial(step, True))

    @pl.when(s == max_sel - 1)
    def _finish():
        q_pos = first + lax.div(lax.broadcasted_iota(jnp.int32, (rows, head_dim), 0), group)
        total = _lanes(l_ref[...], head_dim)
        ok = (q_pos < length) & (total > 0)  # invalid rows and rows with no key: exactly 0
        out = acc_ref[...] / jnp.where(ok, total, 1.0)
        o_ref[...] = jnp.where(ok, out, 0.0).astype(o_ref.dtype)


def _lanes(x: jax.Array, width: int) -> jax.Array:
    """[rows, LANES] lane-replicated values -> [rows, width] (width 64 or a multiple of 128)."""
    return jnp.tile(x, (1, pl.cdiv(width, LANES)))[:, :width]


def _check_tpu_blocks(head_dim: int, dtype, block_q: int, block_k: int) -> None:
    """Raises ValueError for a case the kernel does not support."""
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported: use float32 or bfloat16")
    if head_dim != SMALL_HEAD_DIM and head_dim % LANES:
        raise ValueError(f"{head_dim=} must be {SMALL_HEAD_DIM} or a multiple of {LANES}")
    if block_q < 1 or block_q % SUBLANES:
        raise ValueError(f"{block_q=} must be a positive multiple of {SUBLANES} (TPU sublanes)")
    if block_k < 1 or block_k % LANES:
        raise ValueError(f"{block_k=} must be a positive multiple of {LANES} (TPU lanes)")


@functools.partial(
    jax.jit,
    static_argnames=("sink_tokens", "window", "block_q", "block_k", "sm_scale", "interpret"),
)
def local_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    sink_tokens: int,
    window: int,
    block_q: int,
    block_k: int,
    sm_scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Local attention through the Mosaic kernel; same contract as `local_attention`.

    Args:
      q: [batch, seq, num_heads, head_dim]; k, v: [batch, seq, num_kv_heads, head_dim];
        float32 or bfloat16; head_dim 64 or a multiple of 128.
      lengths: [batch] int32 valid tokens per row.
      sink_tokens, window: the mask (see local_attention.py); static.
      block_q: query tokens per tile, a multiple of 8 (the tile holds block_q * G rows).
      block_k: keys per block, a multiple of 128 (the lane dimension of the score tile).
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).
      interpret: run in Pallas' TPU interpret mode (pltpu.InterpretParams) on the CPU.

    Returns:
      [batch, seq, num_heads, head_dim] in q's dtype.
    """
    _check_inputs(q, k, v, lengths)
    validate_window(window, sink_tokens)
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    _check_tpu_blocks(head_dim, q.dtype, block_q, block_k)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    num_q_blocks = pl.cdiv(seq, block_q)
    num_k_blocks = pl.cdiv(seq, block_k)
    # The grid's slot extent: the longest list (static, from the full-length lists).
    max_sel = window_block_lists(seq, seq, sink_tokens=sink_tokens, window=window,
                                 block_q=block_q, block_k=block_k)[0].shape[1]

    # Head-major layouts (see the module docstring); padding rows sit past every length.
    q_pad = jnp.pad(q, ((0, 0), (0, num_q_blocks * block_q - seq), (0, 0), (0, 0)))
    q_t = q_pad.reshape(batch, -1, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_t = q_t.reshape(batch, num_kv_heads, -1, head_dim)  # [B, K, T_pad * G, D]

    def kv_layout(x):  # [B, T, K, D] -> [B, K, S_pad, D]
        x = jnp.pad(x, ((0, 0), (0, num_k_blocks * block_k - seq), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    span = functools.partial(_block_span, block_q=block_q, block_k=block_k,
                             sink_tokens=sink_tokens, window=window)

    def q_map(b, h, i, s, len_ref):
        return b, h, i, 0

    def kv_map(b, h, i, s, len_ref):
        _, n_sink, lo, count = span(i, len_ref[b])
        return b, h, _slot_block(s, n_sink, lo, count), 0

    rows = block_q * group
    q_spec = pl.BlockSpec((None, None, rows, head_dim), q_map)
    kv_spec = pl.BlockSpec((None, None, block_k, head_dim), kv_map)
    kernel = functools.partial(
        _local_kernel, block_q=block_q, block_k=block_k, group=group, sink_tokens=sink_tokens,
        window=window, max_sel=max_sel, sm_scale=scale,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, num_kv_heads, num_q_blocks, max_sel),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((rows, LANES), jnp.float32),
                pltpu.VMEM((rows, LANES), jnp.float32),
                pltpu.VMEM((rows, head_dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="local_attention_tpu",
    )(lengths.astype(jnp.int32), q_t, kv_layout(k), kv_layout(v))
    out = out.reshape(batch, num_kv_heads, -1, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, -1, num_heads, head_dim)[:, :seq]

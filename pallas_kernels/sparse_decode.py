"""Sparse decode attention: one new query token per row attends to its listed key blocks.

A pure-jnp reference and a split-K Pallas (Triton) kernel. The query heads of one KV head share
its block list, and one program handles all of them, so each listed K/V block is read once.

Shapes (batch = B, num_heads = H, num_kv_heads = K, G = H // K):
  q:                [B, H, D]
  k_cache, v_cache: [B, max_len, K, D] (the new token's K/V already at position lengths[b] - 1)
  block_indices:    [B, K, max_sel] int32, strictly ascending key block ids
  block_counts:     [B, K] int32, valid entries of each list (0..max_sel)
  lengths:          [B] int32, valid keys per row, the new token included (<= max_len)
The query attends to the keys of its listed blocks with position < lengths[b]; with no such key
the output is exactly 0.

With one split per list the kernel writes the normalised output itself, in one launch; with
several, it writes per-split partials ([B, splits, H, ...], the real heads only) that one XLA
reduction merges (`_merge_splits`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention import LOG2_E, MASK_VALUE, MIN_DOT_DIM

# Programs per SM the split heuristic aims for, so memory latency of one hides behind another.
PROGRAMS_PER_SM = 2
# Fewest listed blocks a split should get: below this the partial-result traffic and the merge
# cost more than the parallelism gains.
MIN_BLOCKS_PER_SPLIT = 4
# Most blocks a split walks when its list is full. A program reads its blocks one after
# another, so a long walk is latency no other program hides: on an H100 at 128K (lists ~8%
# full, block_k 64) batch 16 ran 491 us with the 3 splits PROGRAMS_PER_SM alone gives, 288-301
# us with 16-32 (benchmarks/NOTES.md).
MAX_BLOCKS_PER_SPLIT = 64
# Launch parameters: on an H100 (head_dim 128, block_k 64) 8 warps or 3-4 stages measured
# within the run-to-run spread (5-10%) of these; see benchmarks/NOTES.md.
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2


def _check_shapes(q, k_cache, v_cache, block_indices, block_counts, lengths) -> int:
    """Validates the decode inputs; returns G."""
    batch, num_heads, head_dim = q.shape
    _, _, num_kv_heads, _ = k_cache.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"caches {k_cache.shape}, {v_cache.shape} do not match q {q.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
    if block_indices.shape[:2] != (batch, num_kv_heads):
        raise ValueError(f"block_indices {block_indices.shape} != [{batch}, {num_kv_heads}, _]")
    if block_counts.shape != (batch, num_kv_heads) or lengths.shape != (batch,):
        raise ValueError(f"block_counts {block_counts.shape} / lengths {lengths.shape} mismatch")
    return num_heads // num_kv_heads


def sparse_decode_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    lengths: jax.Array,
    *,
    block_k: int,
    sm_scale: float | None = None,
) -> jax.Array:
    """Sparse decode attention, the definition of correct (float32 throughout).

    Args:
      q: [batch, num_heads, head_dim].
      k_cache, v_cache: [batch, max_len, num_kv_heads, head_dim].
      block_indices: [batch, num_kv_heads, max_sel] int32; block_counts: [batch, num_kv_heads].
      lengths: [batch] int32.
      block_k: key positions per block.
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).

    Returns:
      [batch, num_heads, head_dim] in q's dtype.

    Gathers only the listed blocks: memory O(batch * num_kv_heads * max_sel * block_k * D).
    """
    group = _check_shapes(q, k_cache, v_cache, block_indices, block_counts, lengths)
    batch, num_heads, head_dim = q.shape
    _, max_len, num_kv_heads, _ = k_cache.shape
    max_sel = block_indices.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    num_blocks = pl.cdiv(max_len, block_k)
    ids = jnp.clip(block_indices, 0, num_blocks - 1)

    def gather(cache):  # -> [B, K, max_sel, block_k, D]
        cache = jnp.pad(cache.astype(jnp.float32),
                        ((0, 0), (0, num_blocks * block_k - max_len), (0, 0), (0, 0)))
        cache = cache.reshape(batch, num_blocks, block_k, num_kv_heads, head_dim)
        cache = cache.transpose(0, 3, 1, 2, 4)
        return jnp.take_along_axis(cache, ids[..., None, None], axis=2)

    k_pos = ids[..., None] * block_k + jnp.arange(block_k)  # [B, K, sel, bk]
    key_ok = (jnp.arange(max_sel) < block_counts[..., None])[..., None] & (
        k_pos < lengths[:, None, None, None]
    )
    k_sel = gather(k_cache)
    # Zero V outside the length: the cache may hold garbage (even NaN) there.
    v_sel = jnp.where(key_ok[..., None], gather(v_cache), 0.0)
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
    s = jnp.einsum("bkgd,bkstd->bkgst", qg, k_sel, precision=lax.Precision.HIGHEST) * scale
    mask = key_ok[:, :, None]  # [B, K, 1, sel, bk]
    s = jnp.where(mask, s, -jnp.inf)
    row_max = jnp.max(s, axis=(-2, -1), keepdims=True)
    # A row with no visible key has row_max == -inf: subtract 0 instead so p is 0, not NaN.
    p = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = p.sum(axis=(-2, -1))[..., None]
    o = jnp.einsum("bkgst,bkstd->bkgd", p, v_sel, precision=lax.Precision.HIGHEST)
    o = jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)
    return o.reshape(batch, num_heads, head_dim).astype(q.dtype)


def _store_rows(ref, head_rows: pl.Slice, value: jax.Array, group: int) -> None:
    """Writes the first `group` of value's rows ([rows, ...]) at head_rows of ref; the padding
    rows past them belong to the next KV head's programs (or lie past the last head)."""
    rows = value.shape[0]
    if rows == group:
        ref[head_rows, ...] = value
        return
    mask = lax.iota(jnp.int32, rows) < group
    mask = mask.reshape((rows,) + (1,) * (value.ndim - 1))
    plgpu.store(ref.at[head_rows, ...], value, mask=mask)


def _decode_kernel(
    q_ref, k_ref, v_ref, idx_ref, count_ref, len_ref, *out_refs,
    group: int, rows: int, num_splits: int, block_k: int, max_sel: int, qk_scale: float,
    precision,
):
    """One program: the G heads of one KV head (padded to `rows`), one split of its list.

    q_ref: [H, D]; k_ref, v_ref: [max_len, D]; idx_ref: [max_sel]; count_ref, len_ref: scalars.
    out_refs: one split, (o_ref [H, D] in q's dtype,); several, this split's partials (acc_ref
    [H, D], m_ref [H], sum_ref [H], float32, in the exp2 domain). A program writes its G rows.
    """
    split = pl.program_id(0)
    # The group's G query rows, padded with zero rows up to the smallest dot; loaded first so
    # the load overlaps the scalar loads below.
    head_rows = pl.ds(pl.program_id(1) * group, rows)
    q_mask = None if rows == group else (lax.iota(jnp.int32, rows) < group)[:, None]
    q = q_ref[head_rows, :] if q_mask is None else plgpu.load(
        q_ref.at[head_rows, :], mask=q_mask, other=0)
    count = count_ref[()]
    length = len_ref[()]
    # Chunk per row, so the splits stay balanced whatever the row's count.
    chunk = lax.div(count + num_splits - 1, num_splits)
    begin = jnp.minimum(split * chunk, count)
    end = jnp.minimum(begin + chunk, count)
    head_dim = q.shape[1]

    def block_id(i):
        return idx_ref[jnp.minimum(i, max_sel - 1)]

    def body(i, carry):
        # The next block id is loaded here and carried, so K/V addresses never wait on it.
        acc, m, row_sum, j = carry
        j_next = block_id(i + 1)
        start = j * block_k
        k_pos = start + lax.iota(jnp.int32, block_k)
        valid = k_pos < length
        # Masked loads: past the length the cache may hold garbage, even NaN.
        k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=valid[:, None], other=0)
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=valid[:, None], other=0)
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32,
        )
        s = jnp.where(valid[None, :], s * qk_scale, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(valid[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32,
        )
        return acc * alpha[:, None] + pv, m_new, alpha * row_sum + jnp.sum(p, axis=1), j_next

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        block_id(begin),
    )
    acc, m, row_sum, _ = lax.fori_loop(begin, end, body, init)
    if num_splits == 1:
        # The whole list was this program's: normalise here, and no merge runs. A row with no
        # visible key has row_sum == 0 and gets exactly 0.
        (o_ref,) = out_refs
        o = jnp.where(row_sum[:, None] > 0, acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None],
                      0.0)
        _store_rows(o_ref, head_rows, o.astype(o_ref.dtype), group)
        return
    acc_ref, m_ref, sum_ref = out_refs
    _store_rows(acc_ref, head_rows, acc, group)
    _store_rows(m_ref, head_rows, m, group)
    _store_rows(sum_ref, head_rows, row_sum, group)


def sm_count() -> int | None:
    """Streaming multiprocessors of the default device, as its backend reports them (None
    where it reports none, e.g. on CPU)."""
    return getattr(jax.devices()[0], "core_count", None)


def default_num_splits(batch: int, num_kv_heads: int, max_sel: int, sms: int | None = None,
                       *, max_walk: int | None = MAX_BLOCKS_PER_SPLIT) -> int:
    """Splits of each block list: enough that batch * num_kv_heads * splits fills the GPU's sms
    (default: the device's) and that no split of a full list walks more than max_walk blocks
    (None: no such bound, the SM fill alone), but at most as many as leave every split
    MIN_BLOCKS_PER_SPLIT blocks. One split, with no merge, needs both: enough rows to fill the
    GPU and short lists. On a device that reports no SMs (interpret mode) the lists split as
    far as MIN_BLOCKS_PER_SPLIT allows."""
    most = max(1, pl.cdiv(max_sel, MIN_BLOCKS_PER_SPLIT))
    sms = sm_count() if sms is None else sms
    if not sms:
        return most
    wanted = pl.cdiv(sms * PROGRAMS_PER_SM, batch * num_kv_heads)
    if max_walk is not None:
        wanted = max(wanted, pl.cdiv(max_sel, max_walk))
    return max(1, min(wanted, most))


def _merge_splits(acc: jax.Array, m: jax.Array, row_sum: jax.Array) -> jax.Array:
    """Log-sum-exp merge of split partials (exp2 domain), as one XLA reduction.

    acc: [B, splits, H, D]; m, row_sum: [B, splits, H] -> [B, H, D] float32.
    The reduction carries (max, sum, acc) and rescales both sides to their common max, the
    online softmax's own step: one pass over the partials, where a max first and the sums
    after take separate passes (separate launches on a GPU).
    """
    def combine(a, b):
        (m_a, l_a, o_a), (m_b, l_b, o_b) = a, b
        m_ab = jnp.maximum(m_a, m_b)
        # Empty splits carry m == MASK_VALUE (finite): their weight is 0, or 1 against another
        # empty split, whose sums are 0 too.
        w_a, w_b = jnp.exp2(m_a - m_ab), jnp.exp2(m_b - m_ab)
        return m_ab, w_a * l_a + w_b * l_b, w_a * o_a + w_b * o_b

    shape = acc.shape
    _, l_tot, o = lax.reduce(
        (jnp.broadcast_to(m[..., None], shape), jnp.broadcast_to(row_sum[..., None], shape), acc),
        (jnp.float32(MASK_VALUE), jnp.float32(0), jnp.float32(0)), combine, (1,))
    return jnp.where(l_tot > 0, o / jnp.where(l_tot > 0, l_tot, 1.0), 0.0)


@functools.partial(
    jax.jit,
    static_argnames=("block_k", "sm_scale", "num_splits", "interpret", "num_warps", "num_stages"),
)
def sparse_decode(
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
    """Split-K sparse decode (Pallas, Triton lowering); same contract as the reference.

    Args:
      q: [batch, num_heads, head_dim].
      k_cache, v_cache: [batch, max_len, num_kv_heads, head_dim].
      block_indices: [batch, num_kv_heads, max_sel] int32; block_counts: [batch, num_kv_heads].
      lengths: [batch] int32.
      block_k: key positions per block (power of 2, >= 16).
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).
      num_splits: programs per (row, KV head), each taking an equal share of the list;
        defaults to default_num_splits. With 1 the kernel writes the output and no merge runs.
      interpret: run the kernel in Pallas interpret mode (CPU tests).
      num_warps, num_stages: Triton launch parameters.

    Returns:
      [batch, num_heads, head_dim] in q's dtype.
    """
    group = _check_shapes(q, k_cache, v_cache, block_indices, block_counts, lengths)
    batch, num_heads, head_dim = q.shape
    _, max_len, num_kv_heads, _ = k_cache.shape
    max_sel = block_indices.shape[-1]
    if block_k < MIN_DOT_DIM or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power of 2 >= {MIN_DOT_DIM}")
    if max_sel == 0:
        return jnp.zeros_like(q)
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, max_sel)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT

    # The G heads form the rows of the score tile, padded to a power of 2 >= the smallest dot.
    rows = max(MIN_DOT_DIM, pl.next_power_of_2(group))
    kernel = functools.partial(
        _decode_kernel, group=group, rows=rows, num_splits=num_splits, block_k=block_k,
        max_sel=max_sel, qk_scale=scale * LOG2_E, precision=precision,
    )
    kv_spec = pl.BlockSpec((None, max_len, None, head_dim), lambda s, g, b: (b, 0, g, 0))
    # Every output block holds all H heads of a row (and split): the K programs of the row
    # write disjoint rows of it, so outputs need no slicing or reshaping afterwards.
    if num_splits == 1:
        out_specs = [pl.BlockSpec((None, num_heads, head_dim), lambda s, g, b: (b, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        part_shape = (batch, num_splits, num_heads)
        out_specs = [
            pl.BlockSpec((None, None, num_heads, head_dim), lambda s, g, b: (b, s, 0, 0)),
            pl.BlockSpec((None, None, num_heads), lambda s, g, b: (b, s, 0)),
            pl.BlockSpec((None, None, num_heads), lambda s, g, b: (b, s, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((*part_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(part_shape, jnp.float32),
            jax.ShapeDtypeStruct(part_shape, jnp.float32),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(num_splits, num_kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None, num_heads, head_dim), lambda s, g, b: (b, 0, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, max_sel), lambda s, g, b: (b, g, 0)),
            pl.BlockSpec((None, None), lambda s, g, b: (b, g)),
            pl.BlockSpec((None,), lambda s, g, b: (b,)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=DEFAULT_NUM_WARPS if num_warps is None else num_warps,
            num_stages=DEFAULT_NUM_STAGES if num_stages is None else num_stages,
        ),
        interpret=interpret,
        name="sparse_decode",
    )(q, k_cache, v_cache, block_indices.astype(jnp.int32), block_counts.astype(jnp.int32),
      lengths.astype(jnp.int32))
    if num_splits == 1:
        return outs[0]
    return _merge_splits(*outs).astype(q.dtype)

"""Block-sparse flash attention for prefill: a pure-jnp reference and a Pallas (Triton) kernel.

Each (row, KV head, query block) attends only to the key blocks listed for it. The query heads
of one KV head (a GQA group) share the list, so the kernel reads every listed K/V block once
for the whole group.

Shapes (batch = B, q_len = T, kv_len = S, num_heads = H, num_kv_heads = K, G = H // K):
  q:             [B, T, H, D]
  k, v:          [B, S, K, D]
  block_indices: [B, K, ceil(T / block_q), max_sel] int32, strictly ascending key block ids
  block_counts:  [B, K, ceil(T / block_q)] int32, valid entries of each list (0..max_sel)
  lengths:       [B] int32, valid keys per row (<= S)
Query i of row b sits at absolute position q_offset + i and is valid iff that position is below
lengths[b]. It attends to the keys of its listed blocks that are causal (key position <= query
position) and valid (key position < lengths[b]). Rows with no such key, and invalid rows,
output exactly 0.

With a static `window` (and `sink_tokens`), a query at position t also needs
(s < sink_tokens) or (s > t - window) to see key s: attention sinks plus a sliding window that
counts the query itself (window = 1: itself and the sinks). The lists must still cover every
such key the caller wants (pallas_kernels.local_attention builds them); the mask is token-exact.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Finite stand-in for -inf in the running max: exp2(MASK_VALUE - m) underflows to exactly 0
# for any real score m, and MASK_VALUE - MASK_VALUE stays finite (no NaN from inf - inf).
MASK_VALUE = -1e30
# Rows of the kernel's score tile (query tokens x heads of one group) per program. Measured on
# an H100: 64 rows 3-7% slower; 256 rows within 5% (faster at 10% density, slower at 1%) but
# needing 8 warps; 128 rows keep the float32 accumulator in the registers of 4 warps.
TARGET_TILE_ROWS = 128
# Triton's matrix instructions need every dot dimension to be at least this large.
MIN_DOT_DIM = 16
# With a window, each program tile's range row holds (n_full, n_live, n_head, padding): Triton
# blocks need power-of-2 sizes, so the three counts travel in four slots.
WINDOW_RANGE_SLOTS = 4
LOG2_E = math.log2(math.e)


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _default_sm_scale(head_dim: int, sm_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def validate_window(window: int | None, sink_tokens: int) -> None:
    """Raises ValueError unless (window, sink_tokens) is a valid static local-attention mask."""
    if window is not None and window < 1:
        raise ValueError(f"{window=} must be >= 1 (it counts the query itself) or None")
    if sink_tokens < 0:
        raise ValueError(f"{sink_tokens=} must be >= 0")


def window_visible(
    k_pos: jax.Array, q_pos: jax.Array, *, window: int, sink_tokens: int
) -> jax.Array:
    """Sink-or-window part of the local mask: key position k_pos is a sink or is among the
    `window` latest positions up to query position q_pos (broadcasting, elementwise)."""
    return (k_pos < sink_tokens) | (k_pos > q_pos - window)


def _check_shapes(q, k, v, block_indices, block_counts, block_q: int) -> tuple[int, int]:
    """Validates the prefill inputs; returns (G, num_q_blocks)."""
    batch, q_len, num_heads, head_dim = q.shape
    _, kv_len, num_kv_heads, _ = k.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k {k.shape} and v {v.shape} do not match q {q.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
    num_q_blocks = pl.cdiv(q_len, block_q)
    if block_indices.shape[:3] != (batch, num_kv_heads, num_q_blocks):
        raise ValueError(
            f"block_indices {block_indices.shape} != [{batch}, {num_kv_heads}, {num_q_blocks}, _]"
        )
    if block_counts.shape != (batch, num_kv_heads, num_q_blocks):
        raise ValueError(f"block_counts {block_counts.shape} != {block_indices.shape[:3]}")
    return num_heads // num_kv_heads, num_q_blocks


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def sparse_attention_reference(
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
    window: int | None = None,
    sink_tokens: int = 0,
) -> jax.Array:
    """Block-sparse attention, the definition of correct (float32 throughout).

    Args:
      q: [batch, q_len, num_heads, head_dim].
      k, v: [batch, kv_len, num_kv_heads, head_dim].
      block_indices: [batch, num_kv_heads, num_q_blocks, max_sel] int32.
      block_counts: [batch, num_kv_heads, num_q_blocks] int32.
      block_q, block_k: query rows per selection list, key positions per key block.
      lengths: [batch] int32 valid keys per row; defaults to kv_len.
      q_offset: absolute position of query 0 (an int or a traced int32 scalar).
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).
      window, sink_tokens: when window is not None, a query at t sees key s only if
        s < sink_tokens or s > t - window (on top of the lists, causality and the length).

    Returns:
      [batch, q_len, num_heads, head_dim] in q's dtype.

    Loops over query blocks (lax.map) and gathers only the listed key blocks, so memory stays
    at O(batch * num_heads * block_q * max_sel * block_k) whatever the sequence length.
    """
    group, num_q_blocks = _check_shapes(q, k, v, block_indices, block_counts, block_q)
    validate_window(window, sink_tokens)
    batch, q_len, num_heads, head_dim = q.shape
    _, kv_len, num_kv_heads, _ = k.shape
    max_sel = block_indices.shape[-1]
    scale = _default_sm_scale(head_dim, sm_scale)
    if lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    num_k_blocks = pl.cdiv(kv_len, block_k)

    f32 = jnp.float32
    qf = jnp.pad(q.astype(f32), ((0, 0), (0, num_q_blocks * block_q - q_len), (0, 0), (0, 0)))
    # [num_q_blocks, B, block_q, K, G, D]
    qf = qf.reshape(batch, num_q_blocks, block_q, num_kv_heads, group, head_dim)
    qf = qf.transpose(1, 0, 2, 3, 4, 5)

    def to_blocks(x):  # [B, S, K, D] -> [B, K, num_k_blocks, block_k, D]
        x = jnp.pad(x.astype(f32), ((0, 0), (0, num_k_blocks * block_k - kv_len), (0, 0), (0, 0)))
        x = x.reshape(batch, num_k_blocks, block_k, num_kv_heads, head_dim)
        return x.transpose(0, 3, 1, 2, 4)

    kb, vb = to_blocks(k), to_blocks(v)
    sel_ids = jnp.clip(block_indices, 0, num_k_blocks - 1).transpose(2, 0, 1, 3)
    sel_valid = jnp.arange(max_sel) < block_counts.transpose(2, 0, 1)[..., None]
    lens = lengths.astype(jnp.int32)[:, None, None, None]

    def one_query_block(args):
        i, q_blk, ids, valid = args  # q_blk [B, bq, K, G, D]; ids, valid [B, K, max_sel]
        k_pos = ids[..., None] * block_k + jnp.arange(block_k)  # [B, K, sel, bk]
        key_ok = valid[..., None] & (k_pos < lens)  # listed and inside the row's length
        k_sel = jnp.take_along_axis(kb, ids[..., None, None], axis=2)  # [B, K, sel, bk, D]
        # Zero V outside the length: the cache may hold garbage (even NaN) there.
        v_sel = jnp.take_along_axis(vb, ids[..., None, None], axis=2)
        v_sel = jnp.where(key_ok[..., None], v_sel, 0.0)
        s = jnp.einsum("bqkgd,bkstd->bkgqst", q_blk, k_sel, precision=lax.Precision.HIGHEST)
        s = s * scale  # [B, K, G, bq, sel, bk]
        q_pos = q_offset + i * block_q + jnp.arange(block_q)
        q_ok = q_pos[None, :] < lens[:, :, 0, 0]  # [B, bq]
        mask = (
            key_ok[:, :, None, None]
            & (k_pos[:, :, None, None] <= q_pos[None, None, None, :, None, None])
            & q_ok[:, None, None, :, None, None]
        )
        if window is not None:
            mask &= window_visible(
                k_pos[:, :, None, None], q_pos[None, None, None, :, None, None],
                window=window, sink_tokens=sink_tokens,
            )
        s = jnp.where(mask, s, -jnp.inf)
        row_max = jnp.max(s, axis=(-2, -1), keepdims=True)
        # A row with no visible key has row_max == -inf: subtract 0 instead so p is 0, not NaN.
        p = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
        denom = p.sum(axis=(-2, -1))
        o = jnp.einsum("bkgqst,bkstd->bqkgd", p, v_sel, precision=lax.Precision.HIGHEST)
        denom = denom.transpose(0, 3, 1, 2)[..., None]  # [B, bq, K, G, 1]
        return jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)

    out = lax.map(one_query_block, (jnp.arange(num_q_blocks), qf, sel_ids, sel_valid))
    out = out.transpose(1, 0, 2, 3, 4, 5)
    out = out.reshape(batch, num_q_blocks * block_q, num_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Pallas kernel
# ----------------------------------------------------------------------------------------------


def _load(ref, mask):
    """Loads ref, with zeros where mask is False (mask None: the whole ref, unmasked)."""
    if mask is None:
        return ref[...]
    return plgpu.load(ref, mask=mask, other=0)


def _online_softmax_step(carry, q, k, v, mask, *, qk_scale, precision):
    """One key block of the flash-attention recurrence in the exp2 domain.

    carry = (acc [M, D] f32, m [M] f32, row_sum [M] f32); q [M, D]; k, v [bk, D];
    mask [M, bk], or None when every key of the block is visible to every row (no select).
    """
    acc, m, row_sum = carry
    s = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    s = s * qk_scale
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:
        # A row with no visible key yet has m_new == MASK_VALUE and exp2(0) == 1: zero it.
        p = jnp.where(mask, p, 0.0)
    row_sum = alpha * row_sum + jnp.sum(p, axis=1)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32,
    )
    return acc * alpha[:, None] + pv, m_new, row_sum


def _prefill_kernel(
    q_ref, k_ref, v_ref, idx_ref, range_ref, len_ref, off_ref, o_ref, *,
    num_tiles: int, tile_q: int, block_k: int, group: int, q_len: int,
    max_sel: int, qk_scale: float, fold_heads: bool, precision, window: int | None,
    sink_tokens: int,
):
    """One program: all G query heads of one KV head, tile_q query tokens, the listed blocks.

    q_ref, o_ref: [tile_q, G, D]; k_ref, v_ref: [kv_len, D]; idx_ref: [max_sel];
    range_ref: [2] = (n_full, n_live): list entries [0, n_full) are causal for every row of the
    tile (no mask), [n_full, n_live) cross the diagonal or the length (masked); len_ref: scalar;
    off_ref: scalar, the absolute position of query 0 (read at run time: one compiled kernel
    serves every chunk of a chunked prefill).
    With a window, range_ref is [WINDOW_RANGE_SLOTS] = (n_full, n_live, n_head, _): entries
    [0, n_head) hold a key older than some row's window (masked), [n_head, n_full) are fully
    visible to every row, [n_full, n_live) masked as without a window.
    """
    tile = num_tiles - 1 - pl.program_id(0)  # heaviest (latest) tiles first: better tail
    row0 = tile * tile_q
    tok = row0 + lax.iota(jnp.int32, tile_q)
    q_mask = None if q_len % tile_q == 0 else (tok < q_len)[:, None]
    head_dim = q_ref.shape[-1]
    # The query tile is loaded first so its latency overlaps the scalar loads below.
    if fold_heads:
        # [tile_q, G, D] -> [tile_q * G, D]: row r is token r // G, head r % G.
        q_load_mask = None if q_mask is None else q_mask[:, :, None]
        qs = [_load(q_ref, q_load_mask).reshape(tile_q * group, head_dim)]
    else:
        qs = [_load(q_ref.at[:, jnp.int32(h), :], q_mask) for h in range(group)]
    n_full = range_ref[0]
    n_live = range_ref[1]
    length = len_ref[()]
    p_first = off_ref[()] + row0
    if fold_heads:
        q_pos = p_first + lax.div(lax.iota(jnp.int32, tile_q * group), group)
    else:
        q_pos = p_first + lax.iota(jnp.int32, tile_q)
    rows = qs[0].shape[0]
    init = tuple(
        (
            jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        )
        for _ in qs
    )
    step = functools.partial(_online_softmax_step, qk_scale=qk_scale, precision=precision)

    def block_id(i):
        return idx_ref[jnp.minimum(i, max_sel - 1)]

    # Each iteration loads the next block id while this block's K/V are in flight, and carries
    # it: the K/V addresses then never wait on a dependent scalar load inside the iteration.
    def full_block(i, carry):
        *states, j = carry
        j_next = block_id(i + 1)
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        states = [step(c, q, k, v, None) for c, q in zip(states, qs, strict=True)]
        return (*states, j_next)

    def masked_block(i, carry):
        *states, j = carry
        j_next = block_id(i + 1)
        k_pos = j * block_k + lax.iota(jnp.int32, block_k)
        # Keys past the length are masked out of the loads too: the cache may hold garbage
        # (even NaN) there, and p == 0 times NaN is still NaN in the P @ V product.
        kv_mask = (k_pos < length)[:, None]
        k = _load(k_ref.at[pl.ds(j * block_k, block_k), :], kv_mask)
        v = _load(v_ref.at[pl.ds(j * block_k, block_k), :], kv_mask)
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < length)
        if window is not None:
            mask &= window_visible(k_pos[None, :], q_pos[:, None], window=window,
                                   sink_tokens=sink_tokens)
        states = [step(c, q, k, v, mask) for c, q in zip(states, qs, strict=True)]
        return (*states, j_next)

    if window is None:
        carry = lax.fori_loop(0, n_full, full_block, (*init, block_id(0)))
    else:
        # Softmax order does not matter: the masked head first, then the unmasked middle.
        n_head = range_ref[2]
        carry = lax.fori_loop(0, n_head, masked_block, (*init, block_id(0)))
        carry = lax.fori_loop(n_head, n_full, full_block, (*carry[:-1], block_id(n_head)))
    carry = lax.fori_loop(n_full, n_live, masked_block, (*carry[:-1], block_id(n_full)))

    row_valid = (q_pos < length)[:, None]
    outs = []
    for acc, _, row_sum in carry[:-1]:
        has_key = (row_sum > 0)[:, None]
        o = acc / jnp.where(has_key, row_sum[:, None], 1.0)
        outs.append(jnp.where(row_valid & has_key, o, 0.0).astype(o_ref.dtype))
    if fold_heads:
        store_mask = None if q_mask is None else q_mask[:, :, None]
        plgpu.store(o_ref, outs[0].reshape(tile_q, group, head_dim), mask=store_mask)
    else:
        for h, o in enumerate(outs):
            plgpu.store(o_ref.at[:, jnp.int32(h), :], o, mask=q_mask)


def _tile_ranges(block_indices, block_counts, lengths, *, tile_q: int, tiles_per_block: int,
                 block_k: int, q_len: int, q_offset: int | jax.Array,
                 window: int | None = None):
    """Per program tile, the unmasked and the live prefix of its (ascending) list.

    Returns [B, K, num_tiles, 2] int32: n_full = entries whose every key is causal for every
    row of the tile; n_live = entries holding at least one causal key for some valid row.
    With a window: [B, K, num_tiles, WINDOW_RANGE_SLOTS] = (n_full, n_live, n_head, n_live),
    n_head <= n_full = leading entries whose first key is older than the window of the tile's
    last valid row, so [n_head, n_full) is both causal and inside every row's window.
    """
    num_tiles = block_indices.shape[2] * tiles_per_block
    ids = jnp.repeat(block_indices, tiles_per_block, axis=2)  # [B, K, tiles, max_sel]
    counts = jnp.repeat(block_counts, tiles_per_block, axis=2)[..., None]
    listed = jnp.arange(ids.shape[-1]) < counts
    p_first = q_offset + tile_q * jnp.arange(num_tiles)  # [tiles]
    p_last = jnp.minimum(p_first + tile_q, q_offset + q_len)[None, :] - 1
    p_last = jnp.minimum(p_last, lengths[:, None] - 1)  # [B, tiles]: last valid row
    live = listed & (ids <= (p_last // block_k)[:, None, :, None])
    n_live = jnp.where((p_last >= p_first)[:, None, :], jnp.sum(live, axis=-1), 0)
    full = listed & (ids < ((p_first + 1) // block_k)[:, None])
    n_full = jnp.minimum(jnp.sum(full, axis=-1), n_live)
    if window is None:
        return jnp.stack([n_full, n_live], axis=-1).astype(jnp.int32)
    # Sink blocks count as old here: at most ceil(sink_tokens / block_k) of them run masked.
    old = listed & (ids * block_k <= (p_last - window)[:, None, :, None])
    n_head = jnp.minimum(jnp.sum(old, axis=-1), n_full)
    slots = [n_full, n_live, n_head]
    slots += [n_live] * (WINDOW_RANGE_SLOTS - len(slots))
    return jnp.stack(slots, axis=-1).astype(jnp.int32)


def default_tile_q(block_q: int, group: int) -> int:
    """Query tokens per program: about TARGET_TILE_ROWS score rows (tokens x heads)."""
    return min(block_q, max(TARGET_TILE_ROWS // pl.next_power_of_2(group), MIN_DOT_DIM))


def default_prefill_params(tile_rows: int) -> tuple[int, int]:
    """(num_warps, num_stages) for a score tile of tile_rows rows (tokens x heads).

    Measured on an H100 (head_dim 128, block_k 64, see benchmarks/NOTES.md): a 128-row tile
    runs fastest with 4 warps and 2 stages (8 warps or 3 stages: 6-50% slower); a 256-row tile
    needs 8 warps (3x slower with 4).
    """
    return (4 if tile_rows <= TARGET_TILE_ROWS else 8), 2


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_q", "block_k", "sm_scale", "interpret", "num_warps", "num_stages",
        "tile_q", "fold_heads", "window", "sink_tokens",
    ),
)
def sparse_attention(
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
    """Block-sparse flash attention (Pallas, Triton lowering); same contract as the reference.

    Args:
      q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim].
      block_indices: [batch, num_kv_heads, num_q_blocks, max_sel] int32, ascending.
      block_counts: [batch, num_kv_heads, num_q_blocks] int32.
      block_q, block_k: selection granularity (powers of 2, >= 16).
      lengths: [batch] int32, valid keys per row (<= kv_len); defaults to kv_len.
      q_offset: absolute position of query 0: an int or a traced int32 scalar (not static, so
        the chunks of a chunked prefill share one compiled kernel).
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).
      interpret: run the kernel in Pallas interpret mode (CPU tests).
      num_warps, num_stages: Triton launch parameters; defaults from the tile size.
      tile_q: query tokens per program, a power of 2 dividing block_q (programs of one query
        block share its list); defaults to default_tile_q(block_q, G).
      fold_heads: stack the G heads into one [tile_q * G, D] tile (one dot per block) instead of
        G separate dots; defaults to True when G is a power of 2 (Triton tiles must be).
      window, sink_tokens: static local mask as in the reference (None: no window).

    Returns:
      [batch, q_len, num_heads, head_dim] in q's dtype.
    """
    group, num_q_blocks = _check_shapes(q, k, v, block_indices, block_counts, block_q)
    batch, q_len, num_heads, head_dim = q.shape
    _, kv_len, num_kv_heads, _ = k.shape
    max_sel = block_indices.shape[-1]
    if fold_heads is None:
        fold_heads = _is_power_of_2(group)
    if tile_q is None:
        tile_q = default_tile_q(block_q, group)
    for name, size in (("block_q", block_q), ("block_k", block_k), ("tile_q", tile_q)):
        if not _is_power_of_2(size) or size < MIN_DOT_DIM:
            raise ValueError(f"{name}={size} must be a power of 2 >= {MIN_DOT_DIM}")
    if block_q % tile_q:
        raise ValueError(f"tile_q={tile_q} must divide block_q={block_q}")
    if fold_heads and not _is_power_of_2(group):
        raise ValueError(f"fold_heads needs a power-of-2 group size, got G={group}")
    validate_window(window, sink_tokens)
    if lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    if max_sel == 0:
        return jnp.zeros_like(q)

    tile_rows = tile_q * group if fold_heads else tile_q
    default_warps, default_stages = default_prefill_params(tile_rows)
    num_warps = default_warps if num_warps is None else num_warps
    num_stages = default_stages if num_stages is None else num_stages
    tiles_per_block = block_q // tile_q
    num_tiles = num_q_blocks * tiles_per_block
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT

    kernel = functools.partial(
        _prefill_kernel, num_tiles=num_tiles, tile_q=tile_q, block_k=block_k, group=group,
        q_len=q_len, max_sel=max_sel,
        qk_scale=_default_sm_scale(head_dim, sm_scale) * LOG2_E, fold_heads=fold_heads,
        precision=precision, window=window, sink_tokens=sink_tokens,
    )
    block_indices = block_indices.astype(jnp.int32)
    lengths = lengths.astype(jnp.int32)
    # Per row, like the lengths, so that it travels through the same scalar BlockSpec.
    offsets = jnp.full((batch,), q_offset, jnp.int32)
    ranges = _tile_ranges(
        block_indices, block_counts.astype(jnp.int32), lengths, tile_q=tile_q,
        tiles_per_block=tiles_per_block, block_k=block_k, q_len=q_len, q_offset=q_offset,
        window=window,
    )

    # Grid (tile, KV head, batch): consecutive programs are neighbouring query tiles of one KV
    # head, which share most listed K/V blocks, so those reads mostly hit L2.
    def q_map(t, g, b):
        return b, num_tiles - 1 - t, g, 0

    def kv_map(t, g, b):
        return b, 0, g, 0

    def list_map(t, g, b):
        return b, g, lax.div(num_tiles - 1 - t, tiles_per_block), 0

    def range_map(t, g, b):
        return b, g, num_tiles - 1 - t, 0

    def len_map(t, g, b):
        return (b,)

    q_spec = pl.BlockSpec((None, tile_q, group, head_dim), q_map)
    kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), kv_map)
    return pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads, batch),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, None, max_sel), list_map),
            pl.BlockSpec((None, None, None, ranges.shape[-1]), range_map),
            pl.BlockSpec((None,), len_map),
            pl.BlockSpec((None,), len_map),
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_attention_prefill",
    )(q, k, v, block_indices, ranges, lengths, offsets)

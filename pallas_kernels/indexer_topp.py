"""Indexer scoring and block selection: r-dim indexer queries/keys -> per query block key-block
lists, by dynamic top-p (or top-k) with forced sink and local blocks.

The reference here is the definition of the selection every kernel and the model use.

Semantics, per (row b, KV group g, query block i):
  * Query rows t of the block are valid when q_start[b] + t < lengths[b]; the block's pooled
    indexer query is the mean of its valid rows' qi (a block with no valid row selects nothing).
  * Keys s are candidates when s < lengths[b] and s <= the block's last valid query position; the
    candidate key blocks are j = 0 .. last_block.
  * Block logit L_j = logsumexp over candidate keys s in block j of scale * <pooled qi, ki_s>, so
    softmax_j(L) is the pooled query's token softmax summed per block.
  * Forced blocks: the first `sink_blocks` and the last `local_blocks` candidate blocks.
  * top-p: forced blocks, then the other candidates by descending probability while the mass
    kept so far is below top_p (so the kept mass reaches top_p); top_p >= 1 keeps every
    candidate. top-k: forced blocks, then the best others up to `top_k` blocks in all.
  * Clamp the count to [min_blocks, max_blocks] (forced blocks always stay).
  * Output: indices [..., max_sel] ascending, entries past the count repeat the last selected
    index (0 when none), and counts.

Kernels (Pallas, Triton lowering; interpreted on CPU), beside the reference:
  * `block_logits`: the block logits without materialising per-token scores: a program scores a
    tile of pooled queries against a chunk of key blocks, one block at a time, and writes only
    the [nq, nk] float32 logits.
  * `select_blocks`: the selection rule, one tile of rows per program. Instead of a sort it
    finds, by bisection over the bit patterns of the (non-negative float32) probabilities, the
    largest probability tau whose free candidates P >= tau bring the kept mass to top_p
    (top-p), or the k-th largest probability (top-k and clamps); blocks strictly above tau are
    kept, and ties at tau are taken in block order, which is exactly the reference's stable
    descending order. Kept blocks are compacted in ascending order by a prefix sum.
  * `select_blocks_bisect`: the same rule as plain vectorised jnp (XLA), for comparison.
  * `indexer_topp`: pooling (jnp), `block_logits`, then `select_blocks`.
Kernel and reference agree exactly except where a cumulative mass lies within float32 rounding
of top_p (or two probabilities differ only by rounding at the threshold): there the answer
depends on the summation order, which differs between any two implementations (XLA on CPU and
on GPU included).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG_INF = float("-inf")


def max_selected(num_k_blocks: int, max_blocks: int | None, top_k: int | None,
                 forced: int, min_blocks: int) -> int:
    """Static length of the block lists: enough for any selection under the given caps."""
    cap = num_k_blocks if max_blocks is None else max_blocks
    if top_k is not None:
        cap = min(cap, max(top_k, forced, min_blocks))
    return max(1, min(num_k_blocks, cap))


def query_block_extent(
    q_start: jax.Array, lengths: jax.Array, q_len: int, block_q: int
) -> tuple[jax.Array, jax.Array]:
    """(valid rows [batch, num_q_blocks, block_q] bool, last valid position [batch, num_q_blocks]).

    The last position is -1 for a block with no valid row.
    """
    num_q_blocks = -(-q_len // block_q)
    rows = jnp.arange(num_q_blocks * block_q).reshape(num_q_blocks, block_q)
    pos = q_start[:, None, None] + rows[None]
    valid = (rows[None] < q_len) & (pos < lengths[:, None, None])
    if q_len == 1:
        # One query row (decode): it is the block's only possible valid row, and an
        # elementwise select replaces the reduction (a launch of its own on a GPU).
        return valid, jnp.where(valid[:, :, 0], pos[:, :, 0], -1)
    last = jnp.max(jnp.where(valid, pos, -1), axis=-1)
    return valid, last


def pool_queries(qi: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of each query block's valid rows.

    qi: [batch, q_len, groups, r]; valid: [batch, nq, block_q] -> [batch, nq, groups, r].
    """
    b, t, g, r = qi.shape
    if t == 1:
        # One query row (decode): the mean of one valid row is that row (exactly), of none 0;
        # no padding to block_q rows and no reduction.
        return jnp.where(valid[:, :, :1, None], qi.astype(jnp.float32), 0.0)
    nq, bq = valid.shape[1:]
    padded = jnp.pad(qi.astype(jnp.float32), ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
    blocks = padded.reshape(b, nq, bq, g, r) * valid[..., None, None]
    count = jnp.maximum(jnp.sum(valid, axis=-1), 1)[:, :, None, None]
    return jnp.sum(blocks, axis=2) / count


def block_logits_reference(
    pooled: jax.Array, ki: jax.Array, lengths: jax.Array, last: jax.Array, *, block_k: int,
    scale: float
) -> jax.Array:
    """Block logits [batch, groups, nq, nk] float32 (-inf for blocks with no candidate key).

    pooled: [batch, nq, groups, r]; ki: [batch, kv_len, groups, r]; last: [batch, nq].
    """
    b, s, g, r = ki.shape
    nk = -(-s // block_k)
    keys = jnp.pad(ki.astype(jnp.float32), ((0, 0), (0, nk * block_k - s), (0, 0), (0, 0)))
    scores = jnp.einsum("bqgr,bsgr->bgqs", pooled, keys) * scale
    kpos = jnp.arange(nk * block_k)
    ok = (kpos[None, None, :] < lengths[:, None, None]) & (kpos[None, None, :] <= last[:, :, None])
    scores = jnp.where(ok[:, None], scores, NEG_INF)
    return jax.nn.logsumexp(scores.reshape(b, g, -1, nk, block_k), axis=-1)


def select_blocks_reference(
    logits: jax.Array,
    last_block: jax.Array,
    *,
    top_p: float,
    sink_blocks: int,
    local_blocks: int,
    min_blocks: int = 0,
    max_blocks: int | None = None,
    top_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block lists from block logits.

    logits: [batch, groups, nq, nk] (softmax over the last axis is the block distribution; -inf
    marks non-candidates); last_block: [batch, nq] int32, the last candidate block (-1: none).
    Returns (indices [batch, groups, nq, max_sel] int32, counts [batch, groups, nq] int32).
    """
    nk = logits.shape[-1]
    j = jnp.arange(nk)
    last = last_block[:, None, :, None]
    candidate = j <= last
    forced = candidate & ((j < sink_blocks) | (j > last - local_blocks))
    probs = jnp.where(candidate, jax.nn.softmax(jnp.where(candidate, logits, NEG_INF), axis=-1),
                      0.0)
    probs = jnp.where(jnp.isnan(probs), 0.0, probs)  # rows with no candidate at all
    forced_mass = jnp.sum(jnp.where(forced, probs, 0.0), axis=-1, keepdims=True)
    free = candidate & ~forced
    # Rank the free candidates by probability (ties by block index, for determinism).
    order = jnp.argsort(jnp.where(free, -probs, jnp.inf), axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(jnp.where(free, probs, 0.0), order, axis=-1)
    num_free = jnp.sum(free, axis=-1, keepdims=True)
    num_forced = jnp.sum(forced, axis=-1, keepdims=True)
    if top_k is not None:
        keep = jnp.full_like(num_free, top_k) - num_forced
    elif top_p >= 1.0:
        keep = num_free
    else:
        mass_before = forced_mass + jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = jnp.sum((mass_before < top_p) & (j < num_free), axis=-1, keepdims=True)
    keep = jnp.maximum(keep, min_blocks - num_forced)
    if max_blocks is not None:
        keep = jnp.minimum(keep, max_blocks - num_forced)
    keep = jnp.clip(keep, 0, num_free)
    rank = jnp.argsort(order, axis=-1)  # each block's place in the ranking
    selected = forced | (free & (rank < keep))
    counts = jnp.sum(selected, axis=-1).astype(jnp.int32)
    max_sel = max_selected(nk, max_blocks, top_k, sink_blocks + local_blocks, min_blocks)
    ascending = jnp.sort(jnp.where(selected, j, nk), axis=-1)[..., :max_sel]
    last_index = jnp.take_along_axis(ascending, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    fill = jnp.where(counts[..., None] > 0, last_index, 0)
    indices = jnp.where(jnp.arange(max_sel) < counts[..., None], ascending, fill)
    return indices.astype(jnp.int32), counts


def indexer_topp_reference(
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
) -> tuple[jax.Array, jax.Array]:
    """Indexer queries and keys -> block lists (see the module docstring).

    qi: [batch, q_len, groups, r], rows at positions q_start[b] + t; ki: [batch, kv_len, groups, r];
    q_start, lengths: [batch] int32. Returns (indices [batch, groups, nq, max_sel], counts
    [batch, groups, nq]).
    """
    valid, last = query_block_extent(q_start, lengths, qi.shape[1], block_q)
    logits = block_logits_reference(pool_queries(qi, valid), ki, lengths, last, block_k=block_k,
                                    scale=scale)
    last_block = jnp.where(last >= 0, last // block_k, -1)
    return select_blocks_reference(logits, last_block, top_p=top_p, sink_blocks=sink_blocks,
                                   local_blocks=local_blocks, min_blocks=min_blocks,
                                   max_blocks=max_blocks, top_k=top_k)


# ----------------------------------------------------------------------------------------------
# Pallas kernels
# ----------------------------------------------------------------------------------------------

# Finite stand-in for -inf inside a block's logsumexp: exp2(MASK_VALUE - m) is exactly 0 for any
# real score m, and MASK_VALUE - MASK_VALUE stays finite (no NaN from inf - inf).
MASK_VALUE = -1e30
# Triton's matrix instructions need every dot dimension to be a power of 2 of at least this; a
# smaller indexer rank is zero-padded up to it (exact: the padding adds 0 to every score).
MIN_DOT_DIM = 16
LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
# Non-negative float32 values are ordered like their bit patterns read as int32, so an exact
# order statistic of probabilities (all in [0, 1]) is a bisection over integers. It runs over
# (-1, PROB_BITS_END): -1 stands for "every probability", PROB_BITS_END (just above the pattern
# of 1.0) for "none", and BISECT_STEPS halvings shrink that range to one pattern.
PROB_BITS_END = 0x3F800001
BISECT_STEPS = math.ceil(math.log2(PROB_BITS_END + 1))
# Block logits: pooled queries (rows of the score tile) per program, and at most
# MAX_CHUNK_BLOCKS key blocks per program (H100, 128K prefill: 0.88 ms with 64 x 32 and 4
# warps; 32 or 128 rows, 64 blocks or 8 warps 17-100% slower; 1 or 2 stages alike). Smaller
# problems (decode: one query block) get smaller chunks, down to MIN_CHUNK_BLOCKS, until the
# grid has LOGITS_PROGRAMS programs: a program walks its chunk serially, so a long chunk is
# latency the GPU cannot hide.
DEFAULT_TILE_Q = 64
MAX_CHUNK_BLOCKS = 32
MIN_CHUNK_BLOCKS = 4
LOGITS_PROGRAMS = 1024
DEFAULT_LOGITS_WARPS = 4
DEFAULT_LOGITS_STAGES = 2
# Selection: rows per program and warps. Measured on an H100: 2048 logits per program at 16 per
# thread (128K prefill, nk = 2048: one row, 4 warps, 0.55 ms; two rows, 8 warps 18% slower;
# eight rows, 16 warps 2.2x slower); at nk = 8192, 32 per thread (8 warps) beat 16 by 9%. With
# fewer than SELECT_LATENCY_ROWS rows (decode) every row gets its own program, so the rows'
# bisections run side by side rather than in one program's sequence of block-wide reductions.
SELECT_TILE_ELEMS = 2048
SELECT_ELEMS_PER_THREAD = 16
LONG_ROW_ELEMS_PER_THREAD = 32
SELECT_LATENCY_ROWS = 512
MAX_SELECT_WARPS = 16
# Implementations of the selection stage `indexer_topp` can use: the Pallas kernel, the same
# bisection rule as vectorised XLA, or the reference (a sort per row).
SELECTIONS = ("pallas", "bisect", "sort")


def _load(ref, mask, other):
    """Loads ref, with `other` where mask is False (mask None: the whole ref, unmasked)."""
    if mask is None:
        return ref[...]
    return plgpu.load(ref, mask=mask, other=other)


def _split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 x as hi + mid + lo, three bfloat16 terms (24 mantissa bits in all).

    Products of the terms with a bfloat16 operand are exact, so three bfloat16 dots with float32
    accumulation give a float32-accurate score on the matrix units.
    """
    hi = x.astype(jnp.bfloat16)
    rest = x - hi.astype(jnp.float32)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    return hi, mid, lo


def _scores(q_parts, k, precision) -> jax.Array:
    """sum over parts of part @ k.T: q_parts [M, r] each, k [N, r] -> [M, N] float32."""
    total = None
    for part in q_parts:
        s = lax.dot_general(part, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
        total = s if total is None else total + s
    return total


def _logits_kernel(q_ref, k_ref, last_ref, len_ref, o_ref, *, tile_q: int, chunk_blocks: int,
                   block_k: int, nq: int, nk: int, kv_len: int, q_scale: float, split_q: bool,
                   precision):
    """One program: tile_q pooled queries against one chunk of chunk_blocks key blocks.

    q_ref: [tile_q, r] pooled queries (scaled by q_scale here); k_ref: [kv_len, r];
    last_ref: [tile_q] int32, each query block's last valid query position (-1: none);
    len_ref: the row's length (scalar); o_ref: [tile_q, chunk_blocks] float32 block logits
    (natural log).
    """
    rows = pl.program_id(0) * tile_q + lax.iota(jnp.int32, tile_q)
    j0 = pl.program_id(1) * chunk_blocks
    row_ok = None if nq % tile_q == 0 else rows < nq
    # Scaling and the clamp to the length happen here rather than as XLA ops before the
    # launch: at decode each would be a launch of its own, for a handful of numbers.
    q = _load(q_ref, None if row_ok is None else row_ok[:, None], 0.0).astype(jnp.float32)
    q = q * q_scale
    # The last candidate key: keys past the length are never candidates.
    last = jnp.minimum(_load(last_ref, row_ok, -1), len_ref[()] - 1)
    q_parts = _split_bf16(q) if split_q else (q,)
    # Blocks [j0, full_end) hold only candidate keys of every row (no mask); blocks
    # [full_end, live_end) hold a candidate of some row; the rest of the chunk holds none.
    # last >= -1, so both numerators are >= 0 and lax.div rounds down.
    j1 = jnp.minimum(j0 + chunk_blocks, nk)
    live_end = jnp.clip(lax.div(jnp.max(last) + block_k, block_k), j0, j1)
    full_end = jnp.clip(lax.div(jnp.min(last) + 1, block_k), j0, live_end)

    def store_column(j, logit):
        if row_ok is None:
            o_ref[:, j - j0] = logit
        else:
            plgpu.store(o_ref.at[:, j - j0], logit, mask=row_ok)

    def full_block(j, carry):
        k = k_ref[pl.ds(j * block_k, block_k), :]
        s = _scores(q_parts, k, precision)
        m = jnp.max(s, axis=1)
        store_column(j, (m + jnp.log2(jnp.sum(jnp.exp2(s - m[:, None]), axis=1))) * LN_2)
        return carry

    def masked_block(j, carry):
        k_pos = j * block_k + lax.iota(jnp.int32, block_k)
        if kv_len % block_k:
            k = plgpu.load(k_ref.at[pl.ds(j * block_k, block_k), :],
                           mask=(k_pos < kv_len)[:, None], other=0)
        else:
            k = k_ref[pl.ds(j * block_k, block_k), :]
        # A select, not arithmetic: keys past the length may hold garbage, even NaN.
        visible = k_pos[None, :] <= last[:, None]
        s = jnp.where(visible, _scores(q_parts, k, precision), MASK_VALUE)
        m = jnp.max(s, axis=1)
        total = jnp.sum(jnp.where(visible, jnp.exp2(s - m[:, None]), 0.0), axis=1)
        store_column(j, jnp.where(total > 0, (m + jnp.log2(total)) * LN_2, NEG_INF))
        return carry

    lax.fori_loop(j0, full_end, full_block, 0)
    lax.fori_loop(full_end, live_end, masked_block, 0)
    # Columns past every row's last candidate block: one tile store, disjoint from the above.
    cols = j0 + lax.iota(jnp.int32, chunk_blocks)
    dead = jnp.broadcast_to(((cols >= live_end) & (cols < nk))[None, :], (tile_q, chunk_blocks))
    if row_ok is not None:
        dead = dead & row_ok[:, None]
    plgpu.store(o_ref, jnp.full((tile_q, chunk_blocks), NEG_INF, jnp.float32), mask=dead)


@functools.partial(
    jax.jit,
    static_argnames=("block_k", "scale", "interpret", "tile_q", "chunk_blocks", "num_warps",
                     "num_stages"),
)
def block_logits(
    pooled: jax.Array,
    ki: jax.Array,
    lengths: jax.Array,
    last: jax.Array,
    *,
    block_k: int,
    scale: float,
    interpret: bool = False,
    tile_q: int | None = None,
    chunk_blocks: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Block logits (Pallas, Triton lowering); same contract as `block_logits_reference`.

    Args:
      pooled: [batch, nq, groups, r] pooled indexer queries.
      ki: [batch, kv_len, groups, r] indexer keys (bfloat16 or float32; scores are float32).
      lengths: [batch] int32; last: [batch, nq] int32 last valid query position (-1: none).
      block_k: keys per block; scale: score scale.
      interpret: run in Pallas interpret mode (CPU tests).
      tile_q, chunk_blocks: pooled queries and key blocks per program (powers of 2);
        num_warps, num_stages: Triton launch parameters.

    Returns:
      [batch, groups, nq, nk] float32, -inf for blocks with no candidate key.
    """
    batch, kv_len, groups, rank = ki.shape
    nq = pooled.shape[1]
    nk = pl.cdiv(kv_len, block_k)
    if tile_q is None:
        tile_q = min(DEFAULT_TILE_Q, max(MIN_DOT_DIM, pl.next_power_of_2(nq)))
    if chunk_blocks is None:
        chunk_blocks = default_chunk_blocks(pl.cdiv(nq, tile_q) * batch * groups, nk)
    for name, size, least in (("block_k", block_k, MIN_DOT_DIM), ("tile_q", tile_q, MIN_DOT_DIM),
                              ("chunk_blocks", chunk_blocks, 1)):
        if size < least or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of 2 >= {least}")
    split_q = ki.dtype == jnp.bfloat16
    if not split_q:
        ki = ki.astype(jnp.float32)
    q = pooled
    rank_pad = max(MIN_DOT_DIM, pl.next_power_of_2(rank))
    if rank_pad != rank:
        pad = ((0, 0), (0, 0), (0, 0), (0, rank_pad - rank))
        q, ki = jnp.pad(q, pad), jnp.pad(ki, pad)

    kernel = functools.partial(
        _logits_kernel, tile_q=tile_q, chunk_blocks=chunk_blocks, block_k=block_k, nq=nq, nk=nk,
        kv_len=kv_len, q_scale=scale * LOG2_E, split_q=split_q,
        precision=lax.Precision.DEFAULT if split_q else lax.Precision.HIGHEST,
    )

    # Grid (query tile, key chunk, row x group): consecutive programs read the same key chunk.
    def q_map(t, c, bg):
        return lax.div(bg, groups), t, lax.rem(bg, groups), 0

    def k_map(t, c, bg):
        return lax.div(bg, groups), 0, lax.rem(bg, groups), 0

    def last_map(t, c, bg):
        return lax.div(bg, groups), t

    def len_map(t, c, bg):
        return (lax.div(bg, groups),)

    def out_map(t, c, bg):
        return lax.div(bg, groups), lax.rem(bg, groups), t, c

    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(nq, tile_q), pl.cdiv(nk, chunk_blocks), batch * groups),
        in_specs=[
            pl.BlockSpec((None, tile_q, None, rank_pad), q_map),
            pl.BlockSpec((None, kv_len, None, rank_pad), k_map),
            pl.BlockSpec((None, tile_q), last_map),
            pl.BlockSpec((None,), len_map),
        ],
        out_specs=pl.BlockSpec((None, None, tile_q, chunk_blocks), out_map),
        out_shape=jax.ShapeDtypeStruct((batch, groups, nq, nk), jnp.float32),
        compiler_params=plgpu.CompilerParams(
            num_warps=DEFAULT_LOGITS_WARPS if num_warps is None else num_warps,
            num_stages=DEFAULT_LOGITS_STAGES if num_stages is None else num_stages,
        ),
        interpret=interpret,
        name="indexer_block_logits",
    )(q, ki, last.astype(jnp.int32), lengths.astype(jnp.int32))


def default_chunk_blocks(tiles: int, nk: int) -> int:
    """Key blocks per block-logits program: MAX_CHUNK_BLOCKS, or fewer (a power of 2, at least
    MIN_CHUNK_BLOCKS) when `tiles` query tiles x the chunks would give < LOGITS_PROGRAMS."""
    chunk = MAX_CHUNK_BLOCKS
    while chunk > MIN_CHUNK_BLOCKS and tiles * pl.cdiv(nk, chunk) < LOGITS_PROGRAMS:
        chunk //= 2
    return min(chunk, pl.next_power_of_2(nk))


def _bisect(pred, num_rows: int) -> jax.Array:
    """Per row, the largest b in [-1, PROB_BITS_END) with pred(b) true -> [num_rows] int32.

    pred maps [num_rows] int32 thresholds to [num_rows] bool and must be non-increasing in b;
    a row whose pred(-1) is false keeps -1.
    """
    def step(_, carry):
        lo, hi = carry
        # hi - lo >= 0, so a shift halves it exactly (TPUs have no vector integer division).
        mid = lo + lax.shift_right_arithmetic(hi - lo, 1)
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    init = (jnp.full((num_rows,), -1, jnp.int32), jnp.full((num_rows,), PROB_BITS_END, jnp.int32))
    return lax.fori_loop(0, BISECT_STEPS, step, init)[0]


def _exclusive_rank(mask: jax.Array) -> jax.Array:
    """[R, N] bool -> [R, N] int32: how many True entries precede each entry in its row."""
    ones = mask.astype(jnp.int32)
    return jnp.cumsum(ones, axis=1) - ones


def _selection_mask(
    logits: jax.Array, last_block: jax.Array, *, top_p: float, sink_blocks: int,
    local_blocks: int, min_blocks: int, max_blocks: int | None, top_k: int | None,
    exclusive_rank: Callable[[jax.Array], jax.Array] = _exclusive_rank,
) -> tuple[jax.Array, jax.Array]:
    """The selection rule on rows of block logits, without a sort.

    Only elementwise ops, row reductions, a row prefix count and fixed-length loops, so the
    same code runs as XLA and inside a Triton or Mosaic kernel. logits: [R, N] float32 (entries
    past a row's last candidate are ignored); last_block: [R] int32; exclusive_rank: the
    prefix count, [R, N] bool -> [R, N] int32 (Mosaic has no cumulative sum: the TPU kernel
    passes matmuls). Returns (selected [R, N] bool, counts [R] int32).
    """
    num_rows, n = logits.shape
    j = lax.iota(jnp.int32, n)[None, :]
    last = last_block[:, None]
    candidate = j <= last
    forced = candidate & ((j < sink_blocks) | (j > last - local_blocks))
    free = candidate & ~forced
    # The reference's softmax over candidates; a row with no finite candidate gets all zeros.
    x = jnp.where(candidate, logits, NEG_INF)
    m = jnp.max(x, axis=1, keepdims=True)
    e = jnp.exp(x - jnp.where(m > NEG_INF, m, 0.0))
    total = jnp.sum(e, axis=1, keepdims=True)
    probs = jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0), 0.0)
    bits = lax.bitcast_convert_type(probs, jnp.int32)
    forced_mass = jnp.sum(jnp.where(forced, probs, 0.0), axis=1)
    num_forced = jnp.sum(forced.astype(jnp.int32), axis=1)
    num_free = jnp.sum(free.astype(jnp.int32), axis=1)
    clamped = min_blocks > 0 or max_blocks is not None

    def split_at(tau):  # free candidates strictly above / exactly at the threshold pattern
        return free & (bits > tau[:, None]), free & (bits == tau[:, None])

    if top_k is None and top_p < 1.0:
        def reaches_p(tau):
            kept = jnp.where(free & (bits >= tau[:, None]), probs, 0.0)
            return forced_mass + jnp.sum(kept, axis=1) >= top_p

        # tau: the smallest probability the reference's descending walk reaches. Everything
        # above it is kept; ties at tau are taken in block order while the mass before each is
        # still below top_p, as the reference's stable order does.
        tau = _bisect(reaches_p, num_rows)
        above, tie = split_at(tau)
        base = forced_mass + jnp.sum(jnp.where(above, probs, 0.0), axis=1)
        tau_prob = lax.bitcast_convert_type(jnp.maximum(tau, 0), jnp.float32)
        mass_before = base[:, None] + exclusive_rank(tie).astype(jnp.float32) * tau_prob[:, None]
        kept = above | (tie & (mass_before < top_p))
        if not clamped:
            selected = forced | kept
            return selected, jnp.sum(selected.astype(jnp.int32), axis=1)
        keep = jnp.sum(kept.astype(jnp.int32), axis=1)
    elif top_k is not None:
        keep = top_k - num_forced
    else:
        if not clamped:
            return candidate, jnp.sum(candidate.astype(jnp.int32), axis=1)
        keep = num_free
    keep = jnp.maximum(keep, min_blocks - num_forced)
    if max_blocks is not None:
        keep = jnp.minimum(keep, max_blocks - num_forced)
    keep = jnp.clip(keep, 0, num_free)

    # The keep largest free probabilities, ties in block order: tau is the keep-th largest.
    def has_keep(tau):
        return jnp.sum((free & (bits >= tau[:, None])).astype(jnp.int32), axis=1) >= keep

    above, tie = split_at(_bisect(has_keep, num_rows))
    short = keep - jnp.sum(above.astype(jnp.int32), axis=1)
    selected = forced | above | (tie & (exclusive_rank(tie) < short[:, None]))
    return selected, jnp.sum(selected.astype(jnp.int32), axis=1)


def _compaction(selected: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Where each block goes in its row's ascending list, and what it writes there.

    selected: [R, N] bool; counts: [R]. A selected block goes to its rank among the selected;
    the others, in order, go to the slots after the count and write the last selected index
    (0 when none). Every slot < N is written exactly once, so nothing needs initialising and no
    two writes collide. Returns (slots, values), both [R, N] int32.
    """
    j = lax.iota(jnp.int32, selected.shape[1])[None, :]
    inclusive = jnp.cumsum(selected.astype(jnp.int32), axis=1)
    last_index = jnp.max(jnp.where(selected, j, 0), axis=1)
    slots = jnp.where(selected, inclusive - 1, counts[:, None] + j - inclusive)
    return slots, jnp.where(selected, j, last_index[:, None])


def compact_lists(selected: jax.Array, counts: jax.Array, width: int) -> jax.Array:
    """Masks [R, N] bool with counts [R] -> ascending block lists [R, width] int32 (XLA), in
    the selection's output form: entries past a count repeat the last selected index (0 when
    none). A prefix sum and one scatter: no sort."""
    slots, values = _compaction(selected, counts)
    rows = jnp.arange(selected.shape[0])[:, None]
    return jnp.zeros((selected.shape[0], width), jnp.int32).at[rows, slots].set(
        values, mode="drop")


def _select_kernel(l_ref, last_ref, idx_ref, cnt_ref, *, tile_rows: int, num_rows: int,
                   rows_per_batch: int, nq: int, nk: int, nk_pad: int, max_sel: int, rule: dict):
    """One program: the selection of tile_rows rows.

    l_ref: [tile_rows, nk] float32 logits; last_ref: [batch * nq] int32 last candidate block of
    every (batch row, query block), which its groups share; idx_ref: [tile_rows, max_sel]
    int32; cnt_ref: [tile_rows] int32.
    """
    rows = pl.program_id(0) * tile_rows + lax.iota(jnp.int32, tile_rows)
    row_ok = rows < num_rows
    cols = lax.iota(jnp.int32, nk_pad)
    logits = plgpu.load(l_ref.at[:, pl.ds(0, nk_pad)],
                        mask=row_ok[:, None] & (cols < nk)[None, :], other=NEG_INF)
    # Flat row (b * groups + g) * nq + t reads entry b * nq + t: a gather here instead of
    # broadcasting last_block over the groups in XLA first (one launch fewer).
    batch_row = lax.div(rows, rows_per_batch)
    last = plgpu.load(last_ref.at[batch_row * nq + lax.rem(rows, nq)], mask=row_ok, other=-1)
    selected, counts = _selection_mask(logits, last, **rule)
    slots, values = _compaction(selected, counts)
    local = jnp.broadcast_to(lax.iota(jnp.int32, tile_rows)[:, None], slots.shape)
    plgpu.store(idx_ref.at[local, slots], values, mask=row_ok[:, None] & (slots < max_sel))
    plgpu.store(cnt_ref, counts, mask=row_ok)


def _flat_rows(logits: jax.Array, last_block: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[b, g, nq, nk] logits and [b, nq] last blocks -> [rows, nk] float32 and [rows] int32."""
    b, g, nq, nk = logits.shape
    last = jnp.broadcast_to(last_block[:, None], (b, g, nq)).reshape(-1).astype(jnp.int32)
    return logits.reshape(-1, nk).astype(jnp.float32), last


def default_select_tile_rows(nk: int, num_rows: int) -> int:
    """Rows per selection program: about SELECT_TILE_ELEMS logits; one with few rows."""
    if num_rows < SELECT_LATENCY_ROWS:
        return 1
    return max(1, SELECT_TILE_ELEMS // pl.next_power_of_2(nk))


def default_select_warps(tile_elems: int) -> int:
    """Warps for a selection tile of tile_elems (padded) logits."""
    per_thread = SELECT_ELEMS_PER_THREAD if tile_elems <= SELECT_TILE_ELEMS \
        else LONG_ROW_ELEMS_PER_THREAD
    warps = pl.next_power_of_2(pl.cdiv(tile_elems, 32 * per_thread))
    return min(MAX_SELECT_WARPS, warps)


RULE_ARGS = ("top_p", "sink_blocks", "local_blocks", "min_blocks", "max_blocks", "top_k")


@functools.partial(jax.jit,
                   static_argnames=(*RULE_ARGS, "interpret", "tile_rows", "num_warps"))
def select_blocks(
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
    num_warps: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block lists from block logits (Pallas, Triton lowering); same contract as
    `select_blocks_reference`.

    logits: [batch, groups, nq, nk]; last_block: [batch, nq] int32. tile_rows: rows per program
    (power of 2); num_warps: Triton launch parameter. Returns (indices [batch, groups, nq,
    max_sel] int32, counts [batch, groups, nq] int32).
    """
    b, g, nq, nk = logits.shape
    max_sel = max_selected(nk, max_blocks, top_k, sink_blocks + local_blocks, min_blocks)
    flat = logits.reshape(-1, nk).astype(jnp.float32)
    num_rows = flat.shape[0]
    nk_pad = pl.next_power_of_2(nk)
    if tile_rows is None:
        tile_rows = default_select_tile_rows(nk, num_rows)
    if tile_rows < 1 or tile_rows & (tile_rows - 1):
        raise ValueError(f"tile_rows={tile_rows} must be a power of 2")
    num_warps = default_select_warps(tile_rows * nk_pad) if num_warps is None else num_warps
    rule = dict(top_p=top_p, sink_blocks=sink_blocks, local_blocks=local_blocks,
                min_blocks=min_blocks, max_blocks=max_blocks, top_k=top_k)
    kernel = functools.partial(_select_kernel, tile_rows=tile_rows, num_rows=num_rows,
                               rows_per_batch=g * nq, nq=nq, nk=nk, nk_pad=nk_pad,
                               max_sel=max_sel, rule=rule)
    indices, counts = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_rows, tile_rows),),
        in_specs=[pl.BlockSpec((tile_rows, nk), lambda i: (i, 0)),
                  pl.BlockSpec((b * nq,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((tile_rows, max_sel), lambda i: (i, 0)),
                   pl.BlockSpec((tile_rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((num_rows, max_sel), jnp.int32),
                   jax.ShapeDtypeStruct((num_rows,), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="indexer_select_blocks",
    )(flat, last_block.reshape(-1).astype(jnp.int32))
    return indices.reshape(b, g, nq, max_sel), counts.reshape(b, g, nq)


@functools.partial(jax.jit, static_argnames=RULE_ARGS)
def select_blocks_bisect(
    logits: jax.Array,
    last_block: jax.Array,
    *,
    top_p: float,
    sink_blocks: int,
    local_blocks: int,
    min_blocks: int = 0,
    max_blocks: int | None = None,
    top_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The selection kernel's bisection rule as vectorised jnp (XLA); same contract as
    `select_blocks_reference`."""
    b, g, nq, nk = logits.shape
    max_sel = max_selected(nk, max_blocks, top_k, sink_blocks + local_blocks, min_blocks)
    flat, last = _flat_rows(logits, last_block)
    selected, counts = _selection_mask(flat, last, top_p=top_p, sink_blocks=sink_blocks,
                                       local_blocks=local_blocks, min_blocks=min_blocks,
                                       max_blocks=max_blocks, top_k=top_k)
    indices = compact_lists(selected, counts, max_sel)
    return indices.reshape(b, g, nq, max_sel), counts.reshape(b, g, nq)


def pooled_block_logits(
    logits_fn: Any, qi: jax.Array, ki: jax.Array, q_start: jax.Array, lengths: jax.Array, *,
    block_q: int, block_k: int, scale: float, interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """The selection's input, scored by `logits_fn` (a block-logits kernel): (block logits
    [batch, groups, nq, nk], each query block's last valid key block [batch, nq], -1 if none).
    Shapes as `indexer_topp`."""
    valid, last = query_block_extent(q_start, lengths, qi.shape[1], block_q)
    logits = logits_fn(pool_queries(qi, valid), ki, lengths, last, block_k=block_k, scale=scale,
                       interpret=interpret)
    return logits, jnp.where(last >= 0, last // block_k, -1)


@functools.partial(
    jax.jit,
    static_argnames=("block_q", "block_k", "scale", *RULE_ARGS, "interpret", "selection"),
)
def indexer_topp(
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
    `block_logits` kernel, then the selection by `selection` (one of SELECTIONS: "pallas" the
    kernel, "bisect" the same rule in XLA, "sort" the reference). interpret: Pallas interpret
    mode (CPU). Returns (indices [batch, groups, nq, max_sel] int32, counts [batch, groups, nq]).
    """
    return scored_selection(block_logits, select_blocks, qi, ki, q_start, lengths,
                            block_q=block_q, block_k=block_k, scale=scale, interpret=interpret,
                            selection=selection, top_p=top_p, sink_blocks=sink_blocks,
                            local_blocks=local_blocks, min_blocks=min_blocks,
                            max_blocks=max_blocks, top_k=top_k)


def scored_selection(
    logits_kernel: Callable[..., jax.Array], select_kernel: Callable[..., Any], qi: jax.Array,
    ki: jax.Array, q_start: jax.Array, lengths: jax.Array, *, block_q: int, block_k: int,
    scale: float, interpret: bool, selection: str, **rule: Any,
) -> tuple[jax.Array, jax.Array]:
    """The body of a kernel family's indexer entry point (`indexer_topp`, and the TPU's
    `indexer_topp_tpu`): pooling, block logits by the family's `logits_kernel`, then the
    selection `selection` names: "pallas" the family's `select_kernel`, "bisect" the same rule
    in XLA, "sort" the reference. rule: RULE_ARGS."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    logits, last_block = pooled_block_logits(logits_kernel, qi, ki, q_start, lengths,
                                             block_q=block_q, block_k=block_k, scale=scale,
                                             interpret=interpret)
    if selection == "pallas":
        return select_kernel(logits, last_block, interpret=interpret, **rule)
    if selection == "bisect":
        return select_blocks_bisect(logits, last_block, **rule)
    return select_blocks_reference(logits, last_block, **rule)

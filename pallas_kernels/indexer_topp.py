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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
    last = jnp.max(jnp.where(valid, pos, -1), axis=-1)
    return valid, last


def pool_queries(qi: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of each query block's valid rows.

    qi: [batch, q_len, groups, r]; valid: [batch, nq, block_q] -> [batch, nq, groups, r].
    """
    b, t, g, r = qi.shape
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

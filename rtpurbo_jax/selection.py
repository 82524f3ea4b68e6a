"""Block selection for the sparse KV groups of a layer, in prefill and decode.

Where the block scores come from is the SparseConfig's `scorer`:
  "indexer": the trained low-rank indexer (RTPurbo);
  "oracle":  the frozen model's true attention mass per block (the ceiling for any indexer);
  "none":    no scores: only the forced sink and local blocks (a StreamingLLM/DuoAttention-style
             baseline).
The top-p / top-k rule itself is `pallas_kernels.indexer_topp` (reference and kernels); the
kernels run when `backend` asks for them (`kernels`: the GPU's or the TPU's, interpreted off
their platform).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.indexer_topp import (
    block_logits_reference,
    pool_queries,
    query_block_extent,
    select_blocks_reference,
)
from rtpurbo_jax.config import SparseConfig
from rtpurbo_jax.indexer import indexer_queries
from rtpurbo_jax.kernels import kernels, use_kernels
from rtpurbo_jax.teacher import attention_probs, block_attention_mass

Selection = tuple[jax.Array, jax.Array]  # (indices [b, g, nq, max_sel], counts [b, g, nq])


def rule_kwargs(sparse: SparseConfig) -> dict[str, Any]:
    """The selection rule's arguments for `select_blocks_reference` and the kernels."""
    forced = sparse.sink_blocks + sparse.local_blocks
    if sparse.scorer == "none":
        return dict(top_p=1.0, sink_blocks=sparse.sink_blocks, local_blocks=sparse.local_blocks,
                    min_blocks=0, max_blocks=forced, top_k=forced)
    return dict(top_p=sparse.top_p, sink_blocks=sparse.sink_blocks,
                local_blocks=sparse.local_blocks, min_blocks=sparse.min_blocks,
                max_blocks=sparse.max_blocks,
                top_k=sparse.top_k_blocks if sparse.selection == "top_k" else None)


def _select_from_logits(
    logits: jax.Array, last: jax.Array, sparse: SparseConfig, backend: str
) -> Selection:
    """The selection rule on block logits [b, g, nq, nk]; last: [b, nq] last valid positions."""
    last_block = jnp.where(last >= 0, last // sparse.block_k, -1)
    select = kernels(backend).select_blocks if use_kernels(backend) else select_blocks_reference
    return select(logits, last_block, **rule_kwargs(sparse))


def _indexer_logits(q: jax.Array, ki: jax.Array, q_start: jax.Array, lengths: jax.Array,
                    sparse: SparseConfig, layer_indexer: dict[str, jax.Array], backend: str
                    ) -> tuple[jax.Array, jax.Array]:
    """(block logits [b, g, nq, nk], last valid positions [b, nq]) from the indexer.

    The indexer query is linear in q, so pooling the query block's rows first and projecting
    the pooled [b, nq, heads, d] gives the pooled indexer query at block_q times fewer FLOPs.
    """
    valid, last = query_block_extent(q_start, lengths, q.shape[1], sparse.block_q)
    pooled = indexer_queries(pool_queries(q, valid), layer_indexer["wq"])
    logits_fn = kernels(backend).block_logits if use_kernels(backend) else block_logits_reference
    logits = logits_fn(pooled, ki, lengths, last, block_k=sparse.block_k,
                       scale=1.0 / sparse.temperature)
    return logits, last


def _oracle_logits_prefill(q: jax.Array, k: jax.Array, lengths: jax.Array,
                           sparse: SparseConfig, q_offset: int | jax.Array) -> jax.Array:
    mass = block_attention_mass(q, k, lengths, block_q=sparse.block_q, block_k=sparse.block_k,
                                q_offset=q_offset)
    return jnp.log(mass)


def _oracle_logits_decode(q: jax.Array, k_cache: jax.Array, lengths: jax.Array,
                          sparse: SparseConfig) -> jax.Array:
    """q: [b, 1, heads, d] at position lengths-1 -> [b, groups, 1, nk] log block mass."""
    scale = q.shape[-1] ** -0.5
    probs = attention_probs(q, k_cache, (lengths - 1)[:, None], lengths, scale)
    b, g, _, _, s = probs.shape
    nk = -(-s // sparse.block_k)
    probs = jnp.pad(probs.mean(axis=2), ((0, 0), (0, 0), (0, 0), (0, nk * sparse.block_k - s)))
    return jnp.log(probs.reshape(b, g, 1, nk, sparse.block_k).sum(-1))


def select_per_token(q: jax.Array, ki: jax.Array, q_start: jax.Array, lengths: jax.Array,
                     sparse: SparseConfig, layer_indexer: dict[str, jax.Array]) -> Selection:
    """Each query row selecting for itself, as decode does at its position (the reference).

    q: [b, rows, groups * group_size, d] at positions q_start[b] + row; ki: [b, kv_len, groups,
    rank]. Returns lists with one "query block" per row: ([b, g, rows, max_sel], [b, g, rows]).
    """
    per_token = sparse.replace(block_q=1)
    logits, last = _indexer_logits(q, ki, q_start, lengths, per_token, layer_indexer,
                                   "reference")
    return _select_from_logits(logits, last, per_token, "reference")


def select_prefill(
    q: jax.Array,
    k: jax.Array,
    ki: jax.Array | None,
    lengths: jax.Array,
    sparse: SparseConfig,
    layer_indexer: dict[str, jax.Array],
    backend: str = "reference",
    q_offset: int | jax.Array = 0,
) -> Selection:
    """Block lists of a right-padded prompt's queries at positions q_offset .. q_offset+t-1
    (0: a whole prompt; a multiple of block_q: one chunk of a longer prompt).

    q: [b, t, groups * group_size, d]; k: [b, kv_len, groups, d] (the sparse groups only, keys
    at 0 .. kv_len-1); ki: [b, kv_len, groups, rank] indexer keys (for the "indexer" scorer).
    Query blocks sit at absolute multiples of block_q and keys past a block's last valid query
    are never candidates, so a chunk selects exactly the blocks a whole-prompt pass selects for
    its query blocks when both see the same kv_len (the lists' length depends on it).
    """
    b, t = q.shape[:2]
    q_start = jnp.full((b,), q_offset, jnp.int32)
    if sparse.scorer == "indexer":
        logits, last = _indexer_logits(q, ki, q_start, lengths, sparse, layer_indexer, backend)
        return _select_from_logits(logits, last, sparse, backend)
    _, last = query_block_extent(q_start, lengths, t, sparse.block_q)
    if sparse.scorer == "oracle":
        logits = _oracle_logits_prefill(q, k, lengths, sparse, q_offset)
    else:
        nq, nk = -(-t // sparse.block_q), -(-k.shape[1] // sparse.block_k)
        logits = jnp.zeros((b, k.shape[2], nq, nk), jnp.float32)
    return _select_from_logits(logits, last, sparse, backend)


def select_decode(
    q: jax.Array,
    k_cache: jax.Array,
    ki_cache: jax.Array | None,
    lengths: jax.Array,
    sparse: SparseConfig,
    layer_indexer: dict[str, jax.Array],
    backend: str = "reference",
) -> Selection:
    """Block lists for one new token per row at position lengths[b]-1 (lengths count it).

    q: [b, 1, groups * group_size, d]; k_cache: [b, max_len, groups, d];
    ki_cache: [b, max_len, groups, rank]. Returns lists with nq = 1.
    """
    q_start = lengths - 1
    if sparse.scorer == "indexer":
        logits, last = _indexer_logits(q, ki_cache, q_start, lengths, sparse, layer_indexer,
                                       backend)
        return _select_from_logits(logits, last, sparse, backend)
    _, last = query_block_extent(q_start, lengths, 1, sparse.block_q)
    if sparse.scorer == "oracle":
        logits = _oracle_logits_decode(q, k_cache, lengths, sparse)
    else:
        nk = -(-k_cache.shape[1] // sparse.block_k)
        logits = jnp.zeros((q.shape[0], k_cache.shape[2], 1, nk), jnp.float32)
    return _select_from_logits(logits, last, sparse, backend)


def selection_stats(counts: jax.Array, q_start: jax.Array, lengths: jax.Array, q_len: int,
                    sparse: SparseConfig) -> jax.Array:
    """[selected blocks, candidate blocks] summed over rows, groups and query blocks (float32).

    Their ratio is the density: the fraction of causal key blocks the sparse heads attend to.
    """
    _, last = query_block_extent(q_start, lengths, q_len, sparse.block_q)
    candidates = jnp.where(last >= 0, last // sparse.block_k + 1, 0)
    groups = counts.shape[1]
    return jnp.stack([counts.sum(), candidates.sum() * groups]).astype(jnp.float32)


def selection_quality(mass: jax.Array, indices: jax.Array, counts: jax.Array,
                      lengths: jax.Array, sparse: SparseConfig) -> dict[str, jax.Array]:
    """How well block lists cover the true attention, over valid (row, group, query block).

    mass: [b, g, nq, nk] true block attention (`block_attention_mass`); indices, counts: a
    prefill selection. Returns the mean captured mass, the mean density (selected / candidate
    blocks) and the oracle's density (the smallest top-p set of the true mass, forced blocks
    included) for comparison.
    """
    b, g, nq, nk = mass.shape
    q_start = jnp.zeros_like(lengths)
    _, last = query_block_extent(q_start, lengths, nq * sparse.block_q, sparse.block_q)
    valid = jnp.broadcast_to((last >= 0)[:, None], (b, g, nq))
    candidates = jnp.broadcast_to(jnp.where(last >= 0, last // sparse.block_k + 1, 1)[:, None],
                                  (b, g, nq))
    slot_ok = jnp.arange(indices.shape[-1]) < counts[..., None]
    captured = jnp.sum(jnp.where(slot_ok, jnp.take_along_axis(mass, indices, axis=-1), 0.0), -1)
    logits = jnp.log(mass)
    last_block = jnp.where(last >= 0, last // sparse.block_k, -1)
    _, oracle_counts = select_blocks_reference(logits, last_block, **rule_kwargs(
        sparse.replace(selection="top_p", scorer="oracle")))

    def mean(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(valid.sum(), 1)

    return {"captured_mass": mean(captured), "density": mean(counts / candidates),
            "oracle_density": mean(oracle_counts / candidates)}

"""Attention of one layer, routed per head, for a whole prompt (prefill) or one step (decode).

Design "indexer" (and a dense model), here: retrieval KV groups (all of them in a dense model)
attend densely over the causal prefix; every other group attends only to the key blocks its
selection chose, all of a group's query heads sharing one selection. Each layer splits its
heads once into those two sets. Design "paper": `paper_attention`.

`backend` picks the implementations: "reference" (pure jnp, any device), "pallas" (the Pallas
kernels; interpreted when there is no GPU) or "auto" (cuDNN + Pallas on GPU, reference elsewhere).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention import sparse_attention_reference
from pallas_kernels.sparse_decode import sparse_decode_reference
from rtpurbo_jax import paper_attention
from rtpurbo_jax.cache import layer_groups, write_parts, write_parts_at
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.dense import cudnn_supported, dense_attention_cudnn, dense_attention_reference
from rtpurbo_jax.indexer import indexer_keys
from rtpurbo_jax.kernels import kernels, use_kernels
from rtpurbo_jax.model import QKV, AttendFn, merge_heads, query_heads, take_heads
from rtpurbo_jax.selection import select_decode, select_prefill, selection_stats
from rtpurbo_jax.train_attention import block_list_attention, causal_attention


def _use_cudnn(q: jax.Array, backend: str) -> bool:
    return backend != "reference" and cudnn_supported(q)


# Block sizes of the causal lists that run a prefill chunk's dense heads through the
# block-sparse kernel (`causal_block_lists`).
CHUNK_DENSE_BLOCK_Q = 64
CHUNK_DENSE_BLOCK_K = 64


def dense_prefill(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, backend: str,
    sliding_window: int | None = None, q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Causal attention of a right-padded batch's queries at positions q_offset .. q_offset+seq-1
    over keys at 0 .. kv_len-1.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] (the prompt
    itself, or a cache holding a prefill chunk's keys); lengths: [batch]. q_offset: 0 for a
    whole prompt, a traced scalar for a chunk of one.
    """
    from_zero = isinstance(q_offset, int) and q_offset == 0
    if from_zero and _use_cudnn(q, backend):
        return dense_attention_cudnn(q, k, v, jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2]),
                                     lengths, causal_from_zero=True, sliding_window=sliding_window)
    if not from_zero and use_kernels(backend):
        # cuDNN's causal mask starts at query 0; a chunk's start at q_offset. The block-sparse
        # kernel listing every causal block is flash attention with that offset.
        indices, counts = causal_block_lists(q_offset, q.shape[1], k.shape[1], k.shape[0],
                                             k.shape[2])
        return kernels(backend).sparse_attention(
            q, k, v, indices, counts, block_q=CHUNK_DENSE_BLOCK_Q, block_k=CHUNK_DENSE_BLOCK_K,
            lengths=lengths, q_offset=q_offset, window=sliding_window)
    positions = q_offset + jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return dense_attention_reference(q, k, v, positions, lengths, sliding_window=sliding_window)


def causal_block_lists(q_offset: int | jax.Array, q_len: int, kv_len: int, batch: int,
                       kv_heads: int) -> tuple[jax.Array, jax.Array]:
    """Every causal key block of each query block (CHUNK_DENSE_BLOCK_Q queries from q_offset),
    in the block-sparse kernel's list format: (indices [batch, kv_heads, nq, nk], counts
    [batch, kv_heads, nq]). The kernel masks the diagonal, lengths and any window per token."""
    bq, bk = CHUNK_DENSE_BLOCK_Q, CHUNK_DENSE_BLOCK_K
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    last = q_offset + jnp.minimum((jnp.arange(nq) + 1) * bq, q_len) - 1  # [nq]
    counts = jnp.minimum(last // bk + 1, nk).astype(jnp.int32)
    j = jnp.arange(nk, dtype=jnp.int32)
    indices = jnp.where(j < counts[:, None], j, counts[:, None] - 1)  # repeat the last listed
    shape = (batch, kv_heads, nq)
    return jnp.broadcast_to(indices, shape + (nk,)), jnp.broadcast_to(counts, shape)


def dense_decode(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *, backend: str,
    sliding_window: int | None = None,
) -> jax.Array:
    """One query per row at position lengths[b]-1 over the cache.

    q: [batch, 1, heads, head_dim]; k_cache, v_cache: [batch, max_len, kv_heads, head_dim];
    lengths: [batch], counting the new token.
    """
    positions = (lengths - 1)[:, None]
    if _use_cudnn(q, backend):
        return dense_attention_cudnn(q, k_cache, v_cache, positions, lengths,
                                     causal_from_zero=False, sliding_window=sliding_window)
    return dense_attention_reference(q, k_cache, v_cache, positions, lengths,
                                     sliding_window=sliding_window)


def _zero_stats() -> jax.Array:
    return jnp.zeros((2,), jnp.float32)


def positional_parts(k: jax.Array, v: jax.Array, layer: int, config: ModelConfig,
                     sparse: SparseConfig | None, layer_indexer: dict[str, jax.Array]
                     ) -> dict[str, jax.Array]:
    """The cache parts {k, v, ks, vs, ki} (`cache.layer_part_shapes`, all indexed by position) of
    some positions' keys and values, k, v: [b, seq, kv_heads, d], in the indexer design or a
    dense model."""
    dense, sparse_groups = layer_groups(config, sparse, layer)
    parts = {}
    if dense:
        kv = np.array(dense, np.int32)
        parts.update(k=take_heads(k, kv), v=take_heads(v, kv))
    if sparse_groups:
        kv = np.array(sparse_groups, np.int32)
        parts.update(ks=take_heads(k, kv), vs=take_heads(v, kv))
        if sparse.scorer == "indexer":
            parts["ki"] = indexer_keys(parts["ks"], layer_indexer["wk"])
    return parts


def layer_prefill(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, layer: int,
    config: ModelConfig, sparse: SparseConfig | None, layer_indexer: dict[str, jax.Array],
    backend: str, q_offset: int | jax.Array = 0,
    layer_cache: dict[str, jax.Array] | None = None, prompt_len: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """One layer's attention over a right-padded prompt: whole, or one chunk of it.

    q: [b, seq, heads, d]; k, v: [b, seq, kv_heads, d].
    Whole prompt (layer_cache None, q_offset 0): returns (out like q, the cache parts
    {k, v, ks, vs, ki} of this prompt, selection stats [selected blocks, candidate blocks]).
    A chunk (layer_cache: the layer's cache, holding positions 0 .. q_offset-1): its queries
    sit at q_offset .. q_offset+seq-1; its parts are written into the cache at q_offset first,
    then it attends over the cache. Returns (out, the updated cache, stats). prompt_len: the
    whole prompt's width; the selection scores the cache's first prompt_len keys, the keys a
    whole-prompt pass scores, so that the lists match it (`select_prefill`).
    """
    dense, sparse_groups = layer_groups(config, sparse, layer)
    g_size = config.group_size
    parts = positional_parts(k, v, layer, config, sparse, layer_indexer)
    keys = parts if layer_cache is None else write_parts_at(layer_cache, parts, q_offset)
    pieces, stats = [], _zero_stats()
    if dense:
        heads = query_heads(dense, g_size)
        pieces.append((heads, dense_prefill(take_heads(q, heads), keys["k"], keys["v"], lengths,
                                            backend=backend, sliding_window=config.sliding_window,
                                            q_offset=q_offset)))
    if sparse_groups:
        heads = query_heads(sparse_groups, g_size)
        qs = take_heads(q, heads)
        width = q.shape[1] if prompt_len is None else prompt_len
        scored = {name: keys[name][:, :width] for name in ("ks", "ki") if name in keys}
        indices, counts = select_prefill(qs, scored["ks"], scored.get("ki"), lengths, sparse,
                                         layer_indexer, backend, q_offset=q_offset)
        kwargs = dict(block_q=sparse.block_q, block_k=sparse.block_k, lengths=lengths,
                      q_offset=q_offset)
        args = (qs, keys["ks"], keys["vs"], indices, counts)
        if use_kernels(backend):
            out = kernels(backend).sparse_attention(*args, **kwargs)
        else:
            out = sparse_attention_reference(*args, **kwargs)
        pieces.append((heads, out))
        stats = selection_stats(counts, jnp.full_like(lengths, q_offset), lengths, q.shape[1],
                                sparse)
    return merge_heads(pieces, config.num_heads), keys, stats


def layer_decode(
    q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: dict[str, jax.Array],
    lengths: jax.Array, layer: int, config: ModelConfig, sparse: SparseConfig | None,
    layer_indexer: dict[str, jax.Array], backend: str,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """One new token per row: writes its k/v at position lengths[b], then attends.

    q: [b, 1, heads, d]; k, v: [b, 1, kv_heads, d]; lengths: [b], filled positions before this
    step. Returns (out like q, the updated layer cache, selection stats).
    """
    dense, sparse_groups = layer_groups(config, sparse, layer)
    g_size = config.group_size
    parts = positional_parts(k, v, layer, config, sparse, layer_indexer)
    cache = write_parts(layer_cache, parts, lengths)
    new_lengths = lengths + 1
    pieces, stats = [], _zero_stats()
    if dense:
        heads = query_heads(dense, g_size)
        pieces.append((heads, dense_decode(take_heads(q, heads), cache["k"], cache["v"],
                                           new_lengths, backend=backend,
                                           sliding_window=config.sliding_window)))
    if sparse_groups:
        heads = query_heads(sparse_groups, g_size)
        qs = take_heads(q, heads)
        indices, counts = select_decode(qs, cache["ks"], cache.get("ki"), new_lengths, sparse,
                                        layer_indexer, backend)
        args = (qs[:, 0], cache["ks"], cache["vs"], indices[:, :, 0], counts[:, :, 0],
                new_lengths)
        if use_kernels(backend):
            out = kernels(backend).sparse_decode(*args, block_k=sparse.block_k)
        else:
            out = sparse_decode_reference(*args, block_k=sparse.block_k)
        pieces.append((heads, out[:, None]))
        stats = selection_stats(counts, lengths, new_lengths, 1, sparse)
    return merge_heads(pieces, config.num_heads), cache, stats


def _is_paper(sparse: SparseConfig | None) -> bool:
    return sparse is not None and sparse.design == "paper"


def prefill_attend(
    config: ModelConfig, lengths: jax.Array, backend: str, sparse: SparseConfig | None = None,
    indexer: dict[str, Any] | None = None, q_offset: jax.Array | None = None,
    prompt_len: int | None = None,
) -> AttendFn:
    """An `attend` for a right-padded prompt starting at position 0, or (q_offset given) for one
    chunk of a longer one, its queries at q_offset .. (`generate.prefill_chunked`; prompt_len:
    the whole prompt's width).

    Whole prompt: the layer state going in is the layer's cache dict (filled at positions
    0 .. seq-1), or None for a forward pass without a cache. A chunk: the layer's cache holding
    positions 0 .. q_offset-1, which the chunk is written into. Coming out the state is
    {"cache": ..., "stats": ...}.
    """
    chunked = q_offset is not None
    offset = q_offset if chunked else 0

    def attend(i: int, qkv: QKV, layer_cache: Any):
        layer_indexer = indexer["layers"][i] if indexer is not None else {}
        into = layer_cache if chunked else None
        if _is_paper(sparse):
            ring = layer_cache["kw"].shape[1] if layer_cache and "kw" in layer_cache else None
            out, parts, stats = paper_attention.layer_prefill(
                qkv, lengths, i, config, sparse, layer_indexer, backend, dense_prefill, ring,
                q_offset=offset, layer_cache=into)
        else:
            out, parts, stats = layer_prefill(qkv.q, qkv.k, qkv.v, lengths, i, config, sparse,
                                              layer_indexer, backend, q_offset=offset,
                                              layer_cache=into, prompt_len=prompt_len)
        if chunked:
            layer_cache = parts  # already the updated cache
        elif layer_cache is not None:
            layer_cache = write_parts_at(layer_cache, parts, 0)
        return out, {"cache": layer_cache, "stats": stats}

    return attend


def decode_attend(
    config: ModelConfig, lengths: jax.Array, backend: str, sparse: SparseConfig | None = None,
    indexer: dict[str, Any] | None = None,
) -> AttendFn:
    """An `attend` for one new token per row, written at position lengths[b] of the cache.

    lengths: [batch], the filled positions before this step.
    """

    def attend(i: int, qkv: QKV, layer_cache: Any):
        layer_indexer = indexer["layers"][i] if indexer is not None else {}
        if _is_paper(sparse):
            out, cache, stats = paper_attention.layer_decode(
                qkv, layer_cache, lengths, i, config, sparse, layer_indexer, backend,
                dense_decode)
        else:
            out, cache, stats = layer_decode(qkv.q, qkv.k, qkv.v, layer_cache, lengths, i,
                                             config, sparse, layer_indexer, backend)
        return out, {"cache": cache, "stats": stats}

    return attend


def train_attend(
    config: ModelConfig, lengths: jax.Array, sparse: SparseConfig | None = None,
    indexer: dict[str, Any] | None = None,
) -> AttendFn:
    """An `attend` for training (stage 2's student, or a dense model), differentiable and
    memory-bounded in both passes (`train_attention`): the paper design's retrieval heads attend
    as decode does at every position (`paper_attention.layer_train`); the indexer design's
    sparse groups attend their prefill selection (frozen), its dense groups and a dense model
    attend causally. Layer states are unused (None)."""

    def attend(i: int, qkv: QKV, state: Any):
        layer_indexer = indexer["layers"][i] if indexer is not None else {}
        if _is_paper(sparse):
            return paper_attention.layer_train(qkv, lengths, i, config, sparse,
                                               layer_indexer), None
        return indexer_layer_train(qkv, lengths, i, config, sparse, layer_indexer), None

    return attend


def indexer_layer_train(qkv: QKV, lengths: jax.Array, layer: int, config: ModelConfig,
                        sparse: SparseConfig | None, layer_indexer: dict[str, jax.Array]
                        ) -> jax.Array:
    """One layer of the indexer design (or a dense model) in training: the sparse groups'
    block selection as prefill makes it (no gradient through it), attention through it and
    causal attention elsewhere. Out like q."""
    dense, sparse_groups = layer_groups(config, sparse, layer)
    g_size = config.group_size
    pieces = []
    window = config.sliding_window
    if dense:
        heads, kv = query_heads(dense, g_size), np.array(dense, np.int32)
        pieces.append((heads, causal_attention(take_heads(qkv.q, heads), take_heads(qkv.k, kv),
                                               take_heads(qkv.v, kv), lengths, window=window)))
    if sparse_groups:
        heads, kv = query_heads(sparse_groups, g_size), np.array(sparse_groups, np.int32)
        qs, ks, vs = take_heads(qkv.q, heads), take_heads(qkv.k, kv), take_heads(qkv.v, kv)
        frozen_q, frozen_k = jax.lax.stop_gradient((qs, ks))
        ki = (indexer_keys(frozen_k, layer_indexer["wk"]) if sparse.scorer == "indexer"
              else None)
        indices, counts = select_prefill(frozen_q, frozen_k, ki, lengths, sparse,
                                         jax.lax.stop_gradient(layer_indexer), "reference")
        blocks = paper_attention.blocks_to_mask(indices, counts, -(-qs.shape[1] // sparse.block_k))
        pieces.append((heads, block_list_attention(qs, ks, vs, lengths, blocks,
                                                   block_q=sparse.block_q,
                                                   block_k=sparse.block_k)))
    return merge_heads(pieces, config.num_heads)

"""The paper design's attention of one layer (SparseConfig.design == "paper").

Query heads are split once: retrieval heads R and local heads L (`SparseConfig.retrieval_mask`).
  prefill  R: dense causal attention (cuDNN on GPU), building the full KV cache of their groups;
           L: attention sinks + a sliding window (`sink_tokens`, `window`), token-exact (on a
              GPU in half precision: cuDNN's window, its log-sum-exp merging the sinks in).
  decode   R: each head scores the cache's key blocks with its own pre-RoPE indexer (or the
              true attention, scorer "oracle") and keeps its top-p set, the sink block and the
              newest blocks forced; the heads of one KV group then attend the union of their
              sets, so each selected block is read once for the group (the paper's memory
              sparsity is this union; attending it gives each head at least its own top-p mass);
           L: sinks + window again, over a ring buffer when the whole group is local, else
              over the sinks and window cut from the group's full cache.
A KV group keeps its full cache when any of its query heads is a retrieval head ("full"
groups); otherwise only sinks + window ("window" groups, a ring buffer, cache.py).

A head set that takes the same number of heads from each group it touches (whole groups, or
e.g. one retrieval head per group) runs as GQA over those groups (`head_kv_layout`); an uneven
one (query-head routing can make them) has its K/V gathered per query head, a copy of those
heads' K/V. Statistics are token counts summed over rows and all query heads:
[attended keys, causal keys].
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.indexer_topp import compact_lists
from pallas_kernels.local_attention import window_block_lists
from pallas_kernels.sparse_decode import sparse_decode_reference
from rtpurbo_jax.cache import (
    RING_PARTS,
    ring_filled,
    ring_from_prefill,
    ring_positions,
    ring_slots,
    write_parts,
    write_parts_at,
)
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.dense import (
    cudnn_local_supported,
    dense_attention_reference,
    local_attention_cudnn,
)
from rtpurbo_jax.indexer import indexer_keys
from rtpurbo_jax.kernels import kernels, use_kernels
from rtpurbo_jax.model import QKV, head_keys, merge_heads, query_heads, take_heads
from rtpurbo_jax.selection import select_decode, select_per_token
from rtpurbo_jax.train_attention import causal_attention, chunked_attention, window_mask

# Query positions per step of the training-mode retrieval attention (both passes): its memory
# stays [batch, retrieval heads, TRAIN_Q_CHUNK, seq].
TRAIN_Q_CHUNK = 256


def head_kv_layout(heads: tuple[int, ...], group_size: int, groups: tuple[int, ...]
                   ) -> np.ndarray:
    """Where the K/V of `heads` (ascending query heads) sit among `groups` (KV heads in cache
    order), as the KV index list to take.

    When the heads fill the groups they touch equally (n heads in each: whole GQA groups, or
    e.g. the two local heads of each group whose third is a retrieval head), one KV head per
    touched group: GQA with n query heads per KV head, and no copy when they touch every one
    of `groups`. Otherwise one KV head per query head (len(heads) entries), a copy of those
    heads' K/V.
    """
    per_group = collections.Counter(h // group_size for h in heads)
    if len(set(per_group.values())) == 1:
        return np.asarray([groups.index(g) for g in sorted(per_group)], np.int32)
    return np.asarray([groups.index(h // group_size) for h in heads], np.int32)


def local_prefill(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                  sparse: SparseConfig, backend: str) -> jax.Array:
    """Sinks + window attention of a right-padded prompt from position 0 (GQA shapes): on a
    GPU in half precision cuDNN's window with the sinks merged in, else the local kernel."""
    if backend != "reference" and cudnn_local_supported(q):
        return local_attention_cudnn(q, k, v, lengths, sink_tokens=sparse.sink_tokens,
                                     window=sparse.window)
    if use_kernels(backend):
        return kernels(backend).local_attention(q, k, v, lengths, sink_tokens=sparse.sink_tokens,
                                                window=sparse.window, block_q=sparse.block_q,
                                                block_k=sparse.block_k)
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return dense_attention_reference(q, k, v, positions, lengths, sliding_window=sparse.window,
                                     sink_tokens=sparse.sink_tokens)


def _local_heads_qkv(qkv: QKV, local: tuple[int, ...], group_size: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q of the given local query heads and their K/V in `head_kv_layout` (GQA shapes)."""
    groups = tuple(sorted({h // group_size for h in local}))
    at = head_kv_layout(local, group_size, groups)
    group_index = np.asarray(groups, np.int32)
    kl, vl = (take_heads(take_heads(x, group_index), at) for x in (qkv.k, qkv.v))
    return take_heads(qkv.q, np.asarray(local, np.int32)), kl, vl


def _local_heads_prefill(qkv: QKV, lengths: jax.Array, local: tuple[int, ...], group_size: int,
                         sparse: SparseConfig, backend: str) -> jax.Array:
    """Sinks + window prefill of the given local query heads: [b, t, len(local), d]."""
    return local_prefill(*_local_heads_qkv(qkv, local, group_size), lengths, sparse, backend)


def _prefill_stats(lengths: jax.Array, sparse: SparseConfig, layer: int,
                   q_offset: int | jax.Array = 0, q_len: int | None = None) -> jax.Array:
    """[attended, causal] keys of the queries at positions q_offset .. q_offset+q_len-1 (q_len
    None: a whole prompt from 0), over rows and query heads."""
    span = float(sparse.sink_tokens + sparse.window)

    def up_to(n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(causal, local) keys summed over query positions 0 .. n-1."""
        causal = n * (n + 1) / 2
        # A local head's query at position t sees min(t + 1, sinks + window) keys.
        local = jnp.where(n <= span, causal, span * (span + 1) / 2 + (n - span) * span)
        return causal, local

    n = lengths.astype(jnp.float32)
    if q_len is None:
        causal, local = up_to(n)
    else:  # a chunk: what the positions below q_offset see was counted before it
        causal, local = up_to(jnp.minimum(n, q_offset + q_len))
        causal_before, local_before = up_to(jnp.minimum(n, q_offset))
        causal, local = causal - causal_before, local - local_before
    r, heads = len(sparse.retrieval_heads(layer)), len(sparse.retrieval_mask[layer])
    return jnp.stack([jnp.sum(r * causal + (heads - r) * local), jnp.sum(heads * causal)])


def _chunk_regions(sparse: SparseConfig) -> tuple[int, int]:
    """Key slots before a chunk's own keys in `_local_chunk_kernel`: (sinks, window), each
    rounded up to whole query and key blocks."""
    unit = max(sparse.block_q, sparse.block_k)
    return -(-sparse.sink_tokens // unit) * unit, -(-sparse.window // unit) * unit


def chunk_kernel_fits(chunk: int, sparse: SparseConfig) -> bool:
    """Whether a chunk of `chunk` queries takes `_local_chunk_kernel`: every chunk after the
    first then starts past the sinks and a whole window, so the keys it needs before itself
    are exactly the sinks and the window's slots."""
    return chunk >= sum(_chunk_regions(sparse))


def _local_chunk_kernel(q: jax.Array, sinks: tuple[jax.Array, jax.Array],
                        before: tuple[jax.Array, jax.Array], own: tuple[jax.Array, jax.Array],
                        lengths: jax.Array, q_offset: jax.Array, sparse: SparseConfig,
                        backend: str) -> jax.Array:
    """Sinks + window of a chunk's queries (positions q_offset .., q_offset >= both regions of
    `_chunk_regions`) through the block-sparse kernel, O(chunk * (sinks + window)) work.

    q: [b, c, h, d]; sinks, before, own: (k, v) [b, n, g, d] of positions 0 .. sink_tokens-1,
    q_offset-W .. q_offset-1 (W: the window region) and the chunk's. They form one key array
    [sinks, zero-padded to S | before | own]: each query keeps its distance to every window
    key, so the kernel's token mask (sinks, window, causality) holds with the queries at S + W.
    The padding and the slots older than the window sit further than the window from every
    query: no query sees them.
    """
    s_region, w_region = _chunk_regions(sparse)
    base = s_region + w_region
    pad = ((0, 0), (0, s_region - sparse.sink_tokens), (0, 0), (0, 0))
    k, v = (jnp.concatenate([jnp.pad(sinks[i], pad), before[i], own[i]], axis=1)
            for i in (0, 1))
    c = q.shape[1]
    lens = jnp.clip(lengths - q_offset + base, 0, base + c).astype(jnp.int32)
    indices, counts = window_block_lists(c, base + c, sink_tokens=sparse.sink_tokens,
                                         window=sparse.window, block_q=sparse.block_q,
                                         block_k=sparse.block_k, q_offset=base)
    shape = (q.shape[0], k.shape[2])
    return kernels(backend).sparse_attention(
        q, k, v, jnp.broadcast_to(jnp.asarray(indices), shape + indices.shape),
        jnp.broadcast_to(jnp.asarray(counts), shape + counts.shape),
        block_q=sparse.block_q, block_k=sparse.block_k, lengths=lens, q_offset=base,
        window=sparse.window, sink_tokens=sparse.sink_tokens)


def _local_chunk_fast(q: jax.Array, own: tuple[jax.Array, jax.Array], lengths: jax.Array,
                      q_offset: jax.Array, sparse: SparseConfig, backend: str,
                      earlier: Any) -> jax.Array:
    """The first chunk as a prompt of its own (nothing before it), a later one through
    `_local_chunk_kernel` with (sinks, before) = earlier() [see there]."""
    return jax.lax.cond(
        q_offset == 0,
        lambda: local_prefill(q, *own, lengths, sparse, backend),
        lambda: _local_chunk_kernel(q, *earlier(), own, lengths, q_offset, sparse, backend))


def _local_heads_chunk(qkv: QKV, cache: dict[str, jax.Array], old_ring: dict[str, jax.Array],
                       lengths: jax.Array, q_offset: jax.Array, layer: int, config: ModelConfig,
                       sparse: SparseConfig, backend: str
                       ) -> list[tuple[tuple[int, ...], jax.Array]]:
    """Sinks + window of a prefill chunk's local heads (queries at q_offset ..): over the ring
    as it was before the chunk, then the chunk's own keys, for all-local groups; over the full
    cache (the chunk written) for local heads of groups that also hold a retrieval head.

    The ring before the chunk holds the sinks and the newest `window` positions below q_offset:
    every earlier key any of the chunk's queries can see. With kernels and a chunk that
    `chunk_kernel_fits`, the block-sparse kernel; else masked dense attention with explicit key
    positions, whose keys are ring + chunk (the ring heads) or the whole cache (the others).
    """
    gs = config.group_size
    window = sparse.window_groups(layer)
    ring_heads = tuple(int(h) for h in query_heads(window, gs))
    mixed = tuple(h for h in sparse.local_heads(layer) if h // gs not in window)
    c = qkv.q.shape[1]
    fast = use_kernels(backend) and chunk_kernel_fits(c, sparse)
    w_region = _chunk_regions(sparse)[1]
    q_pos = q_offset + jnp.broadcast_to(jnp.arange(c), (lengths.shape[0], c))
    mask = dict(sliding_window=sparse.window, sink_tokens=sparse.sink_tokens)
    pieces = []
    if ring_heads:
        idx = np.asarray(window, np.int32)
        q = take_heads(qkv.q, np.asarray(ring_heads, np.int32))
        own = tuple(take_heads(x, idx) for x in (qkv.k, qkv.v))
        size = old_ring["kw"].shape[1]
        if fast:
            def from_ring():
                positions = jnp.maximum(q_offset - w_region + jnp.arange(w_region), 0)
                slots = ring_slots(positions, sparse, size)
                return ((old_ring["kw"][:, :sparse.sink_tokens],
                         old_ring["vw"][:, :sparse.sink_tokens]),
                        (old_ring["kw"][:, slots], old_ring["vw"][:, slots]))
            out = _local_chunk_fast(q, own, lengths, q_offset, sparse, backend, from_ring)
        else:
            held, valid = ring_positions(jnp.minimum(lengths, q_offset), sparse, size)
            # Empty slots sit past every query, so no query sees them.
            held = jnp.where(valid, held, jnp.iinfo(jnp.int32).max)
            k, v = (jnp.concatenate([old_ring[name], x], axis=1)
                    for name, x in zip(("kw", "vw"), own, strict=True))
            out = dense_attention_reference(q, k, v, q_pos, lengths,
                                            key_positions=jnp.concatenate([held, q_pos], 1),
                                            **mask)
        pieces.append((ring_heads, out))
    if mixed:
        at = head_kv_layout(mixed, gs, sparse.full_groups(layer))
        q = take_heads(qkv.q, np.asarray(mixed, np.int32))
        if fast:
            def heads_at(start, n):
                return tuple(take_heads(jax.lax.dynamic_slice_in_dim(cache[name], start, n, 1),
                                        at) for name in ("k", "v"))
            out = _local_chunk_fast(
                q, heads_at(q_offset, c), lengths, q_offset, sparse, backend,
                lambda: (heads_at(0, sparse.sink_tokens), heads_at(q_offset - w_region,
                                                                   w_region)))
        else:
            out = dense_attention_reference(q, take_heads(cache["k"], at),
                                            take_heads(cache["v"], at), q_pos, lengths, **mask)
        pieces.append((mixed, out))
    return pieces


def positional_parts(qkv: QKV, layer: int, config: ModelConfig, sparse: SparseConfig,
                     layer_indexer: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The cache parts indexed by position, {k, v, ki} of the full groups
    (`cache.layer_part_shapes`), of the positions qkv holds ([b, seq, ...] each)."""
    retrieval, full = sparse.retrieval_heads(layer), sparse.full_groups(layer)
    parts = {}
    if full:
        index = np.asarray(full, np.int32)
        parts.update(k=take_heads(qkv.k, index), v=take_heads(qkv.v, index))
        if sparse.scorer == "indexer":
            parts["ki"] = indexer_keys(head_keys(qkv.k_pre, retrieval, config.group_size),
                                       layer_indexer["wk"])
    return parts


def layer_prefill(qkv: QKV, lengths: jax.Array, layer: int, config: ModelConfig,
                  sparse: SparseConfig, layer_indexer: dict[str, jax.Array], backend: str,
                  dense_prefill: Any, ring: int | None, q_offset: int | jax.Array = 0,
                  layer_cache: dict[str, jax.Array] | None = None,
                  ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """One layer over a right-padded prompt: whole from position 0, or one chunk of it.

    Whole prompt (layer_cache None): returns (out like q, the cache parts {k, v, kw, vw, ki} of
    this prompt, stats [2]); `ring` is the slots of the cache's ring buffers (None: no cache,
    no ring parts). A chunk (layer_cache: the layer's cache holding positions 0 .. q_offset-1;
    its queries at q_offset ..): its positional parts are written into the cache first, the
    retrieval heads attend densely over it, the local heads as `_local_heads_chunk`, and the
    ring takes the chunk's newest positions; returns (out, the updated cache, stats).
    `dense_prefill(q, k, v, lengths, backend=, q_offset=)` is the dense causal attention to use.
    """
    gs = config.group_size
    retrieval, local = sparse.retrieval_heads(layer), sparse.local_heads(layer)
    full, window = sparse.full_groups(layer), sparse.window_groups(layer)
    chunked = layer_cache is not None
    pieces, parts = [], positional_parts(qkv, layer, config, sparse, layer_indexer)
    keys = parts
    if chunked:
        positional = {name: layer_cache[name] for name in parts}
        keys = write_parts_at(positional, parts, q_offset)
    if full:
        at = head_kv_layout(retrieval, gs, full)
        pieces.append((retrieval, dense_prefill(take_heads(qkv.q, np.asarray(retrieval, np.int32)),
                                                take_heads(keys["k"], at),
                                                take_heads(keys["v"], at), lengths,
                                                backend=backend, q_offset=q_offset)))
    if local and chunked:
        pieces += _local_heads_chunk(qkv, keys, layer_cache, lengths, q_offset, layer, config,
                                     sparse, backend)
    elif local:
        pieces.append((local, _local_heads_prefill(qkv, lengths, local, gs, sparse, backend)))
    ring = layer_cache["kw"].shape[1] if chunked and window else ring
    if window and ring is not None:
        for name, x in (("kw", qkv.k), ("vw", qkv.v)):
            old = layer_cache[name] if chunked else None
            parts[name] = ring_from_prefill(take_heads(x, np.asarray(window, np.int32)), lengths,
                                            sparse, ring, start=q_offset, ring=old)
    q_len = qkv.q.shape[1] if chunked else None
    stats = _prefill_stats(lengths, sparse, layer, q_offset, q_len)
    state = {**layer_cache, **keys, **{n: parts[n] for n in RING_PARTS if n in parts}
             } if chunked else parts
    return merge_heads(pieces, config.num_heads), state, stats


def blocks_to_mask(indices: jax.Array, counts: jax.Array, num_blocks: int) -> jax.Array:
    """Block lists [..., max_sel] with counts [...] -> a membership mask [..., num_blocks]."""
    lead, max_sel = indices.shape[:-1], indices.shape[-1]
    flat = indices.reshape(-1, max_sel)
    listed = jnp.arange(max_sel) < counts.reshape(-1, 1)
    rows = jnp.arange(flat.shape[0])[:, None]
    # A scatter, not a one-hot: that one is [..., max_sel, num_blocks] (at 128K decode, 4 heads:
    # 1.7M entries a layer). Unlisted entries go out of range and are dropped.
    mask = jnp.zeros((flat.shape[0], num_blocks), jnp.bool_).at[
        rows, jnp.where(listed, flat, num_blocks)].set(True, mode="drop")
    return mask.reshape(*lead, num_blocks)


def mask_to_blocks(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A membership mask [..., nk] -> (ascending block lists [..., nk], counts [...]); entries
    past a count repeat the last listed block (0 when none), as the kernels expect."""
    flat = mask.reshape(-1, mask.shape[-1])
    counts = jnp.sum(flat, axis=-1).astype(jnp.int32)
    lists = compact_lists(flat, counts, flat.shape[-1])
    return lists.reshape(mask.shape), counts.reshape(mask.shape[:-1])


def _listed_keys(indices: jax.Array, counts: jax.Array, lengths: jax.Array, block_k: int
                 ) -> jax.Array:
    """Valid keys in the listed blocks: indices [b, n, max_sel], counts [b, n] -> [b, n]."""
    listed = jnp.arange(indices.shape[-1]) < counts[..., None]
    keys = jnp.clip(lengths[:, None, None] - indices * block_k, 0, block_k)
    return jnp.sum(jnp.where(listed, keys, 0), axis=-1)


def retrieval_decode(qkv: QKV, cache: dict[str, jax.Array], new_lengths: jax.Array, layer: int,
                     config: ModelConfig, sparse: SparseConfig,
                     layer_indexer: dict[str, jax.Array], backend: str
                     ) -> tuple[jax.Array, jax.Array]:
    """The retrieval heads' top-p decode over the full cache (the new token already written).

    Returns (out [b, 1, len(R), d], attended keys summed over rows and heads).
    """
    gs = config.group_size
    retrieval, full = sparse.retrieval_heads(layer), sparse.full_groups(layer)
    heads = np.asarray(retrieval, np.int32)
    per_head = np.asarray([full.index(h // gs) for h in retrieval], np.int32)
    # The indexer reads pre-RoPE queries; the oracle ranks by each head's true attention.
    q_score = take_heads(qkv.q_pre if sparse.scorer == "indexer" else qkv.q, heads)
    k_score = None if sparse.scorer == "indexer" else take_heads(cache["k"], per_head)
    # Per retrieval head, its own top-p set (each head a "group" of one).
    indices, counts = select_decode(q_score, k_score, cache.get("ki"), new_lengths, sparse,
                                    layer_indexer, backend)
    num_blocks = -(-cache["k"].shape[1] // sparse.block_k)
    own = blocks_to_mask(indices[:, :, 0], counts[:, :, 0], num_blocks)  # [b, R, nk]
    lists, sizes = mask_to_blocks(group_union(own, per_head, len(full)))  # [b, F, nk]
    at = head_kv_layout(retrieval, gs, full)
    if len(at) != len(full):  # unequal shares of groups: one KV head (and list) per query head
        lists, sizes = lists[:, per_head], sizes[:, per_head]
    args = (take_heads(qkv.q, heads)[:, 0], take_heads(cache["k"], at),
            take_heads(cache["v"], at), lists, sizes, new_lengths)
    if use_kernels(backend):
        out = kernels(backend).sparse_decode(*args, block_k=sparse.block_k)
    else:
        out = sparse_decode_reference(*args, block_k=sparse.block_k)
    attended = _listed_keys(lists, sizes, new_lengths, sparse.block_k)
    heads_per_list = len(retrieval) // len(at)
    return out[:, None], jnp.sum(attended).astype(jnp.float32) * heads_per_list


def local_decode(qkv: QKV, cache: dict[str, jax.Array], new_lengths: jax.Array, layer: int,
                 config: ModelConfig, sparse: SparseConfig, backend: str, dense_decode: Any
                 ) -> list[tuple[tuple[int, ...], jax.Array]]:
    """The local heads' sinks + window decode: over the ring of all-local groups, and over the
    full cache (masked) for local heads of groups that also hold a retrieval head."""
    gs = config.group_size
    window = sparse.window_groups(layer)
    ring_heads = tuple(int(h) for h in query_heads(window, gs))
    mixed = tuple(h for h in sparse.local_heads(layer) if h // gs not in window)
    pieces = []
    if ring_heads:
        filled = ring_filled(new_lengths, cache["kw"].shape[1])
        pieces.append((ring_heads, dense_decode(take_heads(qkv.q, np.asarray(ring_heads, np.int32)),
                                                cache["kw"], cache["vw"], filled,
                                                backend=backend)))
    if mixed:
        # Only query-head routing makes these: local heads whose group keeps its full cache.
        at = head_kv_layout(mixed, gs, sparse.full_groups(layer))
        k, v, visible = sink_window_keys(cache["k"], cache["v"], new_lengths, sparse)
        pieces.append((mixed, dense_decode(take_heads(qkv.q, np.asarray(mixed, np.int32)),
                                           take_heads(k, at), take_heads(v, at), visible,
                                           backend=backend)))
    return pieces


def sink_window_keys(k: jax.Array, v: jax.Array, lengths: jax.Array, sparse: SparseConfig
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a sinks + window query at position lengths[b] - 1 sees of a full cache
    k, v: [b, max_len, groups, d], as a prefix: the first sink_tokens positions, then `window`
    positions from max(lengths[b] - window, sink_tokens) (a cache no longer than that: the
    cache), and how many leading keys of that are visible [b]. The query then attends a plain
    prefix (cuDNN with key lengths on a GPU), and a step reads O(window), not the cache."""
    sink, window = sparse.sink_tokens, sparse.window
    if k.shape[1] <= sink + window:  # every filled position is then a sink or in the window
        return k, v, lengths
    start = jnp.clip(lengths - window, sink, k.shape[1] - window)
    visible = jnp.minimum(lengths, sink) + jnp.maximum(lengths - start, 0)

    def cut(x: jax.Array) -> jax.Array:
        span = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, window, axis=0))
        return jnp.concatenate([x[:, :sink], span(x, start)], axis=1)

    return cut(k), cut(v), visible


def layer_decode(qkv: QKV, layer_cache: dict[str, jax.Array], lengths: jax.Array, layer: int,
                 config: ModelConfig, sparse: SparseConfig, layer_indexer: dict[str, jax.Array],
                 backend: str, dense_decode: Any
                 ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """One new token per row, written at position lengths[b], then attended.

    qkv: the new token's projections ([b, 1, ...]); lengths: [b] filled positions before this
    step. Returns (out like q, the updated layer cache, stats [2]).
    """
    retrieval, local = sparse.retrieval_heads(layer), sparse.local_heads(layer)
    window = sparse.window_groups(layer)
    parts = positional_parts(qkv, layer, config, sparse, layer_indexer)
    ring_at = None
    if window:
        idx = np.asarray(window, np.int32)
        parts.update(kw=take_heads(qkv.k, idx), vw=take_heads(qkv.v, idx))
        ring_at = ring_slots(lengths, sparse, layer_cache["kw"].shape[1])
    cache = write_parts(layer_cache, parts, lengths, ring_at)
    new_lengths = lengths + 1
    pieces, attended = [], jnp.float32(0)
    if retrieval:
        out, attended = retrieval_decode(qkv, cache, new_lengths, layer, config, sparse,
                                         layer_indexer, backend)
        pieces.append((retrieval, out))
    if local:
        pieces += local_decode(qkv, cache, new_lengths, layer, config, sparse, backend,
                               dense_decode)
        span = sparse.sink_tokens + sparse.window
        attended += len(local) * jnp.sum(jnp.minimum(new_lengths, span)).astype(jnp.float32)
    causal = len(retrieval + local) * jnp.sum(new_lengths).astype(jnp.float32)
    return merge_heads(pieces, config.num_heads), cache, jnp.stack([attended, causal])


def group_union(own: jax.Array, per_head: np.ndarray, num_groups: int) -> jax.Array:
    """Block masks [b, R, ..., nk] of each retrieval head -> their union per full KV group
    [b, F, ..., nk] (the set decode attends); per_head[r]: the group of head r among F."""
    member = jnp.asarray(per_head[None, :] == np.arange(num_groups)[:, None])  # [F, R]
    member = member.reshape(member.shape + (1,) * (own.ndim - 2))
    return jnp.any(own[:, None] & member[None], axis=2)


def retrieval_train(qkv: QKV, lengths: jax.Array, layer: int, config: ModelConfig,
                    sparse: SparseConfig, layer_indexer: dict[str, jax.Array]) -> jax.Array:
    """The retrieval heads over a whole right-padded sequence, every position attending as
    decode would there: its own top-p blocks by the (frozen) pre-RoPE indexer over the keys up
    to it, unioned over its KV group's retrieval heads. What stage 2 trains the model against:
    differentiable in q, k, v (the selection is not), memory bounded by a chunk of queries in
    both passes (`train_attention.chunked_attention`). Returns [b, t, len(R), d]."""
    if sparse.scorer != "indexer":
        raise ValueError("training-mode retrieval attention needs the 'indexer' scorer, got "
                         f"{sparse.scorer!r}")
    gs = config.group_size
    retrieval, full = sparse.retrieval_heads(layer), sparse.full_groups(layer)
    heads = np.asarray(retrieval, np.int32)
    q = take_heads(qkv.q, heads)
    k, v = head_keys(qkv.k, retrieval, gs), head_keys(qkv.v, retrieval, gs)
    t = q.shape[1]
    chunk = min(TRAIN_Q_CHUNK, t)
    q_pre = take_heads(qkv.q_pre, heads)
    q_pre = jnp.pad(q_pre, ((0, 0), (0, -(-t // chunk) * chunk - t), (0, 0), (0, 0)))
    ki = indexer_keys(head_keys(qkv.k_pre, retrieval, gs), layer_indexer["wk"])
    args = jax.lax.stop_gradient((q_pre, ki, lengths, layer_indexer))
    mask_fn = functools.partial(
        _retrieval_mask, kv_len=t, sparse=sparse,
        per_head=tuple(full.index(h // gs) for h in retrieval), num_full=len(full))
    return chunked_attention(q, k, v, args, mask_fn, config.head_dim**-0.5, chunk)


def _retrieval_mask(args: tuple[Any, ...], start: jax.Array, size: int, *, kv_len: int,
                    sparse: SparseConfig, per_head: tuple[int, ...], num_full: int
                    ) -> jax.Array:
    """Which keys retrieval query rows start .. start + size - 1 attend: their KV group's union
    of per-token top-p block sets, causal, within the row's length: [b, R, size, kv_len]."""
    q_pre, ki, lengths, layer_indexer = args
    b = lengths.shape[0]
    rows_pre = jax.lax.dynamic_slice_in_dim(q_pre, start, size, axis=1)
    indices, counts = select_per_token(rows_pre, ki, jnp.full((b,), start), lengths, sparse,
                                       layer_indexer)
    own = blocks_to_mask(indices, counts, -(-kv_len // sparse.block_k))  # [b, R, size, nk]
    index = np.asarray(per_head, np.int32)
    blocks = group_union(own, index, num_full)[:, index]
    chosen = jnp.take(blocks, jnp.arange(kv_len) // sparse.block_k, axis=-1)
    return chosen & window_mask(lengths, start, size, kv_len, window=None)


def layer_train(qkv: QKV, lengths: jax.Array, layer: int, config: ModelConfig,
                sparse: SparseConfig, layer_indexer: dict[str, jax.Array]) -> jax.Array:
    """One layer as stage 2's student sees it: retrieval heads decode-style at every position
    (`retrieval_train`), local heads on sinks + window; memory-bounded in both passes. Out
    like q."""
    retrieval, local = sparse.retrieval_heads(layer), sparse.local_heads(layer)
    pieces = []
    if retrieval:
        pieces.append((retrieval, retrieval_train(qkv, lengths, layer, config, sparse,
                                                  layer_indexer)))
    if local:
        pieces.append((local, causal_attention(
            *_local_heads_qkv(qkv, local, config.group_size), lengths, window=sparse.window,
            sink_tokens=sparse.sink_tokens)))
    return merge_heads(pieces, config.num_heads)

"""KV cache layout and the writes that prefill and decode make into it.

A cache is a dict:
  layers:  one dict per layer, heads split once by their role (`layer_part_shapes`):
           design "indexer" (and a dense model):
             k, v    [batch, max_len, dense_groups, head_dim]   retrieval (dense) KV heads
             ks, vs  [batch, max_len, sparse_groups, head_dim]  sparse KV heads
             ki      [batch, max_len, sparse_groups, rank]      their indexer keys
           design "paper":
             k, v    [batch, max_len, full_groups, head_dim]    groups with a retrieval head
             kw, vw  [batch, ring, window_groups, head_dim]     all-local groups: a ring buffer
             ki      [batch, max_len, retrieval_heads, rank]    pre-RoPE indexer keys, per head
           (a part is absent when its group count is zero; a dense model has only k, v)
  lengths: [batch] int32, how many positions of each row are filled

Rows are right-padded: row b's tokens sit at positions 0 .. lengths[b]-1, so a decode step writes
row b's new token at lengths[b]. Sparse heads of the indexer design keep their full KV too (any
block may be selected at any step); what they save is reading it. The paper design's all-local
groups keep only what their heads can ever see again: the first `sink_tokens` positions and the
last `window` ones. Position p lives in ring slot p while p < sink_tokens, else in slot
sink_tokens + (p - sink_tokens) % window, so the ring always holds the sinks and the newest
`window` positions, and its filled slots are a prefix (`ring_filled`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.config import ModelConfig, SparseConfig

Cache = dict[str, Any]
# Parts of a layer cache indexed by absolute position; every other part is a ring buffer.
POSITIONAL_PARTS = ("k", "v", "ks", "vs", "ki")
RING_PARTS = ("kw", "vw")


def layer_groups(config: ModelConfig, sparse: SparseConfig | None, layer: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dense KV groups, sparse KV groups) of a layer of the indexer design; a dense model has
    no sparse groups."""
    if sparse is None:
        return tuple(range(config.num_kv_heads)), ()
    return sparse.retrieval_groups(layer), sparse.sparse_groups(layer)


def ring_size(sparse: SparseConfig, max_len: int) -> int:
    """Slots of an all-local group's ring: sinks + window, or max_len if that is smaller (then
    the ring never wraps)."""
    return min(max_len, sparse.sink_tokens + sparse.window)


def ring_slots(positions: jax.Array, sparse: SparseConfig, size: int) -> jax.Array:
    """The ring slot of each absolute position (see the module docstring)."""
    period = max(size - sparse.sink_tokens, 1)
    wrapped = sparse.sink_tokens + (positions - sparse.sink_tokens) % period
    return jnp.where(positions < sparse.sink_tokens, positions, wrapped)


def ring_filled(lengths: jax.Array, size: int) -> jax.Array:
    """Filled slots of a ring after `lengths` positions: [batch]."""
    return jnp.minimum(lengths, size)


def ring_positions(filled: jax.Array, sparse: SparseConfig, size: int
                   ) -> tuple[jax.Array, jax.Array]:
    """What a ring holds once positions 0 .. filled[b]-1 were written: (the absolute position in
    each slot [batch, size], whether the slot holds one [batch, size]).

    Slot j holds the newest position p < filled[b] whose slot is j.
    """
    sink = sparse.sink_tokens
    period = max(size - sink, 1)
    slot = jnp.arange(size)
    offset = slot - sink  # within the window part
    # Newest p = sink + offset + period * n with p < filled: n = (filled - 1 - sink - offset)
    # // period, valid when that is >= 0.
    n = (filled[:, None] - 1 - sink - offset[None]) // period
    windowed = sink + offset[None] + period * jnp.maximum(n, 0)
    pos = jnp.where(slot[None] < sink, slot[None], windowed)
    valid = jnp.where(slot[None] < sink, slot[None] < filled[:, None], n >= 0)
    return pos, valid


def ring_take(x: jax.Array, filled: jax.Array, sparse: SparseConfig, size: int,
              start: int | jax.Array = 0) -> tuple[jax.Array, jax.Array]:
    """What x ([batch, seq, groups, dim], positions start .. start+seq-1) holds of a ring once
    positions 0 .. filled[b]-1 were written: (whether each slot's position lies in x [batch,
    size], x at that position [batch, size, groups, dim], garbage where it does not)."""
    pos, valid = ring_positions(filled, sparse, size)
    from_x = valid & (pos >= start) & (pos < start + x.shape[1])
    at = jnp.clip(pos - start, 0, x.shape[1] - 1)
    return from_x, jnp.take_along_axis(x, at[:, :, None, None], axis=1)


def ring_from_prefill(x: jax.Array, lengths: jax.Array, sparse: SparseConfig, size: int,
                      start: int | jax.Array = 0, ring: jax.Array | None = None) -> jax.Array:
    """The ring after writing x: [batch, seq, groups, dim], positions start .. start+seq-1, rows
    valid up to lengths[b], into `ring` ([batch, size, groups, dim] holding positions
    0 .. start-1; None: an empty ring, for a whole prompt from start 0) -> [batch, size, groups,
    dim] (unfilled slots zero).

    Slot j holds the newest position p < min(lengths[b], start + seq) whose slot is j: from x
    when p >= start, else as `ring` holds it. A gather rather than a scatter of x: a chunk
    longer than the window maps several positions to one slot, and only the newest may land.
    """
    from_x, taken = ring_take(x, jnp.minimum(lengths, start + x.shape[1]), sparse, size, start)
    # Slots not taken from x hold what `ring` holds there: a position before start, or nothing
    # yet (zero, as `ring` itself has it).
    old = jnp.zeros_like(taken) if ring is None else ring.astype(taken.dtype)
    return jnp.where(from_x[:, :, None, None], taken, old)


def layer_part_shapes(config: ModelConfig, sparse: SparseConfig | None, layer: int, batch: int,
                      max_len: int) -> dict[str, tuple[int, ...]]:
    """The shape of every part of one layer's cache: the one declaration that both allocation
    (`empty_cache`) and byte counts (`kv_cache_bytes`) derive from."""
    d = config.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if sparse is not None and sparse.design == "paper":
        full, window = sparse.full_groups(layer), sparse.window_groups(layer)
        if full:
            shapes.update(k=(batch, max_len, len(full), d), v=(batch, max_len, len(full), d))
        if window:
            ring = ring_size(sparse, max_len)
            shapes.update(kw=(batch, ring, len(window), d), vw=(batch, ring, len(window), d))
        heads = sparse.retrieval_heads(layer)
        if heads and sparse.scorer == "indexer":
            shapes["ki"] = (batch, max_len, len(heads), sparse.rank)
        return shapes
    dense, sparse_groups = layer_groups(config, sparse, layer)
    if dense:
        shapes.update(k=(batch, max_len, len(dense), d), v=(batch, max_len, len(dense), d))
    if sparse_groups:
        shapes.update(ks=(batch, max_len, len(sparse_groups), d),
                      vs=(batch, max_len, len(sparse_groups), d))
        if sparse.scorer == "indexer":
            shapes["ki"] = (batch, max_len, len(sparse_groups), sparse.rank)
    return shapes


def empty_cache(
    config: ModelConfig, batch: int, max_len: int, dtype: Any, sparse: SparseConfig | None = None
) -> Cache:
    """A zeroed cache for `batch` rows of up to `max_len` positions."""
    layers = [{name: jnp.zeros(shape, dtype) for name, shape in
               layer_part_shapes(config, sparse, layer, batch, max_len).items()}
              for layer in range(config.num_layers)]
    return {"layers": layers, "lengths": jnp.zeros((batch,), jnp.int32)}


def kv_cache_bytes(config: ModelConfig, sparse: SparseConfig | None, batch: int, max_len: int,
                   dtype: Any) -> dict[str, int]:
    """Bytes of a cache of `max_len` positions, without allocating it: {"kv": keys and values,
    "indexer": indexer keys, "total"}."""
    itemsize = np.dtype(dtype).itemsize
    kv = indexer = 0
    for layer in range(config.num_layers):
        for name, shape in layer_part_shapes(config, sparse, layer, batch, max_len).items():
            size = int(np.prod(shape)) * itemsize
            if name == "ki":
                indexer += size
            else:
                kv += size
    return {"kv": kv, "indexer": indexer, "total": kv + indexer}


def write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes new[b] into buffer[b, starts[b] : starts[b] + new.shape[1]] for every row b;
    positions past the buffer's end are dropped.

    buffer: [batch, max_len, ...]; new: [batch, seq, ...]; starts: [batch] int32 (>= 0).
    One scatter, one position per index (what a per-row dynamic_update_slice lowers to anyway):
    a decode step's writes, each row at its own length.
    """
    rows = jnp.arange(new.shape[0])[:, None]
    positions = starts[:, None] + jnp.arange(new.shape[1])
    return buffer.at[rows, positions].set(new.astype(buffer.dtype), mode="drop",
                                          indices_are_sorted=True, unique_indices=True)


def write_at(buffer: jax.Array, new: jax.Array, start: int | jax.Array) -> jax.Array:
    """Writes new into buffer[:, start : start + seq] for every row: a prompt or one chunk of
    it. A dynamic_update_slice, which XLA does in place where `write_rows`'s scatter into a
    freshly zeroed cache keeps a second copy of it. start + seq must not pass the buffer's end
    (the slice would be shifted back, not cut).

    buffer: [batch, max_len, ...]; new: [batch, seq, ...]; start: int32 scalar.
    """
    return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), start, axis=1)


def write_parts_at(layer_cache: dict[str, jax.Array], parts: dict[str, jax.Array],
                   start: int | jax.Array) -> dict[str, jax.Array]:
    """`write_at` for every part of a layer's cache (a prompt's ring parts come whole, at 0)."""
    return {name: write_at(buffer, parts[name], start) for name, buffer in layer_cache.items()}


def write_parts(layer_cache: dict[str, jax.Array], parts: dict[str, jax.Array],
                starts: jax.Array, ring_starts: jax.Array | None = None) -> dict[str, jax.Array]:
    """Writes every part ([batch, seq, ...]) at per-row offsets: positional parts at `starts`,
    ring parts at `ring_starts` (their slots; needed only when the cache has ring parts)."""
    out = {}
    for name, buffer in layer_cache.items():
        at = ring_starts if name in RING_PARTS else starts
        out[name] = write_rows(buffer, parts[name], at)
    return out

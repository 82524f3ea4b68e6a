"""KV cache layout and the writes that prefill and decode make into it.

A cache is a dict:
  layers:  one dict per layer, heads split once by their role:
             k, v    [batch, max_len, dense_groups, head_dim]   retrieval (dense) KV heads
             ks, vs  [batch, max_len, sparse_groups, head_dim]  sparse KV heads
             ki      [batch, max_len, sparse_groups, rank]      their indexer keys
           (a part is absent when its group count is zero; a dense model has only k, v)
  lengths: [batch] int32, how many positions of each row are filled

Rows are right-padded: row b's tokens sit at positions 0 .. lengths[b]-1, so a decode step writes
row b's new token at lengths[b]. Sparse heads keep their full KV too (any block may be selected
at any step); what they save is reading it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rtpurbo_jax.config import ModelConfig, SparseConfig

Cache = dict[str, Any]


def layer_groups(config: ModelConfig, sparse: SparseConfig | None, layer: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dense KV groups, sparse KV groups) of a layer; a dense model has no sparse groups."""
    if sparse is None:
        return tuple(range(config.num_kv_heads)), ()
    return sparse.retrieval_groups(layer), sparse.sparse_groups(layer)


def empty_cache(
    config: ModelConfig, batch: int, max_len: int, dtype: Any, sparse: SparseConfig | None = None
) -> Cache:
    """A zeroed cache for `batch` rows of up to `max_len` positions."""
    layers = []
    for layer in range(config.num_layers):
        dense, sparse_groups = layer_groups(config, sparse, layer)
        parts: dict[str, jax.Array] = {}
        if dense:
            shape = (batch, max_len, len(dense), config.head_dim)
            parts.update(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
        if sparse_groups:
            shape = (batch, max_len, len(sparse_groups), config.head_dim)
            parts.update(ks=jnp.zeros(shape, dtype), vs=jnp.zeros(shape, dtype))
            if sparse.scorer == "indexer":
                parts["ki"] = jnp.zeros((batch, max_len, len(sparse_groups), sparse.rank), dtype)
        layers.append(parts)
    return {"layers": layers, "lengths": jnp.zeros((batch,), jnp.int32)}


def write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes new[b] into buffer[b, starts[b] : starts[b] + new.shape[1]] for every row b.

    buffer: [batch, max_len, ...]; new: [batch, seq, ...]; starts: [batch] int32.
    """

    def one(row: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
        index = (start,) + (0,) * (row.ndim - 1)
        return jax.lax.dynamic_update_slice(row, update.astype(row.dtype), index)

    return jax.vmap(one)(buffer, new, starts)


def write_parts(layer_cache: dict[str, jax.Array], parts: dict[str, jax.Array],
                starts: jax.Array) -> dict[str, jax.Array]:
    """Writes every part (k, v, ks, vs, ki: [batch, seq, ...]) at per-row offsets."""
    return {name: write_rows(layer_cache[name], parts[name], starts) for name in layer_cache}

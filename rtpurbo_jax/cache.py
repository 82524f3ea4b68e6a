"""KV cache layout and the writes that prefill and decode make into it.

A cache is a dict:
  layers:  one dict per layer: k, v [batch, max_len, kv_heads, head_dim], plus for layers with
           sparse groups the indexer keys ki [batch, max_len, sparse_groups, rank]
  lengths: [batch] int32, how many positions of each row are filled

Rows are right-padded: row b's tokens sit at positions 0 .. lengths[b]-1, so a decode step writes
row b's new token at lengths[b]. Every KV head keeps its full cache: sparse heads may select any
block at any step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Cache = dict[str, Any]


def empty_cache(
    batch: int,
    max_len: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype,
    indexer_shapes: list[tuple[int, int] | None] | None = None,
) -> Cache:
    """A zeroed cache. indexer_shapes[i] = (sparse_groups, rank) for layer i, or None."""
    kv_shape = (batch, max_len, num_kv_heads, head_dim)
    layers = []
    for i in range(num_layers):
        layer = {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype)}
        shape = indexer_shapes[i] if indexer_shapes else None
        if shape is not None:
            layer["ki"] = jnp.zeros((batch, max_len, *shape), dtype)
        layers.append(layer)
    return {"layers": layers, "lengths": jnp.zeros((batch,), jnp.int32)}


def write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes new[b] into buffer[b, starts[b] : starts[b] + new.shape[1]] for every row b.

    buffer: [batch, max_len, ...]; new: [batch, seq, ...]; starts: [batch] int32.
    """

    def one(row: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
        index = (start,) + (0,) * (row.ndim - 1)
        return jax.lax.dynamic_update_slice(row, update.astype(row.dtype), index)

    return jax.vmap(one)(buffer, new, starts)

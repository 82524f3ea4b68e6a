"""Attention of one layer, routed per KV head, for a whole sequence (prefill) or one step (decode).

The model calls attention only through `prefill_attention` and `decode_attention`; `backend`
picks the implementation: "reference" (pure jnp, any device), "pallas" (the kernels), or "auto"
(the fastest available on this device).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rtpurbo_jax.cache import write_rows
from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.dense import cudnn_supported, dense_attention_cudnn, dense_attention_reference
from rtpurbo_jax.model import AttendFn

BACKENDS = ("reference", "pallas", "auto")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _use_cudnn(q: jax.Array, backend: str) -> bool:
    return backend != "reference" and cudnn_supported(q)


def dense_prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    backend: str,
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal attention of a right-padded batch over itself.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; lengths: [batch].
    """
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    if _use_cudnn(q, backend):
        return dense_attention_cudnn(q, k, v, positions, lengths, causal_from_zero=True,
                                     sliding_window=sliding_window)
    return dense_attention_reference(q, k, v, positions, lengths, sliding_window=sliding_window)


def dense_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    backend: str,
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


def prefill_attend(config: ModelConfig, lengths: jax.Array, backend: str) -> AttendFn:
    """An `attend` for a right-padded prompt starting at position 0.

    The layer state is the layer's cache dict (k and v are written at positions 0 .. seq-1), or
    None for a forward pass without a cache.
    """

    def attend(i: int, q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: Any):
        out = dense_prefill(q, k, v, lengths, backend=backend,
                            sliding_window=config.sliding_window)
        if layer_cache is not None:
            starts = jnp.zeros_like(lengths)
            layer_cache = {**layer_cache, "k": write_rows(layer_cache["k"], k, starts),
                           "v": write_rows(layer_cache["v"], v, starts)}
        return out, layer_cache

    return attend


def decode_attend(config: ModelConfig, lengths: jax.Array, backend: str) -> AttendFn:
    """An `attend` for one new token per row, written at position lengths[b] of the cache.

    lengths: [batch], the filled positions before this step.
    """

    def attend(i: int, q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: Any):
        k_cache = write_rows(layer_cache["k"], k, lengths)
        v_cache = write_rows(layer_cache["v"], v, lengths)
        out = dense_decode(q, k_cache, v_cache, lengths + 1, backend=backend,
                           sliding_window=config.sliding_window)
        return out, {**layer_cache, "k": k_cache, "v": v_cache}

    return attend

"""Dense causal attention: the jnp reference, and cuDNN where the GPU can run it.

Both follow one mask convention, shared with the sparse kernels:
  q: [batch, q_len, heads, head_dim] at absolute positions q_positions [batch, q_len];
  k, v: [batch, kv_len, kv_heads, head_dim] at positions 0 .. kv_len-1 (the reference also
  takes explicit key positions: a ring buffer's slots followed by a prefill chunk);
  key j is visible to a query at position p iff j <= p and j < kv_lengths[b] (and, with a sliding
  window w, j > p - w or j < sink_tokens: the paper's local heads, sinks + window); a query with
  p >= kv_lengths[b] is padding and outputs 0.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp

# Queries per step of the reference: bounds its memory to [batch, heads, chunk, kv_len] scores.
REFERENCE_Q_CHUNK = 512


def _scale(head_dim: int, sm_scale: float | None) -> float:
    return head_dim**-0.5 if sm_scale is None else sm_scale


def visible_keys(
    q_positions: jax.Array, kv_len: int, kv_lengths: jax.Array, sliding_window: int | None,
    sink_tokens: int = 0, key_positions: jax.Array | None = None,
) -> jax.Array:
    """[batch, q_len, kv_len] bool: which keys each query may attend to.

    key_positions: [batch, kv_len] absolute position of each key (None: 0 .. kv_len-1); a key
    that holds nothing should carry a position past every query (it is then never visible).
    """
    kpos = (jnp.arange(kv_len)[None] if key_positions is None else key_positions)[:, None, :]
    qpos = q_positions[:, :, None]
    mask = (kpos <= qpos) & (kpos < kv_lengths[:, None, None])
    if sliding_window is not None:
        mask &= (kpos > qpos - sliding_window) | (kpos < sink_tokens)
    return mask


def masked_softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, sm_scale: float
) -> jax.Array:
    """Exact attention under an explicit mask, float32 softmax; rows with no key output 0.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    mask: [batch, kv_heads or 1, q_len, kv_len] bool (per KV group, or shared). Output like q.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores * sm_scale, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def dense_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    sliding_window: int | None = None,
    sink_tokens: int = 0,
    sm_scale: float | None = None,
    key_positions: jax.Array | None = None,
) -> jax.Array:
    """Dense attention in chunks of queries (see the module docstring for the mask; see
    `visible_keys` for key_positions)."""
    b, t, h, d = q.shape
    scale = _scale(d, sm_scale)
    chunk = min(t, REFERENCE_Q_CHUNK)
    num_chunks = -(-t // chunk)
    pad = num_chunks * chunk - t
    # Padded queries get a position past every length, so they come out as zeros.
    big = jnp.iinfo(jnp.int32).max
    q_pad = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    pos_pad = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=big)

    def one_chunk(i: jax.Array) -> jax.Array:
        qc = jax.lax.dynamic_slice_in_dim(q_pad, i * chunk, chunk, axis=1)
        pc = jax.lax.dynamic_slice_in_dim(pos_pad, i * chunk, chunk, axis=1)
        mask = visible_keys(pc, k.shape[1], kv_lengths, sliding_window, sink_tokens,
                            key_positions)
        mask &= (pc < kv_lengths[:, None])[:, :, None]
        return masked_softmax_attention(qc, k, v, mask[:, None], scale)

    out = jax.lax.map(one_chunk, jnp.arange(num_chunks))  # [chunks, b, chunk, h, d]
    return jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * chunk, h, d)[:, :t]


def cudnn_supported(q: jax.Array) -> bool:
    """cuDNN's fused attention runs on NVIDIA GPUs in half precision only."""
    return q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu"


def dense_attention_cudnn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    causal_from_zero: bool,
    sliding_window: int | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """cuDNN attention for the two shapes the model uses.

    causal_from_zero=True: prefill, queries at positions 0 .. q_len-1 over the same keys.
    causal_from_zero=False: one query per row at position kv_lengths[b]-1 (decode): every valid
    key is visible, so no causal mask is needed.
    """
    scale = _scale(q.shape[-1], sm_scale)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal_from_zero,
        # From zero, a valid query's causal keys are all valid, so the plain causal mask is
        # exact for right-padded rows (and faster than cuDNN's padding mask); padded queries
        # are zeroed below.
        key_value_seq_lengths=None if causal_from_zero else kv_lengths,
        local_window_size=window,
        implementation="cudnn",
    )
    return _zero_padding(out, q_positions, kv_lengths)


def _zero_padding(out: jax.Array, q_positions: jax.Array, kv_lengths: jax.Array) -> jax.Array:
    valid = q_positions < kv_lengths[:, None]
    return jnp.where(valid[:, :, None, None], out, jnp.zeros_like(out))


@functools.cache
def _cudnn_with_log_sum_exp() -> Any:
    """jax's cuDNN attention module when its entry point returns the softmax's log-sum-exp
    and takes a sliding window (not public API), else None."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError:
        return None
    params = inspect.signature(fused.dot_product_attention).parameters
    needed = {"return_residual", "sliding_window_length", "mask_type"}
    return fused if needed <= set(params) and hasattr(fused, "MaskType") else None


def cudnn_local_supported(q: jax.Array) -> bool:
    """Whether sinks + window attention of q can run as cuDNN's window plus merged sinks."""
    return (cudnn_supported(q) and q.shape[-1] % 8 == 0
            and _cudnn_with_log_sum_exp() is not None)


def merge_sinks(out_window: jax.Array, lse_window: jax.Array, q: jax.Array, k_sinks: jax.Array,
                v_sinks: jax.Array, window: int, sm_scale: float) -> jax.Array:
    """Adds the sink keys a sliding window does not hold to the window's attention.

    out_window: [b, t, h, d], attention of queries at positions 0 .. t-1 over the keys in their
    window (p - window, p]; lse_window: [b, t, h] float32, the log-sum-exp of those scaled
    scores. k_sinks, v_sinks: [b, s, kv_heads, d], the keys at positions 0 .. s-1. Sink j is
    added for the queries at p >= j + window (the others hold it in their window already).
    Returns the attention over window and sinks, like out_window.
    """
    b, t, h, d = q.shape
    s, hkv = k_sinks.shape[1], k_sinks.shape[2]
    g = h // hkv
    f32 = jnp.float32
    # Products and sums over the few sinks instead of matmuls: XLA fuses them into one pass over
    # q (the scores) and one over the window's output (the merge), with nothing of q's size
    # materialised between.
    k_s = jnp.swapaxes(k_sinks, 1, 2)[:, None, :, None].astype(f32)  # [b, 1, hkv, 1, s, d]
    qg = q.reshape(b, t, hkv, g, 1, d).astype(f32)
    scores = jnp.sum(qg * k_s, axis=-1) * sm_scale  # [b, t, hkv, g, s]
    outside = jnp.arange(s)[None, :] + window <= jnp.arange(t)[:, None]  # [t, s]
    scores = jnp.where(outside[None, :, None, None], scores, -jnp.inf)
    lse = lse_window.reshape(b, t, hkv, g)
    top = jnp.maximum(lse, jnp.max(scores, axis=-1))  # finite: the window is never empty
    w_window = jnp.exp(lse - top)
    p_sinks = jnp.exp(scores - top[..., None])
    out = out_window.reshape(b, t, hkv, g, d).astype(f32) * w_window[..., None]
    for j in range(s):
        out = out + p_sinks[..., j, None] * v_sinks[:, j][:, None, :, None].astype(f32)
    out = out / (w_window + jnp.sum(p_sinks, axis=-1))[..., None]
    return out.reshape(b, t, h, d).astype(out_window.dtype)


def local_attention_cudnn(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, sink_tokens: int,
    window: int, sm_scale: float | None = None,
) -> jax.Array:
    """Sinks + sliding window attention of a right-padded prompt from position 0 (the local
    heads' prefill): cuDNN's causal window, which returns its log-sum-exp, and the sinks outside
    the window merged in (`merge_sinks`). Shapes as `dense_attention_reference`; padded
    queries output 0. Needs `cudnn_local_supported(q)`."""
    fused = _cudnn_with_log_sum_exp()
    scale = _scale(q.shape[-1], sm_scale)
    # The module's own entry point: jax.nn.dot_product_attention casts the log-sum-exp to
    # the output's dtype, too coarse in bf16 to weigh the sinks against the window.
    out, lse = fused.dot_product_attention(
        q, k, v, scale=scale, mask_type=fused.MaskType.CAUSAL, sliding_window_length=window,
        return_residual=True)[:2]
    lse = jnp.swapaxes(lse, 1, 2)  # cuDNN's [b, heads, t] -> [b, t, heads]
    if sink_tokens:
        s = min(sink_tokens, k.shape[1])
        # A sink past a row's length is never merged; zeroed, padding's values can't leak.
        held = (jnp.arange(s)[None, :] < lengths[:, None])[:, :, None, None]
        k_s, v_s = (jnp.where(held, x[:, :s], jnp.zeros_like(x[:, :s])) for x in (k, v))
        out = merge_sinks(out, lse, q, k_s, v_s, window, scale)
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return _zero_padding(out, positions, lengths)

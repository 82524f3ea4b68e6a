"""Attention for training (stage 2's student): exact masked attention with a custom VJP whose
backward pass recomputes the probabilities a chunk of queries at a time (flash-attention
style, in jnp).

Autodiff of a chunked jnp attention keeps every chunk's probabilities, and every mask that
depends only on non-differentiated inputs (lengths, selections) is kept as well, even under
jax.checkpoint: [batch, heads, seq, seq] per layer, 350 GiB for the 135M default model at 8K.
Here the residuals are q, k, v, the output and the row log-sum-exps; masks are rebuilt from
`mask_args` by `mask_fn` in both passes.

Shapes (GQA as in `dense.masked_softmax_attention`): q [batch, q_len, heads, head_dim]; k, v
[batch, kv_len, kv_heads, head_dim]; mask_fn(mask_args, start, size) -> bool [batch, kv_heads or
1, size, kv_len] for query rows start .. start + size - 1 (rows past q_len are padding: any
value). A row with no visible key outputs 0 and gets zero gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rtpurbo_jax.dense import visible_keys

MaskFn = Callable[[Any, jax.Array, int], jax.Array]
# Query rows per step of both passes: memory [batch, heads, TRAIN_CHUNK, kv_len] float32.
TRAIN_CHUNK = 256


def _grouped(x: jax.Array, kv_heads: int) -> jax.Array:
    """[b, n, h, d] -> [b, n, kv_heads, h // kv_heads, d]."""
    b, n, h, d = x.shape
    return x.reshape(b, n, kv_heads, h // kv_heads, d)


def _scores(qc: jax.Array, k: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """qc [b, c, hk, g, d], k [b, s, hk, d], mask [b, hk|1, c, s] -> masked scores [b, hk, g,
    c, s] float32 (-inf where masked)."""
    s = jnp.einsum("bckgd,bskd->bkgcs", qc, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, :, None], s, -jnp.inf)


def _finite(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _forward(q, k, v, mask_args, mask_fn, scale, chunk):
    b, t, h, d = q.shape
    hk = k.shape[2]
    steps = -(-t // chunk)
    qg = _grouped(jnp.pad(q, ((0, 0), (0, steps * chunk - t), (0, 0), (0, 0))), hk)

    def one(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        qc = jax.lax.dynamic_slice_in_dim(qg, c * chunk, chunk, axis=1)
        s = _scores(qc, k, mask_fn(mask_args, c * chunk, chunk), scale)
        top = _finite(jnp.max(s, axis=-1, keepdims=True))
        e = jnp.exp(s - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        p = e / jnp.where(total > 0, total, 1.0)
        out = jnp.einsum("bkgcs,bskd->bckgd", p, v.astype(jnp.float32))
        return out, (top + jnp.log(total))[..., 0]  # log-sum-exp, -inf for empty rows

    out, lse = jax.lax.map(one, jnp.arange(steps))  # [steps, b, c, hk, g, d], [steps, b, hk, g, c]
    out = jnp.moveaxis(out, 0, 1).reshape(b, steps * chunk, h, d)[:, :t].astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_args: Any,
                      mask_fn: MaskFn, scale: float, chunk: int = TRAIN_CHUNK) -> jax.Array:
    """Exact masked attention (see the module docstring), out like q; differentiable in q, k,
    v (mask_args get no gradient)."""
    return _forward(q, k, v, mask_args, mask_fn, scale, chunk)[0]


def _fwd(q, k, v, mask_args, mask_fn, scale, chunk):
    out, lse = _forward(q, k, v, mask_args, mask_fn, scale, chunk)
    return out, (q, k, v, mask_args, out, lse)


def _bwd(mask_fn, scale, chunk, residuals, dout):
    q, k, v, mask_args, out, lse = residuals
    b, t, h, d = q.shape
    hk = k.shape[2]
    steps = -(-t // chunk)
    pad = ((0, 0), (0, steps * chunk - t), (0, 0), (0, 0))
    qg, dog = (_grouped(jnp.pad(x, pad), hk) for x in (q, dout))
    # delta_i = sum_j p_ij dp_ij = dout_i . out_i (the softmax backward's row term).
    delta = _grouped(jnp.pad(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32),
                                     axis=-1, keepdims=True), pad), hk)[..., 0]
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    def one(carry, c):
        dk, dv = carry
        qc, doc, dc = (jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)
                       for x in (qg, dog, delta))
        s = _scores(qc, k, mask_fn(mask_args, c * chunk, chunk), scale)
        row_lse = lse[c][..., None]
        p = jnp.where(jnp.isfinite(row_lse), jnp.exp(s - _finite(row_lse)), 0.0)
        doc = doc.astype(jnp.float32)
        dv = dv + jnp.einsum("bkgcs,bckgd->bskd", p, doc)
        dp = jnp.einsum("bckgd,bskd->bkgcs", doc, vf)
        ds = p * (dp - jnp.moveaxis(dc, 1, -1)[..., None])
        dq = jnp.einsum("bkgcs,bskd->bckgd", ds, kf) * scale
        dk = dk + jnp.einsum("bkgcs,bckgd->bskd", ds, qc.astype(jnp.float32)) * scale
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), jnp.arange(steps))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, steps * chunk, h, d)[:, :t]
    no_grad = jax.tree.map(lambda x: None, mask_args)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad


chunked_attention.defvjp(_fwd, _bwd)


def window_mask(lengths: jax.Array, start: jax.Array, size: int, kv_len: int, *,
                window: int | None, sink_tokens: int = 0) -> jax.Array:
    """Causal (and, with a window, sinks + window) visibility of query rows start .. start +
    size - 1 of right-padded rows from position 0: [b, 1, size, kv_len]."""
    rows = jnp.broadcast_to(start + jnp.arange(size), (lengths.shape[0], size))
    mask = visible_keys(rows, kv_len, lengths, window, sink_tokens)
    return (mask & (rows < lengths[:, None])[:, :, None])[:, None]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                     window: int | None = None, sink_tokens: int = 0) -> jax.Array:
    """Training attention of right-padded rows from position 0: causal, or sinks + window."""
    mask_fn = functools.partial(window_mask, kv_len=k.shape[1], window=window,
                                sink_tokens=sink_tokens)
    return chunked_attention(q, k, v, lengths, mask_fn, q.shape[-1] ** -0.5,
                             min(TRAIN_CHUNK, q.shape[1]))


def block_list_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                         blocks: jax.Array, *, block_q: int, block_k: int) -> jax.Array:
    """Training attention through per-query-block key-block selections (the indexer design's
    prefill): blocks [b, kv_heads, num_q_blocks, num_k_blocks] bool, on top of causality."""
    mask_fn = functools.partial(_block_mask_fn, kv_len=k.shape[1], block_q=block_q,
                                block_k=block_k)
    chunk = min(TRAIN_CHUNK, q.shape[1])
    chunk = max(block_q, chunk - chunk % block_q)  # whole query blocks per chunk
    return chunked_attention(q, k, v, (lengths, blocks), mask_fn, q.shape[-1] ** -0.5, chunk)


def _block_mask_fn(args: tuple[jax.Array, jax.Array], start: jax.Array, size: int, *,
                   kv_len: int, block_q: int, block_k: int) -> jax.Array:
    lengths, blocks = args
    rows = start + jnp.arange(size)
    q_block = jnp.minimum(rows // block_q, blocks.shape[2] - 1)
    chosen = jnp.take(jnp.take(blocks, q_block, axis=2), jnp.arange(kv_len) // block_k,
                      axis=3)  # [b, g, size, kv_len]
    return chosen & window_mask(lengths, start, size, kv_len, window=None)

"""Training attention (custom VJP, chunked backward) equals masked attention by autodiff, in
value and gradient: causal, sinks + window, block lists; ragged and empty rows, GQA, bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax import train_attention as ta
from rtpurbo_jax.dense import masked_softmax_attention

B, T, H, HK, D = 2, 45, 4, 2, 8  # T not a multiple of the chunks tried
LENGTHS = jnp.asarray([45, 17], jnp.int32)


def _inputs(dtype, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = 2.0 * jax.random.normal(kq, (B, T, H, D))
    k = 2.0 * jax.random.normal(kk, (B, T, HK, D))
    v = jax.random.normal(kv, (B, T, HK, D))
    dout = jax.random.normal(kd, (B, T, H, D))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), dout.astype(dtype)


def _check(fn, mask, dtype, rtol):
    """fn(q, k, v) against masked_softmax_attention under the full mask [b, hk|1, T, T]."""
    q, k, v, dout = _inputs(dtype)

    def naive(q, k, v):
        return masked_softmax_attention(q, k, v, mask, D**-0.5)

    got, got_vjp = jax.vjp(fn, q, k, v)
    want, want_vjp = jax.vjp(naive, q, k, v)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=rtol, atol=rtol)
    for g, w in zip(got_vjp(dout), want_vjp(dout), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=rtol, atol=rtol)
    # Rows past a row's length see nothing: zero output and zero gradient.
    assert not np.any(np.asarray(got[1, 17:], np.float32))


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("window,sinks", [(None, 0), (6, 2)])
def test_causal_and_window(monkeypatch, chunk, window, sinks):
    monkeypatch.setattr(ta, "TRAIN_CHUNK", chunk)
    mask = ta.window_mask(LENGTHS, jnp.int32(0), T, T, window=window, sink_tokens=sinks)
    _check(lambda q, k, v: ta.causal_attention(q, k, v, LENGTHS, window=window,
                                               sink_tokens=sinks), mask, jnp.float32, 2e-5)


def test_bfloat16():
    mask = ta.window_mask(LENGTHS, jnp.int32(0), T, T, window=None)
    _check(lambda q, k, v: ta.causal_attention(q, k, v, LENGTHS), mask, jnp.bfloat16, 3e-2)


def test_block_lists(monkeypatch):
    monkeypatch.setattr(ta, "TRAIN_CHUNK", 16)
    block = 8
    nb = -(-T // block)
    blocks = jax.random.bernoulli(jax.random.key(5), 0.5, (B, HK, nb, nb))
    # One query block with nothing selected: a fully masked row group.
    blocks = blocks.at[0, 1, 2].set(False)
    dense = jnp.take(jnp.take(blocks, jnp.arange(T) // block, axis=2), jnp.arange(T) // block,
                     axis=3)
    mask = dense & ta.window_mask(LENGTHS, jnp.int32(0), T, T, window=None)
    _check(lambda q, k, v: ta.block_list_attention(q, k, v, LENGTHS, blocks, block_q=block,
                                                   block_k=block), mask, jnp.float32, 2e-5)

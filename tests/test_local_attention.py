"""Local attention (sinks + sliding window): lists vs brute force, reference vs a naive dense
softmax, kernel (interpret) vs reference, and the kernel's Triton lowering (CPU-side)."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.local_attention import (
    local_attention,
    local_attention_reference,
    window_block_lists,
)
from rtpurbo_jax.dense import merge_sinks

# Largest |kernel - reference| allowed, relative to max |reference|, per input dtype: float32
# differs only by summation order; bf16 rounds the probabilities before the P @ V product.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Reference vs the float64 naive softmax (both see the same float32 inputs).
NAIVE_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    batch: int
    seq: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int
    sink_tokens: int
    lengths: tuple[int, ...]
    dtype: type = jnp.float32
    block_q: int = 16
    block_k: int = 16


def case_id(c: Case) -> str:
    g = c.num_heads // c.num_kv_heads
    dt = "bf16" if c.dtype == jnp.bfloat16 else "f32"
    return f"T{c.seq}-G{g}-w{c.window}-s{c.sink_tokens}-b{c.block_q}x{c.block_k}-{dt}"


def make_inputs(case: Case):
    """Random q, k, v (fresh per case, fixed seed) with NaN past each row's length."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(case.seed), 3)
    q = jax.random.normal(kq, (case.batch, case.seq, case.num_heads, case.head_dim))
    kv_shape = (case.batch, case.seq, case.num_kv_heads, case.head_dim)
    k, v = jax.random.normal(kk, kv_shape), jax.random.normal(kv, kv_shape)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    # Poison the cache past each row's length: it must never leak into an output.
    past = jnp.arange(case.seq)[None, :, None, None] >= lengths[:, None, None, None]
    k, v = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
    return (*(x.astype(case.dtype) for x in (q, k, v)), lengths)


def naive_mask(seq: int, lengths, *, window: int, sink_tokens: int) -> np.ndarray:
    """[B, T, S] visibility, token by token, straight from the definition."""
    t = np.arange(seq)[:, None]
    s = np.arange(seq)[None, :]
    lens = np.asarray(lengths)[:, None, None]
    local = (s <= t) & ((s < sink_tokens) | (s > t - window))
    return local[None] & (s[None] < lens) & (t[None] < lens)


def naive_attention(q, k, v, mask) -> np.ndarray:
    """Full [T, T] masked softmax in float64 numpy; q [B, T, H, D], k, v [B, T, K, D]."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    k, v = np.nan_to_num(k), np.nan_to_num(v)  # masked anyway; keeps 0 * NaN out of the sums
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    m = mask[:, None]  # [B, 1, T, S]
    s = np.where(m, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    p = np.where(m, np.exp(s - np.where(np.isfinite(row_max), row_max, 0)), 0)
    denom = p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p / np.where(denom > 0, denom, 1), v)


def assert_close(out, ref, dtype) -> None:
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert not np.isnan(out).any()
    err = np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def assert_padding_rows_zero(out, lengths) -> None:
    past = np.arange(out.shape[1])[None, :] >= np.asarray(lengths)[:, None]  # [B, T]
    assert past.any()
    assert np.all(np.asarray(out)[past] == 0)


# ----------------------------------------------------------------------------------------------
# Block lists
# ----------------------------------------------------------------------------------------------

LIST_SIZES = [(1, 1), (37, 37), (100, 100), (128, 128), (70, 45), (40, 90)]  # (q_len, kv_len)
LIST_WINDOWS = [1, 5, 16, 33, 200]
LIST_SINKS = [0, 4, 17, 40]
LIST_BLOCKS = [(16, 16), (16, 32), (32, 16), (64, 16)]


@pytest.mark.parametrize("q_offset", [0, 37])  # 37: queries after a prefix of the keys
def test_window_block_lists_cover_exactly_the_visible_keys(q_offset):
    for (q_len, kv_len), window, sinks, (bq, bk) in itertools.product(
        LIST_SIZES, LIST_WINDOWS, LIST_SINKS, LIST_BLOCKS
    ):
        idx, cnt = window_block_lists(q_len, kv_len + q_offset, sink_tokens=sinks,
                                      window=window, block_q=bq, block_k=bk, q_offset=q_offset)
        kv_len += q_offset
        nq = -(-q_len // bq)
        assert idx.dtype == np.int32 and cnt.dtype == np.int32
        assert cnt.shape == (nq,) and idx.shape == (nq, max(int(cnt.max()), 1))
        t = q_offset + np.arange(q_len)[:, None]
        s = np.arange(kv_len)[None, :]
        visible = (s <= t) & ((s < sinks) | (s > t - window))  # [q_len, kv_len]
        for i in range(nq):
            rows = visible[i * bq:(i + 1) * bq].any(axis=0)  # keys any query of the block sees
            expected = np.unique(np.nonzero(rows)[0] // bk)
            listed = idx[i, :cnt[i]]
            np.testing.assert_array_equal(listed, expected, err_msg=f"{q_len=} {kv_len=} "
                                          f"{window=} {sinks=} {bq=} {bk=} block {i}")
            pad = listed[-1] if cnt[i] else 0
            assert np.all(idx[i, cnt[i]:] == pad)


# ----------------------------------------------------------------------------------------------
# Reference vs naive dense
# ----------------------------------------------------------------------------------------------

REFERENCE_CASES = [
    # Ragged rows, window not a multiple of anything, sinks; more than one query chunk.
    Case(1, 2, 300, 4, 2, 16, window=37, sink_tokens=4, lengths=(300, 163)),
    # G = 3; window 1 (each query sees itself and the sinks), sinks beyond one block.
    Case(2, 2, 50, 6, 2, 16, window=1, sink_tokens=20, lengths=(50, 31)),
    # G = 4; window == seq: plain causal attention; no sinks.
    Case(3, 1, 70, 8, 2, 16, window=70, sink_tokens=0, lengths=(60,)),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=case_id)
def test_reference_matches_naive_dense(case):
    q, k, v, lengths = make_inputs(case)
    ref = local_attention_reference(q, k, v, lengths, sink_tokens=case.sink_tokens,
                                    window=case.window)
    mask = naive_mask(case.seq, lengths, window=case.window, sink_tokens=case.sink_tokens)
    np.testing.assert_allclose(np.asarray(ref), naive_attention(q, k, v, mask),
                               rtol=NAIVE_TOLERANCE, atol=NAIVE_TOLERANCE)
    assert_padding_rows_zero(ref, lengths)


# ----------------------------------------------------------------------------------------------
# Kernel (interpret mode) vs reference
# ----------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # G = 1, a few sinks, window not a multiple of the block: 31 = 2 * 16 - 1 puts the first
    # key a tile's last row cannot see exactly at a block start (the unmasked-range boundary).
    Case(10, 2, 100, 2, 2, 32, window=31, sink_tokens=4, lengths=(100, 57)),
    # G = 2, bf16, no sinks, block_q > block_k, a window spanning unmasked blocks.
    Case(11, 2, 150, 4, 2, 32, window=70, sink_tokens=0, lengths=(150, 90),
         dtype=jnp.bfloat16, block_q=32, block_k=16),
    # G = 4, sinks > block_k, the longest sequence, window a multiple of the block.
    Case(12, 1, 300, 8, 2, 64, window=96, sink_tokens=40, lengths=(270,), block_q=32,
         block_k=32),
    # G = 3 (per-head loop in the kernel), bf16, block_q < block_k, a row of length 1.
    Case(13, 2, 130, 6, 2, 32, window=45, sink_tokens=4, lengths=(130, 1),
         dtype=jnp.bfloat16, block_k=32),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_kernel_matches_reference(case):
    q, k, v, lengths = make_inputs(case)
    kw = dict(sink_tokens=case.sink_tokens, window=case.window)
    ref = local_attention_reference(q, k, v, lengths, **kw)
    out = local_attention(q, k, v, lengths, block_q=case.block_q, block_k=case.block_k,
                          interpret=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, case.dtype)
    assert_padding_rows_zero(out, lengths)


def test_kernel_window_at_least_seq_is_causal_attention():
    case = Case(20, 2, 96, 4, 2, 32, window=96 + 7, sink_tokens=4, lengths=(96, 96))
    q, k, v, lengths = make_inputs(case)
    out = local_attention(q, k, v, lengths, sink_tokens=case.sink_tokens, window=case.window,
                          block_q=32, block_k=16, interpret=True)
    with jax.default_matmul_precision("highest"):
        causal = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, causal, case.dtype)


# ----------------------------------------------------------------------------------------------
# cuDNN's window + merged sinks (the GPU's prefill path): the merge, against the definition
# ----------------------------------------------------------------------------------------------

def window_attention_with_lse(q, k, v, window: int) -> tuple[np.ndarray, np.ndarray]:
    """What cuDNN's causal sliding window returns, in float64: the attention over (p - window,
    p] ([B, T, H, D]) and the log-sum-exp of its scaled scores ([B, T, H])."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    t = np.arange(q.shape[1])
    visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    s = np.where(visible, np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1]), -np.inf)
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)  # [B, H, T]
    out = np.einsum("bhts,bshd->bthd", np.exp(s - lse[..., None]), v)
    return out, np.moveaxis(lse, 1, 2)


MERGE_CASES = [
    # G = 4, the window shorter than the prompt: the later queries get the sinks merged.
    Case(30, 2, 300, 8, 2, 32, window=64, sink_tokens=4, lengths=(300, 211)),
    # G = 3 (the default model), bf16, one sink, a window of one block.
    Case(31, 2, 200, 9, 3, 64, window=16, sink_tokens=1, lengths=(200, 129),
         dtype=jnp.bfloat16),
    # The window holds every query's keys: nothing to merge.
    Case(32, 1, 96, 4, 1, 16, window=128, sink_tokens=4, lengths=(96,)),
    # Sinks past the window's start: only the first ones are outside it for early queries.
    Case(33, 1, 120, 4, 2, 16, window=5, sink_tokens=40, lengths=(120,)),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=case_id)
def test_merge_sinks_gives_sinks_plus_window(case):
    q, k, v, lengths = make_inputs(case)
    k, v = (jnp.nan_to_num(x) for x in (k, v))  # the model's padded keys are finite
    out_w, lse = window_attention_with_lse(q, k, v, case.window)
    s = case.sink_tokens
    out = merge_sinks(jnp.asarray(out_w, case.dtype), jnp.asarray(lse, jnp.float32), q,
                      k[:, :s], v[:, :s], case.window, case.head_dim**-0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = naive_mask(case.seq, lengths, window=case.window, sink_tokens=s)
    valid = np.arange(case.seq)[None, :] < np.asarray(lengths)[:, None]
    ref = naive_attention(q, k, v, mask)
    assert_close(np.asarray(jnp.asarray(out, jnp.float32))[valid], ref[valid], case.dtype)


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        window_block_lists(8, 8, sink_tokens=0, window=0, block_q=16, block_k=16)


# ----------------------------------------------------------------------------------------------
# Triton lowering (no GPU needed: Pallas -> Triton IR runs on the CPU)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq,heads,kv_heads,dtype,window,sinks,block_q", [
    (32768, 32, 8, jnp.bfloat16, 8192, 4, 64),  # Llama-3-8B shapes
    (300, 6, 2, jnp.float32, 33, 40, 32),  # ragged, G = 3, sinks > block_k
])
def test_kernel_lowers_to_triton(seq, heads, kv_heads, dtype, window, sinks, block_q):
    spec = jax.ShapeDtypeStruct
    kv = spec((1, seq, kv_heads, 128), dtype)

    def fn(q, k, v, lengths):
        return local_attention(q, k, v, lengths, sink_tokens=sinks, window=window,
                               block_q=block_q, block_k=64)

    lowered = jax.jit(fn).trace(spec((1, seq, heads, 128), dtype), kv, kv,
                                spec((1,), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()

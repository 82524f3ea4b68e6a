"""Local attention (attention sinks + a sliding window), the pattern of RTPurbo's local heads.

A query at absolute position t of row b (valid iff t < lengths[b]) sees key s iff
    s <= t,  s < lengths[b],  and  (s < sink_tokens or s > t - window).
window counts the query itself (window = 1: the query and the sinks). Invalid query rows output
exactly 0.

Shapes (batch = B, seq = T, num_heads = H, num_kv_heads = K, head_dim = D, G = H // K):
  q:       [B, T, H, D], queries at positions 0..T-1
  k, v:    [B, T, K, D]
  lengths: [B] int32, valid tokens per row (<= T)

`local_attention_reference` is the definition (masked dense softmax in float32, queries in
chunks). `local_attention` is the fast path: static block lists (the sink blocks, then the
window blocks up to the diagonal) fed to the block-sparse kernel of sparse_attention.py with its
token-exact window mask, so the work is O(T * (window + sink_tokens)) instead of O(T^2).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.sparse_attention import sparse_attention, validate_window, window_visible

# Query rows of one step of the reference: its scores are [B, H, REFERENCE_QUERY_CHUNK, T]
# float32, e.g. 134 MB at Llama-3-8B shapes and T = 8K, whatever the total length.
REFERENCE_QUERY_CHUNK = 128


def window_block_lists(
    q_len: int,
    kv_len: int,
    *,
    sink_tokens: int,
    window: int,
    block_q: int,
    block_k: int,
    q_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Static key-block lists of local attention, one per query block.

    Queries sit at positions q_offset..q_offset+q_len-1, keys at 0..kv_len-1. The list of query
    block i holds
    every key block with a key some query of the block may see (sink blocks first, then the
    window blocks up to the diagonal), strictly ascending, and no block invisible to all of
    them (before lengths, which the kernel masks per row).

    Returns:
      indices: [num_q_blocks, max_sel] int32; entries past the count repeat the last valid one
        (0 for an empty list), the convention of sparse_attention's lists.
      counts: [num_q_blocks] int32, valid entries per list.
    max_sel (static) is the longest list, at least 1.
    """
    validate_window(window, sink_tokens)
    num_q_blocks = -(-q_len // block_q)
    first = q_offset + np.arange(num_q_blocks, dtype=np.int64) * block_q
    last = np.minimum(first + block_q, q_offset + q_len) - 1
    # Sinks: keys [0, sink_end), each visible to the block's last query (causal).
    sink_end = np.minimum(min(sink_tokens, kv_len), last + 1)
    n_sink = -(-sink_end // block_k)
    # Window: keys [lo_key, hi_key]; each is visible to max(key, first query of the block).
    lo_key = np.maximum(first - window + 1, 0)
    hi_key = np.minimum(last, kv_len - 1)
    lo = np.maximum(lo_key // block_k, n_sink)  # blocks already listed as sinks: once
    hi = hi_key // block_k
    n_window = np.where(lo_key <= hi_key, np.maximum(hi - lo + 1, 0), 0)
    counts = n_sink + n_window
    max_sel = max(int(counts.max(initial=0)), 1)
    slot = np.arange(max_sel)[None, :]
    ids = np.where(slot < n_sink[:, None], slot, lo[:, None] + slot - n_sink[:, None])
    last_id = np.where(counts > 0, ids[np.arange(num_q_blocks), np.maximum(counts - 1, 0)], 0)
    ids = np.where(slot < counts[:, None], ids, last_id[:, None])
    return ids.astype(np.int32), counts.astype(np.int32)


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> None:
    batch, seq, num_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, seq) or k.shape[3] != head_dim:
        raise ValueError(f"k {k.shape} and v {v.shape} must be [{batch}, {seq}, K, {head_dim}]")
    if num_heads % k.shape[2]:
        raise ValueError(f"{num_heads=} is not a multiple of num_kv_heads={k.shape[2]}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths {lengths.shape} != ({batch},)")


def local_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    sink_tokens: int,
    window: int,
    sm_scale: float | None = None,
) -> jax.Array:
    """Local attention by its definition: dense masked softmax in float32.

    Args:
      q: [batch, seq, num_heads, head_dim]; k, v: [batch, seq, num_kv_heads, head_dim].
      lengths: [batch] int32 valid tokens per row.
      sink_tokens, window: the mask (see the module docstring).
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).

    Returns:
      [batch, seq, num_heads, head_dim] in q's dtype.

    Queries run REFERENCE_QUERY_CHUNK at a time (lax.map) against all keys, so memory stays at
    O(batch * num_heads * REFERENCE_QUERY_CHUNK * seq).
    """
    _check_inputs(q, k, v, lengths)
    validate_window(window, sink_tokens)
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    chunk = min(REFERENCE_QUERY_CHUNK, seq)
    num_chunks = -(-seq // chunk)

    f32 = jnp.float32
    lens = lengths.astype(jnp.int32)[:, None]  # [B, 1]
    k_pos = jnp.arange(seq)
    key_ok = k_pos[None, :] < lens  # [B, S]
    # Zero K/V past the length: the cache may hold garbage (even NaN) there.
    kf = jnp.where(key_ok[:, :, None, None], k.astype(f32), 0.0)
    vf = jnp.where(key_ok[:, :, None, None], v.astype(f32), 0.0)
    qf = jnp.pad(q.astype(f32), ((0, 0), (0, num_chunks * chunk - seq), (0, 0), (0, 0)))
    qf = qf.reshape(batch, num_chunks, chunk, num_kv_heads, group, head_dim)
    qf = qf.transpose(1, 0, 2, 3, 4, 5)  # [chunks, B, C, K, G, D]

    def one_chunk(args):
        i, q_blk = args  # q_blk [B, C, K, G, D]
        q_pos = i * chunk + jnp.arange(chunk)
        s = jnp.einsum("bckgd,bskd->bkgcs", q_blk, kf, precision=lax.Precision.HIGHEST)
        s = s * scale  # [B, K, G, C, S]
        visible = (k_pos[None, :] <= q_pos[:, None]) & window_visible(
            k_pos[None, :], q_pos[:, None], window=window, sink_tokens=sink_tokens
        )  # [C, S]
        mask = visible[None] & key_ok[:, None, :] & (q_pos[None, :, None] < lens[:, :, None])
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
        row_max = jnp.max(s, axis=-1, keepdims=True)
        # A row with no visible key has row_max == -inf: subtract 0 instead so p is 0, not NaN.
        p = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
        denom = p.sum(axis=-1).transpose(0, 3, 1, 2)[..., None]  # [B, C, K, G, 1]
        o = jnp.einsum("bkgcs,bskd->bckgd", p, vf, precision=lax.Precision.HIGHEST)
        return jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)

    out = lax.map(one_chunk, (jnp.arange(num_chunks), qf))  # [chunks, B, C, K, G, D]
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(batch, num_chunks * chunk, num_heads, head_dim)
    return out[:, :seq].astype(q.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("sink_tokens", "window", "block_q", "block_k", "sm_scale", "interpret"),
)
def local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    sink_tokens: int,
    window: int,
    block_q: int,
    block_k: int,
    sm_scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Local attention through the block-sparse kernel; same contract as the reference.

    Args:
      q: [batch, seq, num_heads, head_dim]; k, v: [batch, seq, num_kv_heads, head_dim].
      lengths: [batch] int32 valid tokens per row.
      sink_tokens, window: the mask (see the module docstring); static.
      block_q, block_k: list granularity, powers of 2 >= 16 (the kernel's constraint).
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).
      interpret: run the kernel in Pallas interpret mode (CPU).

    Returns:
      [batch, seq, num_heads, head_dim] in q's dtype.
    """
    _check_inputs(q, k, v, lengths)
    batch, seq = q.shape[:2]
    num_kv_heads = k.shape[2]
    indices, counts = window_block_lists(
        seq, seq, sink_tokens=sink_tokens, window=window, block_q=block_q, block_k=block_k
    )
    # One list per query block, shared by every row and KV head (lengths are masked per row).
    indices = jnp.broadcast_to(jnp.asarray(indices), (batch, num_kv_heads, *indices.shape))
    counts = jnp.broadcast_to(jnp.asarray(counts), (batch, num_kv_heads, *counts.shape))
    return sparse_attention(
        q, k, v, indices, counts, block_q=block_q, block_k=block_k, lengths=lengths,
        sm_scale=sm_scale, interpret=interpret, window=window, sink_tokens=sink_tokens,
    )

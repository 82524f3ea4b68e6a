"""The frozen model's own attention, pooled to key blocks, computed blockwise.

This is what the indexer is distilled towards, what the "oracle" selection ranks by, and what
head profiling measures. Queries are processed a chunk at a time, so nothing of size
[seq, seq] is ever materialised: memory is [batch, heads, chunk, kv_len].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.indexer_topp import query_block_extent

# Query rows per step of the blockwise loops (rounded to a multiple of block_q).
TEACHER_CHUNK = 512


def attention_probs(
    q: jax.Array, k: jax.Array, q_pos: jax.Array, lengths: jax.Array, sm_scale: float
) -> jax.Array:
    """Causal softmax attention probabilities, float32.

    q: [batch, rows, heads, head_dim] at positions q_pos [batch, rows]; k: [batch, kv_len,
    kv_heads, head_dim]. Returns [batch, kv_heads, group, rows, kv_len]; rows at or past their
    row's length (and rows with no visible key) are all zero.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    kpos = jnp.arange(k.shape[1])
    visible = (kpos[None, None, :] <= q_pos[:, :, None]) & (kpos < lengths[:, None, None])
    visible &= (q_pos < lengths[:, None])[:, :, None]
    scores = jnp.where(visible[:, None, None], scores * sm_scale, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.where(visible[:, None, None], probs, 0.0)


def _chunk_rows(t: int, block_q: int) -> int:
    chunk = max(block_q, TEACHER_CHUNK // block_q * block_q)
    return min(chunk, -(-t // block_q) * block_q)


def block_attention_mass(
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    *,
    block_q: int,
    block_k: int,
    sm_scale: float | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Attention mass per (query block, key block), averaged over the group's heads and rows.

    q: [batch, seq, heads, head_dim] at positions q_offset .. q_offset+seq-1; k: [batch, kv_len,
    kv_heads, head_dim] at positions 0 .. kv_len-1 (kv_len = seq for a whole prompt); lengths:
    [batch]. Returns [batch, kv_heads, num_q_blocks, num_k_blocks] float32: for each
    query block with a valid row a distribution over key blocks (sums to 1); zeros otherwise.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    nk = -(-k.shape[1] // block_k)
    chunk = _chunk_rows(t, block_q)
    num_chunks = -(-t // chunk)
    q_pad = jnp.pad(q, ((0, 0), (0, num_chunks * chunk - t), (0, 0), (0, 0)))
    k_pad = jnp.pad(k, ((0, 0), (0, nk * block_k - k.shape[1]), (0, 0), (0, 0)))
    blocks_per_chunk = chunk // block_q

    def one_chunk(c: jax.Array) -> jax.Array:
        qc = jax.lax.dynamic_slice_in_dim(q_pad, c * chunk, chunk, axis=1)
        pos = q_offset + c * chunk + jnp.broadcast_to(jnp.arange(chunk), (b, chunk))
        probs = attention_probs(qc, k_pad, pos, lengths, scale)  # [b, hkv, g, chunk, S]
        per_block = probs.reshape(b, hkv, h // hkv, blocks_per_chunk, block_q, nk, block_k)
        mass = per_block.sum(axis=(2, 4, 6))  # [b, hkv, blocks_per_chunk, nk]
        rows = (pos < lengths[:, None]).reshape(b, blocks_per_chunk, block_q).sum(-1)
        return mass / jnp.maximum(rows * (h // hkv), 1)[:, None, :, None]

    out = jax.lax.map(one_chunk, jnp.arange(num_chunks))  # [chunks, b, hkv, bpc, nk]
    out = jnp.moveaxis(out, 0, 2).reshape(b, hkv, num_chunks * blocks_per_chunk, nk)
    return out[:, :, : -(-t // block_q)]


def top_p_mask(probs: jax.Array, p: float) -> jax.Array:
    """The smallest set of entries (last axis) whose mass reaches p, as a bool mask.

    Entries are taken in descending order while the mass before them is below p.
    """
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < p
    rank = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_sorted, rank, axis=-1) & (probs > 0)


def valid_query_blocks(lengths: jax.Array, q_len: int, block_q: int) -> jax.Array:
    """[batch, num_q_blocks] bool: blocks with at least one valid query row."""
    _, last = query_block_extent(jnp.zeros_like(lengths), lengths, q_len, block_q)
    return last >= 0


def collect_qk(
    params: Any, tokens: jax.Array, lengths: jax.Array, config: Any, backend: str = "auto"
) -> list[Any]:
    """The frozen model's queries and keys of every layer, from a dense forward pass.

    tokens: [batch, seq] right-padded; returns one `model.QKV` per layer (q, k rotated; q_pre,
    k_pre before RoPE).
    """
    from rtpurbo_jax.attention import dense_prefill
    from rtpurbo_jax.model import decoder

    def attend(i: int, qkv: Any, state: Any):
        return dense_prefill(qkv.q, qkv.k, qkv.v, lengths, backend=backend), qkv

    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, states = decoder(params, tokens, positions, config, attend, [None] * config.num_layers)
    return states

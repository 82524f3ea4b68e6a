"""The low-rank token indexer: parameters, projections, initialisation and distillation loss.

Design "indexer": for each sparse KV group g of a layer, with query heads h of that group:
  indexer query  qi_t = sum_h q_{h,t} @ wq[g, h]     ([head_dim] -> [rank], summed over heads)
  indexer key    ki_s = k_{g,s} @ wk[g]               ([head_dim] -> [rank])
on the rotated (post-RoPE) q and k the attention itself uses. Indexer parameters of a model:
  {"layers": [{"wq": [sparse_groups, group_size, head_dim, rank],
               "wk": [sparse_groups, head_dim, rank]}  (an empty dict for all-retrieval layers)]}

Design "paper": one indexer per retrieval query head h, on the pre-RoPE q and k (the paper's
Eq. 4: high-frequency RoPE pairs oscillate with distance and hide long-range affinity):
  qi_t = q_pre_{h,t} @ wq[h, 0],  ki_s = k_pre_{kv(h),s} @ wk[h]
which is the same layout with each retrieval head a "group" of one query head:
  {"layers": [{"wq": [retrieval_heads, 1, head_dim, rank], "wk": [retrieval_heads, head_dim,
  rank]}]}, so the projections, the scoring and the selection code serve both designs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.indexer_topp import block_logits_reference, pool_queries, query_block_extent
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.teacher import attention_probs, block_attention_mass, top_p_mask

IndexerParams = dict[str, Any]
LOSS_LEVELS = ("block", "token")
# Query rows per step of the token-level loss.
TOKEN_LOSS_CHUNK = 256


def indexer_queries(q: jax.Array, wq: jax.Array) -> jax.Array:
    """q: [batch, seq, groups * group_size, head_dim] -> qi [batch, seq, groups, rank]."""
    b, t, _, d = q.shape
    groups, group_size = wq.shape[:2]
    qg = q.reshape(b, t, groups, group_size, d)
    return jnp.einsum("btghd,ghdr->btgr", qg, wq.astype(q.dtype))


def indexer_keys(k: jax.Array, wk: jax.Array) -> jax.Array:
    """k: [batch, seq, groups, head_dim] -> ki [batch, seq, groups, rank]."""
    return jnp.einsum("btgd,gdr->btgr", k, wk.astype(k.dtype))


def principal_directions(samples: np.ndarray, rank: int) -> np.ndarray:
    """Top `rank` right singular vectors of samples [n, dim] (uncentred): [dim, rank]."""
    second_moment = samples.T.astype(np.float64) @ samples.astype(np.float64)
    eigvals, eigvecs = np.linalg.eigh(second_moment)
    return eigvecs[:, np.argsort(eigvals)[::-1][:rank]].astype(np.float32)


def init_indexer(
    queries: list[np.ndarray | None],
    model: ModelConfig,
    sparse: SparseConfig,
    sm_scale: float | None = None,
) -> IndexerParams:
    """Indexer weights from the principal directions of the queries on real text.

    queries[layer]: queries [n, heads, head_dim] of that layer, post-RoPE for design "indexer",
    pre-RoPE for design "paper" (None for layers without indexed heads). With U the top-`rank`
    directions of the stacked queries of a group (or of one retrieval head), wk = U and
    wq[h] = U * sm_scale / group_size, so that <qi, ki> approximates the (group's mean) attention
    logit restricted to the principal subspace: a ranking far better than chance before any
    training.
    """
    scale = model.head_dim**-0.5 if sm_scale is None else sm_scale
    size = 1 if sparse.design == "paper" else model.group_size
    layers = []
    for layer in range(model.num_layers):
        groups = sparse.indexed_heads(layer)
        if not groups:
            layers.append({})
            continue
        q = np.asarray(queries[layer], np.float32)
        wq, wk = [], []
        for g in groups:
            heads = q[:, g * size:(g + 1) * size].reshape(-1, model.head_dim)
            u = principal_directions(heads, min(sparse.rank, model.head_dim))
            u = np.pad(u, ((0, 0), (0, sparse.rank - u.shape[1])))
            wk.append(u)
            wq.append(np.broadcast_to(u * (scale / size), (size, *u.shape)))
        layers.append({"wq": jnp.asarray(np.stack(wq)), "wk": jnp.asarray(np.stack(wk))})
    return {"layers": layers}


def truncate_teacher(probs: jax.Array, teacher_top_p: float) -> jax.Array:
    """The teacher distribution (last axis) restricted to its own top-p set and renormalised;
    teacher_top_p >= 1 keeps the whole distribution (the paper's stage-1 target)."""
    if teacher_top_p >= 1.0:
        return probs
    kept = jnp.where(top_p_mask(probs, teacher_top_p), probs, 0.0)
    return kept / jnp.maximum(kept.sum(-1, keepdims=True), 1e-30)


def block_distillation_loss(
    qi: jax.Array,
    ki: jax.Array,
    teacher_mass: jax.Array,
    lengths: jax.Array,
    *,
    block_q: int,
    block_k: int,
    scale: float,
    teacher_top_p: float,
) -> jax.Array:
    """Forward KL(teacher || indexer) over key blocks, mean over valid (row, group, query block).

    qi: [batch, seq, groups, rank]; ki: [batch, seq, groups, rank]; teacher_mass: [batch, groups,
    nq, nk] from `block_attention_mass`. The teacher is restricted to its own top-p block set and
    renormalised; the indexer's distribution is exactly the one selection ranks by.
    """
    valid, last = query_block_extent(jnp.zeros_like(lengths), lengths, qi.shape[1], block_q)
    logits = block_logits_reference(pool_queries(qi, valid), ki, lengths, last, block_k=block_k,
                                    scale=scale)
    log_student = jax.nn.log_softmax(logits, axis=-1)
    teacher = truncate_teacher(teacher_mass, teacher_top_p)
    kl = jnp.sum(jnp.where(teacher > 0, teacher * (jnp.log(jnp.where(teacher > 0, teacher, 1.0))
                                                   - log_student), 0.0), axis=-1)
    rows = jnp.broadcast_to((last >= 0)[:, None, :], kl.shape)
    return jnp.sum(jnp.where(rows, kl, 0.0)) / jnp.maximum(rows.sum(), 1)


def token_distillation_loss(
    q: jax.Array,
    k: jax.Array,
    qi: jax.Array,
    ki: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    teacher_top_p: float,
    sm_scale: float,
) -> jax.Array:
    """Forward KL per query token (teacher: the group's mean attention restricted to its top-p
    token set; student: the token softmax of <qi_t, ki_s>), mean over valid tokens and groups.

    q: [batch, seq, groups * group_size, head_dim]; k: [batch, seq, groups, head_dim].
    """
    b, t = q.shape[:2]
    chunk = min(TOKEN_LOSS_CHUNK, t)
    num_chunks = -(-t // chunk)
    pad = num_chunks * chunk - t
    q_pad = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qi_pad = jnp.pad(qi, ((0, 0), (0, pad), (0, 0), (0, 0)))
    kpos = jnp.arange(k.shape[1])

    @jax.checkpoint
    def one_chunk(c: jax.Array) -> jax.Array:
        pos = c * chunk + jnp.broadcast_to(jnp.arange(chunk), (b, chunk))
        qc = jax.lax.dynamic_slice_in_dim(q_pad, c * chunk, chunk, axis=1)
        probs = attention_probs(qc, k, pos, lengths, sm_scale).mean(axis=2)  # [b, g, c, S]
        teacher = jax.lax.stop_gradient(truncate_teacher(probs, teacher_top_p))
        qic = jax.lax.dynamic_slice_in_dim(qi_pad, c * chunk, chunk, axis=1)
        logits = jnp.einsum("bcgr,bsgr->bgcs", qic.astype(jnp.float32), ki.astype(jnp.float32))
        visible = (kpos[None, None, :] <= pos[:, :, None]) & (kpos < lengths[:, None, None])
        logits = jnp.where(visible[:, None], logits * scale, -jnp.inf)
        log_student = jax.nn.log_softmax(logits, axis=-1)
        safe_t = jnp.where(teacher > 0, teacher, 1.0)
        kl = jnp.sum(jnp.where(teacher > 0, teacher * (jnp.log(safe_t) - log_student), 0.0), -1)
        rows = jnp.broadcast_to((pos < lengths[:, None])[:, None, :], kl.shape)
        return jnp.stack([jnp.sum(jnp.where(rows, kl, 0.0)), rows.sum().astype(jnp.float32)])

    totals = jax.lax.map(one_chunk, jnp.arange(num_chunks)).sum(axis=0)
    return totals[0] / jnp.maximum(totals[1], 1.0)


def layer_distillation_loss(
    layer_params: IndexerParams,
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    sparse: SparseConfig,
    *,
    level: str = "block",
    teacher_top_p: float = 0.9,
    sm_scale: float | None = None,
    q_index: jax.Array | None = None,
    k_index: jax.Array | None = None,
) -> jax.Array:
    """The distillation loss of one layer's indexer on its indexed groups (or heads).

    q: [batch, seq, groups * group_size, head_dim] and k: [batch, seq, groups, head_dim] are the
    frozen model's rotated queries and keys of the indexed groups only (the teacher's
    attention); q_index, k_index (same shapes) what the indexer projects, when that differs
    (the paper design's pre-RoPE q and k).
    """
    if level not in LOSS_LEVELS:
        raise ValueError(f"loss level must be one of {LOSS_LEVELS}, got {level!r}")
    scale = 1.0 / sparse.temperature
    attn_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    qi = indexer_queries(q if q_index is None else q_index, layer_params["wq"])
    ki = indexer_keys(k if k_index is None else k_index, layer_params["wk"])
    if level == "token":
        return token_distillation_loss(q, k, qi, ki, lengths, scale=scale,
                                       teacher_top_p=teacher_top_p, sm_scale=attn_scale)
    mass = jax.lax.stop_gradient(block_attention_mass(
        q, k, lengths, block_q=sparse.block_q, block_k=sparse.block_k, sm_scale=attn_scale))
    return block_distillation_loss(qi, ki, mass, lengths, block_q=sparse.block_q,
                                   block_k=sparse.block_k, scale=scale,
                                   teacher_top_p=teacher_top_p)

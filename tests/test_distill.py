"""The blockwise teacher and the distillation losses equal their naive full-matrix forms; the SVD
initialisation finds a planted low-rank structure; training steps lower the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.indexer import (
    block_distillation_loss,
    indexer_keys,
    indexer_queries,
    init_indexer,
    layer_distillation_loss,
    token_distillation_loss,
)
from rtpurbo_jax.teacher import block_attention_mass, top_p_mask

B, T, HKV, G, D = 2, 45, 2, 2, 8
BQ, BK = 8, 4
LENGTHS = np.array([45, 30])


def _qk(seed: int):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, HKV * G, D)) * 1.5
    k = rng.normal(size=(B, T, HKV, D))
    return q.astype(np.float32), k.astype(np.float32)


def _naive_attention(q, k):
    """[b, hkv, g, t, s] float64 causal softmax with lengths; padded rows zero."""
    scores = np.einsum("btkgd,bskd->bkgts", q.reshape(B, T, HKV, G, D), k) / np.sqrt(D)
    pos = np.arange(T)
    vis = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < LENGTHS[:, None, None])
    vis &= (pos[None, :, None] < LENGTHS[:, None, None])
    scores = np.where(vis[:, None, None], scores, -np.inf)
    m = np.max(np.where(vis[:, None, None], scores, -1e300), -1, keepdims=True)
    p = np.where(vis[:, None, None], np.exp(scores - m), 0.0)
    return p / np.maximum(p.sum(-1, keepdims=True), 1e-300)


def _naive_block_mass(q, k):
    a = _naive_attention(q, k)
    nq, nk = -(-T // BQ), -(-T // BK)
    out = np.zeros((B, HKV, nq, nk))
    for b in range(B):
        for i in range(nq):
            rows = [t for t in range(i * BQ, min((i + 1) * BQ, T)) if t < LENGTHS[b]]
            if not rows:
                continue
            per_key = a[b][:, :, rows].mean(axis=(1, 2))  # [hkv, s]
            for j in range(nk):
                out[b, :, i, j] = per_key[:, j * BK:(j + 1) * BK].sum(-1)
    return out


def test_block_attention_mass_equals_naive(monkeypatch):
    # A chunk smaller than the sequence exercises the blockwise loop.
    monkeypatch.setattr("rtpurbo_jax.teacher.TEACHER_CHUNK", 16)
    q, k = _qk(0)
    mass = block_attention_mass(jnp.asarray(q), jnp.asarray(k), jnp.asarray(LENGTHS),
                                block_q=BQ, block_k=BK)
    np.testing.assert_allclose(np.asarray(mass), _naive_block_mass(q, k), atol=1e-5)


def _naive_kl(teacher, log_student, p):
    """Forward KL of the teacher restricted to its top-p set, per row of the last axis."""
    t = np.asarray(teacher, np.float64)
    keep = np.asarray(top_p_mask(jnp.asarray(t), p))
    t = np.where(keep, t, 0.0)
    t = t / np.maximum(t.sum(-1, keepdims=True), 1e-300)
    ratio = np.where(t > 0, np.log(np.where(t > 0, t, 1.0)) - log_student, 0.0)
    return np.sum(t * ratio, axis=-1)


def test_block_loss_equals_naive():
    q, k = _qk(1)
    rng = np.random.default_rng(2)
    qi = rng.normal(size=(B, T, HKV, 3)).astype(np.float32)
    ki = rng.normal(size=(B, T, HKV, 3)).astype(np.float32)
    mass = _naive_block_mass(q, k)
    loss = block_distillation_loss(jnp.asarray(qi), jnp.asarray(ki), jnp.asarray(mass, jnp.float32),
                                   jnp.asarray(LENGTHS), block_q=BQ, block_k=BK, scale=0.5,
                                   teacher_top_p=0.9)
    # Naive student: pooled query, token softmax summed per key block.
    nq, nk = mass.shape[2:]
    kls = []
    for b in range(B):
        for i in range(nq):
            rows = [t for t in range(i * BQ, min((i + 1) * BQ, T)) if t < LENGTHS[b]]
            if not rows:
                continue
            keys = np.arange(min(max(rows) + 1, LENGTHS[b]))
            for g in range(HKV):
                s = 0.5 * ki[b, keys, g] @ qi[b, rows, g].mean(0)
                p = np.exp(s - s.max())
                p /= p.sum()
                block_p = np.bincount(keys // BK, p, minlength=nk)
                log_student = np.log(np.where(block_p > 0, block_p, 1e-300))
                kls.append(_naive_kl(mass[b, g, i], log_student, 0.9))
    np.testing.assert_allclose(float(loss), np.mean(kls), rtol=1e-4)


def test_token_loss_equals_naive(monkeypatch):
    monkeypatch.setattr("rtpurbo_jax.indexer.TOKEN_LOSS_CHUNK", 16)
    q, k = _qk(3)
    rng = np.random.default_rng(4)
    qi = rng.normal(size=(B, T, HKV, 3)).astype(np.float32)
    ki = rng.normal(size=(B, T, HKV, 3)).astype(np.float32)
    loss = token_distillation_loss(jnp.asarray(q), jnp.asarray(k), jnp.asarray(qi),
                                   jnp.asarray(ki), jnp.asarray(LENGTHS), scale=0.5,
                                   teacher_top_p=0.8, sm_scale=D**-0.5)
    teacher = _naive_attention(q, k).mean(axis=2)  # [b, hkv, t, s]
    kls = []
    for b in range(B):
        for t in range(LENGTHS[b]):
            for g in range(HKV):
                s = 0.5 * ki[b, : t + 1, g] @ qi[b, t, g]
                log_p = s - s.max() - np.log(np.exp(s - s.max()).sum())
                log_student = np.full(T, -np.inf)
                log_student[: t + 1] = log_p
                kls.append(_naive_kl(teacher[b, g, t], log_student, 0.8))
    np.testing.assert_allclose(float(loss), np.mean(kls), rtol=1e-4)


def _planted_config():
    return ModelConfig(family="llama", vocab_size=16, hidden_size=32, intermediate_size=32,
                       num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)


def _planted_qk(seed: int, n: int = 160):
    """Queries and keys that live (up to noise) in one fixed 2-dim subspace of head_dim 16."""
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(16, 16)))[0][:, :2]
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, n, 4, 2)) @ basis.T * 4 + 0.05 * rng.normal(size=(1, n, 4, 16))
    k = rng.normal(size=(1, n, 2, 2)) @ basis.T * 4 + 0.05 * rng.normal(size=(1, n, 2, 16))
    return q.astype(np.float32), k.astype(np.float32)


def test_svd_init_recovers_planted_subspace():
    config = _planted_config()
    sparse = SparseConfig(((False, False),), rank=2, block_q=16, block_k=16)
    q, k = _planted_qk(0)
    indexer = init_indexer([q[0]], config, sparse)
    layer = indexer["layers"][0]
    q_eval, k_eval = _planted_qk(1)
    qi = indexer_queries(jnp.asarray(q_eval), layer["wq"])
    ki = indexer_keys(jnp.asarray(k_eval), layer["wk"])
    # <qi, ki> approximates the group's mean attention logit.
    approx = np.einsum("btgr,bsgr->bgts", np.asarray(qi), np.asarray(ki))
    exact = np.einsum("btghd,bsgd->bgts", q_eval.reshape(1, -1, 2, 2, 16), k_eval) / 4 / 2
    assert np.corrcoef(approx.ravel(), exact.ravel())[0, 1] > 0.99


def test_training_steps_lower_the_loss():
    config = _planted_config()
    sparse = SparseConfig(((False, False),), rank=2, block_q=16, block_k=16)
    q, k = _planted_qk(2)
    lengths = jnp.asarray([q.shape[1]])
    key = jax.random.key(0)
    params = {"wq": 0.1 * jax.random.normal(key, (2, 2, 16, 2)),
              "wk": 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (2, 16, 2))}
    opt = optax.adam(3e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(layer_distillation_loss)(
            params, jnp.asarray(q), jnp.asarray(k), lengths, sparse)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    svd = init_indexer([q[0]], config, sparse)["layers"][0]
    svd_loss = float(layer_distillation_loss(svd, jnp.asarray(q), jnp.asarray(k), lengths, sparse))
    # From random weights, 30 Adam steps beat both the start and the untrained SVD init.
    assert losses[-1] < 0.7 * losses[0]
    assert losses[-1] < svd_loss


def test_unknown_loss_level():
    q, k = _planted_qk(0)
    sparse = SparseConfig(((False, False),), rank=2, block_q=16, block_k=16)
    params = init_indexer([q[0]], _planted_config(), sparse)["layers"][0]
    with pytest.raises(ValueError, match="loss level"):
        layer_distillation_loss(params, jnp.asarray(q), jnp.asarray(k), jnp.asarray([160]),
                                sparse, level="head")

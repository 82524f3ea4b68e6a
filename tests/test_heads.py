"""Profiling finds a retrieval head planted in a tiny model, and the mask/JSON/PNG outputs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.heads import choose_retrieval_heads, profile_heads, save_profile
from rtpurbo_jax.model import init_params
from rtpurbo_jax.tasks import ByteTokenizer, Sample

CONFIG = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     rope_theta=1e9, max_position_embeddings=2048)
PLANTED = (1, 1)  # (layer, KV head)
# Head dims whose RoPE frequency is negligible at rope_theta 1e9 (pairs i, i + 8 for i >= 4).
SLOW_DIMS = [4, 5, 6, 7, 12, 13, 14, 15]


def _planted_model():
    """Random weights, except one KV group whose queries match keys of the same token."""
    params = init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(0)
    params["embed"] = jax.numpy.asarray(rng.normal(size=(256, 64)), jax.numpy.float32)
    proj = np.zeros((64, 16), np.float32)
    proj[:, SLOW_DIMS] = np.linalg.qr(rng.normal(size=(64, 8)))[0]
    layer, group = PLANTED
    size = CONFIG.group_size
    wq = np.asarray(params["layers"][layer]["wq"]).copy()
    wk = np.asarray(params["layers"][layer]["wk"]).copy()
    wq[:, group * size:(group + 1) * size] = 6.0 * proj[:, None]
    wk[:, group] = proj
    params["layers"][layer]["wq"] = jax.numpy.asarray(wq)
    params["layers"][layer]["wk"] = jax.numpy.asarray(wk)
    return params


def _samples(n: int, length: int = 384):
    tok, rng, out, answers = ByteTokenizer(), np.random.default_rng(1), [], []
    for _ in range(n):
        key = str(rng.integers(10000, 99999))
        needle = tok.encode(f" key {key} ")
        letters = rng.integers(ord("a"), ord("z") + 1, length)
        depth = int(rng.integers(20, length - 120))
        question = tok.encode(" key?")
        prompt = np.concatenate([letters[:depth], needle, letters[depth:length - len(needle)
                                                                  - len(question)], question])
        span = (depth + 5, depth + 10)  # the digits
        out.append(Sample("passkey", prompt.astype(np.int32), key, (span,)))
        answers.append(tok.encode(" " + key))
    return out, answers


def test_planted_head_scores_highest():
    samples, answers = _samples(4)
    profile = profile_heads(_planted_model(), CONFIG, samples, answers, batch_size=2,
                            backend="reference")
    score = profile["score"]
    assert np.unravel_index(np.argmax(score), score.shape) == PLANTED
    others = np.delete(score.ravel(), np.ravel_multi_index(PLANTED, score.shape))
    assert score[PLANTED] > 0.1 > 5 * others.max()
    assert choose_retrieval_heads(score, count=1) == ((False, False), (False, True))


def test_choose_heads_options(tmp_path):
    scores = np.array([[0.5, 0.1], [0.05, 0.3]])
    assert choose_retrieval_heads(scores, threshold=0.2) == ((True, False), (False, True))
    assert choose_retrieval_heads(scores, fraction=0.75) == ((True, True), (False, True))
    assert choose_retrieval_heads(scores, count=0) == ((False, False), (False, False))
    with pytest.raises(ValueError, match="exactly one"):
        choose_retrieval_heads(scores, count=1, fraction=0.5)
    mask = choose_retrieval_heads(scores, count=1)
    json_path, png_path = save_profile(tmp_path / "profile", {"score": scores,
                                                              "far_mass": scores / 2},
                                       mask, "toy", {"n": 2})
    saved = json.loads(json_path.read_text())
    assert saved["retrieval_mask"] == [[True, False], [False, False]]
    assert saved["retrieval_fraction"] == 0.25
    assert png_path.read_bytes()[:4] == b"\x89PNG"

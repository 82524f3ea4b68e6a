"""Profiling finds a retrieval head planted in a tiny model (task-based per KV head, and the
needle-copy score per query head), and the mask / ranking / JSON / PNG outputs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.heads import (
    NEEDLE_PREFIX_TOKENS,
    NeedleDocument,
    choose_query_heads,
    choose_retrieval_heads,
    group_scores,
    kv_retrieval_mask,
    needle_document,
    needle_scores,
    profile_heads,
    ranking_agreement,
    save_needle_profile,
    save_profile,
)
from rtpurbo_jax.model import init_params
from rtpurbo_jax.rope import inverse_frequencies
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


# The needle-copy profile. A wider head_dim than CONFIG gives 16 RoPE dims that barely rotate,
# so that the planted head's same-token match stands well above chance matches.
NEEDLE_CONFIG = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                            rope_theta=1e9, max_position_embeddings=2048)
# (layer, query head): the first head of KV group 1, whose index would move (to 1) if the
# scores flattened (group, kv_head) instead of the model's (kv_head, group).
PLANTED_QUERY = (1, 2)
# A dim is "slow" if it turns less than this (radians) over the whole document.
SLOW_ANGLE = 0.01
# How much sharper than a random head the planted head's queries are.
PLANTED_SCALE = 8.0
# Haystack ids come from [0, HAYSTACK_VOCAB), needle ids from the rest: the copy is unambiguous.
HAYSTACK_VOCAB = 128


def _slow_dims(config: ModelConfig, length: int) -> np.ndarray:
    inv_freq, _ = inverse_frequencies(config)
    pairs = np.flatnonzero(inv_freq * length < SLOW_ANGLE)
    return np.concatenate([pairs, pairs + config.head_dim // 2])  # rotate-half partners


def _planted_copy_model(length: int):
    """Random weights, except one query head (and its group's keys) that matches a token's
    earlier occurrences: q . k is large exactly when the two tokens are the same."""
    cfg = NEEDLE_CONFIG
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    params["embed"] = jax.numpy.asarray(rng.normal(size=(cfg.vocab_size, cfg.hidden_size)),
                                        jax.numpy.float32)
    dims = _slow_dims(cfg, length)
    proj = np.zeros((cfg.hidden_size, cfg.head_dim), np.float32)
    proj[:, dims] = np.linalg.qr(rng.normal(size=(cfg.hidden_size, len(dims))))[0]
    layer, head = PLANTED_QUERY
    wq = np.asarray(params["layers"][layer]["wq"]).copy()
    wk = np.asarray(params["layers"][layer]["wk"]).copy()
    wq[:, head] = PLANTED_SCALE * proj
    wk[:, head // cfg.group_size] = proj
    params["layers"][layer]["wq"] = jax.numpy.asarray(wq)
    params["layers"][layer]["wk"] = jax.numpy.asarray(wk)
    return params


def _random_document(rng: np.random.Generator, length: int, needle_tokens: int):
    needle = rng.choice(np.arange(HAYSTACK_VOCAB, NEEDLE_CONFIG.vocab_size), needle_tokens,
                        replace=False)
    tokens = rng.integers(0, HAYSTACK_VOCAB, length)
    pre = (NEEDLE_PREFIX_TOKENS, NEEDLE_PREFIX_TOKENS + needle_tokens)
    tokens[pre[0]:pre[1]] = needle
    tokens[length - needle_tokens:] = needle
    return NeedleDocument(tokens, pre, (length - needle_tokens, length))


def test_planted_copying_head_ranks_first():
    rng = np.random.default_rng(3)
    # Two lengths and needle sizes: the batch pads the shorter one.
    docs = [_random_document(rng, 224, 16), _random_document(rng, 200, 12)]
    params = _planted_copy_model(224)
    scores = needle_scores(params, NEEDLE_CONFIG, docs, batch_size=2, backend="reference")
    assert scores.shape == (2, 4) and scores.dtype == np.float64
    assert np.unravel_index(np.argmax(scores), scores.shape) == PLANTED_QUERY
    others = np.delete(scores.ravel(), np.ravel_multi_index(PLANTED_QUERY, scores.shape))
    # A copying head splits its mass between the earlier copy and the token itself (~0.5); a
    # random head spreads it, putting about needle / position on the earlier copy.
    assert scores[PLANTED_QUERY] > 0.3 > 3 * others.max()
    expected = tuple(tuple((layer, head) == PLANTED_QUERY for head in range(4))
                     for layer in range(2))
    assert choose_query_heads(scores, NEEDLE_CONFIG.group_size, count=1) == expected
    # Padding and batching do not change a document's score.
    alone = needle_scores(params, NEEDLE_CONFIG, docs[1:], backend="reference")
    pair = needle_scores(params, NEEDLE_CONFIG, docs[:1] + docs[1:], batch_size=1,
                         backend="reference")
    np.testing.assert_allclose(pair, scores, atol=1e-6)
    assert alone[PLANTED_QUERY] > 0.3


def test_needle_document_layout():
    text = np.arange(1000, 1000 + 2000)  # unique ids: where each token came from is readable
    for seed, size in [(0, 2000), (1, 2000), (2, 300 - 24), (3, 300 - 24)]:
        doc = needle_document(text[:size], 300, 24, np.random.default_rng(seed))
        tokens, n = doc.tokens, 24
        assert tokens.shape == (300,) and tokens.dtype == np.int32
        assert doc.pre == (NEEDLE_PREFIX_TOKENS, NEEDLE_PREFIX_TOKENS + n)
        assert doc.post == (300 - n, 300) and doc.needle_tokens == n
        needle = tokens[doc.pre[0]:doc.pre[1]]
        np.testing.assert_array_equal(needle, tokens[doc.post[0]:])
        haystack = np.concatenate([tokens[:doc.pre[0]], tokens[doc.pre[1]:doc.post[0]]])
        # Both are contiguous spans of the text, and they do not overlap.
        np.testing.assert_array_equal(np.diff(haystack), 1)
        np.testing.assert_array_equal(np.diff(needle), 1)
        assert not set(needle) & set(haystack)
    no_prefix = needle_document(text, 300, 24, np.random.default_rng(0), prefix_tokens=0)
    assert no_prefix.pre == (0, 24)
    with pytest.raises(ValueError, match="haystack tokens between"):
        needle_document(text, 2 * 24 + 100, 24, np.random.default_rng(0))
    with pytest.raises(ValueError, match="the text has"):
        needle_document(text[:300 - 25], 300, 24, np.random.default_rng(0))
    with pytest.raises(ValueError, match="needle_tokens"):
        needle_document(text, 300, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not identical"):
        NeedleDocument(np.arange(10), (0, 2), (8, 10))


def _rows(*rows: str) -> tuple[tuple[bool, ...], ...]:
    return tuple(tuple(c == "x" for c in row) for row in rows)


def test_choose_query_heads():
    scores = np.array([[0.9, 0.1, 0.2, 0.3], [0.05, 0.8, 0.7, 0.6]])  # 2 groups of 2 per layer
    assert choose_query_heads(scores, 2, count=3) == _rows("x...", ".xx.")
    assert choose_query_heads(scores, 2, threshold=0.6) == _rows("x...", ".xxx")
    assert choose_query_heads(scores, 2, fraction=1.0) == _rows("xxxx", "xxxx")
    assert choose_query_heads(scores, 2, fraction=0.01) == _rows("x...", "....")  # at least one
    assert choose_query_heads(scores, 2, fraction=0.3125) == _rows("x...", ".xx.")  # 2.5 -> 3
    assert choose_query_heads(scores, 2, count=0) == _rows("....", "....")
    # Group means: layer 0 (0.5, 0.25), layer 1 (0.425, 0.65).
    np.testing.assert_allclose(group_scores(scores, 2), [[0.5, 0.25], [0.425, 0.65]])
    assert choose_query_heads(scores, 2, granularity="kv", count=3) == _rows("xx..", "..xx")
    assert choose_query_heads(scores, 2, granularity="kv", count=1) == _rows("....", "..xx")
    assert choose_query_heads(scores, 2, granularity="kv", fraction=0.15) == _rows("....",
                                                                                    "..xx")
    assert choose_query_heads(scores, 2, granularity="kv", threshold=0.45) == _rows("xx..",
                                                                                     "..xx")
    assert choose_query_heads(scores, 2, granularity="kv", fraction=1.0) == _rows("xxxx", "xxxx")
    ties = np.ones((2, 4))
    assert choose_query_heads(ties, 2, count=2) == _rows("xx..", "....")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            choose_query_heads(scores, 2, fraction=bad)
    with pytest.raises(ValueError, match="exactly one"):
        choose_query_heads(scores, 2, count=1, fraction=0.5)
    with pytest.raises(ValueError, match="granularity"):
        choose_query_heads(scores, 2, granularity="layer", count=1)
    with pytest.raises(ValueError, match="count must be"):
        choose_query_heads(scores, 2, count=9)
    with pytest.raises(ValueError, match="does not divide"):
        choose_query_heads(scores, 3, count=1)


def test_ranking_agreement():
    a = np.arange(6.0).reshape(2, 3)
    same = ranking_agreement(a, a.copy(), top=2)
    assert same["spearman"] == pytest.approx(1.0) and same["top_overlap"] == 1.0
    reverse = ranking_agreement(a, -a, top=3)
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["top_overlap"] == 0.0
    # Ties share their mean rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3).
    tied = ranking_agreement(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4]), top=2)
    assert tied["spearman"] == pytest.approx(4.5 / np.sqrt(4.5 * 5.0))
    assert tied["top_overlap"] == 0.5  # {3, 1} against {3, 2}
    assert np.isnan(ranking_agreement(np.ones(4), np.arange(4.0), top=1)["spearman"])
    with pytest.raises(ValueError, match="different shapes"):
        ranking_agreement(a, a.ravel(), top=1)
    with pytest.raises(ValueError, match="top must be"):
        ranking_agreement(a, a, top=7)


def test_save_needle_profile(tmp_path):
    scores = np.array([[0.9, 0.1, 0.2, 0.3], [0.05, 0.8, 0.7, 0.6]])
    mask = choose_query_heads(scores, 2, count=3)
    assert kv_retrieval_mask(mask, 2) == ((True, False), (True, True))
    paths = save_needle_profile(tmp_path / "needle", scores, mask, "toy", {"documents": 1}, 2)
    json_path, png_path, counts_path = paths
    assert (json_path.name, png_path.name, counts_path.name) == (
        "needle.json", "needle.png", "needle_layers.png")
    saved = json.loads(json_path.read_text())
    assert set(saved) == {"model", "info", "granularity", "group_size", "score", "group_score",
                          "retrieval_mask", "kv_retrieval_mask", "query_head_fraction",
                          "kv_group_fraction"}
    assert saved["retrieval_mask"] == [list(row) for row in mask]
    assert saved["kv_retrieval_mask"] == [[True, False], [True, True]]
    assert saved["granularity"] == "query" and saved["info"] == {"documents": 1}
    assert saved["query_head_fraction"] == 3 / 8 and saved["kv_group_fraction"] == 3 / 4
    assert saved["score"] == scores.tolist()
    for png in (png_path, counts_path):
        assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="mask is"):
        save_needle_profile(tmp_path / "bad", scores, mask[:1], "toy", {}, 2)


def test_compare_profiles_of_both_methods(tmp_path):
    """A task profile (per KV head) and a needle profile (per query head, with group scores)
    of one model compare on the KV heads; identical rankings agree fully."""
    from rtpurbo_jax.convert import compare_profiles

    scores = np.array([[0.1, 0.9], [0.5, 0.3]])
    (tmp_path / "tasks.json").write_text(json.dumps({"score": scores.tolist()}))
    (tmp_path / "needle.json").write_text(json.dumps({"score": [[0.0] * 4] * 2,
                                                      "group_score": (2 * scores).tolist()}))
    report = compare_profiles([str(tmp_path / "tasks.json"), str(tmp_path / "needle.json")],
                              str(tmp_path / "out"))
    assert all(r["spearman"] == 1.0 and r["top_overlap"] == 1.0 for r in report["agreement"])
    assert json.loads((tmp_path / "out.json").read_text()) == report


def test_compare_cli_names_its_output_for_the_two_runs(tmp_path, monkeypatch):
    """Without --out, `convert --compare` writes results/profile/<run A>_vs_<run B>.json, so
    comparisons of other runs don't overwrite it."""
    from rtpurbo_jax.convert import main

    scores = [[0.1, 0.9], [0.5, 0.3]]
    for run in ("run_a", "run_b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "heads.json").write_text(json.dumps({"score": scores}))
    monkeypatch.chdir(tmp_path)
    main(["--compare", "run_a/heads.json", "run_b/heads.json"])
    report = json.loads((tmp_path / "results/profile/run_a_vs_run_b.json").read_text())
    assert report["profiles"] == ["run_a/heads.json", "run_b/heads.json"]

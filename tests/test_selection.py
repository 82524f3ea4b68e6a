"""Block selection (pallas_kernels.indexer_topp reference): invariants on random scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer_topp import (
    block_logits_reference,
    indexer_topp_reference,
    pool_queries,
    query_block_extent,
    select_blocks_reference,
)

NK = 24
SINK, LOCAL = 1, 2


def _random_case(seed: int, batch: int = 3, groups: int = 2, nq: int = 5):
    rng = np.random.default_rng(seed)
    # Peaked logits (a few blocks dominate) as well as flat ones.
    logits = rng.normal(size=(batch, groups, nq, NK)) * rng.choice([0.5, 3.0], (batch, 1, 1, 1))
    last_block = rng.integers(-1, NK, (batch, nq))
    last_block[0, 0] = 0  # a query block with one candidate
    last_block[1, 1] = -1  # a query block with none
    return jnp.asarray(logits, jnp.float32), jnp.asarray(last_block, jnp.int32)


def _sets(indices, counts):
    idx, cnt = np.asarray(indices), np.asarray(counts)
    return [[set(idx[b, g, i, :cnt[b, g, i]].tolist()) for i in range(idx.shape[2])]
            for b in range(idx.shape[0]) for g in range(idx.shape[1])], idx, cnt


def _probs(logits, last_block):
    cand = np.arange(NK)[None, None, None] <= np.asarray(last_block)[:, None, :, None]
    x = np.where(cand, np.asarray(logits, np.float64), -np.inf)
    x = np.exp(x - np.max(np.where(cand, x, -1e30), -1, keepdims=True))
    return np.where(cand, x / np.where(cand, x, 0).sum(-1, keepdims=True).clip(1e-300), 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_invariants(seed, top_p):
    logits, last_block = _random_case(seed)
    indices, counts = select_blocks_reference(logits, last_block, top_p=top_p,
                                              sink_blocks=SINK, local_blocks=LOCAL)
    probs = _probs(logits, last_block)
    idx, cnt = np.asarray(indices), np.asarray(counts)
    lb = np.asarray(last_block)
    for b, g, i in np.ndindex(*cnt.shape):
        chosen = idx[b, g, i, :cnt[b, g, i]]
        last = lb[b, i]
        if last < 0:
            assert cnt[b, g, i] == 0
            continue
        assert (np.diff(chosen) > 0).all(), "ascending, no repeats"
        assert (idx[b, g, i, cnt[b, g, i]:] == chosen[-1]).all(), "padding repeats the last"
        assert chosen.max() <= last, "never a future block"
        forced = {j for j in range(last + 1) if j < SINK or j > last - LOCAL}
        assert forced <= set(chosen.tolist()), "sink and local always kept"
        p = probs[b, g, i]
        assert p[chosen].sum() >= top_p - 1e-5, "kept mass reaches p"
        free = [j for j in chosen if j not in forced]
        if free:  # smallest: without its weakest free block the mass falls short of p
            assert p[chosen].sum() - p[min(free, key=lambda j: p[j])] < top_p + 1e-6


def test_monotone_in_p():
    logits, last_block = _random_case(7)
    previous = None
    for top_p in (0.3, 0.6, 0.8, 0.9, 0.95, 0.999, 1.0):
        sets, _, _ = _sets(*select_blocks_reference(logits, last_block, top_p=top_p,
                                                    sink_blocks=SINK, local_blocks=LOCAL))
        if previous is not None:
            for before, now in zip(previous, sets, strict=True):
                for a, c in zip(before, now, strict=True):
                    assert a <= c
        previous = sets


def test_p_one_keeps_every_candidate():
    logits, last_block = _random_case(3)
    sets, _, cnt = _sets(*select_blocks_reference(logits, last_block, top_p=1.0,
                                                  sink_blocks=SINK, local_blocks=LOCAL))
    lb = np.asarray(last_block)
    for b, g, i in np.ndindex(*cnt.shape):
        assert cnt[b, g, i] == lb[b, i] + 1


@pytest.mark.parametrize("min_blocks,max_blocks", [(6, None), (0, 4), (5, 5)])
def test_counts_within_clamps(min_blocks, max_blocks):
    logits, last_block = _random_case(4)
    _, counts = select_blocks_reference(logits, last_block, top_p=0.5, sink_blocks=SINK,
                                        local_blocks=LOCAL, min_blocks=min_blocks,
                                        max_blocks=max_blocks)
    candidates = (np.asarray(last_block) + 1)[:, None, :]
    cnt = np.asarray(counts)
    assert (cnt >= np.minimum(min_blocks, candidates)).all()
    if max_blocks is not None:
        assert (cnt <= max_blocks).all()


def test_top_k_budget():
    logits, last_block = _random_case(5)
    _, counts = select_blocks_reference(logits, last_block, top_p=0.9, sink_blocks=SINK,
                                        local_blocks=LOCAL, top_k=6)
    candidates = (np.asarray(last_block) + 1)[:, None, :]
    np.testing.assert_array_equal(np.asarray(counts),
                                  np.broadcast_to(np.minimum(6, candidates), counts.shape))


def test_empty_and_full_lists():
    logits = jnp.zeros((1, 1, 2, NK))
    last_block = jnp.asarray([[-1, NK - 1]], jnp.int32)
    _, counts = select_blocks_reference(logits, last_block, top_p=1.0, sink_blocks=SINK,
                                        local_blocks=LOCAL)
    assert np.asarray(counts).tolist() == [[[0, NK]]]


def test_block_logits_are_pooled_token_softmax():
    """softmax over block logits == the pooled query's token softmax summed per key block."""
    rng = np.random.default_rng(0)
    b, t, g, r, bq, bk = 2, 37, 2, 4, 8, 8
    qi, ki = rng.normal(size=(b, t, g, r)), rng.normal(size=(b, t, g, r))
    lengths = np.array([37, 21])
    valid, last = query_block_extent(jnp.zeros(2, jnp.int32), jnp.asarray(lengths), t, bq)
    pooled = pool_queries(jnp.asarray(qi, jnp.float32), valid)
    logits = block_logits_reference(pooled, jnp.asarray(ki, jnp.float32), jnp.asarray(lengths),
                                    last, block_k=bk, scale=0.7)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for row, grp, i in np.ndindex(b, g, -(-t // bq)):
        rows = [x for x in range(i * bq, min((i + 1) * bq, t)) if x < lengths[row]]
        if not rows:
            continue
        q = qi[row, rows, grp].mean(0)
        keys = np.arange(min(max(rows) + 1, lengths[row]))
        s = 0.7 * ki[row, keys, grp] @ q
        p = np.exp(s - s.max())
        p /= p.sum()
        expected = np.bincount(keys // bk, p, minlength=probs.shape[-1])
        np.testing.assert_allclose(probs[row, grp, i], expected, atol=1e-5)


def test_indexer_topp_decode_shape():
    rng = np.random.default_rng(1)
    ki = jnp.asarray(rng.normal(size=(2, 100, 3, 4)), jnp.float32)
    qi = jnp.asarray(rng.normal(size=(2, 1, 3, 4)), jnp.float32)
    lengths = jnp.asarray([100, 33], jnp.int32)
    indices, counts = indexer_topp_reference(qi, ki, lengths - 1, lengths, block_q=16,
                                             block_k=16, scale=1.0, top_p=0.9,
                                             sink_blocks=SINK, local_blocks=LOCAL)
    assert indices.shape[:3] == (2, 3, 1)
    assert (np.asarray(indices)[1, :, 0, :np.asarray(counts)[1, 0, 0]] <= 2).all()

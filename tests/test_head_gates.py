"""Head gates (heads.method "gates") and backward elimination ("ablation"): the budget
projection is the Euclidean projection, the gated model is dense at 1 and windowed at 0, the
gates and the elimination find the heads that matter, and the conversion writes their
profile."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rtpurbo_jax.config import ConfigError
from rtpurbo_jax.convert import run_conversion
from rtpurbo_jax.dense import masked_softmax_attention, visible_keys
from rtpurbo_jax.generate import training_hidden
from rtpurbo_jax.head_gates import (
    ablation_scores,
    eliminate,
    elimination_rounds,
    gate_loss,
    gated_attend,
    project_to_budget,
    train_gates,
)
from rtpurbo_jax.model import decoder
from tests.tiny import TINY, tiny_model

WINDOW, SINKS = 16, 4


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.75])
def test_projection_meets_the_budget_and_the_optimality_conditions(budget):
    rng = np.random.default_rng(1)
    alpha = jnp.asarray(rng.uniform(-1.0, 2.0, 60), jnp.float32)
    x = np.asarray(project_to_budget(alpha, budget), np.float64)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert abs(x.mean() - budget) < 1e-5
    # KKT of min |x - alpha|^2 on the capped simplex: one shift tau for the free entries, the
    # clipped ones on the right side of it.
    a = np.asarray(alpha, np.float64)
    free = (x > 1e-6) & (x < 1 - 1e-6)
    assert free.any()
    tau = (a - x)[free]
    assert np.ptp(tau) < 1e-5
    assert np.all(a[x <= 1e-6] <= tau[0] + 1e-5)
    assert np.all(a[x >= 1 - 1e-6] >= tau[0] + 1 - 1e-5)


def _forward(params, tokens, lengths, attend):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return decoder(params, tokens, positions, TINY, attend, [None] * TINY.num_layers)[0]


def _batch(length: int = 96, ragged: int = 70):
    tokens = jax.random.randint(jax.random.key(3), (2, length), 2, TINY.vocab_size)
    return tokens, jnp.asarray([length, ragged], jnp.int32)


def test_gates_at_one_are_dense_and_at_zero_windowed():
    params = tiny_model().params
    tokens, lengths = _batch()
    ones = jnp.ones((TINY.num_layers, TINY.num_heads))

    def windowed(i, qkv, state):
        mask = visible_keys(jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
                            tokens.shape[1], lengths, WINDOW, SINKS)[:, None]
        return masked_softmax_attention(qkv.q, qkv.k, qkv.v, mask, TINY.head_dim**-0.5), state

    for gate, expected in ((ones, training_hidden(params, tokens, lengths, TINY)),
                           (0 * ones, _forward(params, tokens, lengths, windowed))):
        got = _forward(params, tokens, lengths,
                       gated_attend(TINY, lengths, gate, window=WINDOW, sink_tokens=SINKS))
        for row, n in enumerate(np.asarray(lengths)):
            np.testing.assert_allclose(got[row, :n], expected[row, :n], atol=2e-5, rtol=2e-5)


def _loss(params, alpha, tokens, lengths):
    return float(gate_loss(alpha, params, tokens, lengths, jnp.zeros((2, 2), jnp.int32),
                           config=TINY, window=WINDOW, sink_tokens=SINKS, answer_weight=0.0,
                           backend="reference"))


def _only_live(live):
    """The tiny model's params with every head but `live` ((layer, head) pairs) writing
    nothing (its output projection zero)."""
    params = jax.tree.map(lambda x: x, tiny_model().params)
    for layer in range(TINY.num_layers):
        for head in range(TINY.num_heads):
            if (layer, head) not in live:
                params["layers"][layer]["wo"] = params["layers"][layer]["wo"].at[head].set(0.0)
    return params


def test_gates_find_the_heads_whose_window_matters():
    """Every head but two writes nothing: only the two can change the output, so a budget of
    two heads goes to them and the loss falls to ~0."""
    live = {(0, 1), (1, 2)}
    params = _only_live(live)
    tokens, lengths = _batch()
    batches = [{"tokens": tokens, "length": lengths, "answer_span": np.zeros((2, 2), np.int32)}
               ] * 30
    budget = len(live) / (TINY.num_layers * TINY.num_heads)
    gates, losses = train_gates(params, TINY, batches, budget=budget, window=WINDOW,
                                sink_tokens=SINKS, learning_rate=0.05, answer_weight=0.0,
                                backend="reference")
    assert abs(gates.mean() - budget) < 1e-5
    top = {tuple(int(i) for i in np.unravel_index(j, gates.shape))
           for j in np.argsort(-gates, axis=None)[:len(live)]}
    assert top == live
    assert losses[0] > 0 and losses[-1] < 0.1 * losses[0]
    assert _loss(params, jnp.asarray(gates, jnp.float32), tokens, lengths) < 0.1 * losses[0]


@pytest.mark.parametrize("share", [0.1, 0.3, 1.0])
def test_elimination_moves_the_cheapest_first(share):
    """Costs that add up: the order is the units by cost, whatever the round size, and each
    unit's marginal cost is its own."""
    weights = np.random.default_rng(4).permutation(np.arange(1.0, 13.0))
    calls = []
    order, marginal = eliminate(lambda kept: float(weights[~kept].sum()), 12, share,
                                step=lambda: calls.append(1))
    np.testing.assert_array_equal(order, np.argsort(weights))
    np.testing.assert_allclose(marginal, weights)
    rounds = elimination_rounds(12, share)
    assert sum(rounds) == 12 and len(calls) == sum(1 + 12 - sum(rounds[:i])
                                                   for i in range(len(rounds)))


def test_elimination_keeps_one_of_two_heads_that_cover_for_each_other():
    """Units 2 and 5 each suffice (the cost is 1 only when both are moved) and every other unit
    costs a little: one ablation from the dense model rates both free; elimination moves one of
    them first and keeps the other to the end."""
    small = np.linspace(0.01, 0.05, 8)
    small[[2, 5]] = 0.0

    def cost(kept):
        return float(small[~kept].sum() + (not kept[2] and not kept[5]))

    order, marginal = eliminate(cost, 8, 0.1)
    assert order[0] == 2 and order[-1] == 5 and marginal[5] == pytest.approx(1.0)


@pytest.mark.parametrize("unit, live", [(1, {(0, 1), (1, 2)}), (2, {(0, 2), (0, 3), (1, 0)})])
def test_ablation_ranks_the_heads_whose_window_matters_last(unit, live):
    """Only the live heads write: the units holding them are moved last. The first unit moved
    is the one whose own ablation costs least, as gate_loss measures it."""
    params = _only_live(live)
    tokens, lengths = _batch()
    spans = np.zeros((2, 2), np.int32)
    scores, info = ablation_scores(params, TINY, [{"tokens": tokens, "length": lengths,
                                                   "answer_span": spans}],
                                   unit=unit, window=WINDOW, sink_tokens=SINKS,
                                   answer_weight=0.0, round_share=0.25, backend="reference")
    units = TINY.num_layers * TINY.num_heads // unit
    assert scores.shape == (TINY.num_layers, TINY.num_heads) and info["units"] == units
    np.testing.assert_array_equal(scores, np.repeat(scores[:, ::unit], unit, axis=1))
    live_units = {(layer, head // unit) for layer, head in live}
    top = {divmod(int(j), TINY.num_heads // unit)
           for j in np.argsort(-scores[:, ::unit], axis=None)[:len(live_units)]}
    assert top == live_units
    singles = []
    for j in range(units):
        alpha = np.ones((TINY.num_layers, TINY.num_heads), np.float32)
        layer, u = divmod(j, TINY.num_heads // unit)
        alpha[layer, u * unit:(u + 1) * unit] = 0.0
        singles.append(_loss(params, jnp.asarray(alpha), tokens, lengths))
    assert singles[info["order"][0]] == pytest.approx(min(singles), abs=1e-6)
    assert info["local_kl"] == pytest.approx(
        _loss(params, jnp.zeros((TINY.num_layers, TINY.num_heads)), tokens, lengths), rel=1e-4)


def test_bad_budget_fails_clearly():
    with pytest.raises(ValueError, match="budget"):
        train_gates(tiny_model().params, TINY, [], budget=1.0, window=WINDOW, sink_tokens=SINKS,
                    learning_rate=0.1, answer_weight=0.0)


def _paper_conversion(tmp_path, **heads):
    """A one-step paper-design conversion of the tiny model with half its KV groups retrieval,
    the window method's settings in `heads`: (summary, heads.json)."""
    config = tiny.get_config()
    config.sparse.update(design="paper", window=64, sink_blocks=1, local_blocks=1)
    config.heads.update(granularity="kv", rule="fraction", rule_value=0.5, length=256,
                        batch_size=1, gate_min_task_len=240, **heads)
    config.train.update(steps=1, loss_level="token", teacher_top_p=1.0)
    summary = run_conversion(config, tmp_path)
    return summary, json.loads((tmp_path / "heads.json").read_text())


def test_conversion_with_gates_writes_their_profile(tmp_path):
    summary, heads = _paper_conversion(tmp_path, method="gates", gate_steps=2)
    assert heads["info"]["method"] == "gates" and heads["info"]["budget"] == 0.5
    assert heads["info"]["window"] == 64 and np.isfinite(heads["info"]["final_loss"])
    score = np.asarray(heads["score"])
    assert score.shape == (2, 4) and abs(score.mean() - 0.5) < 1e-5
    assert summary["retrieval_fraction"] == 0.5 and heads["kv_group_fraction"] == 0.5
    assert (tmp_path / "heads.png").exists()


def test_conversion_with_ablation_writes_its_profile(tmp_path):
    summary, heads = _paper_conversion(tmp_path, method="ablation", ablation_batches=1)
    info = heads["info"]
    assert info["method"] == "ablation" and info["unit_heads"] == 2 and info["window"] == 64
    assert sorted(info["order"]) == list(range(4)) and np.isfinite(info["local_kl"])
    score = np.asarray(heads["score"])
    assert score.shape == (2, 4)
    np.testing.assert_allclose(sorted(score[:, ::2].ravel()), [0, 1 / 3, 2 / 3, 1], atol=1e-6)
    mask = np.asarray(heads["retrieval_mask"])
    np.testing.assert_array_equal(mask, score >= 2 / 3)
    assert summary["retrieval_fraction"] == 0.5 and heads["kv_group_fraction"] == 0.5
    assert (tmp_path / "heads.png").exists()


@pytest.mark.parametrize("method", ["gates", "ablation"])
def test_window_methods_need_a_budget_rule(tmp_path, method):
    config = tiny.get_config()
    config.sparse.update(design="paper", window=64)
    config.heads.update(method=method, rule="threshold", rule_value=0.1)
    with pytest.raises(ConfigError, match="budget"):
        run_conversion(config, tmp_path)


@pytest.mark.parametrize("method", ["gates", "ablation"])
def test_window_methods_need_the_paper_design(tmp_path, method):
    config = tiny.get_config()
    config.heads.update(method=method, rule="fraction", rule_value=0.5)
    with pytest.raises(ConfigError, match="design='paper'"):
        run_conversion(config, tmp_path)


def test_bad_round_share_fails_clearly():
    with pytest.raises(ValueError, match="round share"):
        elimination_rounds(10, 0.0)

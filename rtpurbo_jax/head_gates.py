"""Retrieval heads chosen by what their window costs the output (heads.method "gates" and
"ablation").

The needle-copy score (the paper's Eq. 3) ranks heads by where they look. Here heads are ranked
by what it does to the model's next-token distribution when they lose the far context, after
DuoAttention (Xiao et al., 2024): every query head h gets a gate alpha_h in [0, 1] and outputs

  alpha_h * causal attention + (1 - alpha_h) * sinks + window attention,

the model frozen. The gates minimise KL(dense model || gated model) on training sequences of
text and long-context tasks (the positions predicting task answers weighted by
`answer_weight`), under a budget: mean(alpha) = the share of query heads that will be retrieval
heads. Each step is Adam on the gates, then the Euclidean projection back onto
{alpha in [0, 1]^n : mean(alpha) = budget}. The gates start uniform, so the budget flows to
the heads whose window costs the most, jointly rather than one head at a time. The final gates
are the heads' scores, ranked like the needle score (`heads.choose_query_heads`).

heads.method "ablation" uses the same gated model with gates fixed at 0 or 1 and no relaxation:
backward elimination. From the dense model (every unit at 1; a unit is a KV group's query heads,
or one query head), each round measures for every unit still at 1 what moving it alone to 0
adds to the KL, then moves the cheapest `round_share` of them. A unit's score is its place in
that order, so the units left last are those whose window costs the output most given the
units already moved (two heads that cover for each other are not both rated free, as a single
ablation from the dense model would rate them).

Shapes: alpha [layers, heads]; tokens [batch, seq] right-padded; lengths [batch];
answer_spans [batch, 2].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.dense import cudnn_local_supported, dense_attention_cudnn, local_attention_cudnn
from rtpurbo_jax.generate import hidden_states
from rtpurbo_jax.model import AttendFn, Params, decoder
from rtpurbo_jax.self_distill import full_loss
from rtpurbo_jax.train_attention import causal_attention

# Bisection steps of the budget projection: the threshold's interval halves each step, from
# width 2 (gates in [0, 1]); 40 steps reach float32 resolution.
PROJECTION_STEPS = 40


def causal_and_local(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                     window: int, sink_tokens: int, backend: str = "reference"
                     ) -> tuple[jax.Array, jax.Array]:
    """Every head's causal and sinks + window attention of right-padded rows from position 0
    (GQA shapes). backend "reference": the training path (differentiable in all of q, k, v);
    otherwise, on a GPU in half precision, cuDNN's inference kernels (forward only: the
    ablation's path, where the training path's query chunks run one after another)."""
    if backend != "reference" and cudnn_local_supported(q):
        positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return (dense_attention_cudnn(q, k, v, positions, lengths, causal_from_zero=True),
                local_attention_cudnn(q, k, v, lengths, sink_tokens=sink_tokens,
                                      window=window))
    return (causal_attention(q, k, v, lengths),
            causal_attention(q, k, v, lengths, window=window, sink_tokens=sink_tokens))


def gated_attend(config: ModelConfig, lengths: jax.Array, alpha: jax.Array, *, window: int,
                 sink_tokens: int, backend: str = "reference") -> AttendFn:
    """An `attend` mixing every query head's causal and sinks + window outputs by its gate
    (`causal_and_local` with `backend`)."""

    def attend(i: int, qkv: Any, state: Any):
        full, local = causal_and_local(qkv.q, qkv.k, qkv.v, lengths, window=window,
                                       sink_tokens=sink_tokens, backend=backend)
        gate = alpha[i].astype(full.dtype)[None, None, :, None]
        # Exactly the causal output at 1 and the windowed one at 0.
        return gate * full + (1 - gate) * local, None

    return attend


def gated_kl(alpha: jax.Array, params: Params, teacher: jax.Array, tokens: jax.Array,
             lengths: jax.Array, answer_spans: jax.Array, *, config: ModelConfig, window: int,
             sink_tokens: int, answer_weight: float, backend: str = "reference") -> jax.Array:
    """KL(dense || gated) over the vocabulary (`self_distill.full_loss`'s mean), given the
    dense model's final hidden states `teacher` [batch, seq, embed]; attention through
    `causal_and_local` with `backend`."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attend = gated_attend(config, lengths, alpha, window=window, sink_tokens=sink_tokens,
                          backend=backend)
    student, _ = decoder(params, tokens, positions, config, attend, [None] * config.num_layers)
    return full_loss(params, params, teacher, student, lengths, config, answer_spans,
                     answer_weight)


def gate_loss(alpha: jax.Array, params: Params, tokens: jax.Array, lengths: jax.Array,
              answer_spans: jax.Array, *, config: ModelConfig, window: int, sink_tokens: int,
              answer_weight: float, backend: str) -> jax.Array:
    """`gated_kl` with the teacher run here; gradients reach alpha only."""
    params = jax.lax.stop_gradient(params)
    teacher = jax.lax.stop_gradient(hidden_states(params, tokens, lengths, config, backend))
    return gated_kl(alpha, params, teacher, tokens, lengths, answer_spans, config=config,
                    window=window, sink_tokens=sink_tokens, answer_weight=answer_weight)


def project_to_budget(alpha: jax.Array, budget: float) -> jax.Array:
    """The Euclidean projection of alpha onto {x in [0, 1]^n : mean(x) = budget}:
    clip(alpha - tau, 0, 1), tau found by bisection (the mean falls as tau rises)."""
    lo, hi = jnp.min(alpha) - 1.0, jnp.max(alpha)  # means 1 and 0

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = (lo + hi) / 2
        above = jnp.mean(jnp.clip(alpha - mid, 0.0, 1.0)) > budget
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, PROJECTION_STEPS, halve, (lo, hi))
    return jnp.clip(alpha - (lo + hi) / 2, 0.0, 1.0)


def check_budget(budget: float) -> None:
    if not 0.0 < budget < 1.0:
        raise ValueError(f"the gates' budget (the share of query heads kept as retrieval "
                         f"heads) must be in (0, 1), got {budget}")


@functools.partial(jax.jit, static_argnames=("optimizer", "config", "window", "sink_tokens",
                                             "answer_weight", "backend", "budget"),
                   donate_argnums=(0, 1))
def _gate_step(alpha: jax.Array, opt_state: Any, params: Params, tokens: jax.Array,
               lengths: jax.Array, answer_spans: jax.Array, *, optimizer: Any,
               config: ModelConfig, window: int, sink_tokens: int, answer_weight: float,
               backend: str, budget: float) -> tuple[jax.Array, Any, jax.Array]:
    loss, grad = jax.value_and_grad(gate_loss)(
        alpha, params, tokens, lengths, answer_spans, config=config, window=window,
        sink_tokens=sink_tokens, answer_weight=answer_weight, backend=backend)
    updates, opt_state = optimizer.update(grad, opt_state, alpha)
    return project_to_budget(optax.apply_updates(alpha, updates), budget), opt_state, loss


def train_gates(params: Params, config: ModelConfig, batches: Any, *, budget: float,
                window: int, sink_tokens: int, learning_rate: float, answer_weight: float,
                backend: str = "auto", progress: bool = False
                ) -> tuple[np.ndarray, list[float]]:
    """Gates [layers, heads] float64 after one Adam step per batch of `batches` (dicts with
    "tokens", "length" and "answer_span", as `data.training_dataset` yields), and the loss of
    every step (before its update)."""
    from tqdm import tqdm

    check_budget(budget)
    if not 0.0 <= answer_weight <= 1.0:
        raise ValueError(f"answer_weight must be in [0, 1], got {answer_weight}")
    optimizer = optax.adam(learning_rate)
    alpha = jnp.full((config.num_layers, config.num_heads), budget, jnp.float32)
    opt_state = optimizer.init(alpha)
    losses = []
    bar = tqdm(batches, total=len(batches), desc="head gates", disable=not progress)
    for batch in bar:
        alpha, opt_state, loss = _gate_step(
            alpha, opt_state, params, jnp.asarray(batch["tokens"]),
            jnp.asarray(batch["length"]), jnp.asarray(batch["answer_span"]),
            optimizer=optimizer, config=config, window=window, sink_tokens=sink_tokens,
            answer_weight=answer_weight, backend=backend, budget=budget)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return np.asarray(alpha, np.float64), losses


def elimination_rounds(units: int, round_share: float) -> list[int]:
    """How many units each round of `eliminate` moves: ceil(round_share * units left), >= 1."""
    if not 0.0 < round_share <= 1.0:
        raise ValueError(f"the elimination's round share must be in (0, 1], got {round_share}")
    rounds, left = [], units
    while left:
        rounds.append(min(left, max(1, math.ceil(round_share * left))))
        left -= rounds[-1]
    return rounds


def eliminate(cost: Callable[[np.ndarray], float], units: int, round_share: float,
              step: Callable[[], None] = lambda: None) -> tuple[np.ndarray, np.ndarray]:
    """Backward elimination over `units` (module docstring). cost(kept) is the loss with the
    units where `kept` [units] is False moved to their window; `step` is called after each.

    Returns (order, marginal): the unit indices, first moved first, and each unit's added cost
    in the round that moved it.
    """
    kept = np.ones(units, bool)
    order, marginal = [], np.zeros(units)
    for take in elimination_rounds(units, round_share):
        base = cost(kept)
        step()
        live = np.flatnonzero(kept)
        added = []
        for unit in live:
            kept[unit] = False
            added.append(cost(kept) - base)
            kept[unit] = True
            step()
        cheapest = np.argsort(np.asarray(added), kind="stable")[:take]
        moved = live[cheapest]
        marginal[moved] = np.asarray(added)[cheapest]
        kept[moved] = False
        order.extend(int(u) for u in moved)
    return np.asarray(order, np.int64), marginal


def ablation_scores(params: Params, config: ModelConfig, batches: Sequence[dict[str, Any]], *,
                    unit: int, window: int, sink_tokens: int, answer_weight: float,
                    round_share: float, backend: str = "auto", progress: bool = False
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """Every query head's elimination score [layers, heads] in [0, 1] (1: the unit moved last;
    the heads of one unit share it) and what the elimination measured. unit: query heads per
    unit (the GQA group size for KV groups, 1 for single heads); batches: dicts with "tokens",
    "length" and "answer_span" (`data.training_dataset`)."""
    from tqdm import tqdm

    if not 0.0 <= answer_weight <= 1.0:
        raise ValueError(f"answer_weight must be in [0, 1], got {answer_weight}")
    if unit < 1 or config.num_heads % unit:
        raise ValueError(f"a unit of {unit} query heads does not divide {config.num_heads}")
    if not batches:
        raise ValueError("the elimination needs at least one batch")
    layers, per_layer = config.num_layers, config.num_heads // unit
    units = layers * per_layer
    teach = jax.jit(hidden_states, static_argnames=("config", "backend"))
    kl = jax.jit(gated_kl, static_argnames=("config", "window", "sink_tokens", "answer_weight",
                                            "backend"))
    data = []
    for batch in batches:
        tokens, lengths = jnp.asarray(batch["tokens"]), jnp.asarray(batch["length"])
        data.append((teach(params, tokens, lengths, config, backend), tokens, lengths,
                     jnp.asarray(batch["answer_span"])))

    def cost(kept: np.ndarray) -> float:
        alpha = jnp.asarray(np.repeat(kept.reshape(layers, per_layer), unit, axis=1),
                            jnp.float32)
        return sum(float(kl(alpha, params, *d, config=config, window=window,
                            sink_tokens=sink_tokens, answer_weight=answer_weight,
                            backend=backend))
                   for d in data) / len(data)

    rounds = elimination_rounds(units, round_share)
    evaluations = sum(1 + units - sum(rounds[:i]) for i in range(len(rounds)))
    bar = tqdm(total=evaluations, desc="head ablation", disable=not progress)
    order, marginal = eliminate(cost, units, round_share, step=lambda: bar.update(1))
    bar.close()
    rank = np.empty(units)
    rank[order] = np.arange(units) / max(units - 1, 1)
    scores = np.repeat(rank.reshape(layers, per_layer), unit, axis=1)
    return scores, {"units": units, "unit_heads": unit, "rounds": rounds,
                    "evaluations": evaluations, "round_share": round_share,
                    "order": order.tolist(), "marginal_kl": marginal.tolist(),
                    "local_kl": cost(np.zeros(units, bool))}

"""Retrieval heads chosen by what their window costs the output (heads.method "gates").

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

Shapes: alpha [layers, heads]; tokens [batch, seq] right-padded; lengths [batch];
answer_spans [batch, 2].
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.generate import hidden_states
from rtpurbo_jax.model import AttendFn, Params, decoder
from rtpurbo_jax.self_distill import full_loss
from rtpurbo_jax.train_attention import causal_attention

# Bisection steps of the budget projection: the threshold's interval halves each step, from
# width 2 (gates in [0, 1]); 40 steps reach float32 resolution.
PROJECTION_STEPS = 40


def gated_attend(config: ModelConfig, lengths: jax.Array, alpha: jax.Array, *, window: int,
                 sink_tokens: int) -> AttendFn:
    """An `attend` mixing every query head's causal and sinks + window outputs by its gate."""

    def attend(i: int, qkv: Any, state: Any):
        full = causal_attention(qkv.q, qkv.k, qkv.v, lengths)
        local = causal_attention(qkv.q, qkv.k, qkv.v, lengths, window=window,
                                 sink_tokens=sink_tokens)
        gate = alpha[i].astype(full.dtype)[None, None, :, None]
        # Exactly the causal output at 1 and the windowed one at 0.
        return gate * full + (1 - gate) * local, None

    return attend


def gate_loss(alpha: jax.Array, params: Params, tokens: jax.Array, lengths: jax.Array,
              answer_spans: jax.Array, *, config: ModelConfig, window: int, sink_tokens: int,
              answer_weight: float, backend: str) -> jax.Array:
    """KL(dense || gated) over the vocabulary (`self_distill.full_loss`'s mean); gradients
    reach alpha only."""
    params = jax.lax.stop_gradient(params)
    teacher = jax.lax.stop_gradient(hidden_states(params, tokens, lengths, config, backend))
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attend = gated_attend(config, lengths, alpha, window=window, sink_tokens=sink_tokens)
    student, _ = decoder(params, tokens, positions, config, attend, [None] * config.num_layers)
    return full_loss(params, params, teacher, student, lengths, config, answer_spans,
                     answer_weight)


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

"""Stage-2 self-distillation: the sparse student matches the dense teacher's next-token
distribution.

The teacher is the original model run dense (frozen weights), the student the same model run
sparse, its weights training. At every valid position t the loss is

  top_k: KL(softmax(teacher logits at ids) || softmax(student logits at ids)),
         ids = the teacher's top-k vocabulary ids at t (k = 10 in the paper);
  full:  KL(softmax(teacher logits) || softmax(student logits)) over the whole vocabulary;

averaged over all valid positions of the batch. [seq, vocab] logits (vocab 49K-128K, seq up to
128K) never exist at once: positions go through the LM head a chunk at a time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.model import lm_logits

LOSSES = ("top_k", "full")
# The paper's number of teacher ids the stage-2 KL is restricted to.
DEFAULT_TOP_K = 10
# Positions (per batch row) whose logits exist at once: the chunk's teacher and student logits
# are [batch, DISTILL_CHUNK, vocab] float32 each (128 MiB per batch row at vocab 128K).
DISTILL_CHUNK = 256


def _check_args(teacher_hidden: jax.Array, student_hidden: jax.Array, lengths: jax.Array,
                config: ModelConfig, loss: str, top_k: int) -> None:
    """One ValueError per misuse, raised before any tracing."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "top_k" and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={config.vocab_size}], got {top_k}")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden {teacher_hidden.shape} and student_hidden "
                         f"{student_hidden.shape} must have the same shape")
    if teacher_hidden.ndim != 3 or teacher_hidden.shape[-1] != config.hidden_size:
        raise ValueError(f"hidden states must be [batch, seq, {config.hidden_size}], got "
                         f"{teacher_hidden.shape}")
    if lengths.shape != teacher_hidden.shape[:1]:
        raise ValueError(f"lengths must be [batch={teacher_hidden.shape[0]}], got "
                         f"{lengths.shape}")


def _chunks(t: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """(chunk, number of chunks, the [batch, seq, ...] padding to a whole number of them)."""
    chunk = min(DISTILL_CHUNK, t)
    num_chunks = -(-t // chunk)
    return chunk, num_chunks, ((0, 0), (0, num_chunks * chunk - t))


def _chunk_rows(x: jax.Array, c: jax.Array, chunk: int, lengths: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """(chunk c of padded x [batch, chunks * chunk, ...] with invalid rows zeroed, valid [b,
    chunk]). Zeroing keeps garbage past a row's length (even inf) out of the loss and its
    gradient."""
    valid = (c * chunk + jnp.arange(chunk))[None, :] < lengths[:, None]
    rows = jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, 1)
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), rows, 0), valid


def _kl(log_teacher: jax.Array, log_student: jax.Array) -> jax.Array:
    """KL(teacher || student) over the last axis, from log-probabilities. log_softmax of finite
    logits is finite, so a teacher probability that underflows to 0 contributes 0."""
    return jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)


def _valid_sum(kl: jax.Array, valid: jax.Array) -> jax.Array:
    """[summed KL over the valid positions, their number] of one chunk."""
    return jnp.stack([jnp.sum(jnp.where(valid, kl, 0.0)), valid.sum().astype(jnp.float32)])


def _mean_over_chunks(one_chunk: Any, num_chunks: int) -> jax.Array:
    """The mean KL over every valid position, from one_chunk(c) -> `_valid_sum` (0 when no
    position is valid)."""
    totals = jax.lax.map(one_chunk, jnp.arange(num_chunks)).sum(axis=0)
    return totals[0] / jnp.maximum(totals[1], 1.0)


def teacher_top_k(teacher_params: Any, teacher_hidden: jax.Array, lengths: jax.Array,
                  config: ModelConfig, top_k: int) -> tuple[jax.Array, jax.Array]:
    """The teacher's top_k logits and their vocabulary ids at every position: ([batch, seq, k]
    float32, [batch, seq, k] int32), made a chunk of positions at a time; zeros past each
    row's length. Small enough to cache ([seq, k] per row)."""
    b, t, _ = teacher_hidden.shape
    chunk, num_chunks, pad = _chunks(t)
    hidden = jnp.pad(jax.lax.stop_gradient(teacher_hidden), pad + ((0, 0),))

    def one_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        rows, valid = _chunk_rows(hidden, c, chunk, lengths)
        values, ids = jax.lax.top_k(lm_logits(teacher_params, rows, config), top_k)
        keep = valid[:, :, None]
        return jnp.where(keep, values, 0.0), jnp.where(keep, ids, 0).astype(jnp.int32)

    values, ids = jax.lax.map(one_chunk, jnp.arange(num_chunks))  # [chunks, b, chunk, k]

    def unchunk(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x, 0, 1).reshape(b, num_chunks * chunk, top_k)[:, :t]

    return jax.lax.stop_gradient(unchunk(values)), unchunk(ids)


def top_k_loss(params: Any, student_hidden: jax.Array, teacher_values: jax.Array,
               teacher_ids: jax.Array, lengths: jax.Array, config: ModelConfig) -> jax.Array:
    """Mean over valid positions of KL(softmax(teacher_values) || softmax(the student's logits
    at teacher_ids)); teacher_values, teacher_ids: [batch, seq, k] from `teacher_top_k` (live
    or cached). Each chunk runs under jax.checkpoint: the backward pass recomputes its [chunk,
    vocab] logits instead of keeping them."""
    t = student_hidden.shape[1]
    chunk, num_chunks, pad = _chunks(t)
    student = jnp.pad(student_hidden, pad + ((0, 0),))
    values = jnp.pad(jax.lax.stop_gradient(teacher_values), pad + ((0, 0),))
    ids = jnp.pad(teacher_ids, pad + ((0, 0),))

    @jax.checkpoint
    def one_chunk(c: jax.Array) -> jax.Array:
        rows, valid = _chunk_rows(student, c, chunk, lengths)
        chosen = jnp.take_along_axis(lm_logits(params, rows, config),
                                     jax.lax.dynamic_slice_in_dim(ids, c * chunk, chunk, 1), -1)
        target = jax.lax.dynamic_slice_in_dim(values, c * chunk, chunk, 1)
        return _valid_sum(_kl(jax.nn.log_softmax(target, -1), jax.nn.log_softmax(chosen, -1)),
                          valid)

    return _mean_over_chunks(one_chunk, num_chunks)


def full_loss(params: Any, teacher_params: Any, teacher_hidden: jax.Array,
              student_hidden: jax.Array, lengths: jax.Array, config: ModelConfig) -> jax.Array:
    """Mean over valid positions of KL(teacher || student) over the whole vocabulary, a chunk of
    positions at a time (each under jax.checkpoint)."""
    t = teacher_hidden.shape[1]
    chunk, num_chunks, pad = _chunks(t)
    teacher = jnp.pad(jax.lax.stop_gradient(teacher_hidden), pad + ((0, 0),))
    student = jnp.pad(student_hidden, pad + ((0, 0),))

    @jax.checkpoint
    def one_chunk(c: jax.Array) -> jax.Array:
        th, valid = _chunk_rows(teacher, c, chunk, lengths)
        sh, _ = _chunk_rows(student, c, chunk, lengths)
        teacher_logits = jax.lax.stop_gradient(lm_logits(teacher_params, th, config))
        return _valid_sum(_kl(jax.nn.log_softmax(teacher_logits, -1),
                              jax.nn.log_softmax(lm_logits(params, sh, config), -1)), valid)

    return _mean_over_chunks(one_chunk, num_chunks)


def distillation_loss(
    params: Any,
    teacher_hidden: jax.Array,
    student_hidden: jax.Array,
    lengths: jax.Array,
    config: ModelConfig,
    *,
    loss: str = "top_k",
    top_k: int = DEFAULT_TOP_K,
    teacher_params: Any = None,
) -> jax.Array:
    """Mean next-token KL(teacher || student) over the valid positions of the batch.

    params: the student's parameters, used through `lm_logits`; teacher_params: the frozen
    original weights whose LM head makes the teacher's logits (default: params, right while the
    head does not train, e.g. at the first step or with adapters elsewhere).
    teacher_hidden, student_hidden: [batch, seq, embed] final normed hidden states of the dense
    and the sparse run; lengths: [batch] int (right padding: positions >= length are ignored,
    whatever they hold). Returns a float32 scalar (0 when no position is valid). Gradients reach
    student_hidden and params via the student's logits only; teacher_hidden gets exactly zero.
    """
    _check_args(teacher_hidden, student_hidden, lengths, config, loss, top_k)
    teacher = params if teacher_params is None else teacher_params
    if loss == "full":
        return full_loss(params, teacher, teacher_hidden, student_hidden, lengths, config)
    values, ids = teacher_top_k(teacher, teacher_hidden, lengths, config, top_k)
    return top_k_loss(params, student_hidden, values, ids, lengths, config)

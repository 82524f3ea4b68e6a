"""Stage-2 self-distillation: the sparse student matches the dense teacher's next-token
distribution.

The teacher is the original model run dense (frozen weights), the student the same model run
sparse, its weights training. At every valid position t the loss is

  top_k: KL(softmax(teacher logits at ids) || softmax(student logits at ids)),
         ids = the teacher's top-k vocabulary ids at t (k = 10 in the paper);
  full:  KL(softmax(teacher logits) || softmax(student logits)) over the whole vocabulary;

averaged over all valid positions of the batch, or, with answer_weight w > 0,

  (1 - w) * (mean over all valid positions) + w * (mean over the answer positions),

the answer positions being each row's [start, end) of `answer_spans` (the positions that
predict a task's answer; the second mean is 0 in a batch without any). The paper's stage 2
takes its loss on the ~300 response tokens of each long dialogue only (w = 1); w between 0 and
1 keeps the text's positions in the loss beside the answers. [seq, vocab] logits (vocab
49K-128K, seq up to 128K) never exist at once: positions go through the LM head a chunk at a
time.
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
                config: ModelConfig, loss: str, top_k: int, answer_weight: float) -> None:
    """One ValueError per misuse, raised before any tracing."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0.0 <= answer_weight <= 1.0:
        raise ValueError(f"answer_weight must be in [0, 1], got {answer_weight}")
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


def _in_answer(c: jax.Array, chunk: int, valid: jax.Array, answer_spans: jax.Array
               ) -> jax.Array:
    """[batch, chunk] bool: the valid positions of chunk c inside each row's answer span
    (answer_spans: [batch, 2] int, [start, end))."""
    pos = (c * chunk + jnp.arange(chunk))[None, :]
    return valid & (pos >= answer_spans[:, :1]) & (pos < answer_spans[:, 1:])


def _kl(log_teacher: jax.Array, log_student: jax.Array) -> jax.Array:
    """KL(teacher || student) over the last axis, from log-probabilities. log_softmax of finite
    logits is finite, so a teacher probability that underflows to 0 contributes 0."""
    return jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)


def _chunk_sums(kl: jax.Array, valid: jax.Array, answer: jax.Array) -> jax.Array:
    """[summed KL over the valid positions, their number, the same over the answer positions]
    of one chunk."""
    def total(mask: jax.Array) -> list[jax.Array]:
        return [jnp.sum(jnp.where(mask, kl, 0.0)), mask.sum().astype(jnp.float32)]

    return jnp.stack(total(valid) + total(answer))


def _weighted_mean(one_chunk: Any, num_chunks: int, answer_weight: float) -> jax.Array:
    """(1 - answer_weight) * the mean KL over the valid positions + answer_weight * the mean
    over the answer positions, from one_chunk(c) -> `_chunk_sums` (a mean over no position is
    0)."""
    totals = jax.lax.map(one_chunk, jnp.arange(num_chunks)).sum(axis=0)
    means = totals[0::2] / jnp.maximum(totals[1::2], 1.0)
    return (1.0 - answer_weight) * means[0] + answer_weight * means[1]


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


def _no_answers(lengths: jax.Array) -> jax.Array:
    """[batch, 2] empty answer spans."""
    return jnp.zeros(lengths.shape + (2,), jnp.int32)


def top_k_loss(params: Any, student_hidden: jax.Array, teacher_values: jax.Array,
               teacher_ids: jax.Array, lengths: jax.Array, config: ModelConfig,
               answer_spans: jax.Array | None = None, answer_weight: float = 0.0) -> jax.Array:
    """KL(softmax(teacher_values) || softmax(the student's logits at teacher_ids)), averaged
    as the module says; teacher_values, teacher_ids: [batch, seq, k] from `teacher_top_k` (live
    or cached); answer_spans: [batch, 2] (None: no answers). Each chunk runs under
    jax.checkpoint: the backward pass recomputes its [chunk, vocab] logits instead of keeping
    them."""
    t = student_hidden.shape[1]
    chunk, num_chunks, pad = _chunks(t)
    student = jnp.pad(student_hidden, pad + ((0, 0),))
    values = jnp.pad(jax.lax.stop_gradient(teacher_values), pad + ((0, 0),))
    ids = jnp.pad(teacher_ids, pad + ((0, 0),))
    spans = _no_answers(lengths) if answer_spans is None else answer_spans

    @jax.checkpoint
    def one_chunk(c: jax.Array) -> jax.Array:
        rows, valid = _chunk_rows(student, c, chunk, lengths)
        chosen = jnp.take_along_axis(lm_logits(params, rows, config),
                                     jax.lax.dynamic_slice_in_dim(ids, c * chunk, chunk, 1), -1)
        target = jax.lax.dynamic_slice_in_dim(values, c * chunk, chunk, 1)
        return _chunk_sums(_kl(jax.nn.log_softmax(target, -1), jax.nn.log_softmax(chosen, -1)),
                           valid, _in_answer(c, chunk, valid, spans))

    return _weighted_mean(one_chunk, num_chunks, answer_weight)


def full_loss(params: Any, teacher_params: Any, teacher_hidden: jax.Array,
              student_hidden: jax.Array, lengths: jax.Array, config: ModelConfig,
              answer_spans: jax.Array | None = None, answer_weight: float = 0.0) -> jax.Array:
    """KL(teacher || student) over the whole vocabulary, averaged as the module says, a chunk
    of positions at a time (each under jax.checkpoint)."""
    t = teacher_hidden.shape[1]
    chunk, num_chunks, pad = _chunks(t)
    teacher = jnp.pad(jax.lax.stop_gradient(teacher_hidden), pad + ((0, 0),))
    student = jnp.pad(student_hidden, pad + ((0, 0),))
    spans = _no_answers(lengths) if answer_spans is None else answer_spans

    @jax.checkpoint
    def one_chunk(c: jax.Array) -> jax.Array:
        th, valid = _chunk_rows(teacher, c, chunk, lengths)
        sh, _ = _chunk_rows(student, c, chunk, lengths)
        teacher_logits = jax.lax.stop_gradient(lm_logits(teacher_params, th, config))
        return _chunk_sums(_kl(jax.nn.log_softmax(teacher_logits, -1),
                               jax.nn.log_softmax(lm_logits(params, sh, config), -1)), valid,
                           _in_answer(c, chunk, valid, spans))

    return _weighted_mean(one_chunk, num_chunks, answer_weight)


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
    answer_spans: jax.Array | None = None,
    answer_weight: float = 0.0,
) -> jax.Array:
    """Next-token KL(teacher || student) over the valid positions of the batch (the mean, or
    with answer_weight > 0 the weighted mean the module describes).

    params: the student's parameters, used through `lm_logits`; teacher_params: the frozen
    original weights whose LM head makes the teacher's logits (default: params, right while the
    head does not train, e.g. at the first step or with adapters elsewhere).
    teacher_hidden, student_hidden: [batch, seq, embed] final normed hidden states of the dense
    and the sparse run; lengths: [batch] int (right padding: positions >= length are ignored,
    whatever they hold); answer_spans: [batch, 2] int [start, end) (None: none). Returns a
    float32 scalar (0 when no position is valid). Gradients reach student_hidden and params
    via the student's logits only; teacher_hidden gets exactly zero.
    """
    _check_args(teacher_hidden, student_hidden, lengths, config, loss, top_k, answer_weight)
    teacher = params if teacher_params is None else teacher_params
    if loss == "full":
        return full_loss(params, teacher, teacher_hidden, student_hidden, lengths, config,
                         answer_spans, answer_weight)
    values, ids = teacher_top_k(teacher, teacher_hidden, lengths, config, top_k)
    return top_k_loss(params, student_hidden, values, ids, lengths, config, answer_spans,
                      answer_weight)

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


def _position_kl(teacher_logits: jax.Array, student_logits: jax.Array, loss: str,
                 top_k: int) -> jax.Array:
    """teacher_logits, student_logits: [..., vocab] float32 -> KL(teacher || student) [...]."""
    if loss == "top_k":
        teacher_logits, ids = jax.lax.top_k(teacher_logits, top_k)
        student_logits = jnp.take_along_axis(student_logits, ids, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits, axis=-1)
    log_student = jax.nn.log_softmax(student_logits, axis=-1)
    # log_softmax of finite logits is finite, so a teacher probability that underflows to 0
    # contributes 0 * finite = 0: no masking needed.
    return jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)


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
    and the sparse run; lengths:
    [batch] int (right padding: positions >= length are ignored, whatever they hold). Returns a
    float32 scalar (0 when no position is valid).

    The teacher's logits are stop_gradient'ed, so gradients reach student_hidden and params via
    the student's logits only; teacher_hidden gets exactly zero. Each chunk of positions runs
    under jax.checkpoint, so the backward pass recomputes its logits instead of keeping
    [seq, vocab] of them.
    """
    _check_args(teacher_hidden, student_hidden, lengths, config, loss, top_k)
    teacher = params if teacher_params is None else teacher_params
    t = teacher_hidden.shape[1]
    chunk = min(DISTILL_CHUNK, t)
    num_chunks = -(-t // chunk)
    pad = ((0, 0), (0, num_chunks * chunk - t), (0, 0))
    teacher_pad = jnp.pad(teacher_hidden, pad)
    student_pad = jnp.pad(student_hidden, pad)

    @jax.checkpoint
    def one_chunk(c: jax.Array) -> jax.Array:
        """Chunk index -> [summed KL over its valid positions, number of valid positions]."""
        pos = c * chunk + jnp.arange(chunk)
        valid = pos[None, :] < lengths[:, None]  # [b, chunk]
        # Padded rows are zeroed before the LM head, so garbage there (even inf) can neither
        # reach the loss nor turn its gradient into NaN through the masked branch.
        keep = valid[:, :, None]
        th = jnp.where(keep, jax.lax.dynamic_slice_in_dim(teacher_pad, c * chunk, chunk, 1), 0)
        sh = jnp.where(keep, jax.lax.dynamic_slice_in_dim(student_pad, c * chunk, chunk, 1), 0)
        teacher_logits = jax.lax.stop_gradient(lm_logits(teacher, th, config))
        kl = _position_kl(teacher_logits, lm_logits(params, sh, config), loss, top_k)
        # Zeroed rows already give KL 0 (identical sides); the mask keeps that explicit.
        return jnp.stack([jnp.sum(jnp.where(valid, kl, 0.0)), valid.sum().astype(jnp.float32)])

    totals = jax.lax.map(one_chunk, jnp.arange(num_chunks)).sum(axis=0)
    return totals[0] / jnp.maximum(totals[1], 1.0)


def stage2_loss(
    params: Any,
    teacher_params: Any,
    tokens: jax.Array,
    lengths: jax.Array,
    config: ModelConfig,
    sparse: Any,
    indexer: Any,
    *,
    loss: str = "top_k",
    top_k: int = DEFAULT_TOP_K,
) -> jax.Array:
    """Stage 2 on a batch: the frozen original weights run dense (the teacher), the training
    weights run sparse as decode would (`generate.training_hidden`, the student), and the KL
    between their next-token distributions. tokens: [batch, seq] right-padded; lengths: [batch].
    Gradients reach `params` only; the indexer stays frozen."""
    from rtpurbo_jax.generate import training_hidden

    teacher_hidden = jax.lax.stop_gradient(training_hidden(teacher_params, tokens, lengths,
                                                           config))
    student_hidden = training_hidden(params, tokens, lengths, config, sparse,
                                     jax.lax.stop_gradient(indexer))
    return distillation_loss(params, teacher_hidden, student_hidden, lengths, config,
                             loss=loss, top_k=top_k, teacher_params=teacher_params)

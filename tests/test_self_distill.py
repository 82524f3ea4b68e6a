"""The chunked stage-2 self-distillation loss equals its naive full-[batch, seq, vocab] form, in
value and gradient; padding is ignored; the teacher gets no gradient; top_k = vocab is "full"."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax import self_distill
from rtpurbo_jax.model import init_params, lm_logits
from rtpurbo_jax.self_distill import LOSSES, distillation_loss
from tests.tiny import TINY

B, T = 3, 37  # T is not a multiple of any chunk tried below
LENGTHS = jnp.array([37, 20, 1], jnp.int32)
# Hidden states scaled so that logits (weights of stddev 0.02) are far from uniform.
HIDDEN_SCALE = 10.0
# Small chunks so that several (and a ragged last one) are used at T = 37.
CHUNKS = (5, 16, 64)
# Large finite garbage, and inf (which must not turn the gradient into NaN either).
PADDING_GARBAGE = (1e4, np.inf)
RTOL, ATOL = 2e-5, 1e-6


def _setup(seed: int = 0, config=TINY):
    k_params, k_teacher, k_student = jax.random.split(jax.random.key(seed), 3)
    params = init_params(config, k_params)
    shape = (B, T, config.hidden_size)
    teacher = HIDDEN_SCALE * jax.random.normal(k_teacher, shape)
    student = teacher + 0.5 * HIDDEN_SCALE * jax.random.normal(k_student, shape)
    return params, teacher, student


def _naive(params, teacher_hidden, student_hidden, lengths, config, loss, top_k,
           answer_spans=None, answer_weight=0.0):
    """Full [b, t, vocab] logits at once; the same KL definitions and weighting."""
    teacher = jax.lax.stop_gradient(lm_logits(params, teacher_hidden, config))
    student = lm_logits(params, student_hidden, config)
    if loss == "top_k":
        teacher, ids = jax.lax.top_k(teacher, top_k)
        student = jnp.take_along_axis(student, ids, axis=-1)
    p = jax.nn.softmax(teacher, axis=-1)
    kl = jnp.sum(p * (jax.nn.log_softmax(teacher, -1) - jax.nn.log_softmax(student, -1)), -1)
    pos = jnp.arange(teacher_hidden.shape[1])[None, :]
    valid = pos < lengths[:, None]
    mean = jnp.sum(jnp.where(valid, kl, 0.0)) / valid.sum()
    if not answer_weight:
        return mean
    answer = valid & (pos >= answer_spans[:, :1]) & (pos < answer_spans[:, 1:])
    answer_mean = jnp.sum(jnp.where(answer, kl, 0.0)) / jnp.maximum(answer.sum(), 1)
    return (1 - answer_weight) * mean + answer_weight * answer_mean


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("loss", LOSSES)
def test_equals_naive_value_and_gradients(monkeypatch, loss, chunk, tied):
    monkeypatch.setattr(self_distill, "DISTILL_CHUNK", chunk)
    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    params, teacher, student = _setup(config=config)
    top_k = self_distill.DEFAULT_TOP_K

    def chunked(p, th, sh):
        return distillation_loss(p, th, sh, LENGTHS, config, loss=loss, top_k=top_k)

    def naive(p, th, sh):
        return _naive(p, th, sh, LENGTHS, config, loss, top_k)

    value, grads = jax.value_and_grad(chunked, argnums=(0, 1, 2))(params, teacher, student)
    ref_value, ref_grads = jax.value_and_grad(naive, argnums=(0, 1, 2))(params, teacher, student)
    assert value.dtype == jnp.float32 and value.shape == ()
    np.testing.assert_allclose(value, ref_value, rtol=RTOL, atol=ATOL)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The teacher side is stop_gradient'ed: exactly zero, not merely small.
    assert not np.any(np.asarray(grads[1]))
    assert np.any(np.asarray(grads[2]))


# Row 0's answer crosses chunk edges, row 1 has none, row 2's runs past its length (1).
ANSWER_SPANS = jnp.array([[3, 14], [0, 0], [0, 9]], jnp.int32)


@pytest.mark.parametrize("answer_weight", [0.5, 1.0])
@pytest.mark.parametrize("chunk", (5, 64))
@pytest.mark.parametrize("loss", LOSSES)
def test_answer_weighting_equals_naive(monkeypatch, loss, chunk, answer_weight):
    monkeypatch.setattr(self_distill, "DISTILL_CHUNK", chunk)
    params, teacher, student = _setup(5)

    def chunked(sh, spans):
        return distillation_loss(params, teacher, sh, LENGTHS, TINY, loss=loss,
                                 answer_spans=spans, answer_weight=answer_weight)

    value, grad = jax.value_and_grad(chunked)(student, ANSWER_SPANS)
    ref_value, ref_grad = jax.value_and_grad(
        lambda sh: _naive(params, teacher, sh, LENGTHS, TINY, loss, self_distill.DEFAULT_TOP_K,
                          ANSWER_SPANS, answer_weight))(student)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    outside = np.ones((B, T), bool)
    outside[0, 3:14] = outside[2, 0:1] = False
    # Only answers count at weight 1; below it every valid position does.
    assert (not np.any(np.asarray(grad)[outside])) == (answer_weight == 1.0)
    # Without any answer in the batch, the answers' term is 0.
    none = chunked(student, jnp.zeros_like(ANSWER_SPANS))
    plain = distillation_loss(params, teacher, student, LENGTHS, TINY, loss=loss)
    np.testing.assert_allclose(none, (1 - answer_weight) * plain, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_for_identical_positive_otherwise(loss):
    params, teacher, student = _setup(1)
    same = distillation_loss(params, teacher, teacher, LENGTHS, TINY, loss=loss)
    assert float(same) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(params, teacher, student, LENGTHS, TINY, loss=loss)) > 1e-3


@pytest.mark.parametrize("garbage", PADDING_GARBAGE)
@pytest.mark.parametrize("loss", LOSSES)
def test_padding_is_ignored(monkeypatch, loss, garbage):
    monkeypatch.setattr(self_distill, "DISTILL_CHUNK", 16)
    params, teacher, student = _setup(2)
    padded = (jnp.arange(T)[None, :] >= LENGTHS[:, None])[:, :, None]
    noise = garbage * jax.random.normal(jax.random.key(3), teacher.shape)
    garbage_t = jnp.where(padded, noise, teacher)
    garbage_s = jnp.where(padded, -noise, student)

    def f(th, sh):
        return distillation_loss(params, th, sh, LENGTHS, TINY, loss=loss)

    clean, (_, clean_grad) = jax.value_and_grad(f, argnums=(0, 1))(teacher, student)
    dirty, (_, dirty_grad) = jax.value_and_grad(f, argnums=(0, 1))(garbage_t, garbage_s)
    assert float(clean) == float(dirty)
    np.testing.assert_array_equal(clean_grad, dirty_grad)
    assert not np.any(np.asarray(dirty_grad)[np.asarray(padded[..., 0])])


def test_top_k_of_whole_vocab_is_full():
    params, teacher, student = _setup(4)
    full = distillation_loss(params, teacher, student, LENGTHS, TINY, loss="full")
    whole = distillation_loss(params, teacher, student, LENGTHS, TINY, loss="top_k",
                              top_k=TINY.vocab_size)
    np.testing.assert_allclose(whole, full, rtol=RTOL, atol=ATOL)


def test_bad_arguments():
    params, teacher, student = _setup()
    cases = [
        (dict(loss="reverse"), "loss must be one of"),
        (dict(top_k=0), "top_k must be in"),
        (dict(top_k=TINY.vocab_size + 1), "top_k must be in"),
        (dict(student_hidden=student[:, :-1]), "must have the same shape"),
        (dict(teacher_hidden=teacher[..., :-1], student_hidden=student[..., :-1]),
         "hidden states must be"),
        (dict(teacher_hidden=teacher[0], student_hidden=student[0]), "hidden states must be"),
        (dict(lengths=LENGTHS[:-1]), "lengths must be"),
        (dict(answer_weight=-0.1), "answer_weight must be in"),
    ]
    for overrides, message in cases:
        kwargs = dict(teacher_hidden=teacher, student_hidden=student, lengths=LENGTHS)
        options = {k: overrides.pop(k) for k in ("loss", "top_k", "answer_weight")
                   if k in overrides}
        kwargs.update(overrides)
        with pytest.raises(ValueError, match=message):
            distillation_loss(params, config=TINY, **kwargs, **options)
    # top_k is unused (and unchecked) by the full loss.
    distillation_loss(params, teacher, student, LENGTHS, TINY, loss="full", top_k=0)


def test_teacher_logits_come_from_the_teacher_weights():
    """Once the student's weights (its LM head included) move, the teacher's distribution must
    still be the frozen original's: a student equal to the teacher in hidden states but with
    another head has a positive loss, and passing the original head as teacher_params counts."""
    import jax
    import jax.numpy as jnp

    from rtpurbo_jax.model import init_params
    from rtpurbo_jax.self_distill import distillation_loss
    from tests.tiny import TINY

    teacher = init_params(TINY, jax.random.key(0))
    student = jax.tree.map(lambda x: x * 1.5, teacher)
    hidden = jax.random.normal(jax.random.key(1), (2, 9, TINY.hidden_size))
    lengths = jnp.asarray([9, 4])
    same = distillation_loss(student, hidden, hidden, lengths, TINY)
    apart = distillation_loss(student, hidden, hidden, lengths, TINY, teacher_params=teacher)
    assert float(same) == 0.0 and float(apart) > 1e-4

"""Shape buckets: a prompt whose bucket was seen compiles nothing, and padding to a bucket
changes no token and no logit beyond float32 rounding, for a dense model and both sparse
designs (ragged batches; the paper design's ring buffers wrapping). What a first call spends
on tracing, lowering and compiling is measured (`compiles`)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax import generate as gen
from rtpurbo_jax.api import SparseModel, right_pad
from rtpurbo_jax.buckets import bucket, check_buckets, default_buckets, generate_shape
from rtpurbo_jax.compiles import compile_profile, compile_seconds, count_compiles
from rtpurbo_jax.config import SparseConfig
from rtpurbo_jax.indexer import init_indexer
from tests.tiny import TINY, tiny_model

TOL = 1e-5  # float32, relative to max |logit|: padding changes only the summation order
# Ragged rows: 75 tokens wrap the paper design's ring (4 sinks + 32 window) twice; 9 fit it.
ROWS = [list(np.random.default_rng(s).integers(2, TINY.vocab_size, n))
        for s, n in ((7, 75), (8, 41), (9, 9))]
MIXED = ((True, False), (False, False))  # indexer design: KV groups [layers][groups]
KV_ROUTED = ((True, True, False, False), (False, False, False, False))
HEAD_ROUTED = ((True, False, False, True), (False, True, False, False))
PAPER = dict(design="paper", group_size=TINY.group_size, rank=4, block_q=16, block_k=16,
             sink_tokens=4, window=32, local_blocks=1, top_p=0.5)
DESIGNS = {
    "dense": None,
    "indexer": SparseConfig(MIXED, rank=8, block_q=16, block_k=16, top_p=0.5),
    "paper_kv_routed": SparseConfig(KV_ROUTED, **PAPER),
    "paper_head_routed": SparseConfig(HEAD_ROUTED, **PAPER),
}
# End-of-sequence ids no other test uses: they are static in generate, so a test's first call
# is sure to compile a program of its own.
FRESH_EOS = (37,)
FRESH_EOS_SPLIT = (38,)


def _models(design: str) -> tuple[SparseModel, SparseModel]:
    """(bucketed, unbucketed) tiny models of one design."""
    sparse = DESIGNS[design]
    model = tiny_model()
    if sparse is not None:
        rng = np.random.default_rng(0)
        queries = [rng.normal(size=(64, TINY.num_heads, TINY.head_dim)) for _ in range(2)]
        model = model.with_sparse(sparse, init_indexer(queries, TINY, sparse))
    exact = SparseModel(model.config, model.params, backend=model.backend, sparse=model.sparse,
                        indexer=model.indexer, buckets=())
    return model, exact


def test_default_ladder_and_bucket_choice():
    assert default_buckets(256) == (64, 128, 256)
    assert default_buckets(100) == (64, 100)
    assert default_buckets(40) == (40,)
    assert check_buckets([128, 64, 64]) == (64, 128)
    ladder = default_buckets(256)
    assert [bucket(n, ladder) for n in (1, 64, 65, 256, 300)] == [64, 64, 128, 256, 300]
    assert bucket(17, ()) == 17
    with pytest.raises(ValueError, match="positive"):
        check_buckets((0, 64))


def test_generate_shape_stays_within_the_context():
    ladder = default_buckets(256)
    assert generate_shape(10, 5, ladder, 256) == (64, 64)
    assert generate_shape(70, 100, ladder, 256) == (128, 128)
    # Near the end of the context the cache is cut back to it, never below the exact lengths.
    assert generate_shape(200, 56, ladder, 256) == (200, 56)
    assert generate_shape(100, 150, ladder, 256) == (106, 150)
    assert generate_shape(10, 5, (), 256) == (10, 5)


def test_same_bucket_compiles_nothing():
    model = tiny_model()
    with count_compiles() as first:
        model.generate([list(range(2, 12))], 5, eos_token_id=FRESH_EOS)
    assert first["jit(generate)"] == 1, first  # the counter sees compiles
    # Another prompt length and max_new_tokens in the same buckets: no program at all.
    with count_compiles() as second:
        model.generate([list(range(2, 32))], 9, eos_token_id=FRESH_EOS)
    assert sum(second.values()) == 0, second


def test_first_call_splits_into_trace_lower_compile():
    """compile_seconds splits a first call into tracing, lowering and XLA's compile, within its
    wall clock; a call in the same buckets spends nothing on any of them."""
    model = tiny_model()
    with compile_seconds() as first:
        start = time.perf_counter()
        model.generate([list(range(2, 12))], 5, eos_token_id=FRESH_EOS_SPLIT)
        seconds = time.perf_counter() - start
    assert min(first.values()) > 0 and sum(first.values()) <= seconds, (first, seconds)
    with compile_seconds() as second:
        model.generate([list(range(2, 32))], 9, eos_token_id=FRESH_EOS_SPLIT)
    assert sum(second.values()) == 0, second


def test_compile_profile_names_the_compiler_phases():
    out, phases = compile_profile(lambda: np.asarray(jax.jit(lambda x: 2 * x + 1)(jnp.arange(3.0))))
    np.testing.assert_array_equal(out, [1.0, 3.0, 5.0])
    assert phases and all(p["seconds"] >= 0 and p["count"] >= 1 for p in phases)
    assert [p["seconds"] for p in phases] == sorted((p["seconds"] for p in phases), reverse=True)
    assert any("Compile" in p["name"] for p in phases), phases


def test_model_call_in_the_same_bucket_does_not_recompile_forward():
    model = tiny_model()
    model([list(range(2, 12))])
    with count_compiles() as counts:
        logits = model([list(range(2, 40))])
    # Only cutting the logits to 38 columns is a new (tiny) program.
    assert counts["jit(forward)"] == 0, counts
    assert logits.shape == (1, 38, TINY.vocab_size)


@pytest.mark.parametrize("design", DESIGNS)
def test_bucketed_generate_equals_unbucketed(design):
    model, exact = _models(design)
    np.testing.assert_array_equal(model.generate(ROWS, 12, eos_token_id=()),
                                  exact.generate(ROWS, 12, eos_token_id=()))


def test_bucketed_sampling_equals_unbucketed():
    model, exact = _models("dense")
    kwargs = dict(temperature=1.0, top_k=20, seed=4, eos_token_id=())
    np.testing.assert_array_equal(model.generate(ROWS, 12, **kwargs),
                                  exact.generate(ROWS, 12, **kwargs))


@pytest.mark.parametrize("design", DESIGNS)
def test_bucketed_logits_equal_unbucketed_at_real_positions(design):
    model, exact = _models(design)
    padded, expected = np.asarray(model(ROWS)), np.asarray(exact(ROWS))
    assert padded.shape == expected.shape == (len(ROWS), len(ROWS[0]), TINY.vocab_size)
    for b, row in enumerate(ROWS):
        real = slice(0, len(row))
        err = np.abs(padded[b, real] - expected[b, real]).max() / np.abs(expected[b, real]).max()
        assert err <= TOL, (b, err)


def test_new_tokens_stops_below_the_capacity():
    """generate's traced new_tokens runs that many steps of a larger compiled capacity."""
    model = tiny_model()
    tokens, lengths = right_pad(ROWS)
    kwargs = dict(config=TINY, sampling=gen.SamplingConfig(), eos_ids=(), pad_id=0,
                  backend="reference")
    key = gen.jax.random.key(0)
    full, _ = gen.generate(model.params, jnp.asarray(tokens), jnp.asarray(lengths), key,
                           max_new_tokens=8, **kwargs)
    short, stats = gen.generate(model.params, jnp.asarray(tokens), jnp.asarray(lengths), key,
                                jnp.int32(3), max_new_tokens=8, **kwargs)
    np.testing.assert_array_equal(np.asarray(short)[:, :3], np.asarray(full)[:, :3])
    assert (np.asarray(short)[:, 3:] == 0).all()

"""GPU checks at real sizes (skipped without a GPU): `JAX_PLATFORMS=cuda pytest -m gpu -n 0
tests/test_gpu.py` (the suite's conftest picks the CPU unless JAX_PLATFORMS is set).

The fast paths (cuDNN for dense heads, the Pallas kernels for sparse ones, bf16) against the
reference path, on a model with the default model's attention shapes; and a short conversion.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.local_attention import local_attention, local_attention_reference
from rtpurbo_jax import generate as gen
from rtpurbo_jax.api import SparseModel, right_pad
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.dense import cudnn_local_supported, local_attention_cudnn
from rtpurbo_jax.head_gates import causal_and_local
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.model import init_params
from tests.test_sparse_attention_kernel import Case, assert_close, dense_mask, make_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu",
                                 reason="needs a GPU: set JAX_PLATFORMS=cuda")]

# The default model's attention (9 query / 3 KV heads of 64) in a 3-layer model.
CONFIG = ModelConfig(family="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
                     num_layers=3, num_heads=9, num_kv_heads=3, head_dim=64,
                     rope_theta=100000.0, max_position_embeddings=8192)
LENGTHS = [2048, 1500]
# float32 runs a real top-p selection (both paths select the same blocks) through the kernels,
# the dense heads on the reference path (cuDNN has no float32), every matmul at full float32
# precision (the GPU's default for float32 is TF32).
F32_TOL = 1e-4  # relative to max |logit|
# In bf16 the rounding of the two paths differs enough to flip a block at the margin of a top-p
# set, so bf16 runs at p = 1 (every block, through cuDNN + the kernels), and the fast path must
# be about as close to the float32 truth as the bf16 reference path is.
BF16_SLACK = 1.5

# The paper design: query-head routing (mixed KV groups in layer 0, a whole group in layer 2),
# local heads on 4 sinks + a 512-token window, so the prompts above wrap the ring.
PAPER_MASK = ((True, False, False, False, True, False, False, False, False),
              (False,) * 9,
              (False, False, False, True, True, True, False, False, False))
DESIGNS = ["indexer", "paper"]


def _sparse(design: str, top_p: float) -> SparseConfig:
    if design == "paper":
        return SparseConfig(PAPER_MASK, design="paper", group_size=CONFIG.group_size, rank=16,
                            top_p=top_p, sink_tokens=4, window=512, local_blocks=1)
    mask = ((True, False, False), (False, False, False), (False, True, False))
    return SparseConfig(mask, rank=16, top_p=top_p)


def _models(dtype: str, top_p: float, design: str = "indexer", config: ModelConfig = CONFIG,
            sparse: SparseConfig | None = None):
    params = jax.tree.map(lambda x: (4.0 * x).astype(dtype),
                          init_params(config, jax.random.key(0)))
    sparse = _sparse(design, top_p) if sparse is None else sparse
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(256, config.num_heads, config.head_dim))
               for _ in range(config.num_layers)]
    indexer = init_indexer(queries, config, sparse)
    fast = SparseModel(config, params, backend="auto").with_sparse(sparse, indexer)
    reference = SparseModel(config, params, backend="reference").with_sparse(sparse, indexer)
    return fast, reference


def _rows():
    rng = np.random.default_rng(1)
    return [list(rng.integers(0, CONFIG.vocab_size, n)) for n in LENGTHS]


def _err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _prefill_logits(model: SparseModel) -> list[np.ndarray]:
    logits = np.asarray(model(_rows()), np.float32)
    return [logits[row, :n] for row, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("design", DESIGNS)
def test_prefill_float32_matches_reference(design):
    with jax.default_matmul_precision("highest"):
        fast, reference = _models("float32", 0.8, design)
        for a, b in zip(_prefill_logits(fast), _prefill_logits(reference), strict=True):
            assert _err(a, b) <= F32_TOL


@pytest.mark.parametrize("design", DESIGNS)
def test_prefill_bf16_is_as_accurate_as_reference(design):
    with jax.default_matmul_precision("highest"):
        truth = _prefill_logits(_models("float32", 1.0, design)[1])
    fast, reference = _models("bfloat16", 1.0, design)
    for a, b, t in zip(_prefill_logits(fast), _prefill_logits(reference), truth, strict=True):
        assert _err(a, t) <= BF16_SLACK * _err(b, t), (_err(a, t), _err(b, t))


def test_prefill_bf16_through_mosaic_is_as_accurate_as_reference():
    """Llama's GQA group of 4 (8 query / 2 KV heads): on a Hopper GPU the indexer design's sparse
    groups prefill through the Mosaic GPU kernel (the default model's group of 3 runs Triton),
    as close to the float32 truth as the bf16 reference path."""
    from pallas_kernels.sparse_attention_mgpu import is_hopper

    config = dataclasses.replace(CONFIG, num_heads=8, num_kv_heads=2)
    sparse = SparseConfig(((True, False), (False, False), (False, True)), rank=16, top_p=1.0)
    with jax.default_matmul_precision("highest"):
        truth = _prefill_logits(_models("float32", 1.0, config=config, sparse=sparse)[1])
    fast, reference = _models("bfloat16", 1.0, config=config, sparse=sparse)
    tokens, lengths = right_pad(_rows())
    program = gen.forward.lower(fast.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                config=config, backend=fast.backend, sparse=fast.sparse,
                                indexer=fast.indexer).as_text()
    assert ("mosaic_gpu" in program) == is_hopper()
    for a, b, t in zip(_prefill_logits(fast), _prefill_logits(reference), truth, strict=True):
        assert _err(a, t) <= BF16_SLACK * _err(b, t), (_err(a, t), _err(b, t))


def _decode_logits(model: SparseModel, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Logits of three decode steps after the prompt: [3, batch, vocab]."""
    prefill = jax.jit(gen.prefill, static_argnames=("config", "max_len", "backend", "sparse"))
    step = jax.jit(gen.decode_step, static_argnames=("config", "backend", "sparse"))
    kwargs = dict(config=CONFIG, backend=model.backend, sparse=model.sparse,
                  indexer=model.indexer)
    _, cache, _ = prefill(model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                          max_len=max(LENGTHS) + 64, **kwargs)
    steps = []
    for token in (5, 6, 7):
        logits, cache, _ = step(model.params, cache, jnp.full((len(LENGTHS),), token), **kwargs)
        steps.append(np.asarray(logits, np.float32))
    return np.stack(steps)


@pytest.mark.parametrize("dtype,top_p,tol", [("float32", 0.8, F32_TOL), ("bfloat16", 1.0, None)])
@pytest.mark.parametrize("design", DESIGNS)
def test_fast_decode_matches_reference(dtype, top_p, tol, design):
    fast, reference = _models(dtype, top_p, design)
    tokens, lengths = right_pad(_rows())
    precision = jax.default_matmul_precision("highest" if dtype == "float32" else "default")
    with precision:
        out = {name: _decode_logits(model, tokens, lengths)
               for name, model in {"fast": fast, "reference": reference}.items()}
    if tol is None:  # bf16: the decode logits of both paths agree like bf16 prefill does
        tol = 3 * _err(*_prefill_logits(fast)[:1], *_prefill_logits(reference)[:1])
    assert _err(out["fast"], out["reference"]) <= tol


def test_short_conversion_runs(tmp_path):
    from configs import tiny
    from rtpurbo_jax.convert import run_conversion

    config = tiny.get_config()
    config.train.steps = 2
    summary = run_conversion(config, tmp_path)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])


def test_decode_split_heuristic_reads_the_gpu():
    """The decode kernel's split count comes from the device's SM count, not a constant."""
    from pallas_kernels import sparse_decode

    sms = sparse_decode.sm_count()
    assert sms is not None and sms >= 1
    fill = -(-sms * sparse_decode.PROGRAMS_PER_SM // 8)
    walk = 4096 // sparse_decode.MAX_BLOCKS_PER_SPLIT
    assert sparse_decode.default_num_splits(1, 8, 4096) == min(
        max(fill, walk), 4096 // sparse_decode.MIN_BLOCKS_PER_SPLIT)


def test_local_heads_through_cudnn_are_as_accurate_as_the_kernel():
    """The local heads' GPU prefill (cuDNN's window + merged sinks) on Llama-3-8B heads, a
    ragged batch and sinks that draw real mass: as close to the float32 truth as the kernel."""
    q = jnp.zeros((1, 1, 1, 128), jnp.bfloat16)
    assert cudnn_local_supported(q), "this jax's cuDNN attention returns no log-sum-exp"
    b, t, heads, kv_heads, d, window, sinks = 2, 4096, 32, 8, 128, 1024, 4
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(b, t, n, d)) for n in (heads, kv_heads, kv_heads))
    k[:, :sinks] *= 4.0  # sink keys that score high, as trained models' first tokens do
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    lengths = jnp.asarray([t, 3001], jnp.int32)
    kw = dict(sink_tokens=sinks, window=window)
    with jax.default_matmul_precision("highest"):
        truth = local_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths,
                                          **kw)
    fast = jax.jit(local_attention_cudnn, static_argnames=("sink_tokens", "window"))(
        q, k, v, lengths, **kw)
    kernel = local_attention(q, k, v, lengths, block_q=64, block_k=64, **kw)
    valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    fast, kernel, truth = (np.asarray(x, np.float32) for x in (fast, kernel, truth))
    assert np.all(fast[~valid] == 0)
    assert _err(fast[valid], truth[valid]) <= BF16_SLACK * _err(kernel[valid], truth[valid])



def test_ablation_attention_through_cudnn_is_as_accurate_as_the_training_path():
    """The head ablation's causal and sinks + window outputs through cuDNN, on the default
    model's heads at 4K with a ragged batch: each as close to the float32 truth as the bf16
    training path, padded rows zero."""
    b, t, heads, kv_heads, d = 2, 4096, 9, 3, 64
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(b, t, n, d)) for n in (heads, kv_heads, kv_heads))
    k[:, :4] *= 4.0
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    lengths = jnp.asarray([t, 3001], jnp.int32)
    kw = dict(window=2048, sink_tokens=4)
    with jax.default_matmul_precision("highest"):
        truth = causal_and_local(*(x.astype(jnp.float32) for x in (q, k, v)), lengths, **kw)
    fast = jax.jit(causal_and_local, static_argnames=("window", "sink_tokens", "backend"))(
        q, k, v, lengths, backend="auto", **kw)
    slow = causal_and_local(q, k, v, lengths, **kw)
    valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    for f, s_, tr in zip(fast, slow, truth, strict=True):
        f, s_, tr = (np.asarray(x, np.float32) for x in (f, s_, tr))
        assert np.all(f[~valid] == 0)
        assert _err(f[valid], tr[valid]) <= BF16_SLACK * _err(s_[valid], tr[valid])


# The Mosaic GPU prefill kernel on Llama-3-8B-like heads: ragged rows over a NaN-poisoned cache,
# a later chunk, a two-tile query block, one entry per step, few persistent programs (many
# items each, so slots and barriers carry across items) at GQA 2 and 8, and every kind of
# list (empty, full, random, with the diagonal, with future blocks).
MGPU_CASES = [
    (Case(101, 2, 2000, 32, 8, 128, 64, 64, jnp.bfloat16, lengths=(2000, 1400)), {}),
    (Case(102, 1, 1024, 16, 4, 64, 64, 64, jnp.bfloat16, lengths=(4000,), q_offset=3072,
          kv_len=4133), {}),
    (Case(103, 2, 1536, 8, 2, 128, 128, 64, jnp.bfloat16, lengths=(1536, 777)), {}),
    (Case(104, 2, 2000, 32, 8, 128, 64, 64, jnp.bfloat16, lengths=(1999, 1024)),
     {"blocks_per_step": 1, "steps_in_flight": 4}),
    (Case(105, 2, 2000, 16, 8, 128, 64, 64, jnp.bfloat16, lengths=(2000, 1333)),
     {"num_programs": 7}),  # GQA 2
    (Case(106, 1, 1024, 32, 4, 64, 64, 64, jnp.bfloat16, lengths=(4000,), q_offset=3072,
          kv_len=4133), {"num_programs": 1, "steps_in_flight": 2}),  # GQA 8
]


@pytest.mark.parametrize("case, launch", MGPU_CASES, ids=lambda c: getattr(c, "seed", ""))
def test_mosaic_prefill_matches_reference(case, launch):
    from pallas_kernels.sparse_attention import sparse_attention_reference
    from pallas_kernels.sparse_attention_mgpu import sparse_attention_mgpu

    q, k, v, idx, cnt, lengths = make_inputs(case)
    kw = dict(block_q=case.block_q, block_k=case.block_k, lengths=lengths,
              q_offset=case.q_offset)
    out = sparse_attention_mgpu(q, k, v, idx, cnt, **kw, **launch)
    with jax.default_matmul_precision("highest"):
        ref = sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), idx, cnt,
                                         **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, case.dtype)
    empty = ~dense_mask(idx, cnt, lengths, case).any(-1)  # [B, K, T]: no visible key
    empty = np.repeat(empty, case.num_heads // case.num_kv_heads, axis=1).transpose(0, 2, 1)
    assert empty.any() and np.all(np.asarray(out, np.float32)[empty] == 0)


def test_gpu_prefill_dispatch_picks_mosaic_on_hopper():
    """On a Hopper GPU the family's prefill lowers an even-group bf16 input through Mosaic GPU
    and the default model's group of 3 through Triton."""
    from pallas_kernels.sparse_attention_mgpu import is_hopper, sparse_attention_gpu

    def lowered(heads, kv_heads):
        q = jnp.zeros((1, 128, heads, 64), jnp.bfloat16)
        k = jnp.zeros((1, 128, kv_heads, 64), jnp.bfloat16)
        idx, cnt = jnp.zeros((1, kv_heads, 2, 1), jnp.int32), jnp.ones((1, kv_heads, 2), jnp.int32)
        run = jax.jit(lambda *a: sparse_attention_gpu(*a, block_q=64, block_k=64))
        return run.lower(q, k, k, idx, cnt).as_text()

    assert ("mosaic_gpu" in lowered(8, 2)) == is_hopper()
    assert "mosaic_gpu" not in lowered(9, 3)

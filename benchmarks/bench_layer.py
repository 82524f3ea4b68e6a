"""GPU timings of the indexer + selection kernels and of whole sparse attention layers vs cuDNN.

Run from the repository root on a machine with one CUDA GPU:

    PYTHONPATH=. python3 benchmarks/bench_layer.py --out-dir benchmarks/results

Sections (--sections, comma separated):
  check           kernels vs the jnp reference at real sizes (logit error, identical lists);
  sweep           launch parameters of the two indexer kernels;
  indexer_select  indexer scoring + top-p selection (and its stages) vs the dense layer;
  prefill_layer   a whole Llama-3-8B attention layer (32 query / 8 KV heads, head_dim 128,
                  bf16, batch 1): KV head 0 dense through cuDNN, the other 7 through the indexer
                  and the block-sparse kernel, vs cuDNN dense over all heads;
  decode_layer    one decode step of the same layer over a cache, batch 1 and 16, once per
                  --decode-splits variant, with the launches of its compiled step.
Indexer inputs are synthetic but shaped like real ones (see `planted_indexer`), so top-p picks a
realistic, query-dependent set of blocks. Results go to OUT_DIR/layer.json (rewritten after
every row); a short table prints last. The commit recorded is $COMMIT when set, else HEAD.

Smoke run (CI: CPU, tiny sizes, every section, < 90 s on 2 cores; writes to a temp dir unless
--out-dir is given):

    PYTHONPATH=. JAX_PLATFORMS=cpu python3 benchmarks/bench_layer.py --smoke

It swaps the shapes for SMOKE_* ones (4 query / 2 KV heads, head_dim 16, block 16, KV head 0
dense and head 1 sparse, 256 tokens), times each call once (SMOKE_TIMED_RUNS), sweeps one
launch configuration per kernel, and runs all the sections above with the Pallas kernels in
interpret mode and the dense baselines through XLA. A failing row raises instead of being
logged; at the end it asserts that the checks passed and that every section wrote its rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import (
    BLOCK,
    DTYPE,
    ERROR_CHARS,
    HEAD_DIM,
    INNER_TOKENS,
    LONG_PREFILL,
    LONG_TIMED_RUNS,
    MAX_INNER,
    NUM_HEADS,
    NUM_KV_HEADS,
    TIMED_RUNS,
    git_commit,
    log,
    median_ms,
)
from pallas_kernels.indexer_topp import (
    SELECTIONS,
    block_logits,
    block_logits_reference,
    indexer_topp,
    indexer_topp_reference,
    max_selected,
    pool_queries,
    query_block_extent,
    select_blocks,
    select_blocks_bisect,
    select_blocks_reference,
)
from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.sparse_decode import default_num_splits, sparse_decode
from rtpurbo_jax import attention
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.indexer import indexer_keys, indexer_queries
from rtpurbo_jax.model import query_heads
from rtpurbo_jax.selection import Selection, rule_kwargs

RANK = 16
TOP_P = 0.9
GROUP = NUM_HEADS // NUM_KV_HEADS
DENSE_GROUPS = (0,)  # one retrieval KV head of eight keeps full attention
SPARSE_GROUPS = tuple(range(1, NUM_KV_HEADS))
DENSE_HEADS = query_heads(DENSE_GROUPS, GROUP)
SPARSE_HEADS = query_heads(SPARSE_GROUPS, GROUP)


def layer_config(num_heads: int, num_kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_layers=1, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, rope_theta=500000.0,
                       max_position_embeddings=1 << 20, name="Llama-3-8B attention")


def sparse_config(num_kv_heads: int, block: int) -> SparseConfig:
    return SparseConfig(retrieval_mask=(tuple(g in DENSE_GROUPS for g in range(num_kv_heads)),),
                        rank=RANK, top_p=TOP_P, block_q=block, block_k=block)


CONFIG = layer_config(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
SPARSE = sparse_config(NUM_KV_HEADS, BLOCK)
BYTES_BF16 = 2
BYTES_F32 = 4
# Off a GPU (a dry run of this script at toy sizes) the kernels run interpreted and dense
# attention through XLA.
ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
DENSE_IMPL = "cudnn" if ON_GPU else "xla"
DENSE_NAME = "cuDNN" if ON_GPU else "XLA"
# The model's layer code: "auto" is cuDNN + the kernels on a GPU; off one, "pallas" keeps the
# kernels (interpreted) where "auto" would take the jnp references.
LAYER_BACKEND = "auto" if ON_GPU else "pallas"
# Ceilings the floors use (as measured on H100 SXM parts of this kind, benchmarks/NOTES.md).
PEAK_TFLOPS = 800.0
PEAK_TBPS = 3.0
# Timing as bench_kernels (medians of TIMED_RUNS, LONG_TIMED_RUNS from LONG_PREFILL tokens,
# short calls chained INNER_TOKENS // length to a region); a layer decode region holds fewer
# calls over fewer caches, since each call also runs the indexer.
DECODE_CALLS = 16
# Distinct decode caches a timing cycles through (so one call's blocks are out of L2 by the
# next use), within this memory budget.
DECODE_CACHE_BUDGET = 16 << 30
MAX_DECODE_LAYERS = 4
# Planted indexer structure (see planted_indexer): one query "region" of REGION_TOKENS shares a
# direction; key blocks carry a relevance along RELEVANCE_DIMS dims (block logits spread with
# std BLOCK_LOGIT_STD across blocks, a different ranking per region) and each region plants
# NEEDLES spans of NEEDLE_SPAN_BLOCKS blocks earlier in the context whose logit is raised by
# NEEDLE_LOGIT; per-token noise on keys and queries.
REGION_TOKENS = 1024
RELEVANCE_DIMS = 4
BLOCK_LOGIT_STD = 2.0
NEEDLES = 4
NEEDLE_SPAN_BLOCKS = 2
NEEDLE_LOGIT = 4.0
KEY_NOISE = 0.3
QUERY_NOISE = 0.5
# Launch parameters the sweep tries: (tile_q, chunk_blocks, num_warps, num_stages) for the
# block logits; (tile_rows, num_warps) for the selection.
LOGITS_SWEEP = [(64, 32, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2),
                (64, 32, 4, 1)]
SELECT_SWEEP = [(1, 4), (2, 4), (2, 8), (4, 8), (8, 16)]
SELECT_SWEEP_DECODE = [(1, 8), (1, 16)]
# Selection by a full XLA sort (the reference) is timed only up to this length.
SORT_MAX_LENGTH = 128 * 1024
# A failed row is logged and the run goes on (--smoke: raises).
RAISE_FAILURES = False

# --smoke (see the module docstring): the shapes, timing and sweep that replace the above
# (`use_smoke_sizes`), then the defaults of the command line options. Four query / two KV heads
# keep one dense and one sparse group; an interpreted call costs up to seconds, so each is
# timed once, unchained, and a decode timing holds two calls over one cache.
SMOKE_NUM_HEADS = 4
SMOKE_NUM_KV_HEADS = 2
SMOKE_HEAD_DIM = 16  # = RANK, the planted indexer reads the first RANK dims
SMOKE_BLOCK = 16
SMOKE_REGION_TOKENS = 64  # several regions (and needles) in a few hundred tokens
SMOKE_TIMED_RUNS = 1
SMOKE_MAX_INNER = 1
SMOKE_DECODE_CALLS = 2
SMOKE_MAX_DECODE_LAYERS = 1
SMOKE_LOGITS_SWEEP = [(16, 8, 4, 2)]  # tiles within the few query / key blocks
SMOKE_SELECT_SWEEP = SELECT_SWEEP[:1]
SMOKE_SELECT_SWEEP_DECODE = SELECT_SWEEP_DECODE[:1]
SMOKE_LENGTH = 256  # 16 blocks
# Option defaults: (real run, smoke run).
ALL_SECTIONS = "check,sweep,indexer_select,prefill_layer,decode_layer"
OPTION_DEFAULTS = {
    "sections": ("check,indexer_select,prefill_layer,decode_layer", ALL_SECTIONS),
    "check_lengths": ([32768, 131072], [SMOKE_LENGTH]),
    "check_decode_length": (131072, SMOKE_LENGTH),
    "sweep_length": (131072, SMOKE_LENGTH),
    "sweep_decode_length": (524288, SMOKE_LENGTH),
    "sweep_decode_batches": ([1, 16], [1, 2]),
    "indexer_lengths": ([32768, 131072, 524288], [SMOKE_LENGTH]),
    "prefill_lengths": ([32768, 131072, 524288, 1 << 20], [SMOKE_LENGTH]),
    "decode_lengths": ([32768, 131072, 524288], [SMOKE_LENGTH]),
    "decode_batches": ([1, 16], [1, 2]),
    # "auto" the kernel's default split count, "fill" the SM fill alone (the default before
    # the walk bound), an integer that count; smoke: 1 is the path without a merge.
    "decode_splits": (["auto"], ["auto", "1"]),
    "dense_max_length": (524288, SMOKE_LENGTH),
    "breakdown_max_length": (131072, SMOKE_LENGTH),
}
# Checks a smoke run asserts: block logits within this relative max error of the float32
# reference (as the kernel tests); a list may differ from the reference only at a float32
# tie, its boundary mass this close to top_p.
SMOKE_LOGITS_TOLERANCE = 1e-2
SMOKE_TIE_MARGIN = 1e-5


def use_smoke_sizes() -> None:
    """Rebinds this module's shapes, timing and sweeps to the SMOKE_* ones, with every constant
    derived from them (call before anything is traced: the jitted helpers read them then)."""
    group = SMOKE_NUM_HEADS // SMOKE_NUM_KV_HEADS
    sparse_groups = tuple(range(1, SMOKE_NUM_KV_HEADS))
    globals().update(
        NUM_HEADS=SMOKE_NUM_HEADS, NUM_KV_HEADS=SMOKE_NUM_KV_HEADS, HEAD_DIM=SMOKE_HEAD_DIM,
        BLOCK=SMOKE_BLOCK, GROUP=group, SPARSE_GROUPS=sparse_groups,
        DENSE_HEADS=query_heads(DENSE_GROUPS, group),
        SPARSE_HEADS=query_heads(sparse_groups, group),
        CONFIG=layer_config(SMOKE_NUM_HEADS, SMOKE_NUM_KV_HEADS, SMOKE_HEAD_DIM),
        SPARSE=sparse_config(SMOKE_NUM_KV_HEADS, SMOKE_BLOCK), REGION_TOKENS=SMOKE_REGION_TOKENS,
        TIMED_RUNS=SMOKE_TIMED_RUNS, LONG_TIMED_RUNS=SMOKE_TIMED_RUNS, MAX_INNER=SMOKE_MAX_INNER,
        DECODE_CALLS=SMOKE_DECODE_CALLS, MAX_DECODE_LAYERS=SMOKE_MAX_DECODE_LAYERS,
        LOGITS_SWEEP=SMOKE_LOGITS_SWEEP, SELECT_SWEEP=SMOKE_SELECT_SWEEP,
        SELECT_SWEEP_DECODE=SMOKE_SELECT_SWEEP_DECODE, RAISE_FAILURES=True)


# ----------------------------------------------------------------------------------------------
# Realistic indexer inputs
# ----------------------------------------------------------------------------------------------


def _unit(key, shape) -> jax.Array:
    x = jax.random.normal(key, shape)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def planted_indexer(key, batch: int, length: int, groups: int) -> tuple[jax.Array, jax.Array]:
    """Indexer queries and keys with the structure of real ones: (qi, ki) [batch, length,
    groups, RANK] float32, scale 1.

    Every REGION_TOKENS queries share a direction: RELEVANCE_DIMS components that rank all key
    blocks (each key block has a random relevance vector, so block logits spread with std
    BLOCK_LOGIT_STD and the ranking changes from region to region) and RANK - RELEVANCE_DIMS
    components matching NEEDLES "needle" spans of NEEDLE_SPAN_BLOCKS key blocks planted at
    random earlier positions, whose logit gains NEEDLE_LOGIT. Keys and queries carry Gaussian
    noise per token (KEY_NOISE, QUERY_NOISE).
    """
    num_blocks = -(-length // BLOCK)
    num_regions = -(-length // REGION_TOKENS)
    k_rel, k_dir, k_q, k_blocks, k_pos, k_noise = jax.random.split(key, 6)
    needle_scale = math.sqrt(NEEDLE_LOGIT)
    rel_dir = _unit(k_rel, (batch, num_regions, groups, RELEVANCE_DIMS))
    needle_dir = _unit(k_dir, (batch, num_regions, groups, RANK - RELEVANCE_DIMS))
    region_q = jnp.concatenate([BLOCK_LOGIT_STD * rel_dir, needle_scale * needle_dir], axis=-1)
    region_of = jnp.arange(length) // REGION_TOKENS
    qi = region_q[:, region_of] + QUERY_NOISE * jax.random.normal(
        k_q, (batch, length, groups, RANK))

    relevance = jax.random.normal(k_blocks, (batch, num_blocks, groups, RELEVANCE_DIMS))
    # Needle spans end before their region's first block (region 0 has none earlier: its
    # spans land on the sink block, which is kept anyway).
    first_block = jnp.arange(num_regions) * (REGION_TOKENS // BLOCK)
    room = jnp.maximum(first_block - NEEDLE_SPAN_BLOCKS + 1, 1)[None, :, None, None]
    u = jax.random.uniform(k_pos, (batch, num_regions, groups, NEEDLES))
    start = jnp.floor(u * room).astype(jnp.int32)
    blocks = jnp.minimum(start[..., None] + jnp.arange(NEEDLE_SPAN_BLOCKS), num_blocks - 1)
    shape = blocks.shape + (RANK - RELEVANCE_DIMS,)  # [b, regions, g, needles, span, dims]
    contrib = jnp.broadcast_to(needle_scale * needle_dir[:, :, :, None, None, :], shape)
    b_idx = jnp.arange(batch)[:, None, None, None, None]
    g_idx = jnp.arange(groups)[None, None, :, None, None]
    needle_keys = jnp.zeros((batch, num_blocks, groups, RANK - RELEVANCE_DIMS)).at[
        b_idx, blocks, g_idx].add(contrib)
    block_keys = jnp.concatenate([relevance, needle_keys], axis=-1)
    ki = jnp.repeat(block_keys, BLOCK, axis=1)[:, :length] + KEY_NOISE * jax.random.normal(
        k_noise, (batch, length, groups, RANK))
    return qi, ki


def indexer_params() -> dict[str, jax.Array]:
    """wq, wk reading the first RANK dims of each sparse group's q (mean over heads) and k."""
    select = jnp.eye(HEAD_DIM, RANK, dtype=DTYPE)
    groups = len(SPARSE_GROUPS)
    wq = jnp.broadcast_to(select / GROUP, (groups, GROUP, HEAD_DIM, RANK))
    return {"wq": wq, "wk": jnp.broadcast_to(select, (groups, HEAD_DIM, RANK))}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def planted_layer(key, batch: int, length: int, q_len: int | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Layer inputs q [b, q_len, H, D] (the last q_len positions; None: all), k, v [b, T, K, D]
    (bf16) whose indexer projections through `indexer_params` are `planted_indexer`'s qi and
    ki; every other component is N(0, 1)."""
    qi, ki = planted_indexer(key, batch, length, len(SPARSE_GROUPS))
    q_len = length if q_len is None else q_len
    qi = qi[:, length - q_len:]
    k_q, k_k, k_v = jax.random.split(jax.random.fold_in(key, 1), 3)
    q = jax.random.normal(k_q, (batch, q_len, NUM_HEADS, HEAD_DIM), DTYPE)
    k = jax.random.normal(k_k, (batch, length, NUM_KV_HEADS, HEAD_DIM), DTYPE)
    v = jax.random.normal(k_v, (batch, length, NUM_KV_HEADS, HEAD_DIM), DTYPE)
    q_planted = jnp.repeat(qi, GROUP, axis=2).astype(DTYPE)  # every head of a group: mean = qi
    q = q.at[:, :, SPARSE_HEADS, :RANK].set(q_planted)
    k = k.at[:, :, np.array(SPARSE_GROUPS), :RANK].set(ki.astype(DTYPE))
    return q, k, v


# ----------------------------------------------------------------------------------------------
# The layer as the model runs it, selection through the kernels
# ----------------------------------------------------------------------------------------------


def select_prefill_kernel(q: jax.Array, k: jax.Array, ki: jax.Array | None, lengths: jax.Array,
                          sparse: SparseConfig, layer_indexer: dict[str, jax.Array],
                          backend: str = LAYER_BACKEND, q_offset: int | jax.Array = 0
                          ) -> Selection:
    """`rtpurbo_jax.selection.select_prefill` (same signature) for the "indexer" scorer, through
    the kernels whatever the backend."""
    del k, backend  # the oracle scorer's input; the kernels always
    q_start = jnp.full((q.shape[0],), q_offset, jnp.int32)
    qi = indexer_queries(q, layer_indexer["wq"])
    return indexer_topp(qi, ki, q_start, lengths, block_q=sparse.block_q,
                        block_k=sparse.block_k, scale=1.0 / sparse.temperature,
                        interpret=INTERPRET, **rule_kwargs(sparse))


def select_decode_kernel(q: jax.Array, k_cache: jax.Array, ki_cache: jax.Array | None,
                         lengths: jax.Array, sparse: SparseConfig,
                         layer_indexer: dict[str, jax.Array],
                         backend: str = LAYER_BACKEND) -> Selection:
    """`rtpurbo_jax.selection.select_decode` (same signature) for the "indexer" scorer, through
    the kernels whatever the backend."""
    del k_cache, backend
    qi = indexer_queries(q, layer_indexer["wq"])
    return indexer_topp(qi, ki_cache, lengths - 1, lengths, block_q=sparse.block_q,
                        block_k=sparse.block_k, scale=1.0 / sparse.temperature,
                        interpret=INTERPRET, **rule_kwargs(sparse))


def prefill_layer(q, k, v, lengths, layer_indexer):
    """The model's own `layer_prefill`, its indexer selection through the kernels.

    Returns (out [b, T, H, D], stats [selected blocks, candidate blocks]).
    """
    with mock.patch.object(attention, "select_prefill", select_prefill_kernel):
        out, _, stats = attention.layer_prefill(q, k, v, lengths, 0, CONFIG, SPARSE,
                                                layer_indexer, LAYER_BACKEND)
    return out, stats


def decode_layer(q, k, v, ks, vs, ki, lengths, layer_indexer, num_splits=None):
    """One decode step of the layer over a filled cache, without the cache write.

    q: [b, 1, H, D] at position lengths - 1; k, v: [b, L, 1, D] (the dense group); ks, vs:
    [b, L, 7, D]; ki: [b, L, 7, RANK]. As `attention.layer_decode` after its `write_parts`
    (timed apart, a write into an undonated cache would copy all of it); num_splits: the
    sparse decode's (None: its default). Returns (out, counts).
    """
    dense = attention.dense_decode(q[:, :, DENSE_HEADS], k, v, lengths, backend=LAYER_BACKEND)
    qs = q[:, :, SPARSE_HEADS]
    indices, counts = select_decode_kernel(qs, ks, ki, lengths, SPARSE, layer_indexer)
    out = sparse_decode(qs[:, 0], ks, vs, indices[:, :, 0], counts[:, :, 0], lengths,
                        block_k=BLOCK, num_splits=num_splits, interpret=INTERPRET)
    # Dense group 0 holds heads 0..G-1: concatenation is head order.
    return jnp.concatenate([dense, out[:, None]], axis=2), counts


def dense_prefill_cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=DENSE_IMPL)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def runs_for(length: int) -> int:
    return LONG_TIMED_RUNS if length >= LONG_PREFILL else TIMED_RUNS


def inner_for(length: int) -> int:
    return max(1, min(MAX_INNER, INNER_TOKENS // length))


def time_calls(fn: Callable, inputs: list[tuple], runs: int) -> tuple[float, list]:
    """(ms per call, outputs) of fn(*inputs[i]) for every i, all in one jitted region."""
    def chain(inputs):
        return [fn(*args) for args in inputs]

    jitted = jax.jit(chain)
    outputs = []

    def run():
        outputs[:] = jax.block_until_ready(jitted(inputs))

    return median_ms(run, runs, len(inputs)), outputs


def time_ms(fn: Callable, inputs: list[tuple], runs: int) -> float:
    return time_calls(fn, inputs, runs)[0]


# Instructions of a compiled module that launch nothing: they name, view or bundle buffers.
NO_LAUNCH_OPS = frozenset({"parameter", "constant", "bitcast", "get-tuple-element", "tuple"})


def compiled_launches(fn: Callable, args: tuple) -> dict[str, int]:
    """Instructions of jit(fn)(*args)'s optimised entry computation that do work, by opcode.

    On a GPU each is one launch (a fusion, a custom call: Triton, cuDNN, cuBLAS, or a copy);
    off one they are a proxy (interpreted Pallas kernels are loops of XLA ops there).
    """
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY "):]
    entry = entry[:entry.index("\n}") + 1]
    ops: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        # `name = type opcode(operands), attributes`; a tuple type may hold /*index=N*/.
        line = re.sub(r"/\*.*?\*/", "", line)
        match = re.match(r"\s*(?:ROOT )?\S+ = (?:\([^=]*?\)|\S+) ([\w-]+)\(", line)
        if match and match.group(1) not in NO_LAUNCH_OPS:
            ops[match.group(1)] = ops.get(match.group(1), 0) + 1
    return ops


def guarded(name: str, fn: Callable[[], None], save: Callable[[], None]) -> None:
    """Runs fn, then saves the results; a failure is logged and the run goes on (--smoke: it
    raises, after the save)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - record the failure, run the other rows
        log(f"{name}: FAILED {type(e).__name__}: {str(e)[:ERROR_CHARS]}")
        if RAISE_FAILURES:
            save()
            raise
    save()


def dense_prefill_flops(length: int, heads: int = NUM_HEADS) -> float:
    return 4.0 * heads * HEAD_DIM * length * length / 2


def floor_ms(flops: float, nbytes: float) -> float:
    return max(flops / PEAK_TFLOPS / 1e9, nbytes / PEAK_TBPS / 1e9)


def rule() -> dict:
    return rule_kwargs(SPARSE)


def indexer_inputs(seed: int, batch: int, length: int):
    """Planted (qi, ki) as the model holds them (bf16), q_start, lengths."""
    qi, ki = planted_indexer(jax.random.PRNGKey(seed), batch, length, len(SPARSE_GROUPS))
    lengths = jnp.full((batch,), length, jnp.int32)
    return qi.astype(DTYPE), ki.astype(DTYPE), jnp.zeros((batch,), jnp.int32), lengths


def topp_kwargs() -> dict:
    """indexer_topp(_reference)'s arguments but the inputs (the planted scale is 1)."""
    return dict(block_q=BLOCK, block_k=BLOCK, scale=1.0, **rule())


def logits_kernel(pooled, ki, lengths, last, **kwargs) -> jax.Array:
    return block_logits(pooled, ki, lengths, last, block_k=BLOCK, scale=1.0,
                        interpret=INTERPRET, **kwargs)


class DenseTimes:
    """Dense prefill times per length, measured once per run and shared by the sections."""

    def __init__(self, max_measured: int):
        self.max_measured = max_measured
        self.ms: dict[int, float] = {}
        self.model_ms: dict[int, float] = {}

    def measure(self, length: int, q=None, k=None, v=None) -> float | None:
        if length in self.ms or length > self.max_measured:
            return self.ms.get(length)
        if q is None:
            q, k, v = planted_layer(jax.random.PRNGKey(7), 1, length)
        runs = runs_for(length)
        self.ms[length] = time_ms(dense_prefill_cudnn, [(q, k, v)], runs)
        log(f"dense {DENSE_NAME} {length}: {self.ms[length]:.2f} ms "
            f"({dense_prefill_flops(length) / self.ms[length] / 1e9:.0f} TFLOP/s)")
        if length < LONG_PREFILL:
            lengths = jnp.full((1,), length, jnp.int32)
            self.model_ms[length] = time_ms(
                lambda q, k, v: attention.dense_prefill(q, k, v, lengths,
                                                        backend=LAYER_BACKEND),
                [(q, k, v)], runs)
            log(f"dense model path ({DENSE_NAME} + lengths) {length}: "
                f"{self.model_ms[length]:.2f} ms")
        return self.ms[length]

    def best(self, length: int) -> tuple[float | None, bool]:
        """(the fastest dense time, extrapolated?) at this length."""
        if length in self.ms:
            return min(self.ms[length], self.model_ms.get(length, math.inf)), False
        measured = sorted(self.ms)
        if len(measured) < 2:
            return None, False
        # Fit t = c * T^e through the two longest measured lengths, then extend.
        (a, ta), (b, tb) = [(n, self.ms[n]) for n in measured[-2:]]
        exponent = math.log(tb / ta) / math.log(b / a)
        return tb * (length / b) ** exponent, True


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def mismatch_margins(logits: np.ndarray, last_block: np.ndarray, rows: list[tuple]) -> float:
    """Largest distance to top_p of the reference's two boundary masses over mismatched rows
    (float64 on the host): tiny values mean a float32 rounding tie, not a bug."""
    worst = 0.0
    for b, g, i in rows:
        last = last_block[b, i]
        x = logits[b, g, i, :last + 1].astype(np.float64)
        p = np.exp(x - x.max())
        p /= p.sum()
        j = np.arange(last + 1)
        forced = (j < SPARSE.sink_blocks) | (j > last - SPARSE.local_blocks)
        free = np.sort(p[~forced])[::-1]
        mass = p[forced].sum() + np.concatenate([[0.0], np.cumsum(free)])
        k = int(np.searchsorted(mass, TOP_P))  # first cumulative mass >= top_p
        near = [abs(mass[m] - TOP_P) for m in (k - 1, k) if 0 <= m < len(mass)]
        worst = max(worst, min(near))
    return worst


def compare_lists(name: str, out, ref, logits, last_block) -> dict:
    idx, cnt = (np.asarray(x) for x in out)
    ref_idx, ref_cnt = (np.asarray(x) for x in ref)
    differ = (cnt != ref_cnt) | (idx != ref_idx).any(-1)
    rows = [tuple(r) for r in np.argwhere(differ)]
    margin = mismatch_margins(np.asarray(logits), np.asarray(last_block), rows[:64]) \
        if rows else 0.0
    result = {"check": name, "rows": int(differ.size), "rows_differ": len(rows),
              "worst_margin": margin}
    log(f"check {name}: {len(rows)} of {differ.size} lists differ"
        + (f" (largest |mass - p| at the reference's boundary: {margin:.1e})" if rows else ""))
    return result


def run_checks(args, results: dict, save: Callable[[], None]) -> None:
    checks = results.setdefault("checks", [])

    def prefill_check(length: int):
        qi, ki, q_start, lengths = indexer_inputs(11, 1, length)
        valid, last = query_block_extent(q_start, lengths, length, BLOCK)
        pooled = pool_queries(qi, valid)
        out = logits_kernel(pooled, ki, lengths, last)
        with jax.default_matmul_precision("highest"):
            ref = block_logits_reference(pooled, ki, lengths, last, block_k=BLOCK, scale=1.0)
        finite = jnp.isfinite(ref)
        same_inf = bool(jnp.all(jnp.isneginf(out) == jnp.isneginf(ref)))
        err = float(jnp.max(jnp.where(finite, jnp.abs(out - ref), 0.0))
                    / jnp.max(jnp.where(finite, jnp.abs(ref), 0.0)))
        checks.append({"check": f"block_logits_{length}", "rel_max": err, "same_inf": same_inf,
                       "nan": bool(jnp.isnan(out).any())})
        log(f"check block_logits {length}: rel_max {err:.2e}, -inf pattern equal {same_inf}")
        last_block = jnp.where(last >= 0, last // BLOCK, -1)
        ref_lists = select_blocks_reference(ref, last_block, **rule())
        select_pallas = functools.partial(select_blocks, interpret=INTERPRET)
        for name, fn in (("pallas", select_pallas), ("bisect", select_blocks_bisect)):
            checks.append(compare_lists(f"select_{name}_{length}", fn(ref, last_block, **rule()),
                                        ref_lists, ref, last_block))
        with jax.default_matmul_precision("highest"):
            ref_e2e = indexer_topp_reference(qi, ki, q_start, lengths, **topp_kwargs())
        checks.append(compare_lists(f"indexer_topp_{length}",
                                    indexer_topp(qi, ki, q_start, lengths, interpret=INTERPRET,
                                                 **topp_kwargs()),
                                    ref_e2e, ref, last_block))

    def decode_check(length: int, batch: int):
        qi, ki, _, _ = indexer_inputs(12, batch, length)
        lengths = jnp.asarray(np.linspace(length, 1, batch).astype(np.int32))
        q = qi[jnp.arange(batch), lengths - 1][:, None]
        with jax.default_matmul_precision("highest"):
            ref = indexer_topp_reference(q, ki, lengths - 1, lengths, **topp_kwargs())
            valid, last = query_block_extent(lengths - 1, lengths, 1, BLOCK)
            logits = block_logits_reference(pool_queries(q, valid), ki, lengths, last,
                                            block_k=BLOCK, scale=1.0)
        out = indexer_topp(q, ki, lengths - 1, lengths, interpret=INTERPRET, **topp_kwargs())
        last_block = jnp.where(last >= 0, last // BLOCK, -1)
        checks.append(compare_lists(f"indexer_topp_decode_{length}_b{batch}", out, ref, logits,
                                    last_block))

    for length in args.check_lengths:
        guarded(f"check prefill {length}", lambda n=length: prefill_check(n), save)
    guarded("check decode", lambda: decode_check(args.check_decode_length, 4), save)


def run_sweep(args, results: dict, save: Callable[[], None]) -> None:
    sweep = results.setdefault("sweep", [])
    length = args.sweep_length
    qi, ki, q_start, lengths = indexer_inputs(21, 1, length)
    valid, last = query_block_extent(q_start, lengths, length, BLOCK)
    pooled = pool_queries(qi, valid)
    for tile_q, chunk, warps, stages in LOGITS_SWEEP:
        cfg = dict(tile_q=tile_q, chunk_blocks=chunk, num_warps=warps, num_stages=stages)

        def one(cfg=cfg):
            fn = functools.partial(logits_kernel, **cfg)
            ms = time_ms(fn, [(pooled, ki, lengths, last)], TIMED_RUNS)
            sweep.append({"sweep": "block_logits", "length": length, **cfg, "ms": ms})
            log(f"sweep block_logits {length} {cfg}: {ms:.3f} ms")

        guarded(f"sweep block_logits {cfg}", one, save)
    logits = logits_kernel(pooled, ki, lengths, last)
    cases = [("prefill", logits, jnp.where(last >= 0, last // BLOCK, -1), SELECT_SWEEP)]
    for batch in args.sweep_decode_batches:
        dqi, dki, _, dlen = indexer_inputs(22, batch, args.sweep_decode_length)
        dvalid, dlast = query_block_extent(dlen - 1, dlen, 1, BLOCK)
        dlogits = logits_kernel(pool_queries(dqi[:, -1:], dvalid), dki, dlen, dlast)
        cases.append((f"decode_b{batch}", dlogits, jnp.where(dlast >= 0, dlast // BLOCK, -1),
                      SELECT_SWEEP_DECODE))
        del dqi, dki
    for name, lg, lb, configs in cases:
        for tile_rows, warps in configs:
            cfg = dict(tile_rows=tile_rows, num_warps=warps)

            def one(cfg=cfg, name=name, lg=lg, lb=lb):
                fn = functools.partial(select_blocks, interpret=INTERPRET, **rule(), **cfg)
                ms = time_ms(fn, [(lg, lb)], TIMED_RUNS)
                sweep.append({"sweep": f"select_{name}", "nk": lg.shape[-1],
                              "rows": int(np.prod(lg.shape[:3])), **cfg, "ms": ms})
                log(f"sweep select {name} nk={lg.shape[-1]} {cfg}: {ms:.3f} ms")

            guarded(f"sweep select {name} {cfg}", one, save)


def run_indexer_select(args, results: dict, dense: DenseTimes, save: Callable[[], None]) -> None:
    rows = results["rows"]
    kw = topp_kwargs()
    for length in args.indexer_lengths:
        def one(length=length):
            runs = runs_for(length)
            inputs = [indexer_inputs(31 + i, 1, length) for i in range(inner_for(length))]
            stage_ms = {}
            for selection in args.selections:
                if selection != "sort" or length <= SORT_MAX_LENGTH:
                    fn = functools.partial(indexer_topp, selection=selection,
                                           interpret=INTERPRET, **kw)
                    ms, outputs = time_calls(fn, inputs, runs)
                    stage_ms[f"total_{selection}_ms"] = ms
                    if selection == "pallas":
                        counts = outputs[0][1]
            qi, ki, q_start, lengths = inputs[0]
            valid, last = query_block_extent(q_start, lengths, length, BLOCK)
            stage_ms["block_logits_ms"], logits = time_calls(
                logits_kernel,
                [(pool_queries(x[0], valid), x[1], lengths, last) for x in inputs], runs)
            last_block = jnp.where(last >= 0, last // BLOCK, -1)
            select_pallas = functools.partial(select_blocks, interpret=INTERPRET)
            for name, fn in (("pallas", select_pallas), ("bisect", select_blocks_bisect),
                             ("sort", select_blocks_reference)):
                if name in args.selections and (name != "sort" or length <= SORT_MAX_LENGTH):
                    stage_ms[f"select_{name}_ms"] = time_ms(
                        functools.partial(fn, **rule()), [(lg, last_block) for lg in logits],
                        runs)
            del logits, inputs
            # The indexer projections of the layer's q (28 heads) and k (7 groups).
            q, k, v = planted_layer(jax.random.PRNGKey(31), 1, length)
            layer_indexer = indexer_params()
            stage_ms["projection_ms"] = time_ms(
                lambda q, k: (indexer_queries(q[:, :, SPARSE_HEADS], layer_indexer["wq"]),
                              indexer_keys(k[:, :, np.array(SPARSE_GROUPS)],
                                           layer_indexer["wk"])),
                [(q, k)], runs)
            dense.measure(length, q, k, v)
            del q, k, v
            dense_ms, extrapolated = dense.best(length)
            nq = -(-length // BLOCK)
            density = float(jnp.sum(counts)) / (len(SPARSE_GROUPS) * nq * (nq + 1) / 2)
            ms = stage_ms["total_pallas_ms"]
            # Floor: qi, ki read once; the [nq, nk] logits written and read back once.
            nbytes = (2 * length * len(SPARSE_GROUPS) * RANK * BYTES_BF16
                      + 2 * len(SPARSE_GROUPS) * nq * nq * BYTES_F32)
            row = {
                "bench": "indexer_select", "length": length, "batch": 1, "density": density,
                "ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms if dense_ms else None,
                "dense_extrapolated": extrapolated,
                "fraction_of_dense": ms / dense_ms if dense_ms else None,
                "with_projection_fraction":
                    (ms + stage_ms["projection_ms"]) / dense_ms if dense_ms else None,
                "bytes": nbytes, "floor_ms": floor_ms(0.0, nbytes), "timed_runs": runs,
                **stage_ms,
            }
            rows.append(row)
            log(f"indexer_select {length}: {ms:.3f} ms = "
                f"{(row['fraction_of_dense'] or math.nan):.2%} of dense "
                f"{(dense_ms or math.nan):.1f} ms, density "
                f"{density:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in stage_ms.items()))

        guarded(f"indexer_select {length}", one, save)


def run_prefill_layer(args, results: dict, dense: DenseTimes, save: Callable[[], None]) -> None:
    rows = results["rows"]
    layer_indexer = indexer_params()
    sparse_fn = functools.partial(prefill_layer, layer_indexer=layer_indexer)
    dense_groups, sparse_groups = np.array(DENSE_GROUPS), np.array(SPARSE_GROUPS)
    for length in args.prefill_lengths:
        def one(length=length):
            runs = runs_for(length)
            lengths = jnp.full((1,), length, jnp.int32)
            data = [planted_layer(jax.random.PRNGKey(41 + i), 1, length)
                    for i in range(inner_for(length))]
            q, k, v = data[0]
            dense.measure(length, q, k, v)
            ms, outputs = time_calls(sparse_fn, [(*x, lengths) for x in data], runs)
            selected, candidates = (float(x) for x in sum(out[1] for out in outputs))
            density = selected / candidates
            listed = selected / len(outputs)  # (query block, key block) pairs of one call
            del outputs
            row = {"bench": "prefill_layer", "length": length, "batch": 1, "density": density,
                   "ms": ms, "timed_runs": runs}
            if length <= args.breakdown_max_length:
                row["dense_head_ms"] = time_ms(
                    lambda q, k, v: attention.dense_prefill(
                        q[:, :, DENSE_HEADS], k[:, :, dense_groups], v[:, :, dense_groups],
                        lengths, backend=LAYER_BACKEND), [(q, k, v)], runs)
                qs = q[:, :, SPARSE_HEADS]
                ks, vs = k[:, :, sparse_groups], v[:, :, sparse_groups]
                row["indexer_ms"], lists = time_calls(
                    lambda qs, ks: select_prefill_kernel(
                        qs, None, indexer_keys(ks, layer_indexer["wk"]), lengths, SPARSE,
                        layer_indexer), [(qs, ks)], runs)
                row["sparse_attention_ms"] = time_ms(
                    functools.partial(sparse_attention, block_q=BLOCK, block_k=BLOCK,
                                      lengths=lengths, interpret=INTERPRET),
                    [(qs, ks, vs, *lists[0])], runs)
                del qs, ks, vs, lists
            del data, q, k, v
            dense_ms, extrapolated = dense.best(length)
            flops = (dense_prefill_flops(length, GROUP * len(DENSE_GROUPS))
                     + 4.0 * BLOCK * BLOCK * HEAD_DIM * GROUP * listed)
            nbytes = (2 * length * NUM_HEADS * HEAD_DIM * BYTES_BF16  # q in, out
                      + 2 * length * NUM_KV_HEADS * HEAD_DIM * BYTES_BF16)  # K, V once
            row.update({
                "dense_ms": dense_ms, "speedup": dense_ms / ms if dense_ms else None,
                "dense_extrapolated": extrapolated, "flops": flops, "bytes": nbytes,
                "floor_ms": floor_ms(flops, nbytes),
                "amdahl_bound": NUM_KV_HEADS / len(DENSE_GROUPS),
            })
            rows.append(row)
            log(f"prefill_layer {length}: {ms:.2f} ms vs dense {(dense_ms or math.nan):.1f} ms"
                f"{' (extrapolated)' if extrapolated else ''}, x{(row['speedup'] or math.nan):.2f}"
                f", density {density:.3f}, floor {row['floor_ms']:.2f} ms"
                + "".join(f", {k} {row[k]:.2f}" for k in
                          ("dense_head_ms", "indexer_ms", "sparse_attention_ms") if k in row))

        guarded(f"prefill_layer {length}", one, save)


def decode_num_splits(variant: str, batch: int, max_sel: int) -> int:
    """A --decode-splits entry -> the sparse decode's split count at this shape."""
    groups = len(SPARSE_GROUPS)
    if variant == "auto":
        return default_num_splits(batch, groups, max_sel)
    if variant == "fill":
        return default_num_splits(batch, groups, max_sel, max_walk=None)
    return int(variant)


def run_decode_layer(args, results: dict, save: Callable[[], None]) -> None:
    rows = results["rows"]
    layer_indexer = indexer_params()
    dense_groups, sparse_groups = np.array(DENSE_GROUPS), np.array(SPARSE_GROUPS)

    def dense_fn(q, k, v, lengths):
        return attention.dense_decode(q, k, v, lengths, backend=LAYER_BACKEND)

    def indexer_fn(q, ki, lengths):
        return select_decode_kernel(q[:, :, SPARSE_HEADS], None, ki, lengths, SPARSE,
                                    layer_indexer)

    r = rule()
    for length in args.decode_lengths:
        max_sel = max_selected(-(-length // BLOCK), r["max_blocks"], r["top_k"],
                               r["sink_blocks"] + r["local_blocks"], r["min_blocks"])
        for batch in args.decode_batches:
            def one(length=length, batch=batch, max_sel=max_sel):
                cache_bytes = 2 * batch * length * NUM_KV_HEADS * HEAD_DIM * BYTES_BF16
                num_layers = int(max(1, min(MAX_DECODE_LAYERS,
                                            DECODE_CACHE_BUDGET // cache_bytes)))
                per_layer = -(-DECODE_CALLS // num_layers)
                lengths = jnp.full((batch,), length, jnp.int32)
                # Per layer cache: the layer's K/V; its new-token queries: the planted queries
                # of its last positions, each timed as the token at position length - 1.
                layers = [planted_layer(jax.random.PRNGKey(51 + i), batch, length, per_layer)
                          for i in range(num_layers)]
                queries = [q for q, _, _ in layers]
                caches = [(k, v) for _, k, v in layers]
                del layers

                def calls(caches):
                    return [(queries[c % num_layers][:, c // num_layers][:, None],
                             *caches[c % num_layers], lengths) for c in range(DECODE_CALLS)]

                dense_ms = time_ms(dense_fn, calls(caches), TIMED_RUNS)
                split = []
                while caches:  # the model's cache layout; each full cache freed once split
                    k, v = caches.pop(0)
                    ks, vs = k[:, :, sparse_groups], v[:, :, sparse_groups]
                    # The cached indexer keys: indexer_keys(ks, wk) with the selector weights
                    # of indexer_params is exactly this slice; the einsum's autotuning
                    # workspace alone ran out of memory at 512K x 16.
                    split.append((k[:, :, dense_groups], v[:, :, dense_groups], ks, vs,
                                  ks[..., :RANK]))
                    del k, v
                sparse_calls = calls(split)
                index_ms = time_ms(indexer_fn, [(c[0], c[5], lengths) for c in sparse_calls],
                                   TIMED_RUNS)
                for variant in args.decode_splits:
                    num_splits = decode_num_splits(variant, batch, max_sel)
                    sparse_fn = functools.partial(decode_layer, layer_indexer=layer_indexer,
                                                  num_splits=num_splits)
                    ms, outputs = time_calls(sparse_fn, sparse_calls, TIMED_RUNS)
                    launches = compiled_launches(sparse_fn, sparse_calls[0])
                    listed = float(sum(jnp.sum(out[1]) for out in outputs)) / len(outputs)
                    density = listed / (batch * len(SPARSE_GROUPS) * -(-length // BLOCK))
                    del outputs
                    nbytes = (2 * batch * length * len(DENSE_GROUPS) * HEAD_DIM * BYTES_BF16
                              + batch * length * len(SPARSE_GROUPS) * RANK * BYTES_BF16
                              + listed * BLOCK * HEAD_DIM * 2 * BYTES_BF16)
                    row = {
                        "bench": "decode_layer", "length": length, "batch": batch,
                        "splits": variant, "num_splits": num_splits,
                        "launches": sum(launches.values()), "launch_ops": launches,
                        "density": density, "ms": ms, "dense_ms": dense_ms,
                        "speedup": dense_ms / ms, "indexer_ms": index_ms, "bytes": nbytes,
                        "floor_ms": floor_ms(0.0, nbytes),
                        "dense_floor_ms": floor_ms(0.0, cache_bytes), "cache_layers": num_layers,
                        "amdahl_bound": NUM_KV_HEADS / len(DENSE_GROUPS),
                    }
                    rows.append(row)
                    log(f"decode_layer {length} b{batch} splits {variant} ({num_splits}): "
                        f"{ms * 1e3:.1f} us vs dense {dense_ms * 1e3:.1f} us, "
                        f"x{row['speedup']:.2f}, {row['launches']} launches {launches}, "
                        f"density {density:.3f}, indexer {index_ms * 1e3:.1f} us, "
                        f"floor {row['floor_ms'] * 1e3:.1f} us")

            guarded(f"decode_layer {length} b{batch}", one, save)


def print_table(rows: list[dict]) -> None:
    log("\nbench            length  batch density         ms    dense_ms  speedup  note")
    for r in rows:
        dense = r["dense_ms"]
        note = f"floor {r['floor_ms']:.3f} ms"
        if r.get("dense_extrapolated"):
            note += ", dense extrapolated"
        if r["bench"] == "indexer_select" and dense:
            note += f", {r['fraction_of_dense']:.2%} of dense"
        if r["bench"] == "decode_layer":
            note += f", splits {r['splits']} ({r['num_splits']}), {r['launches']} launches"
        log(f"{r['bench']:<16} {r['length']:>7} {r['batch']:>6} {r['density']:>7.3f} "
            f"{r['ms']:>10.3f} {dense if dense else float('nan'):>11.3f} "
            f"{(r['speedup'] or float('nan')):>8.2f}  {note}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    def ints(s):
        return [int(x) for x in s.split(",") if x]

    def default(name: str) -> str:
        real, smoke = OPTION_DEFAULTS[name]
        return f"default {real} (--smoke: {smoke})"

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, every section (CPU: interpret mode, XLA dense); asserts")
    p.add_argument("--out-dir", default=None,
                   help="default benchmarks/results (--smoke: a fresh temp dir)")
    p.add_argument("--sections", default=None, help=default("sections"))
    p.add_argument("--check-lengths", type=ints, default=None, help=default("check_lengths"))
    p.add_argument("--check-decode-length", type=int, default=None,
                   help=default("check_decode_length"))
    p.add_argument("--sweep-length", type=int, default=None, help=default("sweep_length"))
    p.add_argument("--sweep-decode-length", type=int, default=None,
                   help=default("sweep_decode_length"))
    p.add_argument("--sweep-decode-batches", type=ints, default=None,
                   help=default("sweep_decode_batches"))
    p.add_argument("--indexer-lengths", type=ints, default=None,
                   help=default("indexer_lengths"))
    p.add_argument("--prefill-lengths", type=ints, default=None,
                   help=default("prefill_lengths"))
    p.add_argument("--decode-lengths", type=ints, default=None, help=default("decode_lengths"))
    p.add_argument("--decode-batches", type=ints, default=None, help=default("decode_batches"))
    p.add_argument("--decode-splits", type=lambda s: s.split(","), default=None,
                   help="split counts of the sparse decode, each timed: auto (the kernel's "
                   "default), fill (the SM fill alone, the default before the walk bound) or "
                   "an integer; " + default("decode_splits"))
    p.add_argument("--selections", type=lambda s: s.split(","), default=list(SELECTIONS),
                   help="selection implementations indexer_select times (pallas first)")
    p.add_argument("--dense-max-length", type=int, default=None,
                   help="longest prefill timed densely; longer ones are extrapolated; "
                   + default("dense_max_length"))
    p.add_argument("--breakdown-max-length", type=int, default=None,
                   help="longest prefill whose parts are also timed one by one; "
                   + default("breakdown_max_length"))
    args = p.parse_args(argv)
    for name, (real, smoke) in OPTION_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else real)
    if args.out_dir is None:
        args.out_dir = (tempfile.mkdtemp(prefix="bench_layer_") if args.smoke
                        else "benchmarks/results")
    return args


def check_smoke(sections: list[str], results: dict) -> None:
    """--smoke: the checks passed and every section wrote its rows."""
    failed = []
    for c in results.get("checks", []):
        if "rel_max" in c:
            ok = c["rel_max"] <= SMOKE_LOGITS_TOLERANCE and c["same_inf"] and not c["nan"]
        else:
            ok = c["rows_differ"] == 0 or c["worst_margin"] <= SMOKE_TIE_MARGIN
        if not ok:
            failed.append(c)
    assert not failed, f"checks failed: {failed}"
    written = {r["bench"] for r in results["rows"]} | {
        "check" for _ in results.get("checks", [])} | {"sweep" for _ in results.get("sweep", [])}
    missing = set(sections) - written
    assert not missing, f"sections without results: {sorted(missing)}"
    log(f"smoke ok: {len(results.get('checks', []))} checks, {len(results.get('sweep', []))} "
        f"sweep rows, {len(results['rows'])} rows")


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if args.smoke:
        use_smoke_sizes()
    sections = args.sections.split(",")
    os.makedirs(args.out_dir, exist_ok=True)
    results = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "jax_version": jax.__version__, "commit": git_commit(),
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"}, "rows": [],
    }
    path = os.path.join(args.out_dir, "layer.json")
    log(f"{results['device']} jax {results['jax']} commit {results['commit']} -> {path}")
    dense = DenseTimes(args.dense_max_length)

    def save():
        results["dense_prefill_ms"] = {str(k): v for k, v in dense.ms.items()}
        results["dense_prefill_model_path_ms"] = {str(k): v for k, v in dense.model_ms.items()}
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    runners = {
        "check": lambda: run_checks(args, results, save),
        "sweep": lambda: run_sweep(args, results, save),
        "indexer_select": lambda: run_indexer_select(args, results, dense, save),
        "prefill_layer": lambda: run_prefill_layer(args, results, dense, save),
        "decode_layer": lambda: run_decode_layer(args, results, save),
    }
    for section in sections:
        runners[section]()
    save()
    print_table(results["rows"])
    if args.smoke:
        check_smoke(sections, results)


if __name__ == "__main__":
    main(sys.argv[1:])

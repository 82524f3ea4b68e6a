"""GPU checks and timings of the sparse attention kernels against cuDNN dense attention.

Run from the repository root on a machine with one CUDA GPU:

    PYTHONPATH=. python3 benchmarks/bench_kernels.py --out-dir benchmarks/results

Sections (--sections, comma separated): `check` (kernel vs float32 reference at real sizes),
`sweep` (launch-parameter sweep of both kernels), `prefill`, `decode` (timings vs cuDNN/XLA
dense attention measured in the same run). Shapes are Llama-3-8B attention: 32 query heads,
8 KV heads, head_dim 128, bf16. Results go to OUT_DIR/kernels.json; a short table prints last.
The commit recorded is $COMMIT when set, else `git rev-parse HEAD`.

Smoke run (CPU, tiny sizes, < 60 s; CI runs it):

    PYTHONPATH=. JAX_PLATFORMS=cpu python3 benchmarks/bench_kernels.py --smoke

--smoke runs every section (check,sweep,prefill,decode unless --sections says otherwise) at
SMOKE's shapes (4 query / 2 KV heads, head_dim 16, block 16, lengths 64-256, 2 timed runs, few
chained calls) with both kernels in Pallas interpret mode and the dense baselines through XLA
(no cuDNN off a GPU): `check` runs tiny analogues of the real cases (ragged rows, f32 with
block_q != block_k, a chunk at a query offset, a non-power-of-2 group, every block listed vs
dense, ragged decode, decode with explicit splits); `sweep` a few launch configurations of each
kernel; `prefill` and `decode` one length and density each, with the dense row; the Mosaic GPU
prefill kernel, which needs a Hopper GPU, is lowered for CUDA instead of timed. Any failure
raises, every check must be within CHECK_TOLERANCE of its reference, and every row and sweep
entry must be there. XLA compiles unoptimised (SMOKE_XLA_FLAGS: the run is compile-bound). The
JSON goes to a fresh temp dir unless --out-dir is given. The timings of a smoke run mean
nothing: it only proves the script still runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference
from pallas_kernels.sparse_attention_mgpu import sparse_attention_mgpu, unsupported_reason
from pallas_kernels.sparse_decode import sparse_decode, sparse_decode_reference

NUM_HEADS = 32  # Llama-3-8B
NUM_KV_HEADS = 8
HEAD_DIM = 128
BLOCK = 64  # block_q = block_k, the design's default
DTYPE = jnp.bfloat16
BYTES_BF16 = 2
WARMUP_RUNS = 2
TIMED_RUNS = 10
# At 512K tokens one dense prefill takes ~4 s: time it (and the sparse kernel) fewer times.
LONG_PREFILL = 512 * 1024
LONG_TIMED_RUNS = 3
# Several chained calls per timed region when one call is short, so host dispatch stays out
# of the numbers: prefill calls per region = INNER_TOKENS // length, at most MAX_INNER;
# decode calls per region = DECODE_CALLS.
INNER_TOKENS = 128 * 1024
MAX_INNER = 4
DECODE_CALLS = 32
# Distinct per-layer caches a decode timing cycles through, so the selected blocks of one
# call are out of L2 (50 MB on an H100) by the next; bounded by this memory budget.
DECODE_CACHE_BUDGET = 24 << 30
MAX_DECODE_LAYERS = 8
# Launch parameters the sweep tries: (fold_heads, tile_q, num_warps, num_stages) for prefill,
# (num_splits, num_warps, num_stages) for decode; None = the kernel's default.
PREFILL_SWEEP = [
    (True, 16, 4, 2), (True, 32, 4, 2), (True, 32, 4, 3), (True, 32, 8, 2), (True, 32, 8, 3),
    (True, 64, 8, 2), (True, 64, 8, 3), (False, 64, 8, 2),
]
DECODE_SWEEP = [(None, 4, 2), (None, 4, 3), (None, 8, 3), (16, 4, 3), (8, 4, 3)]
# Characters of a failure's message worth logging (compiler errors run to pages).
ERROR_CHARS = 400
# The prefill target: sparse time <= density * dense / TARGET_EFFICIENCY + SLACK * dense.
TARGET_EFFICIENCY = 0.75
TARGET_SLACK = 0.02
# The sweep's decode timings: batches, per-layer caches cycled through, density of the lists.
SWEEP_DECODE_BATCHES = (1, 16)
SWEEP_DECODE_LAYERS = 2
SWEEP_DECODE_DENSITY = 0.05
# Prefill kernels timed side by side: the Triton one, and the Mosaic GPU one (Hopper; under
# --smoke, where it cannot run, it is lowered for CUDA at SMOKE_MOSAIC_SHAPE instead).
PREFILL_IMPLS = ("triton", "mosaic_gpu")
# (q_len, heads, kv_heads, head_dim): the smallest shape family the Mosaic kernel tiles.
SMOKE_MOSAIC_SHAPE = (256, 4, 2, 64)
MOSAIC_BLOCK = 64
# Default sizes of the real run (command-line options override them).
SECTIONS = "check,prefill,decode"
ALL_SECTIONS = "check,sweep,prefill,decode"
PREFILL_LENGTHS = [32768, 131072]
DENSITIES = [0.01, 0.03, 0.1, 0.3]
DECODE_LENGTHS = [32768, 131072, 524288]
DECODE_BATCHES = [1, 16]
DECODE_DENSITIES = [0.05]
SWEEP_LENGTH = 32768
SWEEP_DENSITIES = [0.1]
SWEEP_DECODE_LENGTH = 131072
# Tokens in a "k" of a check's name (8192 -> "8k").
TOKENS_PER_K = 1024
# --smoke: bf16 outputs vs the float32 reference, max |error| / max |reference| allowed (as the
# tests); the real run records the errors without judging them.
CHECK_TOLERANCE = 2e-2


@dataclasses.dataclass(frozen=True)
class PrefillCheck:
    """One prefill check: the kernel vs the float32 reference on random q, k, v and stratified
    lists over each query block's causal blocks (offset-aware)."""

    name: str
    seed: int
    q_len: int
    heads: int
    kv_heads: int
    dim: int
    dtype: object
    lengths: tuple[int, ...]  # valid KV length of each row; batch = len(lengths)
    q_offset: int = 0
    kv_len: int | None = None  # None: q_offset + q_len
    block_q: int = BLOCK
    block_k: int = BLOCK
    density: float = 0.1
    launch_args: bool = False  # with the command line's launch parameters (prefill_kwargs)


@dataclasses.dataclass(frozen=True)
class DecodeCheck:
    """One decode check: the kernel vs the float32 reference (the setup's heads and block)."""

    name: str
    seed: int
    lengths: tuple[int, ...]  # one per row
    max_len: int
    dtype: object
    density: float
    num_splits: int | None = None


PREFILL_CHECKS = (
    PrefillCheck("prefill_bf16_8k_g4_ragged", 10, 8192, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE,
                 (8192, 5000), launch_args=True),
    PrefillCheck("prefill_f32_2k_g8_d64_bq32", 20, 2048, 32, 4, 64, jnp.float32, (2048,),
                 block_q=32, density=0.3),
    PrefillCheck("prefill_bf16_chunk_offset", 30, 1024, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE,
                 (4133,), q_offset=3072, kv_len=4133, density=0.5),
    PrefillCheck("prefill_bf16_4k_g3_loop", 40, 4096, 24, 8, 64, DTYPE, (4000,)),
)
DECODE_CHECKS = (
    DecodeCheck("decode_bf16_32k_b4_ragged", 60, (32768, 30000, 12345, 1), 32768, DTYPE, 0.1),
    DecodeCheck("decode_f32_8k_b2", 70, (8192, 4097), 8192, jnp.float32, 0.3, num_splits=5),
)
FULL_CHECK_LENGTH = 8192  # every causal block listed vs dense attention

# --smoke: the same cases at tiny shapes (lengths inside a block and past the last one kept).
SMOKE_HEADS = 4
SMOKE_KV_HEADS = 2
SMOKE_HEAD_DIM = 16
SMOKE_BLOCK = 16  # the kernels' smallest block (MIN_DOT_DIM)
SMOKE_PREFILL_CHECKS = (
    PrefillCheck("prefill_bf16_128_g2_ragged", 10, 128, SMOKE_HEADS, SMOKE_KV_HEADS,
                 SMOKE_HEAD_DIM, DTYPE, (128, 77), block_q=SMOKE_BLOCK, block_k=SMOKE_BLOCK,
                 launch_args=True),
    PrefillCheck("prefill_f32_128_g8_bk32", 20, 128, 8, 1, SMOKE_HEAD_DIM, jnp.float32, (128,),
                 block_q=SMOKE_BLOCK, block_k=2 * SMOKE_BLOCK, density=0.3),
    PrefillCheck("prefill_bf16_chunk_offset", 30, 64, SMOKE_HEADS, SMOKE_KV_HEADS,
                 SMOKE_HEAD_DIM, DTYPE, (133,), q_offset=96, kv_len=133, block_q=SMOKE_BLOCK,
                 block_k=SMOKE_BLOCK, density=0.5),
    PrefillCheck("prefill_bf16_128_g3_loop", 40, 128, 3, 1, SMOKE_HEAD_DIM, DTYPE, (120,),
                 block_q=SMOKE_BLOCK, block_k=SMOKE_BLOCK),
)
SMOKE_DECODE_CHECKS = (
    DecodeCheck("decode_bf16_256_b4_ragged", 60, (256, 200, 77, 1), 256, DTYPE, 0.1),
    DecodeCheck("decode_f32_128_b2", 70, (128, 65), 128, jnp.float32, 0.3, num_splits=3),
)
SMOKE_FULL_CHECK_LENGTH = 128
SMOKE_PREFILL_SWEEP = ((True, SMOKE_BLOCK, 4, 2), (False, SMOKE_BLOCK, 4, 2))
SMOKE_DECODE_SWEEP = ((None, 4, 2), (2, 4, 2))
SMOKE_SWEEP_DECODE_BATCHES = (1, 2)
SMOKE_TIMED_RUNS = 2
SMOKE_INNER = 2  # chained calls per timed region, prefill and decode
SMOKE_DECODE_LAYERS = 2
SMOKE_PREFILL_LENGTHS = [256]
SMOKE_DENSITIES = [0.25]
SMOKE_DECODE_LENGTHS = [256]
SMOKE_DECODE_BATCHES = [2]
SMOKE_DECODE_DENSITIES = [0.25]
SMOKE_SWEEP_LENGTH = 128
SMOKE_SWEEP_DENSITIES = [0.25]
SMOKE_SWEEP_DECODE_LENGTH = 256
# --smoke is bound by XLA:CPU compile time (each interpreted kernel, reference and random draw
# is a fresh compile, its run milliseconds): unoptimised compiles halve it. Set before jax
# starts its backend, unless XLA_FLAGS already says otherwise.
SMOKE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Shapes and means of one run (the real GPU one or the CPU smoke one)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block: int  # block_q = block_k of the timings
    interpret: bool  # the kernels in Pallas interpret mode (no GPU)
    dense_impl: str  # dot_product_attention implementation of the dense prefill
    decode_dense_impls: tuple[str, ...]  # tried for dense decode; the fastest is the baseline
    timed_runs: int | None  # None: TIMED_RUNS, LONG_TIMED_RUNS from LONG_PREFILL tokens
    max_inner: int  # prefill calls chained per timed region, at most
    decode_calls: int  # decode calls per timed region
    max_decode_layers: int
    prefill_sweep: tuple
    decode_sweep: tuple
    sweep_decode_batches: tuple[int, ...]
    prefill_checks: tuple[PrefillCheck, ...]
    decode_checks: tuple[DecodeCheck, ...]
    full_check_length: int


REAL = Setup(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK, interpret=False, dense_impl="cudnn",
             decode_dense_impls=("cudnn", "xla"), timed_runs=None, max_inner=MAX_INNER,
             decode_calls=DECODE_CALLS, max_decode_layers=MAX_DECODE_LAYERS,
             prefill_sweep=tuple(PREFILL_SWEEP), decode_sweep=tuple(DECODE_SWEEP),
             sweep_decode_batches=SWEEP_DECODE_BATCHES, prefill_checks=PREFILL_CHECKS,
             decode_checks=DECODE_CHECKS, full_check_length=FULL_CHECK_LENGTH)
SMOKE = Setup(SMOKE_HEADS, SMOKE_KV_HEADS, SMOKE_HEAD_DIM, SMOKE_BLOCK, interpret=True,
              dense_impl="xla", decode_dense_impls=("xla",), timed_runs=SMOKE_TIMED_RUNS,
              max_inner=SMOKE_INNER, decode_calls=SMOKE_INNER,
              max_decode_layers=SMOKE_DECODE_LAYERS, prefill_sweep=SMOKE_PREFILL_SWEEP,
              decode_sweep=SMOKE_DECODE_SWEEP, sweep_decode_batches=SMOKE_SWEEP_DECODE_BATCHES,
              prefill_checks=SMOKE_PREFILL_CHECKS, decode_checks=SMOKE_DECODE_CHECKS,
              full_check_length=SMOKE_FULL_CHECK_LENGTH)


def log(msg: str) -> None:
    print(msg, flush=True)


def median_ms(fn: Callable[[], object], runs: int, inner: int = 1) -> float:
    """Median wall time of fn() in ms (fn must block until the device is done), per inner call."""
    for _ in range(WARMUP_RUNS):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def rel_errors(out: jax.Array, ref: jax.Array) -> dict[str, float]:
    out = out.astype(jnp.float32)
    ref = ref.astype(jnp.float32)
    diff = out - ref
    return {
        "rel_fro": float(jnp.linalg.norm(diff) / jnp.linalg.norm(ref)),
        "rel_max": float(jnp.max(jnp.abs(diff)) / jnp.max(jnp.abs(ref))),
        "nan": bool(jnp.isnan(out).any()),
    }


def random_array(seed: int, shape: Sequence[int], dtype=DTYPE) -> jax.Array:
    return jax.jit(lambda key: jax.random.normal(key, shape, dtype))(jax.random.PRNGKey(seed))


def stratified_picks(key, num: jax.Array, span: jax.Array, slots: int) -> jax.Array:
    """num[i] distinct ascending ids in [0, span[i]): one uniform pick per equal stratum.

    num, span: [...] int32 with num <= span; returns [..., slots] (entries past num arbitrary).
    """
    k = jnp.arange(slots)
    denom = jnp.maximum(num, 1)[..., None]
    lo = (k * span[..., None]) // denom
    hi = ((k + 1) * span[..., None]) // denom
    u = jax.random.uniform(key, (*num.shape, slots))
    return lo + jnp.floor(u * (hi - lo)).astype(jnp.int32)


def prefill_lists(setup: Setup, seed: int, batch: int, q_len: int, density: float):
    """Random lists per (row, KV head, query block): its diagonal block plus a stratified draw
    from the earlier ones, round(density * causal blocks) in all (at least 1).

    Returns (block_indices [B, K, nq, max_sel], block_counts [B, K, nq], listed blocks in all,
    causal blocks in all).
    """
    block = setup.block
    nq = -(-q_len // block)
    diag = (np.minimum((np.arange(nq) + 1) * block, q_len) - 1) // block
    causal = diag + 1
    count = np.clip(np.round(density * causal), 1, causal).astype(np.int32)
    max_sel = int(count.max())
    shape = (batch, setup.num_kv_heads, nq)
    count_b = jnp.broadcast_to(jnp.asarray(count), shape)
    diag_b = jnp.broadcast_to(jnp.asarray(diag, jnp.int32), shape)
    picks = stratified_picks(jax.random.PRNGKey(seed), count_b - 1, diag_b, max_sel)
    slot = jnp.arange(max_sel)
    idx = jnp.where(slot < (count_b - 1)[..., None], picks, diag_b[..., None]).astype(jnp.int32)
    listed = int(count.sum()) * batch * setup.num_kv_heads
    return idx, count_b.astype(jnp.int32), listed, int(causal.sum()) * batch * setup.num_kv_heads


def decode_lists(setup: Setup, seed: int, lengths: np.ndarray, density: float):
    """Per (row, KV head): the newest token's block plus a stratified draw from the earlier
    ones, round(density * valid blocks) in all (at least 1).

    Returns (block_indices [B, K, max_sel], block_counts [B, K], listed blocks in all).
    """
    last = (lengths - 1) // setup.block
    count = np.clip(np.round(density * (last + 1)), 1, last + 1).astype(np.int32)
    max_sel = int(count.max())
    shape = (len(lengths), setup.num_kv_heads)
    count_b = jnp.broadcast_to(jnp.asarray(count)[:, None], shape)
    last_b = jnp.broadcast_to(jnp.asarray(last, jnp.int32)[:, None], shape)
    picks = stratified_picks(jax.random.PRNGKey(seed), count_b - 1, last_b, max_sel)
    slot = jnp.arange(max_sel)
    idx = jnp.where(slot < (count_b - 1)[..., None], picks, last_b[..., None]).astype(jnp.int32)
    return idx, count_b.astype(jnp.int32), int(count.sum()) * setup.num_kv_heads


def prefill_kwargs(args) -> dict:
    return {
        "tile_q": args.tile_q, "num_warps": args.num_warps, "num_stages": args.num_stages,
        "fold_heads": args.fold_heads,
    }


def dense_prefill(q, k, v, impl: str = "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


# ----------------------------------------------------------------------------------------------
# Correctness (real sizes; tiny ones under --smoke)
# ----------------------------------------------------------------------------------------------


def size_tag(tokens: int) -> str:
    """A length in a check's name: 8192 -> "8k", 128 -> "128"."""
    return f"{tokens // TOKENS_PER_K}k" if tokens % TOKENS_PER_K == 0 else str(tokens)


def run_checks(setup: Setup, args) -> list[dict]:
    results = []

    def record(name: str, out, ref):
        errs = rel_errors(out, ref)
        results.append({"check": name, **errs})
        log(f"check {name}: rel_fro {errs['rel_fro']:.2e} rel_max {errs['rel_max']:.2e} "
            f"nan {errs['nan']}")

    def guarded(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record the failure, run the other checks
            if args.smoke:
                raise
            results.append({"check": name, "error": f"{type(e).__name__}: {e}"[:ERROR_CHARS]})
            log(f"check {name}: FAILED {results[-1]['error']}")

    def prefill_case(c: PrefillCheck):
        batch = len(c.lengths)
        kv_len = c.q_offset + c.q_len if c.kv_len is None else c.kv_len
        q = random_array(c.seed, (batch, c.q_len, c.heads, c.dim), c.dtype)
        k = random_array(c.seed + 1, (batch, kv_len, c.kv_heads, c.dim), c.dtype)
        v = random_array(c.seed + 2, (batch, kv_len, c.kv_heads, c.dim), c.dtype)
        nq = -(-c.q_len // c.block_q)
        # Lists over the causal blocks of each query block (offset-aware), stratified.
        diag = (c.q_offset + np.minimum((np.arange(nq) + 1) * c.block_q, c.q_len) - 1) // c.block_k
        count = np.clip(np.round(c.density * (diag + 1)), 1, diag + 1).astype(np.int32)
        shape = (batch, c.kv_heads, nq)
        cnt = jnp.broadcast_to(jnp.asarray(count), shape)
        dg = jnp.broadcast_to(jnp.asarray(diag, jnp.int32), shape)
        picks = stratified_picks(jax.random.PRNGKey(c.seed + 3), cnt - 1, dg, int(count.max()))
        slot = jnp.arange(int(count.max()))
        idx = jnp.where(slot < (cnt - 1)[..., None], picks, dg[..., None]).astype(jnp.int32)
        lens = jnp.asarray(c.lengths, jnp.int32)
        kw = dict(block_q=c.block_q, block_k=c.block_k, lengths=lens, q_offset=c.q_offset)
        launch = prefill_kwargs(args) if c.launch_args else {}
        out = sparse_attention(q, k, v, idx, cnt, **kw, **launch, interpret=setup.interpret)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref = sparse_attention_reference(*f32, idx, cnt, **kw)
        record(c.name, out, ref)
        if not setup.interpret and unsupported_reason(
                q.shape, k.shape, q.dtype, block_q=c.block_q, block_k=c.block_k,
                window=None) is None:
            record(f"{c.name}_mosaic_gpu", sparse_attention_mgpu(q, k, v, idx, cnt, **kw), ref)

    for case in setup.prefill_checks:
        guarded(case.name, functools.partial(prefill_case, case))

    full_name = f"prefill_full_vs_{setup.dense_impl}_{size_tag(setup.full_check_length)}"

    def full_vs_dense():
        # Every causal block listed: the kernel must agree with dense causal attention.
        q_len = setup.full_check_length
        q = random_array(50, (1, q_len, setup.num_heads, setup.head_dim))
        k = random_array(51, (1, q_len, setup.num_kv_heads, setup.head_dim))
        v = random_array(52, (1, q_len, setup.num_kv_heads, setup.head_dim))
        idx, cnt, _, _ = prefill_lists(setup, 53, 1, q_len, 1.0)
        out = sparse_attention(q, k, v, idx, cnt, block_q=setup.block, block_k=setup.block,
                               interpret=setup.interpret, **prefill_kwargs(args))
        record(full_name, out, dense_prefill(q, k, v, setup.dense_impl))

    guarded(full_name, full_vs_dense)

    def decode_case(c: DecodeCheck):
        batch = len(c.lengths)
        shape = (batch, c.max_len, setup.num_kv_heads, setup.head_dim)
        q = random_array(c.seed, (batch, setup.num_heads, setup.head_dim), c.dtype)
        k = random_array(c.seed + 1, shape, c.dtype)
        v = random_array(c.seed + 2, shape, c.dtype)
        lens = np.asarray(c.lengths, np.int32)
        idx, cnt, _ = decode_lists(setup, c.seed + 3, lens, c.density)
        lens = jnp.asarray(lens)
        out = sparse_decode(q, k, v, idx, cnt, lens, block_k=setup.block,
                            num_splits=c.num_splits, interpret=setup.interpret)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        record(c.name, out, sparse_decode_reference(*f32, idx, cnt, lens, block_k=setup.block))

    for case in setup.decode_checks:
        guarded(case.name, functools.partial(decode_case, case))
    return results


# ----------------------------------------------------------------------------------------------
# Timings
# ----------------------------------------------------------------------------------------------


def prefill_kernel_fn(setup: Setup, impl: str, **kwargs) -> Callable:
    """fn(q, k, v, idx, cnt) of one prefill kernel at the setup's block."""
    if impl == "mosaic_gpu":
        return functools.partial(sparse_attention_mgpu, block_q=setup.block,
                                 block_k=setup.block)
    return functools.partial(sparse_attention, block_q=setup.block, block_k=setup.block,
                             interpret=setup.interpret, **kwargs)


@functools.cache
def lower_mosaic_prefill() -> bool:
    """--smoke's stand-in for timing the Mosaic GPU kernel: it lowers for CUDA (once: every
    row of a smoke run asks the same question)."""
    q_len, heads, kv_heads, dim = SMOKE_MOSAIC_SHAPE
    nq = q_len // MOSAIC_BLOCK
    sds = jax.ShapeDtypeStruct
    kv = sds((1, q_len, kv_heads, dim), DTYPE)
    run = jax.jit(functools.partial(sparse_attention_mgpu, block_q=MOSAIC_BLOCK,
                                    block_k=MOSAIC_BLOCK))
    lowered = run.trace(sds((1, q_len, heads, dim), DTYPE), kv, kv,
                        sds((1, kv_heads, nq, nq), jnp.int32), sds((1, kv_heads, nq), jnp.int32))
    return "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


def time_prefill_sparse(setup: Setup, q, k, v, lists, runs: int, impl: str = "triton",
                        **kwargs) -> float:
    """ms per call; lists: one (idx, cnt) per call of the timed region.

    Each call's output is the next call's query, so no call can be skipped or hoisted.
    """
    attend = prefill_kernel_fn(setup, impl, **kwargs)

    def chain(q, k, v, lists):
        for idx, cnt in lists:
            q = attend(q, k, v, idx, cnt)
        return q

    fn = jax.jit(chain)
    return median_ms(lambda: jax.block_until_ready(fn(q, k, v, lists)), runs, len(lists))


def time_prefill_fn(attend: Callable, q, k, v, runs: int, inner: int) -> float:
    """ms per call of attend(q, k, v) -> like q, inner calls chained in one timed region.

    Each call's output is the next call's query, so no call can be skipped or hoisted.
    """
    def chain(q, k, v):
        for _ in range(inner):
            q = attend(q, k, v)
        return q

    fn = jax.jit(chain)
    return median_ms(lambda: jax.block_until_ready(fn(q, k, v)), runs, inner)


def time_prefill_dense(q, k, v, runs: int, inner: int, impl: str = "cudnn") -> float:
    return time_prefill_fn(functools.partial(dense_prefill, impl=impl), q, k, v, runs, inner)


def prefill_runs(setup: Setup, q_len: int) -> int:
    if setup.timed_runs is not None:
        return setup.timed_runs
    return LONG_TIMED_RUNS if q_len >= LONG_PREFILL else TIMED_RUNS


def prefill_qkv(setup: Setup, seeds: Sequence[int], q_len: int):
    q = random_array(seeds[0], (1, q_len, setup.num_heads, setup.head_dim))
    k = random_array(seeds[1], (1, q_len, setup.num_kv_heads, setup.head_dim))
    v = random_array(seeds[2], (1, q_len, setup.num_kv_heads, setup.head_dim))
    return q, k, v


def run_prefill(setup: Setup, args, rows: list[dict]) -> None:
    kwargs = prefill_kwargs(args)
    group = setup.num_heads // setup.num_kv_heads
    for q_len in args.prefill_lengths:
        runs = prefill_runs(setup, q_len)
        inner = max(1, min(setup.max_inner, INNER_TOKENS // q_len))
        q, k, v = prefill_qkv(setup, (100, 110, 111), q_len)
        dense_ms = time_prefill_dense(q, k, v, runs, inner, setup.dense_impl)
        dense_flops = 4.0 * setup.num_heads * setup.head_dim * q_len * q_len / 2
        dense_tflops = dense_flops / dense_ms / 1e9
        log(f"prefill {q_len}: {setup.dense_impl} dense {dense_ms:.2f} ms "
            f"({dense_tflops:.0f} TFLOP/s)")
        for density, impl in itertools.product(args.densities, args.prefill_impls):
            lists, listed, causal = [], 0, 0
            for i in range(inner):
                idx, cnt, listed, causal = prefill_lists(setup, 200 + i, 1, q_len, density)
                lists.append((idx, cnt))
            actual = listed / causal
            if impl == "mosaic_gpu" and setup.interpret:
                rows.append({"bench": "prefill_kernel", "impl": impl, "length": q_len,
                             "density": actual, "ms": None,
                             "lowered_for_cuda": lower_mosaic_prefill()})
                continue
            try:
                ms = time_prefill_sparse(setup, q, k, v, lists, runs, impl, **kwargs)
            except Exception as e:  # noqa: BLE001 - record the failure, keep timing the rest
                if args.smoke:
                    raise
                log(f"prefill {q_len} density {density} {impl}: FAILED {type(e).__name__}: "
                    f"{str(e)[:ERROR_CHARS]}")
                continue
            flops = 4.0 * setup.block * setup.block * setup.head_dim * group * listed
            target = actual * dense_ms / TARGET_EFFICIENCY + TARGET_SLACK * dense_ms
            row = {
                "bench": "prefill_kernel", "impl": impl, "length": q_len, "batch": 1,
                "density": actual, "ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms,
                "tflops": flops / ms / 1e9, "dense_tflops": dense_tflops,
                "tflops_vs_dense": flops / ms / 1e9 / dense_tflops,
                "target_ms": target, "meets_target": ms <= target,
            }
            rows.append(row)
            log(f"prefill {q_len} density {actual:.3f} {impl}: {ms:.3f} ms, "
                f"x{dense_ms / ms:.1f}, {row['tflops']:.0f} TFLOP/s on listed blocks "
                f"({row['tflops_vs_dense']:.0%} of dense), target {target:.3f} ms")
        del q, k, v


def time_decode(setup: Setup, fn, q, layers, runs: int) -> float:
    """ms per call of fn(q, *layer), cycling through layers; each output is the next query."""
    steps = -(-setup.decode_calls // len(layers))

    def chain(q, layers):
        for _ in range(steps):
            for layer in layers:
                q = fn(q, *layer)
        return q

    jitted = jax.jit(chain)
    return median_ms(lambda: jax.block_until_ready(jitted(q, layers)), runs, steps * len(layers))


def dense_decode_fn(impl: str):
    def fn(q, k, v, lengths, *_):
        out = jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=lengths, implementation=impl
        )
        return out[:, 0]

    return fn


def sparse_decode_fn(setup: Setup, **kwargs):
    def fn(q, k, v, lengths, idx, cnt):
        return sparse_decode(q, k, v, idx, cnt, lengths, block_k=setup.block,
                             interpret=setup.interpret, **kwargs)

    return fn


def run_decode(setup: Setup, args, rows: list[dict]) -> None:
    runs = setup.timed_runs or TIMED_RUNS
    for context in args.decode_lengths:
        for batch in args.decode_batches:
            cache_bytes = 2 * batch * context * setup.num_kv_heads * setup.head_dim * BYTES_BF16
            num_layers = int(max(1, min(setup.max_decode_layers,
                                        DECODE_CACHE_BUDGET // cache_bytes)))
            lengths = np.full((batch,), context, np.int32)
            q = random_array(999, (batch, setup.num_heads, setup.head_dim))
            shape = (batch, context, setup.num_kv_heads, setup.head_dim)
            layers = [
                [random_array(1000 + 2 * i, shape), random_array(1001 + 2 * i, shape),
                 jnp.asarray(lengths)]
                for i in range(num_layers)
            ]
            dense = {}
            for impl in setup.decode_dense_impls:
                try:
                    dense[impl] = time_decode(setup, dense_decode_fn(impl), q, layers, runs)
                except Exception as e:  # noqa: BLE001 - a backend may not support the shape
                    if args.smoke:
                        raise
                    log(f"decode dense {impl} {context} b{batch}: FAILED {type(e).__name__}: "
                        f"{str(e)[:ERROR_CHARS]}")
            dense_impl = min(dense, key=dense.get)
            dense_ms = dense[dense_impl]
            log(f"decode {context} b{batch}: dense {dense}")
            sparse_fn = sparse_decode_fn(setup, num_splits=args.num_splits,
                                         num_warps=args.decode_num_warps,
                                         num_stages=args.decode_num_stages)
            for density in args.decode_densities:
                listed = 0
                for i, layer in enumerate(layers):
                    idx, cnt, listed = decode_lists(setup, 2000 + i, lengths, density)
                    layer[3:] = [idx, cnt]
                ms = time_decode(setup, sparse_fn, q, layers, runs)
                blocks = batch * setup.num_kv_heads * math.ceil(context / setup.block)
                actual = listed / blocks
                bytes_read = listed * setup.block * setup.head_dim * BYTES_BF16 * 2
                row = {
                    "bench": "decode_layer", "length": context, "batch": batch,
                    "density": actual, "ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms,
                    "dense_impl": dense_impl, "gbps": bytes_read / ms / 1e6,
                    "dense_gbps": cache_bytes / dense_ms / 1e6,
                }
                rows.append(row)
                log(f"decode {context} b{batch} density {actual:.3f}: {ms * 1e3:.1f} us, "
                    f"dense {dense_ms * 1e3:.1f} us ({dense_impl}), x{dense_ms / ms:.1f}, "
                    f"{row['gbps']:.0f} GB/s")
            del q
            for layer in layers:
                layer.clear()


def run_sweep(setup: Setup, args) -> list[dict]:
    """Launch parameters of both kernels, timed at one size each."""
    results = []
    runs = setup.timed_runs or TIMED_RUNS
    q_len = args.sweep_length
    q, k, v = prefill_qkv(setup, (300, 301, 302), q_len)
    inner = max(1, min(setup.max_inner, INNER_TOKENS // q_len))
    for density in args.sweep_densities:
        lists = [prefill_lists(setup, 303 + i, 1, q_len, density)[:2] for i in range(inner)]
        for fold, tile_q, warps, stages in setup.prefill_sweep:
            cfg = dict(fold_heads=fold, tile_q=tile_q, num_warps=warps, num_stages=stages)
            try:
                ms = time_prefill_sparse(setup, q, k, v, lists, runs, **cfg)
            except Exception as e:  # noqa: BLE001 - some configs do not compile
                if args.smoke:
                    raise
                ms = None
                log(f"sweep prefill {cfg}: FAILED {type(e).__name__}: {str(e)[:ERROR_CHARS]}")
            results.append({"sweep": "prefill", "length": q_len, "density": density, **cfg,
                            "ms": ms})
            if ms is not None:
                log(f"sweep prefill d{density} {cfg}: {ms:.3f} ms")
    del q, k, v
    for batch in setup.sweep_decode_batches:
        context = args.sweep_decode_length
        lengths = np.full((batch,), context, np.int32)
        shape = (batch, context, setup.num_kv_heads, setup.head_dim)
        q = random_array(410, (batch, setup.num_heads, setup.head_dim))
        layers = []
        for i in range(SWEEP_DECODE_LAYERS):
            idx, cnt, _ = decode_lists(setup, 400 + i, lengths, SWEEP_DECODE_DENSITY)
            layers.append([random_array(420 + i, shape), random_array(430 + i, shape),
                           jnp.asarray(lengths), idx, cnt])
        for splits, warps, stages in setup.decode_sweep:
            cfg = dict(num_splits=splits, num_warps=warps, num_stages=stages)
            try:
                ms = time_decode(setup, sparse_decode_fn(setup, **cfg), q, layers, runs)
            except Exception as e:  # noqa: BLE001 - some configs do not compile
                if args.smoke:
                    raise
                ms = None
                log(f"sweep decode {cfg}: FAILED {type(e).__name__}")
            results.append({"sweep": "decode", "length": context, "batch": batch, **cfg,
                            "ms": ms})
            if ms is not None:
                log(f"sweep decode {context} b{batch} {cfg}: {ms * 1e3:.1f} us")
    return results


def git_commit() -> str:
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[dict]) -> None:
    log("\nbench           length  batch density        ms   dense_ms  speedup  note")
    for r in rows:
        if r["bench"] == "prefill_kernel" and r["ms"] is None:
            log(f"prefill {r['impl']} lowered for CUDA: {r['lowered_for_cuda']}")
            continue
        if r["bench"] == "prefill_kernel":
            note = (f"{r['impl']} {r['tflops']:.0f}/{r['dense_tflops']:.0f} TFLOP/s, target "
                    f"{r['target_ms']:.2f} ms {'met' if r['meets_target'] else 'MISSED'}")
        else:
            note = f"{r['gbps']:.0f} GB/s, dense {r['dense_impl']} {r['dense_gbps']:.0f} GB/s"
        log(f"{r['bench']:<15} {r['length']:>6} {r['batch']:>6} {r['density']:>7.3f} "
            f"{r['ms']:>9.3f} {r['dense_ms']:>10.3f} {r['speedup']:>8.1f}  {note}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    def ints(s):
        return [int(x) for x in s.split(",") if x]

    def floats(s):
        return [float(x) for x in s.split(",") if x]

    def opt_int(s):
        return None if s in ("", "none", "None") else int(s)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (CPU: interpret mode, XLA baselines); asserts the checks")
    p.add_argument("--out-dir", default=None,
                   help="default benchmarks/results (--smoke: a fresh temp dir)")
    # Sizes default to the real run's, or to the smoke run's with --smoke (SMOKE_* constants).
    p.add_argument("--sections", default=None,
                   help=f"default {SECTIONS} (--smoke: check,sweep,prefill,decode)")
    p.add_argument("--prefill-lengths", type=ints, default=None,
                   help=f"default {PREFILL_LENGTHS}")
    p.add_argument("--densities", type=floats, default=None, help=f"default {DENSITIES}")
    p.add_argument("--decode-lengths", type=ints, default=None,
                   help=f"default {DECODE_LENGTHS}")
    p.add_argument("--decode-batches", type=ints, default=None,
                   help=f"default {DECODE_BATCHES}")
    p.add_argument("--decode-densities", type=floats, default=None,
                   help=f"default {DECODE_DENSITIES}")
    p.add_argument("--sweep-length", type=int, default=None, help=f"default {SWEEP_LENGTH}")
    p.add_argument("--sweep-densities", type=floats, default=None,
                   help=f"default {SWEEP_DENSITIES}")
    p.add_argument("--sweep-decode-length", type=int, default=None,
                   help=f"default {SWEEP_DECODE_LENGTH}")
    p.add_argument("--prefill-impls", type=lambda s: tuple(s.split(",")),
                   default=PREFILL_IMPLS, help=f"default {','.join(PREFILL_IMPLS)}")
    p.add_argument("--tile-q", type=opt_int, default=None)
    p.add_argument("--num-warps", type=opt_int, default=None)
    p.add_argument("--num-stages", type=opt_int, default=None)
    p.add_argument("--fold-heads", type=lambda s: None if s == "auto" else s == "true",
                   default=None)
    p.add_argument("--num-splits", type=opt_int, default=None)
    p.add_argument("--decode-num-warps", type=opt_int, default=None)
    p.add_argument("--decode-num-stages", type=opt_int, default=None)
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "sections": (ALL_SECTIONS, SECTIONS),
        "prefill_lengths": (SMOKE_PREFILL_LENGTHS, PREFILL_LENGTHS),
        "densities": (SMOKE_DENSITIES, DENSITIES),
        "decode_lengths": (SMOKE_DECODE_LENGTHS, DECODE_LENGTHS),
        "decode_batches": (SMOKE_DECODE_BATCHES, DECODE_BATCHES),
        "decode_densities": (SMOKE_DECODE_DENSITIES, DECODE_DENSITIES),
        "sweep_length": (SMOKE_SWEEP_LENGTH, SWEEP_LENGTH),
        "sweep_densities": (SMOKE_SWEEP_DENSITIES, SWEEP_DENSITIES),
        "sweep_decode_length": (SMOKE_SWEEP_DECODE_LENGTH, SWEEP_DECODE_LENGTH),
    }
    for name, (smoke_value, real_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke_value if smoke else real_value)
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="bench_kernels_") if smoke else "benchmarks/results"
    return args


def check_smoke(setup: Setup, args, sections: set[str], result: dict) -> None:
    """--smoke: every check within CHECK_TOLERANCE of its reference, every row and entry there."""
    failed = [c["check"] for c in result.get("checks", [])
              if "error" in c or c["nan"] or c["rel_max"] > CHECK_TOLERANCE]
    assert not failed, f"checks failed: {failed}"
    if "check" in sections:
        expected = len(setup.prefill_checks) + 1 + len(setup.decode_checks)
        assert len(result["checks"]) == expected, result["checks"]
    if "sweep" in sections:
        expected = (len(args.sweep_densities) * len(setup.prefill_sweep)
                    + len(setup.sweep_decode_batches) * len(setup.decode_sweep))
        timed = [s for s in result["sweep"] if s["ms"] is not None]
        assert len(timed) == expected, result["sweep"]
    expected = 0
    if "prefill" in sections:
        expected += len(args.prefill_lengths) * len(args.densities) * len(args.prefill_impls)
        lowered = [r for r in result["rows"] if r.get("ms") is None]
        assert all(r["lowered_for_cuda"] for r in lowered), lowered
    if "decode" in sections:
        expected += (len(args.decode_lengths) * len(args.decode_batches)
                     * len(args.decode_densities))
    assert len(result["rows"]) == expected, result["rows"]


def use_smoke_xla_flags() -> None:
    """Adds SMOKE_XLA_FLAGS to $XLA_FLAGS (a flag already set there wins). Call before JAX's
    backend starts."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    flags += [f for f in SMOKE_XLA_FLAGS if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(flags)


def main(argv: Sequence[str]) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv)
    setup = SMOKE if args.smoke else REAL
    if args.smoke:
        use_smoke_xla_flags()
    sections = set(args.sections.split(","))
    os.makedirs(args.out_dir, exist_ok=True)
    result = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "jax_version": jax.__version__, "commit": git_commit(),
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"}, "rows": [],
    }
    path = os.path.join(args.out_dir, "kernels.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    log(f"{result['device']} jax {result['jax']} commit {result['commit']}")
    if "check" in sections:
        result["checks"] = run_checks(setup, args)
        save()
    if "sweep" in sections:
        result["sweep"] = run_sweep(setup, args)
        save()
    if "prefill" in sections:
        run_prefill(setup, args, result["rows"])
        save()
    if "decode" in sections:
        run_decode(setup, args, result["rows"])
        save()
    print_table(result["rows"])
    if args.smoke:
        check_smoke(setup, args, sections, result)
        log(f"smoke ok: {len(result.get('checks', []))} checks, "
            f"{len(result.get('sweep', []))} sweep entries, {len(result['rows'])} rows in "
            f"{path} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])

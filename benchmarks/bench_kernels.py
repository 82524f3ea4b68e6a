"""GPU checks and timings of the sparse attention kernels against cuDNN dense attention.

Run from the repository root on a machine with one CUDA GPU:

    PYTHONPATH=. python3 benchmarks/bench_kernels.py --out-dir benchmarks/results

Sections (--sections, comma separated): `check` (kernel vs float32 reference at real sizes),
`sweep` (launch-parameter sweep of both kernels), `prefill`, `decode` (timings vs cuDNN/XLA
dense attention measured in the same run). Shapes are Llama-3-8B attention: 32 query heads,
8 KV heads, head_dim 128, bf16. Results go to OUT_DIR/kernels.json; a short table prints last.
The commit recorded is $COMMIT when set, else `git rev-parse HEAD`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference
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


def prefill_lists(seed: int, batch: int, q_len: int, density: float):
    """Random lists per (row, KV head, query block): its diagonal block plus a stratified draw
    from the earlier ones, round(density * causal blocks) in all (at least 1).

    Returns (block_indices [B, K, nq, max_sel], block_counts [B, K, nq], listed blocks in all,
    causal blocks in all).
    """
    nq = -(-q_len // BLOCK)
    diag = (np.minimum((np.arange(nq) + 1) * BLOCK, q_len) - 1) // BLOCK
    causal = diag + 1
    count = np.clip(np.round(density * causal), 1, causal).astype(np.int32)
    max_sel = int(count.max())
    shape = (batch, NUM_KV_HEADS, nq)
    count_b = jnp.broadcast_to(jnp.asarray(count), shape)
    diag_b = jnp.broadcast_to(jnp.asarray(diag, jnp.int32), shape)
    picks = stratified_picks(jax.random.PRNGKey(seed), count_b - 1, diag_b, max_sel)
    slot = jnp.arange(max_sel)
    idx = jnp.where(slot < (count_b - 1)[..., None], picks, diag_b[..., None]).astype(jnp.int32)
    listed = int(count.sum()) * batch * NUM_KV_HEADS
    return idx, count_b.astype(jnp.int32), listed, int(causal.sum()) * batch * NUM_KV_HEADS


def decode_lists(seed: int, lengths: np.ndarray, density: float):
    """Per (row, KV head): the newest token's block plus a stratified draw from the earlier
    ones, round(density * valid blocks) in all (at least 1).

    Returns (block_indices [B, K, max_sel], block_counts [B, K], listed blocks in all).
    """
    last = (lengths - 1) // BLOCK
    count = np.clip(np.round(density * (last + 1)), 1, last + 1).astype(np.int32)
    max_sel = int(count.max())
    shape = (len(lengths), NUM_KV_HEADS)
    count_b = jnp.broadcast_to(jnp.asarray(count)[:, None], shape)
    last_b = jnp.broadcast_to(jnp.asarray(last, jnp.int32)[:, None], shape)
    picks = stratified_picks(jax.random.PRNGKey(seed), count_b - 1, last_b, max_sel)
    slot = jnp.arange(max_sel)
    idx = jnp.where(slot < (count_b - 1)[..., None], picks, last_b[..., None]).astype(jnp.int32)
    return idx, count_b.astype(jnp.int32), int(count.sum()) * NUM_KV_HEADS


def prefill_kwargs(args) -> dict:
    return {
        "tile_q": args.tile_q, "num_warps": args.num_warps, "num_stages": args.num_stages,
        "fold_heads": args.fold_heads,
    }


def dense_prefill(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


# ----------------------------------------------------------------------------------------------
# Correctness at real sizes
# ----------------------------------------------------------------------------------------------


def run_checks(args) -> list[dict]:
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
            results.append({"check": name, "error": f"{type(e).__name__}: {e}"[:ERROR_CHARS]})
            log(f"check {name}: FAILED {results[-1]['error']}")

    def prefill_case(name, seed, batch, q_len, heads, kv_heads, dim, dtype, lengths, *,
                     q_offset=0, kv_len=None, block_q=BLOCK, block_k=BLOCK, density=0.1,
                     **kernel_kwargs):
        kv_len = q_offset + q_len if kv_len is None else kv_len
        q = random_array(seed, (batch, q_len, heads, dim), dtype)
        k = random_array(seed + 1, (batch, kv_len, kv_heads, dim), dtype)
        v = random_array(seed + 2, (batch, kv_len, kv_heads, dim), dtype)
        nq = -(-q_len // block_q)
        # Lists over the causal blocks of each query block (offset-aware), stratified.
        diag = (q_offset + np.minimum((np.arange(nq) + 1) * block_q, q_len) - 1) // block_k
        count = np.clip(np.round(density * (diag + 1)), 1, diag + 1).astype(np.int32)
        shape = (batch, kv_heads, nq)
        cnt = jnp.broadcast_to(jnp.asarray(count), shape)
        dg = jnp.broadcast_to(jnp.asarray(diag, jnp.int32), shape)
        picks = stratified_picks(jax.random.PRNGKey(seed + 3), cnt - 1, dg, int(count.max()))
        slot = jnp.arange(int(count.max()))
        idx = jnp.where(slot < (cnt - 1)[..., None], picks, dg[..., None]).astype(jnp.int32)
        lens = jnp.asarray(lengths, jnp.int32)
        kw = dict(block_q=block_q, block_k=block_k, lengths=lens, q_offset=q_offset)
        out = sparse_attention(q, k, v, idx, cnt, **kw, **kernel_kwargs)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref = sparse_attention_reference(*f32, idx, cnt, **kw)
        record(name, out, ref)

    guarded("prefill_bf16_8k_g4_ragged", lambda: prefill_case(
        "prefill_bf16_8k_g4_ragged", 10, 2, 8192, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE,
        (8192, 5000), **prefill_kwargs(args)))
    guarded("prefill_f32_2k_g8_d64_bq32", lambda: prefill_case(
        "prefill_f32_2k_g8_d64_bq32", 20, 1, 2048, 32, 4, 64, jnp.float32, (2048,), block_q=32,
        density=0.3))
    guarded("prefill_bf16_chunk_offset", lambda: prefill_case(
        "prefill_bf16_chunk_offset", 30, 1, 1024, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE,
        (4133,), q_offset=3072, kv_len=4133, density=0.5))
    guarded("prefill_bf16_4k_g3_loop", lambda: prefill_case(
        "prefill_bf16_4k_g3_loop", 40, 1, 4096, 24, 8, 64, DTYPE, (4000,)))

    def full_vs_cudnn():
        # Every causal block listed: the kernel must agree with cuDNN dense causal attention.
        q_len = 8192
        q = random_array(50, (1, q_len, NUM_HEADS, HEAD_DIM))
        k = random_array(51, (1, q_len, NUM_KV_HEADS, HEAD_DIM))
        v = random_array(52, (1, q_len, NUM_KV_HEADS, HEAD_DIM))
        idx, cnt, _, _ = prefill_lists(53, 1, q_len, 1.0)
        out = sparse_attention(q, k, v, idx, cnt, block_q=BLOCK, block_k=BLOCK,
                               **prefill_kwargs(args))
        record("prefill_full_vs_cudnn_8k", out, dense_prefill(q, k, v))

    guarded("prefill_full_vs_cudnn_8k", full_vs_cudnn)

    def decode_case(name, seed, lengths, max_len, dtype, density, num_splits=None):
        batch = len(lengths)
        q = random_array(seed, (batch, NUM_HEADS, HEAD_DIM), dtype)
        k = random_array(seed + 1, (batch, max_len, NUM_KV_HEADS, HEAD_DIM), dtype)
        v = random_array(seed + 2, (batch, max_len, NUM_KV_HEADS, HEAD_DIM), dtype)
        lens = np.asarray(lengths, np.int32)
        idx, cnt, _ = decode_lists(seed + 3, lens, density)
        lens = jnp.asarray(lens)
        out = sparse_decode(q, k, v, idx, cnt, lens, block_k=BLOCK, num_splits=num_splits)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        record(name, out, sparse_decode_reference(*f32, idx, cnt, lens, block_k=BLOCK))

    guarded("decode_bf16_32k_b4_ragged", lambda: decode_case(
        "decode_bf16_32k_b4_ragged", 60, (32768, 30000, 12345, 1), 32768, DTYPE, 0.1))
    guarded("decode_f32_8k_b2", lambda: decode_case(
        "decode_f32_8k_b2", 70, (8192, 4097), 8192, jnp.float32, 0.3, num_splits=5))
    return results


# ----------------------------------------------------------------------------------------------
# Timings
# ----------------------------------------------------------------------------------------------


def time_prefill_sparse(q, k, v, lists, runs: int, **kwargs) -> float:
    """ms per call; lists: one (idx, cnt) per call of the timed region.

    Each call's output is the next call's query, so no call can be skipped or hoisted.
    """
    def chain(q, k, v, lists):
        for idx, cnt in lists:
            q = sparse_attention(q, k, v, idx, cnt, block_q=BLOCK, block_k=BLOCK, **kwargs)
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


def time_prefill_dense(q, k, v, runs: int, inner: int) -> float:
    return time_prefill_fn(dense_prefill, q, k, v, runs, inner)


def run_prefill(args, rows: list[dict]) -> None:
    kwargs = prefill_kwargs(args)
    for q_len in args.prefill_lengths:
        runs = LONG_TIMED_RUNS if q_len >= LONG_PREFILL else TIMED_RUNS
        inner = max(1, min(MAX_INNER, INNER_TOKENS // q_len))
        q = random_array(100, (1, q_len, NUM_HEADS, HEAD_DIM))
        k = random_array(110, (1, q_len, NUM_KV_HEADS, HEAD_DIM))
        v = random_array(111, (1, q_len, NUM_KV_HEADS, HEAD_DIM))
        dense_ms = time_prefill_dense(q, k, v, runs, inner)
        dense_flops = 4.0 * NUM_HEADS * HEAD_DIM * q_len * q_len / 2
        dense_tflops = dense_flops / dense_ms / 1e9
        log(f"prefill {q_len}: cuDNN dense {dense_ms:.2f} ms ({dense_tflops:.0f} TFLOP/s)")
        for density in args.densities:
            lists, listed, causal = [], 0, 0
            for i in range(inner):
                idx, cnt, listed, causal = prefill_lists(200 + i, 1, q_len, density)
                lists.append((idx, cnt))
            try:
                ms = time_prefill_sparse(q, k, v, lists, runs, **kwargs)
            except Exception as e:  # noqa: BLE001 - record the failure, keep timing the rest
                log(f"prefill {q_len} density {density}: FAILED {type(e).__name__}: "
                    f"{str(e)[:ERROR_CHARS]}")
                continue
            actual = listed / causal
            flops = 4.0 * BLOCK * BLOCK * HEAD_DIM * (NUM_HEADS // NUM_KV_HEADS) * listed
            target = actual * dense_ms / TARGET_EFFICIENCY + TARGET_SLACK * dense_ms
            row = {
                "bench": "prefill_kernel", "length": q_len, "batch": 1, "density": actual,
                "ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms,
                "tflops": flops / ms / 1e9, "dense_tflops": dense_tflops,
                "target_ms": target, "meets_target": ms <= target,
            }
            rows.append(row)
            log(f"prefill {q_len} density {actual:.3f}: {ms:.3f} ms, x{dense_ms / ms:.1f}, "
                f"{row['tflops']:.0f} TFLOP/s on listed blocks, target {target:.3f} ms")
        del q, k, v


def time_decode(fn, q, layers, runs: int) -> float:
    """ms per call of fn(q, *layer), cycling through layers; each output is the next query."""
    steps = -(-DECODE_CALLS // len(layers))

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


def sparse_decode_fn(**kwargs):
    def fn(q, k, v, lengths, idx, cnt):
        return sparse_decode(q, k, v, idx, cnt, lengths, block_k=BLOCK, **kwargs)

    return fn


def run_decode(args, rows: list[dict]) -> None:
    for context in args.decode_lengths:
        for batch in args.decode_batches:
            cache_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * BYTES_BF16
            num_layers = int(max(1, min(MAX_DECODE_LAYERS, DECODE_CACHE_BUDGET // cache_bytes)))
            lengths = np.full((batch,), context, np.int32)
            q = random_array(999, (batch, NUM_HEADS, HEAD_DIM))
            shape = (batch, context, NUM_KV_HEADS, HEAD_DIM)
            layers = [
                [random_array(1000 + 2 * i, shape), random_array(1001 + 2 * i, shape),
                 jnp.asarray(lengths)]
                for i in range(num_layers)
            ]
            dense = {}
            for impl in ("cudnn", "xla"):
                try:
                    dense[impl] = time_decode(dense_decode_fn(impl), q, layers, TIMED_RUNS)
                except Exception as e:  # noqa: BLE001 - a backend may not support the shape
                    log(f"decode dense {impl} {context} b{batch}: FAILED {type(e).__name__}: "
                        f"{str(e)[:ERROR_CHARS]}")
            dense_impl = min(dense, key=dense.get)
            dense_ms = dense[dense_impl]
            log(f"decode {context} b{batch}: dense {dense}")
            sparse_fn = sparse_decode_fn(num_splits=args.num_splits,
                                         num_warps=args.decode_num_warps,
                                         num_stages=args.decode_num_stages)
            for density in args.decode_densities:
                listed = 0
                for i, layer in enumerate(layers):
                    idx, cnt, listed = decode_lists(2000 + i, lengths, density)
                    layer[3:] = [idx, cnt]
                ms = time_decode(sparse_fn, q, layers, TIMED_RUNS)
                actual = listed / (batch * NUM_KV_HEADS * math.ceil(context / BLOCK))
                bytes_read = listed * BLOCK * HEAD_DIM * BYTES_BF16 * 2
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


def run_sweep(args) -> list[dict]:
    """Launch parameters of both kernels, timed at one size each."""
    results = []
    q_len = args.sweep_length
    q = random_array(300, (1, q_len, NUM_HEADS, HEAD_DIM))
    k = random_array(301, (1, q_len, NUM_KV_HEADS, HEAD_DIM))
    v = random_array(302, (1, q_len, NUM_KV_HEADS, HEAD_DIM))
    inner = max(1, min(MAX_INNER, INNER_TOKENS // q_len))
    for density in args.sweep_densities:
        lists = [prefill_lists(303 + i, 1, q_len, density)[:2] for i in range(inner)]
        for fold, tile_q, warps, stages in PREFILL_SWEEP:
            cfg = dict(fold_heads=fold, tile_q=tile_q, num_warps=warps, num_stages=stages)
            try:
                ms = time_prefill_sparse(q, k, v, lists, TIMED_RUNS, **cfg)
            except Exception as e:  # noqa: BLE001 - some configs do not compile
                ms = None
                log(f"sweep prefill {cfg}: FAILED {type(e).__name__}: {str(e)[:ERROR_CHARS]}")
            results.append({"sweep": "prefill", "length": q_len, "density": density, **cfg,
                            "ms": ms})
            if ms is not None:
                log(f"sweep prefill d{density} {cfg}: {ms:.3f} ms")
    del q, k, v
    for batch in (1, 16):
        context = args.sweep_decode_length
        lengths = np.full((batch,), context, np.int32)
        shape = (batch, context, NUM_KV_HEADS, HEAD_DIM)
        q = random_array(410, (batch, NUM_HEADS, HEAD_DIM))
        layers = []
        for i in range(2):
            idx, cnt, _ = decode_lists(400 + i, lengths, 0.05)
            layers.append([random_array(420 + i, shape), random_array(430 + i, shape),
                           jnp.asarray(lengths), idx, cnt])
        for splits, warps, stages in DECODE_SWEEP:
            cfg = dict(num_splits=splits, num_warps=warps, num_stages=stages)
            try:
                ms = time_decode(sparse_decode_fn(**cfg), q, layers, TIMED_RUNS)
            except Exception as e:  # noqa: BLE001 - some configs do not compile
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
        if r["bench"] == "prefill_kernel":
            note = (f"{r['tflops']:.0f}/{r['dense_tflops']:.0f} TFLOP/s, target "
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
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--sections", default="check,prefill,decode")
    p.add_argument("--prefill-lengths", type=ints, default=[32768, 131072])
    p.add_argument("--densities", type=floats, default=[0.01, 0.03, 0.1, 0.3])
    p.add_argument("--decode-lengths", type=ints, default=[32768, 131072, 524288])
    p.add_argument("--decode-batches", type=ints, default=[1, 16])
    p.add_argument("--decode-densities", type=floats, default=[0.05])
    p.add_argument("--sweep-length", type=int, default=32768)
    p.add_argument("--sweep-densities", type=floats, default=[0.1])
    p.add_argument("--sweep-decode-length", type=int, default=131072)
    p.add_argument("--tile-q", type=opt_int, default=None)
    p.add_argument("--num-warps", type=opt_int, default=None)
    p.add_argument("--num-stages", type=opt_int, default=None)
    p.add_argument("--fold-heads", type=lambda s: None if s == "auto" else s == "true",
                   default=None)
    p.add_argument("--num-splits", type=opt_int, default=None)
    p.add_argument("--decode-num-warps", type=opt_int, default=None)
    p.add_argument("--decode-num-stages", type=opt_int, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    sections = set(args.sections.split(","))
    os.makedirs(args.out_dir, exist_ok=True)
    result = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "commit": git_commit(),
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"}, "rows": [],
    }
    path = os.path.join(args.out_dir, "kernels.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    log(f"{result['device']} jax {result['jax']} commit {result['commit']}")
    if "check" in sections:
        result["checks"] = run_checks(args)
        save()
    if "sweep" in sections:
        result["sweep"] = run_sweep(args)
        save()
    if "prefill" in sections:
        run_prefill(args, result["rows"])
        save()
    if "decode" in sections:
        run_decode(args, result["rows"])
        save()
    print_table(result["rows"])


if __name__ == "__main__":
    main(sys.argv[1:])

"""Local-head prefill (attention sinks + a sliding window): our kernel vs cuDNN on one GPU.

Run from the repository root on a machine with one CUDA GPU:

    COMMIT=$(git rev-parse HEAD) PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 \\
      python3 benchmarks/bench_local.py --out-dir benchmarks/results

    options: --lengths 32768,131072,524288  --windows 8192,1024  --sink-tokens 4
             --check-length 8192  --sections check,time

Smoke run (CPU, tiny sizes, the kernel in Pallas interpret mode, < 60 s; asserts that the kernel
matches the reference; writes to a temp dir unless --out-dir is given):

    PYTHONPATH=. JAX_PLATFORMS=cpu python3 benchmarks/bench_local.py --smoke

Shapes are Llama-3-8B attention (32 query / 8 KV heads, head_dim 128, bf16, batch 1). Per length:
  cudnn_causal  cuDNN dense causal attention, the dense_ms of every row of that length;
per length and window:
  local_kernel  pallas_kernels.local_attention: sink_tokens + window, token-exact;
  cudnn_sinks   rtpurbo_jax.dense.local_attention_cudnn: cuDNN's window, whose log-sum-exp
                merges the sinks in (token-exact; the paper design's prefill on a GPU);
  cudnn_window  jax.nn.dot_product_attention(local_window_size=(window - 1, 0), cuDNN): the
                same window without sinks: a lower bound.
Rows: {bench: "local_prefill", impl, length, window, sink_tokens, ms, dense_ms,
speedup = dense_ms / ms, tflops}; tflops counts only the (query, key) pairs the impl must see:
4 * H * D * pairs / time. Checks at --check-length: the kernel and cudnn_sinks vs the float32
reference (ragged batch of 2), the kernel without sinks vs cuDNN's window, and cuDNN's window
vs the reference without sinks (confirms the (window - 1, 0) convention). Timing as
bench_kernels.py (its helpers). Results: OUT_DIR/local_<device tag>.json, rewritten after every
row, with the device, jax version and commit ($COMMIT when set, else `git rev-parse HEAD`); a
table prints last.
Off a GPU (--smoke) the kernel runs interpreted and the dense baselines through XLA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence

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
    random_array,
    rel_errors,
    time_prefill_fn,
)
from pallas_kernels.local_attention import local_attention, local_attention_reference
from rtpurbo_jax.dense import cudnn_local_supported, local_attention_cudnn

ON_GPU = jax.default_backend() == "gpu"
LENGTHS = [32768, 131072, 524288]
WINDOWS = [8192, 1024]
SINK_TOKENS = 4  # StreamingLLM's four attention sinks
CHECK_LENGTH = 8192
# bf16 outputs vs the float32 reference: max |error| / max |reference| allowed (as the tests).
CHECK_TOLERANCE = 2e-2
# The check's second row is this fraction of the first: a length inside a block, rows past it.
CHECK_RAGGED_FRACTION = 0.61
# FLOPs of one visible (query, key) pair per head dim: q.k and p.v, a multiply-add each.
FLOPS_PER_PAIR_DIM = 4


@dataclasses.dataclass(frozen=True)
class Setup:
    """Shapes and means of one run (the real one or the smoke one)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block: int
    interpret: bool  # the kernel in Pallas interpret mode (no GPU)
    dense_impl: str  # jax.nn.dot_product_attention implementation of the baselines
    timed_runs: int | None  # None: bench_kernels' TIMED_RUNS / LONG_TIMED_RUNS by length
    max_inner: int  # calls chained per timed region, at most


REAL = Setup(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK, interpret=not ON_GPU,
             dense_impl="cudnn" if ON_GPU else "xla", timed_runs=None, max_inner=MAX_INNER)
# Smoke: a GQA group of 4 like Llama, tiny heads, one timed call (each interpreted call costs
# seconds), windows below / not a multiple of the block.
SMOKE = dataclasses.replace(REAL, num_heads=8, num_kv_heads=2, head_dim=32, block=32,
                            timed_runs=1, max_inner=1)
SMOKE_LENGTHS = [256]
SMOKE_WINDOWS = [64, 40]
SMOKE_CHECK_LENGTH = 160


def device_kind() -> str:
    """The default device's kind ("NVIDIA H100 80GB HBM3"), or its platform where it has none."""
    device = jax.devices()[0]
    return getattr(device, "device_kind", None) or device.platform


def device_tag(kind: str) -> str:
    """Short file-name tag of a device kind: "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
    words = [w for w in re.split(r"[^a-z0-9]+", kind.lower()) if w and w != "nvidia"]
    return words[0] if words else "unknown"


def visible_pairs(length: int, window: int | None, sink_tokens: int) -> int:
    """(query, key) pairs of one full row: causal when window is None, else sinks + window."""
    t = np.arange(length, dtype=np.int64)
    if window is None:
        return int((t + 1).sum())
    in_window = np.minimum(t + 1, window)
    return int((in_window + np.minimum(sink_tokens, t + 1 - in_window)).sum())


def local_fn(setup: Setup, window: int, sink_tokens: int) -> Callable:
    """attend(q, k, v) through our kernel, every row at full length."""
    def attend(q, k, v):
        lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
        return local_attention(q, k, v, lengths, sink_tokens=sink_tokens, window=window,
                               block_q=setup.block, block_k=setup.block,
                               interpret=setup.interpret)

    return attend


def cudnn_sinks_fn(window: int, sink_tokens: int) -> Callable:
    """attend(q, k, v) through cuDNN's window and the merged sinks, every row at full length."""
    def attend(q, k, v):
        lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
        return local_attention_cudnn(q, k, v, lengths, sink_tokens=sink_tokens, window=window)

    return attend


def dense_fn(setup: Setup, window: int | None) -> Callable:
    """attend(q, k, v) through dot_product_attention: causal, or the sliding window."""
    local_window = None if window is None else (window - 1, 0)

    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            local_window_size=local_window,
                                            implementation=setup.dense_impl)

    return attend


def qkv(setup: Setup, seed: int, batch: int, length: int):
    q = random_array(seed, (batch, length, setup.num_heads, setup.head_dim))
    k = random_array(seed + 1, (batch, length, setup.num_kv_heads, setup.head_dim))
    v = random_array(seed + 2, (batch, length, setup.num_kv_heads, setup.head_dim))
    return q, k, v


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------


def run_checks(setup: Setup, args, result: dict, save: Callable[[], None]) -> None:
    length = args.check_length
    q, k, v = qkv(setup, 10, 2, length)
    lengths = jnp.asarray([length, round(CHECK_RAGGED_FRACTION * length)], jnp.int32)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    dense_name = setup.dense_impl

    def record(name: str, window: int, sink_tokens: int, out, ref) -> None:
        errs = rel_errors(out, ref)
        ok = errs["rel_max"] <= CHECK_TOLERANCE and not errs["nan"]
        result["checks"].append({"check": name, "length": length, "window": window,
                                 "sink_tokens": sink_tokens, **errs, "ok": ok})
        log(f"check {name} {length} w{window} s{sink_tokens}: rel_fro {errs['rel_fro']:.2e} "
            f"rel_max {errs['rel_max']:.2e} nan {errs['nan']} {'ok' if ok else 'FAILED'}")
        save()

    for window in args.windows:
        kw = dict(sink_tokens=args.sink_tokens, window=window)
        out = local_attention(q, k, v, lengths, block_q=setup.block, block_k=setup.block,
                              interpret=setup.interpret, **kw)
        ref = local_attention_reference(*f32, lengths, **kw)
        record("local_kernel_vs_reference", window, args.sink_tokens, out, ref)
        if cudnn_local_supported(q):
            out = jax.jit(local_attention_cudnn, static_argnames=("sink_tokens", "window"))(
                q, k, v, lengths, **kw)
            record("cudnn_sinks_vs_reference", window, args.sink_tokens, out, ref)
        # Row 0 only (full length): the dense baselines' rows past a length are not zeroed.
        ref0 = local_attention_reference(*(x[:1] for x in f32), lengths[:1], sink_tokens=0,
                                         window=window)
        dense0 = dense_fn(setup, window)(q[:1], k[:1], v[:1])
        record(f"{dense_name}_window_vs_reference", window, 0, dense0, ref0)
        local0 = local_fn(setup, window, 0)(q[:1], k[:1], v[:1])
        record(f"local_kernel_vs_{dense_name}_window", window, 0, local0, dense0)


# ----------------------------------------------------------------------------------------------
# Timings
# ----------------------------------------------------------------------------------------------


def run_timings(setup: Setup, args, result: dict, save: Callable[[], None]) -> None:
    heads_flops = FLOPS_PER_PAIR_DIM * setup.num_heads * setup.head_dim

    def timed(impl: str, length: int, window: int | None, sink_tokens: int,
              attend: Callable, q, k, v) -> float | None:
        runs = setup.timed_runs or (LONG_TIMED_RUNS if length >= LONG_PREFILL else TIMED_RUNS)
        inner = max(1, min(setup.max_inner, INNER_TOKENS // length))
        try:
            ms = time_prefill_fn(attend, q, k, v, runs, inner)
        except Exception as e:  # noqa: BLE001 - record the failure, time the rest
            if args.smoke:
                raise
            error = f"{type(e).__name__}: {e}"[:ERROR_CHARS]
            result["failures"].append({"impl": impl, "length": length, "window": window,
                                       "error": error})
            log(f"{impl} {length} w{window}: FAILED {error}")
            save()
            return None
        dense_ms = ms if window is None else dense_ms_of[length]
        pairs = visible_pairs(length, window, sink_tokens)
        row = {"bench": "local_prefill", "impl": impl, "length": length, "window": window,
               "sink_tokens": sink_tokens, "ms": ms, "dense_ms": dense_ms,
               "speedup": None if dense_ms is None else dense_ms / ms,
               "tflops": heads_flops * pairs / ms / 1e9}
        result["rows"].append(row)
        log(f"{impl} {length} w{window} s{sink_tokens}: {ms:.3f} ms, "
            f"{row['tflops']:.0f} TFLOP/s on visible pairs")
        save()
        return ms

    dense_ms_of: dict[int, float | None] = {}
    for length in args.lengths:
        q, k, v = qkv(setup, 100, 1, length)
        dense_ms_of[length] = timed(f"{setup.dense_impl}_causal", length, None, 0,
                                    dense_fn(setup, None), q, k, v)
        for window in args.windows:
            timed("local_kernel", length, window, args.sink_tokens,
                  local_fn(setup, window, args.sink_tokens), q, k, v)
            if cudnn_local_supported(q):
                timed("cudnn_sinks", length, window, args.sink_tokens,
                      cudnn_sinks_fn(window, args.sink_tokens), q, k, v)
            timed(f"{setup.dense_impl}_window", length, window, 0, dense_fn(setup, window),
                  q, k, v)
        del q, k, v


def print_table(rows: list[dict]) -> None:
    log("\nimpl            length  window sinks        ms   dense_ms  speedup  TFLOP/s")
    for r in rows:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.1f}"
        log(f"{r['impl']:<14} {r['length']:>7} {str(r['window']):>7} {r['sink_tokens']:>5} "
            f"{r['ms']:>9.3f} {r['dense_ms'] or float('nan'):>10.3f} {speedup:>8} "
            f"{r['tflops']:>8.1f}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    def ints(s):
        return [int(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (CPU: interpret mode, XLA baselines); asserts the checks")
    p.add_argument("--out-dir", default=None,
                   help="default benchmarks/results (--smoke: a fresh temp dir)")
    p.add_argument("--sections", default="check,time")
    p.add_argument("--lengths", type=ints, default=None, help=f"default {LENGTHS}")
    p.add_argument("--windows", type=ints, default=None, help=f"default {WINDOWS}")
    p.add_argument("--sink-tokens", type=int, default=SINK_TOKENS)
    p.add_argument("--check-length", type=int, default=None, help=f"default {CHECK_LENGTH}")
    args = p.parse_args(argv)
    smoke = args.smoke
    if args.lengths is None:
        args.lengths = SMOKE_LENGTHS if smoke else LENGTHS
    if args.windows is None:
        args.windows = SMOKE_WINDOWS if smoke else WINDOWS
    if args.check_length is None:
        args.check_length = SMOKE_CHECK_LENGTH if smoke else CHECK_LENGTH
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="bench_local_") if smoke else "benchmarks/results"
    return args


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    setup = SMOKE if args.smoke else REAL
    sections = set(args.sections.split(","))
    os.makedirs(args.out_dir, exist_ok=True)
    kind = device_kind()
    result = {
        "device": kind, "jax_version": jax.__version__, "commit": git_commit(),
        "config": {"smoke": args.smoke, "lengths": args.lengths, "windows": args.windows,
                   "sink_tokens": args.sink_tokens, "check_length": args.check_length,
                   "dtype": jnp.dtype(DTYPE).name, **dataclasses.asdict(setup)},
        "checks": [], "rows": [], "failures": [],
    }
    path = os.path.join(args.out_dir, f"local_{device_tag(kind)}.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    log(f"{kind} jax {jax.__version__} commit {result['commit']} -> {path}")
    if "check" in sections:
        run_checks(setup, args, result, save)
    if "time" in sections:
        run_timings(setup, args, result, save)
    save()
    print_table(result["rows"])
    if args.smoke:
        failed = [c["check"] for c in result["checks"] if not c["ok"]]
        assert not failed, f"checks failed: {failed}"
        expected = len(args.lengths) * (1 + 2 * len(args.windows)) if "time" in sections else 0
        assert len(result["rows"]) == expected, result["rows"]
        log(f"smoke ok: {len(result['checks'])} checks, {len(result['rows'])} rows in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Where the whole-model decode step's time goes: a per-kernel profile on the Llama-3-8B shapes
of configs/llama_1m.py (random bf16 weights, the designs and cache of `bench_model.py`).

Run from the repository root on a GPU:

    PYTHONPATH=. python3 benchmarks/profile_decode.py --length 131072 --batch 1

    options: --designs dense,paper,indexer  --length TOKENS  --batch ROWS  --steps 5
             --top 40  --routing kv|query  --out-dir DIR (default benchmarks/results)

Smoke run (CPU, a tiny random model, < 60 s): `--smoke`. Off a GPU the kernels are XLA's CPU
operations, found by their instruction names.

Per design: the step's wall time as `bench_model` times it (`--steps` calls after warm-up, each
dispatched while the previous one runs) and one call at a time (`alone_ms`, the median: the
host's dispatch of the call is then not hidden), the summed kernel time per step, the kernels
launched per step,
and the `--top` kernels by time: name, calls and microseconds per step, and the HLO operation
(`op_name` of the instruction's metadata, e.g. `jit(decode_step)/bse,ehd->bshd/dot_general`)
and result shape where the kernel is a named instruction of the compiled step (cuDNN's and
cuBLAS's own kernels have none). Results: OUT_DIR/profile_decode_<device tag>.json with the
device, jax version and commit.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from benchmarks import bench_model  # noqa: E402
from benchmarks.bench_kernels import git_commit, log  # noqa: E402
from benchmarks.bench_local import device_kind, device_tag  # noqa: E402
from rtpurbo_jax import generate as gen  # noqa: E402
from rtpurbo_jax.model import init_params  # noqa: E402

# Extra positions in the cache past `length`: the steps write there.
SPARE = 64
SMOKE_LENGTH = 512


def instruction_info(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (result shape, op_name) of a compiled module's text. A kernel is
    named after its fusion's instruction (dots for underscores) or its deduplicated name."""
    info = {}
    pattern = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) [^\n]*?op_name=\"([^\"]*)\"[^\n]*",
                         re.M)
    for m in pattern.finditer(hlo_text):
        name, shape, op = m.group(1), m.group(2), m.group(3)
        info.setdefault(name, (shape, op))
        dedup = re.search(r'deduplicated_name="([^"]*)"', m.group(0))
        if dedup:
            info.setdefault(dedup.group(1), (shape, op))
    return info


def kernel_events(xplane: str, hlo_names: set[str]) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel in a trace: the events of the device planes, or, on
    a backend without one (CPU), the host events named after an instruction of the program."""
    data = jax.profiler.ProfileData.from_file(xplane)
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    events = [(e.name, e.duration_ns / 1e3) for p in planes for line in p.lines
              for e in line.events]
    if planes:
        return events
    return [(e.name, e.duration_ns / 1e3) for p in data.planes for line in p.lines
            for e in line.events if e.name in hlo_names]


def summarise(events: list[tuple[str, float]], steps: int, info: dict[str, tuple[str, str]],
              top: int) -> dict[str, Any]:
    """Per-step totals and the `top` kernels by time."""
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for name, us in events:
        entry = per_name[name]
        entry[0] += 1
        entry[1] += us
    kernels = []
    for name, (calls, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]:
        # Fusion kernels carry the instruction's name with an underscore for its last dot.
        shape, op = (info.get(name) or info.get(re.sub(r"_(\d+)$", r".\1", name))
                     or (None, None))
        kernels.append({"name": name, "calls": calls / steps, "us": us / steps, "op": op,
                        "shape": shape})
    return {"kernel_us": sum(us for _, us in events) / steps, "launches": len(events) / steps,
            "kernels": kernels}


def profile_row(params: Any, config: Any, design: str, args: argparse.Namespace
                ) -> dict[str, Any]:
    """The decode step of `design` at args.length cached tokens, args.batch rows."""
    sparse = bench_model.sparse_config(design, config, args.length, args)
    indexer = bench_model.random_indexer(config, sparse)
    step = jax.jit(partial(gen.decode_step, config=config, backend=args.backend, sparse=sparse),
                   donate_argnums=(1,))
    tokens = jnp.zeros((args.batch,), jnp.int32)
    cache = bench_model.random_cache(config, sparse, args.batch, args.length + SPARE,
                                     args.length, args.dtype)
    compiled = step.lower(params, cache, tokens, indexer=indexer).compile()
    for _ in range(2):
        logits, cache, _ = compiled(params, cache, tokens, indexer=indexer)
    jax.block_until_ready(logits)
    start = time.perf_counter()
    for _ in range(args.steps):
        logits, cache, _ = compiled(params, cache, tokens, indexer=indexer)
    jax.block_until_ready(logits)
    step_ms = (time.perf_counter() - start) * 1e3 / args.steps
    alone = []
    for _ in range(args.steps):
        start = time.perf_counter()
        logits, cache, _ = compiled(params, cache, tokens, indexer=indexer)
        jax.block_until_ready(logits)
        alone.append((time.perf_counter() - start) * 1e3)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                logits, cache, _ = compiled(params, cache, tokens, indexer=indexer)
            jax.block_until_ready(logits)
        xplane = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
        info = instruction_info(compiled.as_text())
        events = kernel_events(xplane, set(info))
    return {"design": design, "length": args.length, "batch": args.batch,
            "density": None if sparse is None else args.density,
            "step_ms": step_ms, "alone_ms": float(np.median(alone)),
            **summarise(events, args.steps, info, args.top)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random model on CPU")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    bench_model.add_design_args(p)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    bench_model.finish_design_args(p, args)
    args.layers = None
    if args.smoke:
        args.length, args.window, args.steps = SMOKE_LENGTH, bench_model.SMOKE["window"], 2
    if args.out_dir is None:
        args.out_dir = (tempfile.mkdtemp(prefix="profile_decode_") if args.smoke
                        else "benchmarks/results")
    return args


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    kind = device_kind()
    config = bench_model.model_config(args)
    params = init_params(config, jax.random.key(bench_model.SEED), args.dtype)
    path = os.path.join(args.out_dir, f"profile_decode_{device_tag(kind)}.json")
    result = {"device": kind, "jax_version": jax.__version__, "commit": git_commit(),
              "model": config.name, "rows": []}
    for design in args.designs:
        row = profile_row(params, config, design, args)
        result["rows"].append(row)
        log(f"{design}: step {row['step_ms']:.2f} ms ({row['alone_ms']:.2f} alone), kernels "
            f"{row['kernel_us'] / 1e3:.2f} ms, {row['launches']:.0f} launches")
        for k in row["kernels"][:12]:
            log(f"  {k['us']:9.1f} us {k['calls']:5.0f}x  {k['name'][:40]:40s} {k['op'] or ''}")
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
    log(f"-> {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Whole-model prefill (time to first token) and decode (tokens/s) on the Llama-3-8B shapes of
configs/llama_1m.py with random bf16 weights: dense (cuDNN), the paper design and the indexer
design, in one run, with the KV-cache bytes of each and XLA's memory analysis of each program.

Run from the repository root on a GPU (H100 up to 128K; 512K and 1M need an H200 and
--prefill-chunk):

    PYTHONPATH=. python3 benchmarks/bench_model.py --lengths 131072 --decode-batches 1,16

    options: --designs dense,paper,indexer  --layers N (default: the config's 32)
             --density 0.1  --retrieval-groups 1  --routing kv|query  --window 8192
             --prefill-chunk TOKENS
             --decode-steps 16  --out-dir DIR  --append

Smoke run (CPU, a tiny random model, no downloads, < 60 s):

    PYTHONPATH=. JAX_PLATFORMS=cpu python3 benchmarks/bench_model.py --smoke

Both sparse designs route `--retrieval-groups` of the 8 KV groups per layer (paper: their query
heads are retrieval heads, the others local on 4 sinks + `--window` keys; indexer: those groups
stay dense, the others select blocks). `--routing query` (paper design) spreads as many
retrieval query heads one per KV group instead, as query-head routing does. Random weights rank
blocks at random, so the selected share of causal key blocks is fixed by a cap (`max_blocks`) at
`--density` of the blocks: the timing is that of a trained model at that density, not a claim
about which density a trained model reaches. Decode runs on a cache of `length` synthetic
positions (its cost depends on shapes and lengths, not values), so no prefill of `batch` long
prompts is needed to time it.

Rows: {bench: "model_prefill" | "model_decode", design, length, batch, ms (prefill: the whole
prompt; decode: one step of the batch), dense_ms, speedup, tokens_per_s (decode), peak_bytes
(XLA's memory analysis of the program: arguments + outputs - aliased + temporaries), kv_bytes,
dense_kv_bytes, density, routing (paper design), note}. A program whose weights and KV cache
alone exceed the device is not compiled; it and one that runs out of memory are rows with ms
null and a note that starts "does not fit". A dense prefill that does not fit gets a time
extrapolated from b*L + c*L^2 over the dense lengths measured, a dense decode from a + b*batch
over the dense batches measured at its length (labelled "extrapolated"). XLA may use 95% of the
GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set). Results: OUT_DIR/model_<device tag>.json with
the device, jax version and commit; `--append` adds to that file (the runs listed under "runs",
each with its commit), so lengths measured in separate jobs share one table and one dense fit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# What fits is one of the results: let XLA use the whole GPU, not its default 75%. Set before
# bench_local starts the backend on import; an explicit setting wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from benchmarks.bench_kernels import git_commit, log  # noqa: E402
from benchmarks.bench_local import device_kind, device_tag  # noqa: E402
from rtpurbo_jax import generate as gen  # noqa: E402
from rtpurbo_jax.cache import empty_cache, kv_cache_bytes  # noqa: E402
from rtpurbo_jax.compiles import memory_analysis, needed_bytes  # noqa: E402
from rtpurbo_jax.config import ModelConfig, SparseConfig  # noqa: E402
from rtpurbo_jax.indexer import init_indexer  # noqa: E402
from rtpurbo_jax.model import init_params  # noqa: E402

DESIGNS = ("dense", "paper", "indexer")
ROUTINGS = ("kv", "query")
SMOKE_CONFIG = ModelConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=96,
                           num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16,
                           max_position_embeddings=4096, name="tiny-random")
SMOKE = dict(lengths=[512], decode_batches=[1, 2], window=128, decode_steps=2, prefill_chunk=256)
BLOCK = 64  # key and query blocks of both sparse designs
RANK = 16  # indexer rank
TOP_P = 0.95
INDEXER_SAMPLES = 256  # random queries the indexer is initialised from
SEED = 0


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.smoke:
        return SMOKE_CONFIG
    arch = dict(importlib.import_module("configs.llama_1m").get_config().model.arch)
    if args.layers:
        arch["num_hidden_layers"] = args.layers
    return ModelConfig.from_hf(arch, name="Llama-3-8B shapes (random)")


def sparse_config(design: str, config: ModelConfig, length: int,
                  args: argparse.Namespace) -> SparseConfig | None:
    """The design with `retrieval_groups` KV groups routed per layer and its selections capped
    at `density` of the causal key blocks of `length` tokens."""
    if design == "dense":
        return None
    local_blocks = 1 if design == "paper" else 2
    # The cap can't drop the sink and local blocks every selection keeps.
    cap = max(1 + local_blocks, math.ceil(args.density * length / BLOCK))
    common = dict(rank=RANK, top_p=TOP_P, block_q=BLOCK, block_k=BLOCK, max_blocks=cap,
                  sink_blocks=1, local_blocks=local_blocks)
    if design == "paper":
        row = paper_row(config, args.retrieval_groups, args.routing)
        return SparseConfig((row,) * config.num_layers, design="paper",
                            group_size=config.group_size, sink_tokens=4,
                            window=args.window, **common)
    row = tuple(g < args.retrieval_groups for g in range(config.num_kv_heads))
    return SparseConfig((row,) * config.num_layers, **common)


def paper_row(config: ModelConfig, groups: int, routing: str) -> tuple[bool, ...]:
    """A layer's retrieval heads: the query heads of the first `groups` KV groups ("kv"), or
    as many query heads spread one per group in turn ("query": every group they touch keeps
    its full cache, and its other heads are local heads over it)."""
    count = groups * config.group_size
    if routing == "kv":
        heads = set(range(count))
    else:
        kv = config.num_kv_heads
        heads = {(i % kv) * config.group_size + i // kv for i in range(count)}
    return tuple(h in heads for h in range(config.num_heads))


def random_indexer(config: ModelConfig, sparse: SparseConfig | None) -> Any:
    if sparse is None:
        return None
    rng = np.random.default_rng(SEED)
    queries = [rng.normal(size=(INDEXER_SAMPLES, config.num_heads, config.head_dim))
               for _ in range(config.num_layers)]
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                        init_indexer(queries, config, sparse))


def random_cache(config: ModelConfig, sparse: SparseConfig | None, batch: int, max_len: int,
                 filled: int, dtype: Any) -> dict[str, Any]:
    """A cache of `filled` positions per row holding values in [-1, 1] (sin of a scrambled
    index: XLA's RNG over tens of GiB compiled for minutes), allocated once."""
    shapes = jax.eval_shape(lambda: empty_cache(config, batch, max_len, dtype, sparse))

    @jax.jit
    def make():
        leaves, tree = jax.tree.flatten(shapes["layers"])
        layers = [jnp.sin(jax.lax.iota(jnp.float32, math.prod(s.shape)) * 0.7548776662
                          + i).reshape(s.shape).astype(s.dtype) for i, s in enumerate(leaves)]
        return {"layers": jax.tree.unflatten(tree, layers),
                "lengths": jnp.full((batch,), filled, jnp.int32)}

    return make()


def memory_bytes(compiled: Any) -> int | None:
    """What XLA says the program needs (None where the backend does not say)."""
    memory = memory_analysis(compiled)
    return int(needed_bytes(memory)) if memory else None


def is_out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def device_bytes() -> int | None:
    """The memory XLA may use on the first device (None where the backend does not say)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def too_big(params: Any, kv_bytes: int) -> str | None:
    """A "does not fit" note when the weights and the KV cache alone exceed the device (no
    compile spent on it: XLA's autotuner takes minutes to fail), else None."""
    limit = device_bytes()
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    if limit is None or weights + kv_bytes <= limit:
        return None
    return (f"does not fit: weights {weights / 2**30:.1f} GiB + KV cache "
            f"{kv_bytes / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB on the device")


def oom_note(err: Exception) -> str:
    """"does not fit" with the first line of XLA's message."""
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    return f"does not fit: {first[:200]}"


def timed(fn: Callable[[], Any], runs: int) -> float:
    """Median milliseconds of `runs` calls after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def prefill_row(params: Any, config: ModelConfig, design: str, length: int,
                args: argparse.Namespace) -> dict[str, Any]:
    """Time to first token of one `length`-token prompt (batch 1)."""
    sparse = sparse_config(design, config, length, args)
    indexer = random_indexer(config, sparse)
    tokens = jax.random.randint(jax.random.key(SEED), (1, length), 0, config.vocab_size)
    lengths = jnp.array([length], jnp.int32)
    run = (partial(gen.prefill_chunked, chunk=args.prefill_chunk) if args.prefill_chunk
           else gen.prefill)
    fn = jax.jit(partial(run, config=config, max_len=length, backend=args.backend,
                         sparse=sparse))
    row = {"bench": "model_prefill", "design": design, "length": length, "batch": 1,
           "kv_bytes": kv_cache_bytes(config, sparse, 1, length, args.dtype)["total"],
           "density": None if sparse is None else args.density,
           "routing": args.routing if design == "paper" else None, "note": None}
    row["note"] = too_big(params, row["kv_bytes"])
    if row["note"]:
        return row | {"ms": None, "peak_bytes": None}
    try:
        compiled = fn.lower(params, tokens, lengths, indexer=indexer).compile()
        row["peak_bytes"] = memory_bytes(compiled)
        row["ms"] = timed(lambda: compiled(params, tokens, lengths, indexer=indexer),
                          args.prefill_runs)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is a result
        if not is_out_of_memory(err):
            raise
        row.update(ms=None, peak_bytes=None, note=oom_note(err))
    return row


def decode_row(params: Any, config: ModelConfig, design: str, length: int, batch: int,
               args: argparse.Namespace) -> dict[str, Any]:
    """One decode step of `batch` rows at `length` cached tokens."""
    sparse = sparse_config(design, config, length, args)
    indexer = random_indexer(config, sparse)
    row = {"bench": "model_decode", "design": design, "length": length, "batch": batch,
           "kv_bytes": kv_cache_bytes(config, sparse, batch, length + args.decode_steps,
                                      args.dtype)["total"],
           "density": None if sparse is None else args.density,
           "routing": args.routing if design == "paper" else None, "note": None}
    step = jax.jit(partial(gen.decode_step, config=config, backend=args.backend, sparse=sparse),
                   donate_argnums=(1,))
    tokens = jnp.zeros((batch,), jnp.int32)
    row["note"] = too_big(params, row["kv_bytes"])
    if row["note"]:
        return row | {"ms": None, "peak_bytes": None, "tokens_per_s": None}
    try:
        cache = random_cache(config, sparse, batch, length + args.decode_steps, length,
                             args.dtype)
        compiled = step.lower(params, cache, tokens, indexer=indexer).compile()
        row["peak_bytes"] = memory_bytes(compiled)
        _, cache, _ = compiled(params, cache, tokens, indexer=indexer)  # warm
        start = time.perf_counter()
        for _ in range(args.decode_steps - 1):
            logits, cache, _ = compiled(params, cache, tokens, indexer=indexer)
        jax.block_until_ready(logits)
        ms = (time.perf_counter() - start) * 1e3 / max(1, args.decode_steps - 1)
        row.update(ms=ms, tokens_per_s=batch * 1e3 / ms)
        del cache
    except Exception as err:  # noqa: BLE001 - only out-of-memory is a result
        if not is_out_of_memory(err):
            raise
        row.update(ms=None, peak_bytes=None, tokens_per_s=None, note=oom_note(err))
    return row


def _fill_from_fit(rows: list[dict[str, Any]], bench: str, key: str, same: Callable[[dict], bool],
                   powers: tuple[int, ...], what: str) -> None:
    """Dense rows of `bench` that did not fit get `extrapolated_ms` from a least-squares fit of
    sum_p c_p * key**p over `powers` to the measured dense rows for which same(row) holds (at
    least as many as there are powers)."""
    dense = [r for r in rows if r["bench"] == bench and r["design"] == "dense"]
    for r in dense:
        if r["ms"] is not None:
            continue
        measured = sorted((d[key], d["ms"]) for d in dense if d["ms"] and same(d, r))
        if len(measured) < len(powers):
            continue
        x, ms = (np.array(v, np.float64) for v in zip(*measured, strict=True))
        scale = x.max()  # conditioning: fit in units of the largest measured key
        basis = np.stack([(x / scale) ** p for p in powers], axis=1)
        coef = np.linalg.lstsq(basis, ms, rcond=None)[0]
        r["extrapolated_ms"] = float(sum(c * (r[key] / scale) ** p
                                         for c, p in zip(coef, powers, strict=True)))
        terms = " + ".join(f"{what[0]}{p}*{key}^{p}" for p in powers)
        r["note"] = (f"{r['note']}; extrapolated from a fit of {terms} to the dense {what} at "
                     f"{key} {[int(v) for v in x]}")


def extrapolate_dense(rows: list[dict[str, Any]]) -> None:
    """Dense rows that did not fit get a time fitted to the measured dense rows: prefill from
    b*L + c*L^2 over lengths (the weights' work per token, attention's per pair of tokens; two
    lengths or more); decode from a + b*batch over the batches measured at the same length (a
    step reads the weights once and each row's cache once)."""
    _fill_from_fit(rows, "model_prefill", "length", lambda d, r: True, (1, 2), "prefill")
    _fill_from_fit(rows, "model_decode", "batch", lambda d, r: d["length"] == r["length"],
                   (0, 1), "decode")


def attach_dense(rows: list[dict[str, Any]]) -> None:
    """dense_ms, dense_kv_bytes and speedup of every row against the dense row of its bench,
    length and batch (measured, else extrapolated)."""
    for r in rows:
        dense = next((d for d in rows if d["design"] == "dense" and d["bench"] == r["bench"]
                      and d["length"] == r["length"] and d["batch"] == r["batch"]), None)
        dense_ms = None if dense is None else dense.get("ms") or dense.get("extrapolated_ms")
        r["dense_ms"] = dense_ms
        r["dense_kv_bytes"] = None if dense is None else dense["kv_bytes"]
        r["speedup"] = dense_ms / r["ms"] if dense_ms and r["ms"] else None


def merge_rows(earlier: list[dict[str, Any]], new: list[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """The rows of earlier runs with this run's (a row of the same bench, design, routing,
    length and batch replaced by the new one), extrapolations and speedups computed again over
    all."""
    def key(r):
        return r["bench"], r["design"], r.get("routing"), r["length"], r["batch"]

    replaced = {key(r) for r in new}
    rows = [dict(r) for r in earlier if key(r) not in replaced] + [dict(r) for r in new]
    for r in rows:  # an earlier extrapolation is redone from every measured row
        if r.pop("extrapolated_ms", None) is not None:
            r["note"] = r["note"].split("; extrapolated")[0]
    extrapolate_dense(rows)
    attach_dense(rows)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    log("\nbench          design   length  batch        ms   dense_ms  speedup  kv GiB  note")
    for r in rows:
        def f(x, spec):
            return format(x, spec) if x is not None else "-"
        log(f"{r['bench']:<14} {r['design']:<8} {r['length']:>7} {r['batch']:>5} "
            f"{f(r['ms'], '10.2f')} {f(r['dense_ms'], '10.2f')} {f(r['speedup'], '8.2f')} "
            f"{r['kv_bytes'] / 2**30:7.2f}  {r['note'] or ''}")


def add_design_args(p: argparse.ArgumentParser) -> None:
    """The designs to run and how their sparse configs are made (`sparse_config`)."""
    p.add_argument("--designs", type=lambda s: s.split(","), default=list(DESIGNS))
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--retrieval-groups", type=int, default=1)
    p.add_argument("--routing", choices=ROUTINGS, default="kv",
                   help="paper design: retrieval heads as whole KV groups or spread query heads")
    p.add_argument("--window", type=int, default=8192)


def finish_design_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks --designs; sets the weights' dtype and the attention backend of this device."""
    unknown = set(args.designs) - set(DESIGNS)
    if unknown:
        p.error(f"unknown designs {sorted(unknown)}: choose from {DESIGNS}")
    args.dtype = jnp.bfloat16
    args.backend = "auto" if jax.default_backend() == "gpu" else "reference"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    def ints(s):
        return [int(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random model on CPU")
    p.add_argument("--out-dir", default=None,
                   help="default benchmarks/results (--smoke: a fresh temp dir)")
    add_design_args(p)
    p.add_argument("--lengths", type=ints, default=[131072])
    p.add_argument("--decode-batches", type=ints, default=[1, 16])
    p.add_argument("--layers", type=int, default=None, help="default: the config's")
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--append", action="store_true",
                   help="add to OUT_DIR's file for this device (same rows replaced), so one "
                        "table can be measured over several time-limited jobs")
    p.add_argument("--prefill-runs", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--skip", type=lambda s: s.split(","), default=[],
                   help="sections to leave out: prefill, decode")
    args = p.parse_args(argv)
    finish_design_args(p, args)
    if args.smoke:
        args.lengths, args.decode_batches = SMOKE["lengths"], SMOKE["decode_batches"]
        args.window, args.decode_steps, args.prefill_runs = (
            SMOKE["window"], SMOKE["decode_steps"], 1)
        args.prefill_chunk = args.prefill_chunk or SMOKE["prefill_chunk"]
    if args.out_dir is None:
        args.out_dir = (tempfile.mkdtemp(prefix="bench_model_") if args.smoke
                        else "benchmarks/results")
    return args


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    kind = device_kind()
    config = model_config(args)
    params = init_params(config, jax.random.key(SEED), args.dtype)
    path = os.path.join(args.out_dir, f"model_{device_tag(kind)}.json")
    run = ({k: v for k, v in vars(args).items() if k not in ("dtype",)}
           | {"commit": git_commit(), "model": config.name, "layers": config.num_layers,
              "dtype": "bfloat16"})
    result = {"device": kind, "jax_version": jax.__version__, "commit": run["commit"],
              "runs": [], "rows": []}
    if args.append and os.path.exists(path):
        with open(path) as fh:
            result = json.load(fh)
        if result["device"] != kind:
            raise SystemExit(f"{path} holds rows of {result['device']}, not {kind}: "
                             "give another --out-dir")
    result["runs"].append(run)
    earlier = result["rows"]
    log(f"{kind} jax {jax.__version__} commit {run['commit']} -> {path}")

    def save() -> None:
        result["rows"] = merge_rows(earlier, rows)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)

    rows: list[dict[str, Any]] = []

    for length in args.lengths:
        for design in args.designs:
            if "prefill" not in args.skip:
                rows.append(prefill_row(params, config, design, length, args))
                log(json.dumps(rows[-1]))
                save()
            if "decode" not in args.skip:
                for batch in args.decode_batches:
                    rows.append(decode_row(params, config, design, length, batch, args))
                    log(json.dumps(rows[-1]))
                    save()
    save()
    print_table(result["rows"])


if __name__ == "__main__":
    main(sys.argv[1:])

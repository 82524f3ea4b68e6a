"""What a new prompt length costs `SparseModel.generate`: the first call (compiles), a prompt of
another length in the same bucket (must not compile), a repeat, and another max_new_tokens.

Run from the repository root (the default model, fetched once; any device):

    PYTHONPATH=. python3 benchmarks/bench_generate.py --out-dir benchmarks/results

    options: --source (hub id, directory, .gguf; default the embedded model)  --sparse DIR
             --prompt-lens 300,400,400,400  --max-new-tokens 64,64,64,48  --batch 1
             --dtype float32  --backend auto  --profile-compile

Smoke run (CPU, a tiny random model, no downloads, < 60 s; asserts that only the first call
compiles and that its split adds up, profiles it; writes to a temp dir unless --out-dir is
given):

    PYTHONPATH=. JAX_PLATFORMS=cpu python3 benchmarks/bench_generate.py --smoke

Calls, in order: "first", "same_bucket" (another prompt length in the first one's bucket),
"repeat" (the same_bucket call again), "new_tokens" (the same prompt, another max_new_tokens in
the same bucket of new tokens). Each is one `model.generate` of a batch of random prompt
tokens, greedy, with no end-of-sequence token so every call runs all its steps. Rows: {call,
prompt_len, bucket, max_new_tokens, capacity, seconds (wall clock, output on the host),
trace_s, lower_s, compile_s (of those seconds: tracing to jaxprs, lowering to StableHLO, XLA's
compile, over every program of the call: `compiles.compile_seconds`), compiled (whether
`generate` compiled), compiles (every XLA program compiled during the call, by name)}; with
--profile-compile the first row also holds compile_profile, the heaviest host phases of that
call (`compiles.compile_profile`: XLA's pass pipelines, code generation, kernel compiles; its
seconds then include the profiler's overhead). The config records the model's layer layouts:
how many layers, how many distinct (retrieval-mask rows) and how many runs of consecutive
equal ones. Results: OUT_DIR/generate_<device tag>.json with the device, jax version and
commit ($COMMIT when set, else `git rev-parse HEAD`); a table prints last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import git_commit, log
from benchmarks.bench_local import device_kind, device_tag
from rtpurbo_jax.api import SparseModel, load
from rtpurbo_jax.buckets import generate_shape
from rtpurbo_jax.compiles import compile_profile, compile_seconds, count_compiles
from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.kernels import BACKENDS
from rtpurbo_jax.model import init_params

CALLS = ("first", "same_bucket", "repeat", "new_tokens")
PROMPT_LENS = [300, 400, 400, 400]  # 300 and 400 share the default ladder's 512 bucket
MAX_NEW_TOKENS = [64, 64, 64, 48]  # the CLI's default, then another count in its bucket
SMOKE_PROMPT_LENS = [20, 40, 40, 40]
SMOKE_MAX_NEW_TOKENS = [8, 8, 8, 6]
# A tests/tiny.py-sized model: the smoke run compiles in seconds.
SMOKE_CONFIG = ModelConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=96,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           max_position_embeddings=256, eos_token_ids=(1,), name="tiny-random")
GENERATE_PROGRAM = "jit(generate)"  # the jitted function's name in compile events
SEED = 0


def build_model(args: argparse.Namespace) -> SparseModel:
    if args.smoke:
        params = init_params(SMOKE_CONFIG, jax.random.key(SEED), jnp.dtype(args.dtype))
        return SparseModel(SMOKE_CONFIG, params, backend=args.backend)
    return load(args.source, sparse=args.sparse, dtype=jnp.dtype(args.dtype),
                backend=args.backend, with_tokenizer=False)


def layouts(model: SparseModel) -> dict[str, int]:
    """{"layers", "layouts": distinct layer layouts, "layout_runs": runs of consecutive layers
    with one layout}. A layer's layout is its retrieval-mask row (which heads are dense or
    sparse); a dense model has one."""
    rows = (model.sparse.retrieval_mask if model.sparse is not None
            else ((),) * model.config.num_layers)
    runs = 1 + sum(a != b for a, b in zip(rows, rows[1:], strict=False))
    return {"layers": len(rows), "layouts": len(set(rows)), "layout_runs": runs}


def timed_call(model: SparseModel, call: str, prompt_len: int, max_new_tokens: int,
               batch: int, profile: bool = False) -> dict:
    """One generate call on random prompt tokens -> its result row (profiled: with
    compile_profile)."""
    rng = np.random.default_rng(prompt_len)
    prompts = rng.integers(0, model.config.vocab_size, (batch, prompt_len), dtype=np.int32)
    width, capacity = generate_shape(prompt_len, max_new_tokens, model.buckets,
                                     model.config.max_position_embeddings)

    def run() -> np.ndarray:
        return model.generate(prompts, max_new_tokens, eos_token_id=())

    with count_compiles() as compiles, compile_seconds() as phases:
        start = time.perf_counter()
        if profile:
            _, top = compile_profile(run)
        else:
            run()
        seconds = time.perf_counter() - start
    row = {"call": call, "prompt_len": prompt_len, "bucket": width,
           "max_new_tokens": max_new_tokens, "capacity": capacity, "seconds": seconds,
           **{f"{phase}_s": t for phase, t in phases.items()},
           "compiled": compiles[GENERATE_PROGRAM] > 0, "compiles": dict(compiles)}
    if profile:
        row["compile_profile"] = top
    return row


def print_table(rows: list[dict]) -> None:
    log("\ncall         prompt bucket  new  cap   seconds   trace   lower  compile  compiled")
    for r in rows:
        log(f"{r['call']:<12} {r['prompt_len']:>6} {r['bucket']:>6} {r['max_new_tokens']:>4} "
            f"{r['capacity']:>4} {r['seconds']:>9.3f} {r['trace_s']:>7.3f} {r['lower_s']:>7.3f} "
            f"{r['compile_s']:>8.3f}  {r['compiled']}")


def print_profile(top: list[dict]) -> None:
    log("\nfirst call, heaviest host phases (inclusive seconds, summed over threads):")
    for event in top:
        log(f"{event['seconds']:>9.3f} s {event['count']:>6}x  {event['name'][:100]}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    def ints(s):
        return [int(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="a tiny random model on CPU; asserts that only the first call compiles")
    p.add_argument("--out-dir", default=None,
                   help="default benchmarks/results (--smoke: a fresh temp dir)")
    p.add_argument("--source", default=None, help="default: the embedded default model")
    p.add_argument("--sparse", default=None, help="a sparse checkpoint directory")
    p.add_argument("--prompt-lens", type=ints, default=None,
                   help=f"one per call {CALLS}; default {PROMPT_LENS}")
    p.add_argument("--max-new-tokens", type=ints, default=None,
                   help=f"one per call; default {MAX_NEW_TOKENS}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--profile-compile", action="store_true",
                   help="profile the first call: its heaviest host (compile) phases; on in --smoke")
    args = p.parse_args(argv)
    args.profile_compile = args.profile_compile or args.smoke
    if args.prompt_lens is None:
        args.prompt_lens = SMOKE_PROMPT_LENS if args.smoke else PROMPT_LENS
    if args.max_new_tokens is None:
        args.max_new_tokens = SMOKE_MAX_NEW_TOKENS if args.smoke else MAX_NEW_TOKENS
    if not len(args.prompt_lens) == len(args.max_new_tokens) == len(CALLS):
        p.error(f"--prompt-lens and --max-new-tokens need one value per call {CALLS}")
    if args.out_dir is None:
        args.out_dir = (tempfile.mkdtemp(prefix="bench_generate_") if args.smoke
                        else "benchmarks/results")
    return args


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    kind = device_kind()
    model = build_model(args)
    result = {
        "device": kind, "jax_version": jax.__version__, "commit": git_commit(),
        "config": {"smoke": args.smoke, "model": model.config.name, "sparse": args.sparse,
                   "design": model.sparse.design if model.sparse else None,
                   "backend": model.backend, "buckets": list(model.buckets),
                   "batch": args.batch, "dtype": args.dtype, **layouts(model)},
        "rows": [],
    }
    path = os.path.join(args.out_dir, f"generate_{device_tag(kind)}.json")
    log(f"{kind} jax {jax.__version__} commit {result['commit']} -> {path}")
    for call, prompt_len, new in zip(CALLS, args.prompt_lens, args.max_new_tokens, strict=True):
        row = timed_call(model, call, prompt_len, new, args.batch,
                         profile=args.profile_compile and call == CALLS[0])
        result["rows"].append(row)
        log(f"{call}: {prompt_len} tokens (bucket {row['bucket']}), {row['seconds']:.3f} s "
            f"(trace {row['trace_s']:.3f}, lower {row['lower_s']:.3f}, compile "
            f"{row['compile_s']:.3f}), compiles {row['compiles']}")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result["rows"])
    first = result["rows"][0]
    if "compile_profile" in first:
        print_profile(first["compile_profile"])
    if args.smoke:
        compiled = [r["compiled"] for r in result["rows"]]
        assert compiled == [True, False, False, False], result["rows"]
        phases = [first[f"{phase}_s"] for phase in ("trace", "lower", "compile")]
        assert min(phases) > 0 and sum(phases) <= first["seconds"], first
        assert first["compile_profile"], first
        log(f"smoke ok: {len(result['rows'])} rows in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Generate text: `python -m rtpurbo_jax "Your prompt"` (default model unless --source; sparse
with --sparse <checkpoint dir>)."""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp

from rtpurbo_jax.api import load
from rtpurbo_jax.compiles import COMPILATION_CACHE_SUBDIR


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rtpurbo_jax", description=__doc__)
    parser.add_argument("prompt", help="the user message (chat template applied when known)")
    parser.add_argument("--source", default=None,
                        help="hub id, local directory or .gguf (default: the embedded model)")
    parser.add_argument("--sparse", default=None,
                        help="a sparse checkpoint directory (e.g. runs/smollm2_135m/sparse)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    # Each run is a new process: without JAX's persistent compilation cache every run would
    # compile generate again; with it (and prompt buckets) a prompt whose bucket an earlier run
    # saw loads the compiled program instead.
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not keep compiled programs between runs (default: kept under "
                             f"the cache directory's {COMPILATION_CACHE_SUBDIR}/, unless "
                             "JAX_COMPILATION_CACHE_DIR names another)")
    args = parser.parse_args(argv)

    try:
        model = load(args.source, sparse=args.sparse, dtype=jnp.dtype(args.dtype),
                     compilation_cache=not args.no_compile_cache)
    except (OSError, ValueError) as err:  # bad paths, checkpoints and configs: one line
        parser.error(str(err))
    tok = model.tokenizer
    if tok is None:
        parser.error(f"{args.source} ships no tokenizer; use the Python API with token ids")
    if tok.chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="np",
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="np").input_ids
    start = time.perf_counter()
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)[0]
    seconds = time.perf_counter() - start
    eos = set(model.config.eos_token_ids)
    n = next((i for i, t in enumerate(out) if t in eos), len(out))
    print(tok.decode(out[:n], skip_special_tokens=True))
    print(f"[{model.config.name}: {ids.shape[1]} prompt tokens, {n} new tokens, "
          f"{seconds:.1f} s including compilation]")


if __name__ == "__main__":
    main()

"""KV-cache bytes of each design on the Llama-3-8B shapes: arithmetic, checked by allocation.

    PYTHONPATH=. python3 benchmarks/kv_bytes.py --out-dir benchmarks/results    # one GPU
    PYTHONPATH=. python3 benchmarks/kv_bytes.py --smoke                         # CPU, tiny

For dense attention, the indexer design (retrieval KV groups dense, every group keeps its full
cache plus indexer keys) and the paper design (all-local groups keep a ring of sinks + window;
groups with a retrieval query head keep everything, plus per-head indexer keys), at each
length: the bytes `rtpurbo_jax.cache.kv_cache_bytes` computes from the layout's declaration,
and, where the cache fits on the device, the bytes of the cache `empty_cache` really allocates
(the arrays' sizes and the device's bytes in use before and after). Masks: the retrieval
fraction of query heads (`--fraction`, the paper's 15%) chosen as whole KV groups (KV-group
routing) or as single query heads spread over the groups (query-head routing, the worst case for
memory: each retrieval head lands in a different group while it can). Random weights are not
needed: the cache depends only on shapes. Writes OUT_DIR/kv_bytes_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.bench_kernels import git_commit
from rtpurbo_jax.cache import empty_cache, kv_cache_bytes
from rtpurbo_jax.config import ModelConfig, SparseConfig

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, max_position_embeddings=1 << 20)
TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096)
# Leave this much of the device free when deciding whether a cache can be allocated.
ALLOCATION_HEADROOM = 0.9


def device_tag() -> str:
    """A file-name tag of the first device: "h100", "h200", or the platform ("cpu")."""
    kind = getattr(jax.devices()[0], "device_kind", "").lower()
    for name in ("h100", "h200", "a100"):
        if name in kind:
            return name
    return jax.devices()[0].platform


def masks(config: ModelConfig, fraction: float) -> dict[str, tuple[tuple[bool, ...], ...]]:
    """Query-head masks [layers][heads] of `fraction` of the query heads per layer: whole KV
    groups ("kv") or single heads each in a new group while one is free ("query")."""
    per_layer = max(1, round(fraction * config.num_heads))
    groups = math.ceil(per_layer / config.group_size)
    kv_heads = set(range(groups * config.group_size)[:per_layer])
    spread = [(i % config.num_kv_heads) * config.group_size + i // config.num_kv_heads
              for i in range(per_layer)]
    row = lambda chosen: tuple(h in chosen for h in range(config.num_heads))  # noqa: E731
    return {"kv": (row(kv_heads),) * config.num_layers,
            "query": (row(set(spread)),) * config.num_layers}


def designs(config: ModelConfig, fraction: float, window: int, sink_tokens: int,
            rank: int) -> dict[str, SparseConfig | None]:
    out: dict[str, SparseConfig | None] = {"dense": None}
    for routing, mask in masks(config, fraction).items():
        out[f"paper_{routing}"] = SparseConfig(
            mask, design="paper", group_size=config.group_size, rank=rank, window=window,
            sink_tokens=sink_tokens)
    kv_mask = tuple(tuple(any(row[g * config.group_size:(g + 1) * config.group_size])
                          for g in range(config.num_kv_heads)) for row in masks(config, fraction)
                    ["kv"])
    out["indexer"] = SparseConfig(kv_mask, rank=rank)
    return out


def allocated(config: ModelConfig, sparse: SparseConfig | None, length: int) -> dict[str, int]:
    """Allocates the cache; returns the arrays' bytes and the device's bytes-in-use delta."""
    device = jax.devices()[0]
    stats = getattr(device, "memory_stats", lambda: None)() or {}
    before = stats.get("bytes_in_use")
    cache = jax.block_until_ready(empty_cache(config, 1, length, jnp.bfloat16, sparse))
    arrays = sum(x.nbytes for layer in cache["layers"] for x in layer.values())
    after = (device.memory_stats() or {}).get("bytes_in_use") if before is not None else None
    del cache
    return {"allocated_bytes": arrays,
            "device_bytes_delta": None if after is None else int(after - before)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU")
    parser.add_argument("--lengths", default="131072,1048576")
    parser.add_argument("--fraction", type=float, default=0.15)
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        config = ModelConfig.from_hf(TINY, name="tiny")
        lengths, window = [512, 2048], 128
    else:
        config = ModelConfig.from_hf(LLAMA3_8B, name="llama-3-8b shapes")
        lengths, window = [int(x) for x in args.lengths.split(",")], args.window
    device = jax.devices()[0]
    capacity = (getattr(device, "memory_stats", lambda: None)() or {}).get("bytes_limit")
    rows = []
    for length in lengths:
        by_design = designs(config, args.fraction, window, args.sink_tokens, args.rank)
        dense_total = kv_cache_bytes(config, None, 1, length, jnp.bfloat16)["total"]
        for name, sparse in by_design.items():
            row = {"bench": "kv_bytes", "design": name, "length": length, "batch": 1,
                   **kv_cache_bytes(config, sparse, 1, length, jnp.bfloat16),
                   "dense_kv_bytes": dense_total,
                   "query_head_fraction": 1.0 if sparse is None else sparse.query_head_fraction,
                   "kv_group_fraction": 1.0 if sparse is None else sparse.kv_group_fraction}
            row["fraction_of_dense"] = row["total"] / dense_total
            fits = args.smoke or (capacity is not None
                                  and row["total"] < ALLOCATION_HEADROOM * capacity)
            if fits:
                row.update(allocated(config, sparse, length))
                assert row["allocated_bytes"] == row["total"], row
            else:
                row.update(allocated_bytes=None, device_bytes_delta=None,
                           note="does not fit the device: arithmetic only")
            rows.append(row)
            print(f"{name:12s} {length:>8d}: {row['total'] / 2**30:8.2f} GiB "
                  f"({row['fraction_of_dense']:.1%} of dense), allocated "
                  f"{row['allocated_bytes']}")
    out_dir = args.out_dir or (tempfile.mkdtemp() if args.smoke else "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"kv_bytes_{device_tag()}.json")
    with open(path, "w") as f:
        json.dump({"device": device.device_kind, "jax_version": jax.__version__,
                   "commit": git_commit(), "model": config.name, "dtype": "bfloat16",
                   "window": window, "sink_tokens": args.sink_tokens, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

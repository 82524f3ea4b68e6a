"""One attention layer of the paper design vs cuDNN and FlashAttention-2, prefill and decode.

Run from the repository root on a machine with one CUDA GPU (torch with CUDA for the FA2 rows):

    COMMIT=$(git rev-parse HEAD) PYTHONPATH=. python3 benchmarks/bench_paper_layer.py \\
      --lengths 131072 --decode-batches 1,16 --out-dir benchmarks/results

    options: --sections check,prefill,decode  --lengths 131072,1048576  --decode-batches 1,16
             --window 8192  --sink-tokens 4  --retrieval-groups 1  --check-length 8192
             --dense-max-length 1048576

Smoke run (CPU, tiny sizes, < 90 s on 2 cores; asserts; writes to a temp dir unless --out-dir is
given):

    PYTHONPATH=. JAX_PLATFORMS=cpu python3 benchmarks/bench_paper_layer.py --smoke

The layer is Llama-3-8B attention (32 query / 8 KV heads, head_dim 128, bf16). The paper design
(SparseConfig design "paper") makes the query heads of the first --retrieval-groups KV groups
retrieval heads (1 group: 4 of 32 query heads, 12.5%) and every other head local, on
--sink-tokens sinks + a --window window. Three designs per (bench, length, batch), each through
the functions the model calls (`attention.prefill_attend` / `decode_attend`, jitted):
  dense  prefill: the faster of plain cuDNN causal attention and the model's dense layer (cuDNN
         with sequence lengths), as `bench_layer.DenseTimes`; decode: the model's dense layer
         (`attention.dense_decode`: cuDNN with key lengths);
  fa2    FlashAttention-2 through torch: `scaled_dot_product_attention` under
         `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` on JAX's own arrays (DLPack: same memory), GQA
         by `enable_gqa=True` where torch takes it, else K/V repeated per query head before
         timing (the row's impl says which); prefill causal, decode one query over the whole
         cache (is_causal=False). Off a GPU the math backend stands in (the impl says so). No
         FA2 rows, with a printed note, when torch is not importable;
  paper  prefill: retrieval heads dense through cuDNN, local heads through cuDNN's window with
         the sinks merged in (the local kernel where cuDNN can't:
         `paper_attention.layer_prefill`); decode: each retrieval head's pre-RoPE indexer
         top-p selection (the indexer kernels), the sparse decode kernel over the union of the
         group's blocks, and the local heads over their sinks + window ring (`layer_decode`).
Prefill: one prompt (batch 1) of `length` tokens, random q/k/v (no design's cost depends on the
values), no cache written (a forward pass, for every design alike). Decode: one new token per
row written at position length - 1 of a cache of `length` tokens, then attended; the cache is
donated, as the model's decode step donates it, so the write lands in place. The retrieval
heads' indexer keys and queries are planted (`bench_layer.planted_indexer`, see
`decode_inputs`) so that top-p keeps a realistic, query-dependent set.

Rows: {bench: "layer_prefill" | "layer_decode", design, length, batch, ms, dense_ms, speedup
(dense_ms / ms), fa2_ms, speedup_vs_fa2 (fa2_ms / ms), peak_bytes (XLA's memory analysis of one
call: arguments + outputs - aliased + temporaries; dense prefill: of the model's dense layer;
null for fa2, which torch runs), kv_bytes (the design's cache of `batch` rows of `length`
tokens, `rtpurbo_jax.cache.kv_cache_bytes`), dense_kv_bytes, density (attended / causal
(query, key) pairs over all query heads), impl, note}; paper decode rows add
retrieval_density (the retrieval heads' attended / causal keys). A design whose cache does not
fit the device, or that runs out of memory, is a row with ms null and a note that starts "does
not fit"; a dense prefill longer than --dense-max-length is extrapolated (`DenseTimes.best`).
Checks at --check-length (prefill batch 1, decode batch CHECK_DECODE_BATCH): the paper layer
through the kernels vs the library's jnp reference (backend "reference"), and FA2 vs JAX's
dense attention. Timing as bench_layer: medians of TIMED_RUNS (LONG_TIMED_RUNS from LONG_PREFILL
tokens) after warm-ups, on the wall clock up to block_until_ready / torch.cuda.synchronize;
a decode region scans DECODE_CALLS steps over up to MAX_DECODE_LAYERS caches carried in place
(as `generate`'s loop carries its cache), so one step's blocks are out of L2 by the next.
Results: OUT_DIR/paper_layer_<device>_<lengths>.json with the device, jax and torch versions
and the commit ($COMMIT, else HEAD), rewritten after every row; a table prints last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.bench_kernels import (
    CHECK_TOLERANCE,
    DTYPE,
    ERROR_CHARS,
    git_commit,
    log,
    median_ms,
    prefill_qkv,
    random_array,
    rel_errors,
    size_tag,
    use_smoke_xla_flags,
)

# FA2 runs in this process on JAX's arrays, and torch allocates its outputs itself: JAX takes
# device memory as it needs it (up to 94%) rather than all of it at start. Set before the
# benchmark modules below start JAX's backend on import; an explicit setting wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
# --smoke is bound by XLA:CPU compile time, which unoptimised compiles halve; they too must be
# set before the backend starts, so the flag is read from the command line here.
if "--smoke" in sys.argv[1:]:
    use_smoke_xla_flags()

from benchmarks import bench_layer as bl  # noqa: E402
from benchmarks.bench_local import device_kind, device_tag  # noqa: E402
from benchmarks.bench_model import (  # noqa: E402
    attach_dense,
    device_bytes,
    is_out_of_memory,
    memory_bytes,
    oom_note,
    random_cache,
)
from rtpurbo_jax import attention  # noqa: E402
from rtpurbo_jax.cache import kv_cache_bytes  # noqa: E402
from rtpurbo_jax.config import ModelConfig, SparseConfig  # noqa: E402
from rtpurbo_jax.model import QKV  # noqa: E402

try:  # after JAX's backend: on a GPU both share one cuDNN, the one JAX loaded
    import torch  # noqa: E402
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
except ImportError:
    torch = None

SINK_TOKENS = 4  # the paper's (StreamingLLM's) four sinks
WINDOW = 8192  # the paper's local window
RETRIEVAL_GROUPS = 1  # of 8 KV groups: 4 of 32 query heads retrieve
LENGTHS = [131072]
DECODE_BATCHES = [1, 16]
CHECK_LENGTH = 8192
CHECK_DECODE_BATCH = 2
DENSE_MAX_LENGTH = 1 << 20  # one dense cuDNN layer at 1M runs on an H100 (~19 s)
SECTIONS = ("check", "prefill", "decode")
DESIGNS = ("dense", "fa2", "paper")
FA2_NAME = "torch SDPA flash (FlashAttention-2)"
MATH_NAME = "torch SDPA math (CPU stand-in for FlashAttention-2)"
# --smoke: bench_layer's smoke shapes (4 query / 2 KV heads, head_dim 16, block 16), so KV group
# 0 retrieves and group 1 is local, on a window of a few blocks inside the length, so that the
# ring wraps in decode.
SMOKE_WINDOW = 64
SMOKE_DECODE_BATCHES = [1, 2]


@dataclasses.dataclass(frozen=True)
class Layer:
    """The benchmarked attention layer: its shapes and the paper design over it."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block: int  # block_q = block_k of the paper design's kernels and selection
    retrieval_groups: int
    sink_tokens: int
    window: int

    @property
    def retrieval_heads(self) -> int:
        """Query heads of the first retrieval_groups KV groups (GQA: consecutive)."""
        return self.retrieval_groups * self.num_heads // self.num_kv_heads

    @property
    def config(self) -> ModelConfig:
        return bl.layer_config(self.num_heads, self.num_kv_heads, self.head_dim)

    @property
    def paper(self) -> SparseConfig:
        mask = tuple(h < self.retrieval_heads for h in range(self.num_heads))
        return SparseConfig((mask,), design="paper", group_size=self.num_heads // self.num_kv_heads,
                            rank=bl.RANK, top_p=bl.TOP_P, block_q=self.block,
                            block_k=self.block, sink_tokens=self.sink_tokens, window=self.window)

    def sparse(self, design: str) -> SparseConfig | None:
        """The SparseConfig of a design: None (dense attention) for dense and fa2."""
        return self.paper if design == "paper" else None

    def indexer(self) -> dict[str, Any]:
        """Paper-design indexer weights that read the first RANK dims of each retrieval head's
        pre-RoPE q (wq [R, 1, D, RANK]) and of its KV head's k (wk [R, D, RANK]): the dims
        `decode_inputs` plants, at scale 1."""
        select = jnp.eye(self.head_dim, bl.RANK, dtype=DTYPE)
        r, d = self.retrieval_heads, self.head_dim
        return {"layers": [{"wq": jnp.broadcast_to(select, (r, 1, d, bl.RANK)),
                            "wk": jnp.broadcast_to(select, (r, d, bl.RANK))}]}

    def kv_bytes(self, design: str, batch: int, length: int) -> int:
        """Bytes of the design's cache of one layer, `batch` rows of `length` positions."""
        return kv_cache_bytes(self.config, self.sparse(design), batch, length, DTYPE)["total"]


# ----------------------------------------------------------------------------------------------
# The layer as the model runs it
# ----------------------------------------------------------------------------------------------


def prefill_fn(layer: Layer, design: str, backend: str = bl.LAYER_BACKEND) -> Callable:
    """attend(q [b, T, H, D], k, v [b, T, K, D], lengths [b]) -> (out [b, T, H, D], stats [2]):
    the model's `prefill_attend` of the design over a whole prompt, no cache (stats: attended
    and causal keys over query heads, zeros for dense)."""
    sparse = layer.sparse(design)
    indexer = layer.indexer() if sparse else None

    def attend(q, k, v, lengths):
        # Pre-RoPE = rotated here: RoPE belongs to the projections, outside the layer timed,
        # and the paper design's prefill does not score blocks.
        run = attention.prefill_attend(layer.config, lengths, backend, sparse, indexer)
        out, state = run(0, QKV(q, k, v, q, k), None)
        return out, state["stats"]

    return attend


def decode_fn(layer: Layer, design: str, backend: str = bl.LAYER_BACKEND) -> Callable:
    """step(token, cache, lengths [b]) -> (out [b, 1, H, D], cache, stats [2]): the model's
    `decode_attend` of the design. token: QKV of one new token per row ([b, 1, heads, D]),
    written at position lengths[b] of the layer's cache (the design's layout), then attended."""
    sparse = layer.sparse(design)
    indexer = layer.indexer() if sparse else None

    def step(token, cache, lengths):
        out, state = attention.decode_attend(layer.config, lengths, backend, sparse,
                                             indexer)(0, token, cache)
        return out, state["cache"], state["stats"]

    return step


def decode_inputs(layer: Layer, design: str, seed: int, batch: int, length: int, caches: int,
                  calls: int) -> tuple[list[dict[str, jax.Array]], list[QKV]]:
    """`caches` layer caches of the design holding `length` positions per row, and `calls` new
    tokens (token c is for cache c % caches).

    Cache values are bench_model's `random_cache` (in [-1, 1]; dense costs do not depend on
    them). Paper design: a cache's indexer keys [b, length, R, RANK] are one planted structure
    (`planted_indexer` with one group) that the R retrieval heads share, and head r of a token
    carries in the first RANK dims of its q the planted query of its own recent position: the
    region's direction with its own noise, so the heads' top-p sets mostly overlap, as heads of
    one KV group reading the same keys do.
    """
    per_cache = -(-calls // caches)
    r = layer.retrieval_heads
    out, planted = [], []
    for i in range(caches):
        cache = random_cache(layer.config, layer.sparse(design), batch, length, length,
                             DTYPE)["layers"][0]
        if design == "paper":
            qi, ki = bl.planted_indexer(jax.random.PRNGKey(seed + i), batch, length, 1)
            cache["ki"] = jnp.broadcast_to(ki, (batch, length, r, bl.RANK)).astype(DTYPE)
            planted.append(qi[:, length - per_cache * r:, 0].reshape(batch, per_cache, r,
                                                                       bl.RANK))
            del qi, ki
        out.append(cache)
    shapes = [(calls, batch, 1, n, layer.head_dim)
              for n in (layer.num_heads, layer.num_kv_heads, layer.num_kv_heads)]
    q_all, k_all, v_all = (random_array(seed + 100 + j, s) for j, s in enumerate(shapes))
    tokens = []
    for c in range(calls):
        q = q_all[c]
        if planted:
            q = q.at[:, 0, :r, :bl.RANK].set(planted[c % caches][:, c // caches].astype(DTYPE))
        tokens.append(QKV(q, k_all[c], v_all[c], q, k_all[c]))
    return out, tokens


def time_decode(step: Callable, tokens: list[QKV], caches: list[dict[str, jax.Array]],
                lengths: jax.Array, runs: int) -> tuple[float, list]:
    """(ms per step, the last region's [(out, stats)] per token) of step(token c, cache
    c % len(caches), lengths) for every token, in one jitted region: a scan over rounds, each
    stepping every cache once, the caches carried and donated as `generate`'s decode loop
    carries its cache, so each write lands in place (the arrays passed in are consumed).
    An unrolled chain that wrote one donated cache several times made XLA copy it at batch 1
    (a 128K dense step took 0.63 ms there against 0.24 ms for the attention alone)."""
    n = len(caches)
    if len(tokens) % n:
        raise ValueError(f"{len(tokens)} tokens do not make whole rounds over {n} caches")
    # [rounds, n, ...] per field: token c = round c // n, cache c % n.
    rounds = jax.tree.map(lambda *x: jnp.stack(x).reshape(-1, n, *x[0].shape), *tokens)

    def one_round(caches, round_tokens):
        caches, outs = list(caches), []
        for i in range(n):
            token = jax.tree.map(lambda x, i=i: x[i], round_tokens)
            out, caches[i], stats = step(token, caches[i], lengths)
            outs.append((out, stats))
        return tuple(caches), outs

    jitted = jax.jit(lambda caches, rounds: jax.lax.scan(one_round, caches, rounds),
                     donate_argnums=0)
    state: dict[str, Any] = {"caches": tuple(caches)}

    def run():
        state["caches"], state["outs"] = jax.block_until_ready(jitted(state["caches"], rounds))

    ms = median_ms(run, runs, len(tokens))
    outs = state["outs"]
    return ms, [jax.tree.map(lambda x, r=r: x[r], outs[i])
                for r in range(len(tokens) // n) for i in range(n)]


def program_bytes(fn: Callable, *args: Any, donate_argnums: tuple[int, ...] = ()) -> int | None:
    """What one call of fn on args needs on the device, by XLA's memory analysis (None where
    the backend does not say)."""
    return memory_bytes(jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile())


# ----------------------------------------------------------------------------------------------
# FlashAttention-2 through torch
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sdpa:
    """torch's scaled_dot_product_attention as the FA2 baseline: its backend and GQA mode."""

    backend: Any  # an SDPBackend
    name: str  # FA2_NAME, or MATH_NAME off a GPU
    gqa: str  # "enable_gqa" (torch's own GQA) or "repeat_kv" (K/V repeated before timing)

    @property
    def impl(self) -> str:
        return f"{self.name}, GQA by {self.gqa}"

    def views(self, q: jax.Array, k: jax.Array, v: jax.Array
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """torch [b, heads, t, D] views of JAX [b, t, heads, D] arrays (DLPack: no copy); with
        "repeat_kv", K/V repeated to the query heads (a copy, made here, outside the timing)."""
        tq, tk, tv = (torch.from_dlpack(jax.block_until_ready(x)).transpose(1, 2)
                      for x in (q, k, v))
        if self.gqa == "repeat_kv":
            group = tq.shape[1] // tk.shape[1]
            tk, tv = (x.repeat_interleave(group, dim=1) for x in (tk, tv))
        return tq, tk, tv

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
               ) -> torch.Tensor:
        """Attention of torch views from `views`: [b, H, t, D] (call under `kernel()`)."""
        gqa = {"enable_gqa": True} if self.gqa == "enable_gqa" else {}
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                **gqa)

    def kernel(self) -> Any:
        """The context that restricts SDPA to this backend."""
        return sdpa_kernel(self.backend)

    def to_jax(self, out: torch.Tensor) -> jax.Array:
        """An output of `attend` as JAX [b, t, H, D] float32 (host copy: for checks only)."""
        return jnp.asarray(out.transpose(1, 2).float().cpu().numpy())

    def ms(self, calls: list[Callable[[], Any]], runs: int) -> float:
        """ms per call of calls run in order per timed region, then synchronized."""
        def region():
            for call in calls:
                call()
            if bl.ON_GPU:
                torch.cuda.synchronize()

        with self.kernel():
            return median_ms(region, runs, len(calls))

    def release(self) -> None:
        """Hands torch's cached blocks back to the device, for JAX's next allocations."""
        if bl.ON_GPU:
            torch.cuda.empty_cache()


def make_sdpa() -> Sdpa | str:
    """The FA2 baseline, or why there are no FA2 rows. On a GPU: the flash backend; off one: the
    math backend on the CPU. GQA: enable_gqa where the backend takes it (torch >= 2.5), probed
    on a tiny call, else repeat_kv."""
    if torch is None:
        return "torch is not importable: no FA2 rows"
    if bl.ON_GPU and not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU-only torch?): no FA2 rows"
    backend, name = ((SDPBackend.FLASH_ATTENTION, FA2_NAME) if bl.ON_GPU
                     else (SDPBackend.MATH, MATH_NAME))
    device = "cuda" if bl.ON_GPU else "cpu"
    q = torch.zeros((1, 2, 16, 64), dtype=torch.bfloat16, device=device)
    kv = torch.zeros((1, 1, 16, 64), dtype=torch.bfloat16, device=device)
    try:
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True,
                                                             enable_gqa=True)
        gqa = "enable_gqa"
    except (TypeError, RuntimeError):  # an older torch, or a backend without GQA
        gqa = "repeat_kv"
    return Sdpa(backend, name, gqa)


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------


def attach_baselines(rows: list[dict[str, Any]]) -> None:
    """dense_ms, dense_kv_bytes, speedup (bench_model's `attach_dense`), fa2_ms and
    speedup_vs_fa2 of every row against the rows of its bench, length and batch."""
    attach_dense(rows)
    for r in rows:
        fa2 = next((f for f in rows if f["design"] == "fa2" and f["bench"] == r["bench"]
                    and f["length"] == r["length"] and f["batch"] == r["batch"]), None)
        r["fa2_ms"] = None if fa2 is None else fa2["ms"]
        r["speedup_vs_fa2"] = r["fa2_ms"] / r["ms"] if r["fa2_ms"] and r["ms"] else None


def does_not_fit(what: str, nbytes: int) -> str | None:
    """A "does not fit" note when nbytes alone exceed what XLA may use, else None."""
    limit = device_bytes()
    if limit is None or nbytes <= limit:
        return None
    return f"does not fit: {what} {nbytes / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB on the device"


class Run:
    """The results of one run: rows and checks, saved after each."""

    def __init__(self, args: argparse.Namespace, layer: Layer, sdpa: Sdpa | str):
        self.args, self.layer, self.sdpa = args, layer, sdpa
        kind = device_kind()
        self.result: dict[str, Any] = {
            "device": kind, "jax_version": jax.__version__,
            "torch_version": None if torch is None else torch.__version__,
            "commit": git_commit(),
            "config": {k: v for k, v in vars(args).items() if k != "out_dir"}
            | dataclasses.asdict(layer) | {"dense": bl.DENSE_NAME, "layer_backend":
                                           bl.LAYER_BACKEND},
            "fa2": sdpa.impl if isinstance(sdpa, Sdpa) else sdpa,
            "checks": [], "rows": [],
        }
        lengths = "-".join(size_tag(n) for n in args.lengths)
        self.path = os.path.join(args.out_dir, f"paper_layer_{device_tag(kind)}_{lengths}.json")

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.result["rows"]

    def save(self) -> None:
        attach_baselines(self.rows)
        with open(self.path, "w") as f:
            json.dump(self.result, f, indent=1)

    def rows_for(self, bench: str, length: int, batch: int) -> dict[str, dict[str, Any]]:
        """Unmeasured rows of the designs of one (bench, length, batch), in the order they are
        measured: fa2 first (when there is torch), so that torch hands its memory back before
        JAX's runs."""
        kind = bench.removeprefix("layer_")
        impls = {"fa2": self.sdpa.impl if isinstance(self.sdpa, Sdpa) else None,
                 "dense": bl.DENSE_NAME + ("" if kind == "prefill" else
                                           " (attention.dense_decode)"),
                 "paper": f"attention.{kind}_attend, backend {bl.LAYER_BACKEND}"}
        return {design: {"bench": bench, "design": design, "length": length, "batch": batch,
                         "ms": None, "peak_bytes": None,
                         "kv_bytes": self.layer.kv_bytes(design, batch, length),
                         "density": None if design == "paper" else 1.0, "impl": impl,
                         "note": None}
                for design, impl in impls.items() if impl is not None}

    def attempt(self, fn: Callable[[], Any]) -> tuple[Any, str | None]:
        """(fn(), None), or (None, why not): a note that starts "does not fit" when out of
        memory, else "failed" (--smoke: raises)."""
        try:
            return fn(), None
        except Exception as err:  # noqa: BLE001 - label the rows, measure the others
            if self.args.smoke:
                raise
            return None, (oom_note(err) if is_out_of_memory(err) else
                          f"failed: {type(err).__name__}: {str(err)[:ERROR_CHARS]}")

    def record(self, row: dict[str, Any], measure: Callable[[], dict[str, Any]] | None = None,
               note: str | None = None) -> None:
        """Fills the row from measure() (see `attempt`), or gives it the note of why it was not
        measured, and saves it."""
        if measure is not None:
            fields, note = self.attempt(measure)
            row.update(fields or {})
        row["note"] = note or row["note"]
        self.rows.append(row)
        self.save()
        ms = "-" if row["ms"] is None else f"{row['ms']:.3f} ms"
        log(f"{row['bench']} {row['design']} {row['length']} b{row['batch']}: {ms}"
            + (f", x{row['speedup']:.2f} vs dense" if row.get("speedup") else "")
            + (f", x{row['speedup_vs_fa2']:.2f} vs fa2" if row.get("speedup_vs_fa2") else "")
            + (f" ({row['note']})" if row["note"] else ""))

    def check(self, name: str, batch: int, out: jax.Array, ref: jax.Array) -> None:
        errs = rel_errors(out, ref)
        ok = errs["rel_max"] <= CHECK_TOLERANCE and not errs["nan"]
        self.result["checks"].append({"check": name, "length": self.args.check_length,
                                      "batch": batch, **errs, "ok": ok})
        self.save()
        log(f"check {name}: rel_fro {errs['rel_fro']:.2e} rel_max {errs['rel_max']:.2e} "
            f"nan {errs['nan']} {'ok' if ok else 'FAILED'}")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def run_checks(run: Run) -> None:
    """The paper layer through the kernels vs the library's jnp reference, prefill and decode;
    FA2 vs JAX's dense attention on the same arrays."""
    layer, sdpa, length = run.layer, run.sdpa, run.args.check_length
    q, k, v = prefill_qkv(layer, (10, 11, 12), length)
    lengths = jnp.full((1,), length, jnp.int32)
    out, ref = (jax.jit(prefill_fn(layer, "paper", backend))(q, k, v, lengths)[0]
                for backend in (bl.LAYER_BACKEND, "reference"))
    run.check("paper_prefill_vs_reference", 1, out, ref)
    if isinstance(sdpa, Sdpa):
        with sdpa.kernel():
            fa2 = sdpa.to_jax(sdpa.attend(*sdpa.views(q, k, v), causal=True))
        run.check(f"fa2_prefill_vs_{bl.DENSE_NAME}", 1, fa2, bl.dense_prefill_cudnn(q, k, v))
    del q, k, v, out, ref

    batch = CHECK_DECODE_BATCH
    before = jnp.full((batch,), length - 1, jnp.int32)
    (cache,), (token,) = decode_inputs(layer, "paper", 20, batch, length, 1, 1)
    out, ref = (jax.jit(decode_fn(layer, "paper", backend))(token, cache, before)[0]
                for backend in (bl.LAYER_BACKEND, "reference"))
    run.check("paper_decode_vs_reference", batch, out, ref)
    if isinstance(sdpa, Sdpa):
        (cache,), (token,) = decode_inputs(layer, "dense", 30, batch, length, 1, 1)
        dense = attention.dense_decode(token.q, cache["k"], cache["v"], before + 1,
                                       backend=bl.LAYER_BACKEND)
        tq, tk, tv = sdpa.views(token.q, cache["k"], cache["v"])
        with sdpa.kernel():
            fa2 = sdpa.to_jax(sdpa.attend(tq, tk, tv, causal=False))
        run.check(f"fa2_decode_vs_{bl.DENSE_NAME}", batch, fa2, dense)


def prefill_rows(run: Run, dense: bl.DenseTimes, length: int) -> None:
    """The designs' prefill of one prompt of `length` tokens."""
    layer, sdpa = run.layer, run.sdpa
    runs = bl.runs_for(length)
    rows = run.rows_for("layer_prefill", length, 1)
    # Distinct inputs per chained call: XLA would merge calls on the same ones.
    data, note = run.attempt(lambda: [
        (*prefill_qkv(layer, (40 + 3 * i, 41 + 3 * i, 42 + 3 * i), length),
         jnp.full((1,), length, jnp.int32)) for i in range(bl.inner_for(length))])
    if note:
        for row in rows.values():
            run.record(row, note=note)
        return

    def fa2() -> dict[str, Any]:
        views = [sdpa.views(q, k, v) for q, k, v, _ in data]
        ms = sdpa.ms([lambda x=x: sdpa.attend(*x, causal=True) for x in views], runs)
        del views
        sdpa.release()
        return {"ms": ms}

    def dense_layer() -> dict[str, Any]:
        dense.measure(length, *data[0][:3])
        ms, extrapolated = dense.best(length)
        if extrapolated:
            return {"extrapolated_ms": ms,
                    "note": f"extrapolated from the dense lengths measured, {sorted(dense.ms)}"}
        model_path = dense.model_ms.get(length, float("inf")) < dense.ms[length]
        return {"ms": ms, "peak_bytes": program_bytes(prefill_fn(layer, "dense"), *data[0]),
                "impl": (f"{bl.DENSE_NAME} with lengths (the model's dense layer)" if model_path
                         else f"{bl.DENSE_NAME} causal"), "timed_runs": runs}

    def paper() -> dict[str, Any]:
        fn = prefill_fn(layer, "paper")
        peak = program_bytes(fn, *data[0])
        ms, outputs = bl.time_calls(fn, data, runs)
        attended, causal = (float(x) for x in outputs[0][1])
        return {"ms": ms, "peak_bytes": peak, "density": attended / causal, "timed_runs": runs}

    for design, measure in (("fa2", fa2), ("dense", dense_layer), ("paper", paper)):
        if design in rows:
            run.record(rows[design], measure)


def decode_rows(run: Run, length: int, batch: int) -> None:
    """The designs' decode step of `batch` rows over caches of `length` tokens."""
    layer, sdpa = run.layer, run.sdpa
    runs = bl.TIMED_RUNS
    before = jnp.full((batch,), length - 1, jnp.int32)  # filled positions before the step
    rows = run.rows_for("layer_decode", length, batch)

    def inputs(design: str, seed: int) -> tuple[list[dict[str, jax.Array]], list[QKV]]:
        """As many caches as bench_layer's budget takes (at most MAX_DECODE_LAYERS)."""
        fit = int(max(1, min(bl.MAX_DECODE_LAYERS,
                             bl.DECODE_CACHE_BUDGET // layer.kv_bytes(design, batch, length))))
        # Whole rounds: every cache takes the same number of the timed steps.
        count = max(c for c in range(1, fit + 1) if bl.DECODE_CALLS % c == 0)
        return decode_inputs(layer, design, seed, batch, length, count, bl.DECODE_CALLS)

    def timed(design: str, caches: list[dict[str, jax.Array]], tokens: list[QKV]
              ) -> tuple[dict[str, Any], list]:
        """The row's fields and the outputs of the design's steps; the caches are consumed."""
        step = decode_fn(layer, design)
        peak = program_bytes(step, tokens[0], caches[0], before, donate_argnums=(1,))
        count = len(caches)
        ms, outputs = time_decode(step, tokens, caches, before, runs)
        return {"ms": ms, "peak_bytes": peak, "cache_layers": count, "timed_runs": runs}, outputs

    # FA2 and dense attention read the same caches (dense layout), FA2 first: the dense
    # timing consumes them.
    note = does_not_fit("dense KV cache", rows["dense"]["kv_bytes"])
    if note is None:
        made, note = run.attempt(lambda: inputs("dense", 60))
    if note:
        for design in ("fa2", "dense"):
            if design in rows:
                run.record(rows[design], note=note)
    else:
        caches, tokens = made
        del made

        def fa2() -> dict[str, Any]:
            views = [sdpa.views(t.q, caches[c % len(caches)]["k"], caches[c % len(caches)]["v"])
                     for c, t in enumerate(tokens)]
            ms = sdpa.ms([lambda x=x: sdpa.attend(*x, causal=False) for x in views], runs)
            del views
            sdpa.release()
            return {"ms": ms}

        if "fa2" in rows:
            run.record(rows["fa2"], fa2)
        run.record(rows["dense"], lambda: timed("dense", caches, tokens)[0])
        del caches, tokens

    def paper() -> dict[str, Any]:
        fields, outputs = timed("paper", *inputs("paper", 70))
        attended = sum(float(stats[0]) for _, stats in outputs) / len(outputs)
        local = ((layer.num_heads - layer.retrieval_heads) * batch
                 * min(length, layer.sink_tokens + layer.window))
        return fields | {"density": attended / (layer.num_heads * batch * length),
                         "retrieval_density":
                             (attended - local) / (layer.retrieval_heads * batch * length)}

    note = does_not_fit("paper KV cache", rows["paper"]["kv_bytes"])
    run.record(rows["paper"], None if note else paper, note)


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    log("\nbench          design  length batch         ms    dense_ms speedup     fa2_ms  vs_fa2"
        " density  kv GiB  note")
    for r in rows:
        log(f"{r['bench']:<14} {r['design']:<6} {r['length']:>7} {r['batch']:>5} "
            f"{f(r['ms'], '10.3f'):>10} {f(r['dense_ms'], '11.3f'):>11} "
            f"{f(r['speedup'], '7.2f'):>7} {f(r['fa2_ms'], '10.3f'):>10} "
            f"{f(r['speedup_vs_fa2'], '7.2f'):>7} {f(r['density'], '7.3f'):>7} "
            f"{r['kv_bytes'] / 2**30:7.3f}  {r['note'] or ''}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on the CPU (kernels interpreted, XLA dense, torch's math "
                   "backend for FA2); asserts the checks and that every section wrote rows")
    p.add_argument("--out-dir", default=None,
                   help="default benchmarks/results (--smoke: a fresh temp dir)")
    p.add_argument("--sections", type=lambda s: s.split(","), default=list(SECTIONS))
    p.add_argument("--lengths", type=ints, default=None,
                   help=f"prefill and decode lengths; default {LENGTHS} (--smoke: "
                   f"[{bl.SMOKE_LENGTH}])")
    p.add_argument("--decode-batches", type=ints, default=None,
                   help=f"default {DECODE_BATCHES} (--smoke: {SMOKE_DECODE_BATCHES})")
    p.add_argument("--window", type=int, default=None,
                   help=f"local heads' window; default {WINDOW} (--smoke: {SMOKE_WINDOW})")
    p.add_argument("--sink-tokens", type=int, default=SINK_TOKENS)
    p.add_argument("--retrieval-groups", type=int, default=RETRIEVAL_GROUPS)
    p.add_argument("--check-length", type=int, default=None,
                   help=f"default {CHECK_LENGTH} (--smoke: {bl.SMOKE_LENGTH})")
    p.add_argument("--dense-max-length", type=int, default=DENSE_MAX_LENGTH,
                   help="longest prefill timed densely; longer ones are extrapolated")
    args = p.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}: choose from {SECTIONS}")
    smoke = args.smoke
    for name, real, tiny in (("lengths", LENGTHS, [bl.SMOKE_LENGTH]),
                             ("decode_batches", DECODE_BATCHES, SMOKE_DECODE_BATCHES),
                             ("window", WINDOW, SMOKE_WINDOW),
                             ("check_length", CHECK_LENGTH, bl.SMOKE_LENGTH)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else real)
    if args.out_dir is None:
        args.out_dir = (tempfile.mkdtemp(prefix="bench_paper_layer_") if smoke
                        else "benchmarks/results")
    return args


def check_smoke(run: Run) -> None:
    """--smoke: every check within CHECK_TOLERANCE, and every section wrote its rows, timed."""
    failed = [c["check"] for c in run.result["checks"] if not c["ok"]]
    assert not failed, f"checks failed: {failed}"
    args, fa2 = run.args, isinstance(run.sdpa, Sdpa)
    if "check" in args.sections:
        assert len(run.result["checks"]) == (4 if fa2 else 2), run.result["checks"]
    designs = [d for d in DESIGNS if fa2 or d != "fa2"]
    expected = {("layer_prefill", d, n, 1) for d in designs for n in args.lengths
                if "prefill" in args.sections}
    expected |= {("layer_decode", d, n, b) for d in designs for n in args.lengths
                 for b in args.decode_batches if "decode" in args.sections}
    timed = {(r["bench"], r["design"], r["length"], r["batch"]) for r in run.rows if r["ms"]}
    assert timed == expected, f"rows missing or untimed: {sorted(expected - timed)}"
    assert all(r["density"] for r in run.rows), run.rows


def main(argv: Sequence[str]) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv)
    if args.smoke:
        bl.use_smoke_sizes()  # shapes, block, planted structure and timing counts
    layer = Layer(bl.NUM_HEADS, bl.NUM_KV_HEADS, bl.HEAD_DIM, bl.BLOCK, args.retrieval_groups,
                  args.sink_tokens, args.window)
    sdpa = make_sdpa()
    os.makedirs(args.out_dir, exist_ok=True)
    run = Run(args, layer, sdpa)
    log(f"{run.result['device']} jax {jax.__version__} torch {run.result['torch_version']} "
        f"commit {run.result['commit']} -> {run.path}")
    log(f"FA2: {run.result['fa2']}")
    run.save()
    if "check" in args.sections:
        run_checks(run)
    if "prefill" in args.sections:
        dense = bl.DenseTimes(args.dense_max_length)
        for length in args.lengths:
            prefill_rows(run, dense, length)
    if "decode" in args.sections:
        for length in args.lengths:
            for batch in args.decode_batches:
                decode_rows(run, length, batch)
    run.save()
    print_table(run.rows)
    if args.smoke:
        check_smoke(run)
        log(f"smoke ok: {len(run.result['checks'])} checks, {len(run.rows)} rows in {run.path} "
            f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The accuracy suite: a sparse model beside its baselines, on the same samples.

Modes, all built from one loaded base model and its sparse checkpoints:
  full       dense attention in every head (the base model);
  rtpurbo    the checkpoint at eval.sparse, in whichever design it was converted;
  paper,     the converted model in each design (eval.paper, eval.indexer), for comparing the
  indexer    two designs on the same samples;
  topk       the rtpurbo checkpoint's indexer (design "indexer") with a fixed number of blocks
             per query block, matched at each length to rtpurbo's measured density there;
  streaming  with a paper-design checkpoint (eval.paper, or rtpurbo's own): every head on the
             same sinks + window (StreamingLLM, the floor); otherwise the indexer design's
             sparse heads on their sink and local blocks only (DuoAttention-style);
  oracle     the same checkpoint with blocks ranked by the true attention instead of the
             indexer: the ceiling for any indexer.

Per (task, length, mode) cell: exact-match accuracy of greedy answers over `samples` seeded
prompts; for the sparse modes the mode's selection density, and per query head the compute
density of the prefill and of the decode steps (attended / causal keys, over all query heads).
Per length and mode: the paired difference to `full` on the same samples with a bootstrap
interval. Per mode: perplexity on held-out text at the largest length (a forward pass: the
paper design's decode-time selection plays no part in it), and KV-cache bytes.

Seeds: `eval.seed` draws the test samples and text windows. Tune anything (top_p, the head
choice, the budget) on a separate validation seed (e.g. 2) and never on the test seed, or the
reported accuracy is no longer a held-out measurement.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from rtpurbo_jax import generate as gen
from rtpurbo_jax.api import SparseModel, check_arch, load, load_from_config
from rtpurbo_jax.cache import kv_cache_bytes
from rtpurbo_jax.checkpoint import CONFIG_FILE, SparseCheckpointError, load_sparse
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.convert import STAGES, TRAIN_SUMMARY, task_tokenizer
from rtpurbo_jax.export import ORIGIN_FILE
from rtpurbo_jax.tasks import TASKS, Sample, is_correct, make_samples
from rtpurbo_jax.text import text_tokens, text_windows

MODES = ("full", "rtpurbo", "topk", "paper", "indexer", "streaming", "oracle")
SPARSE_MODES = MODES[1:]
# What `python eval.py` runs with one checkpoint (eval.sparse) and no design checkpoints.
DEFAULT_MODES = ("full", "rtpurbo", "topk", "streaming", "oracle")
# Modes that are a converted model in one design (eval.<design> names its checkpoint).
DESIGN_MODES = ("paper", "indexer")
# The paired bootstrap of each mode's accuracy difference to full.
BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# How a context length becomes a prompt: the answer must fit in the length too.
LENGTH_RULE = "prompt_tokens = length - max_new_tokens"
# A padding row of a batch is one token long: it has exactly one causal key block, which every
# selection keeps (it is the local block), so its share of the prefill stats is known exactly and
# is taken out of the density. A copy of a real prompt would count that sample twice.
PAD_ROW_TOKENS = 1
# Greedy decoding never draws from the key; generate still takes one.
GREEDY = gen.SamplingConfig()
GREEDY_KEY_SEED = 0
# The held-out text windows get a random stream of their own, apart from the task samples'
# [seed, task, length] streams.
PERPLEXITY_STREAM = 1000
RESULTS_FILE = "results.json"
ACCURACY_PLOT = "accuracy.png"
DENSITY_PLOT = "density.png"
HEADS_PLOT = "heads.png"
# The training metadata of a results file, which the eval section can set.
TRAINING_KEYS = ("steps", "train_minutes", "stages")
HEAD_PROFILE = "heads.json"


def default_eval_config() -> ml_collections.ConfigDict:
    """The `eval` section of a config; every field can be set as --config.eval.<field>=..."""
    return ml_collections.ConfigDict(dict(
        sparse="",  # the sparse checkpoint directory; empty: <run_dir>/sparse
        paper="",  # the paper-design checkpoint of modes paper (and streaming, oracle)
        indexer="",  # the indexer-design checkpoint of mode indexer
        run_dir="",  # the training run (train_summary.json, heads.json); empty: as train.py
        heads_file="",  # a head profile JSON for the heatmap; empty: <run_dir>/heads.json
        out_dir="",  # empty: results/eval/<config name>
        tasks=TASKS,
        lengths=(2048, 4096, 8192),  # tokens, prompt + answer; at most the model's context
        samples=50,  # per (task, length) cell; every mode sees the same ones
        # The test seed. Tune on a separate validation seed (e.g. 2), never on this one.
        seed=1,
        modes=DEFAULT_MODES,  # add "paper" / "indexer" with eval.paper / eval.indexer
        batch_size=8,
        max_new_tokens=12,
        perplexity_windows=8,  # held-out text windows at the largest length; 0: no perplexity
        perplexity_batch_size=2,  # windows per forward pass (the logits are [batch, len, vocab])
        dtype="",  # empty: config.model.dtype
        backend="auto",  # "reference" | "pallas" | "mosaic" | "auto" (rtpurbo_jax/kernels.py)
        # Training metadata for the report; None: the model's own record (a stage-2 model's
        # rtpurbo.json, else <run_dir>/train_summary.json). Set them where the stages ran as
        # separate runs (stage 2 from another run's stage-1 checkpoint); `eval.py --merge`
        # applies them too.
        steps=ml_collections.FieldReference(None, field_type=int),
        train_minutes=ml_collections.FieldReference(None, field_type=float),
        stages=ml_collections.FieldReference(None, field_type=tuple),
    ))


def eval_section(config: Any) -> ml_collections.ConfigDict:
    """The config's `eval` section, or the defaults when the config has none."""
    section = config.get("eval")
    return default_eval_config() if section is None else section


def check_eval_config(ev: Any, max_context: int) -> None:
    """Raises ValueError naming the field for settings the suite cannot run.

    max_context: the model's max_position_embeddings.
    """
    modes = tuple(ev.modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown eval mode(s) {bad}; modes are {MODES}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"eval.modes lists a mode twice: {modes}")
    if "topk" in modes and "rtpurbo" not in modes:
        raise ValueError("eval mode 'topk' needs 'rtpurbo' too: its budget is matched to "
                         "rtpurbo's measured density")
    for name in DESIGN_MODES:
        if name in modes and not ev.get(name):
            raise ValueError(f"eval mode {name!r} needs its checkpoint: set "
                             f"--config.eval.{name}=<{name}-design checkpoint dir>")
    tasks = tuple(ev.tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown eval task(s) {bad}; tasks are {TASKS}")
    check_training_fields(ev)
    for field in ("samples", "batch_size", "max_new_tokens", "perplexity_batch_size"):
        if int(ev[field]) <= 0:
            raise ValueError(f"eval.{field} must be positive, got {ev[field]}")
    if int(ev.perplexity_windows) < 0:
        raise ValueError(f"eval.perplexity_windows must be >= 0, got {ev.perplexity_windows}")
    lengths = tuple(ev.lengths)
    if not lengths or len(set(lengths)) != len(lengths):
        raise ValueError(f"eval.lengths must be distinct context lengths, got {lengths}")
    for length in lengths:
        if length > max_context:
            raise ValueError(f"eval length {length} is beyond the model's context "
                             f"({max_context} tokens)")
        if length <= ev.max_new_tokens:
            raise ValueError(f"eval length {length} leaves no room for a prompt before "
                             f"{ev.max_new_tokens} new tokens")


def check_training_fields(ev: Any) -> None:
    """Raises ValueError for training metadata (eval.steps / train_minutes / stages) that no
    run could have."""
    if ev.stages is not None and (not ev.stages or [s for s in STAGES if s in ev.stages]
                                  != list(ev.stages)):
        raise ValueError(f"eval.stages must list stages of {STAGES}, each once and in that "
                         f"order, got {tuple(ev.stages)}")
    for field in ("steps", "train_minutes"):
        if ev[field] is not None and ev[field] < 0:
            raise ValueError(f"eval.{field} must be >= 0, got {ev[field]}")


def training_metadata(recorded: dict[str, Any], ev: Any) -> dict[str, Any]:
    """{"steps", "train_minutes", "stages"}: the eval section's value where set, else the
    recorded one."""
    return {key: recorded.get(key) if ev[key] is None else
            list(ev[key]) if key == "stages" else ev[key] for key in TRAINING_KEYS}


def prompt_tokens(length: int, max_new_tokens: int) -> int:
    """The prompt length of a context length (see LENGTH_RULE)."""
    return length - max_new_tokens


def candidate_blocks(prompt_len: int, block_q: int, block_k: int) -> np.ndarray:
    """Candidate key blocks of each query block of a causal prompt: those up to the block
    holding the query block's last token. [num_q_blocks] int."""
    num_q_blocks = -(-prompt_len // block_q)
    last = np.minimum(np.arange(1, num_q_blocks + 1) * block_q, prompt_len) - 1
    return last // block_k + 1


def mean_candidate_blocks(prompt_len: int, block_q: int, block_k: int) -> float:
    """Mean over the query blocks of a causal prompt of its candidate key blocks."""
    return float(np.mean(candidate_blocks(prompt_len, block_q, block_k)))


def topk_budget(density: float | None, prompt_len: int, sparse: SparseConfig) -> int:
    """The fewest blocks per query block whose top-k density on this prompt length reaches
    rtpurbo's: early query blocks have fewer candidates than k and keep them all, so the
    density of a budget k is sum(min(k, candidates)) / sum(candidates). At least the forced
    sink and local blocks (and those alone when there is no density: no sparse heads)."""
    forced = sparse.sink_blocks + sparse.local_blocks
    if density is None:
        return forced
    candidates = candidate_blocks(prompt_len, sparse.block_q, sparse.block_k)
    for k in range(forced, int(candidates.max()) + 1):
        if np.minimum(k, candidates).sum() >= density * candidates.sum():
            return k
    return int(candidates.max())


def mode_sparse(mode: str, sparse: SparseConfig, top_k_blocks: int | None = None
                ) -> SparseConfig | None:
    """The SparseConfig of a mode (None: dense), derived from one checkpoint's own."""
    if mode == "full":
        return None
    if mode in ("rtpurbo", *DESIGN_MODES):
        return sparse
    if mode == "topk":
        if top_k_blocks is None:
            raise ValueError("mode 'topk' needs its block budget")
        if sparse.design != "indexer":
            raise ValueError("mode 'topk' needs an indexer-design checkpoint at eval.sparse")
        return sparse.replace(selection="top_k", top_k_blocks=top_k_blocks)
    if mode == "streaming":
        if sparse.design == "paper":  # every head local: sinks + the same window
            mask = tuple((False,) * len(row) for row in sparse.retrieval_mask)
            return sparse.replace(retrieval_mask=mask)
        return sparse.replace(scorer="none")
    if mode == "oracle":
        return sparse.replace(scorer="oracle")
    raise ValueError(f"unknown eval mode {mode!r}; modes are {MODES}")


Checkpoint = tuple[SparseConfig, Any]  # (SparseConfig, indexer params)


def mode_model(mode: str, model: SparseModel, designs: dict[str, Checkpoint],
               top_k_blocks: int | None = None, full_model: SparseModel | None = None
               ) -> SparseModel:
    """The model of a mode: `model` carries the rtpurbo checkpoint, `designs` the checkpoints of
    the design modes; streaming and oracle derive from the paper-design checkpoint when there
    is one. Mode full runs full_model (the original weights, when `model` is a stage-2 model
    with weights of its own), else `model`'s weights, dense."""
    if mode == "full" and full_model is not None:
        return full_model.with_sparse(None)
    if mode in DESIGN_MODES:
        if mode not in designs:
            raise ValueError(f"eval mode {mode!r} needs a {mode}-design checkpoint: set "
                             f"--config.eval.{mode}=<checkpoint dir>")
        sparse, indexer = designs[mode]
        return model.with_sparse(sparse, indexer)
    sparse, indexer = model.sparse, model.indexer
    if mode in ("streaming", "oracle") and "paper" in designs:
        sparse, indexer = designs["paper"]
    return model.with_sparse(mode_sparse(mode, sparse, top_k_blocks), indexer)


def compute_density(stats: np.ndarray, sparse: SparseConfig | None) -> float | None:
    """Attended / causal keys per query head over all heads, from a mode's stats [2]: the paper
    design counts tokens over all heads already; the indexer design counts its sparse heads'
    blocks, and its retrieval heads attend everything."""
    d = density(stats)
    if sparse is None or sparse.design == "paper" or d is None:
        return d if sparse is not None else 1.0
    f = sparse.query_head_fraction
    return f + (1.0 - f) * d


def paired_difference(full: np.ndarray, other: np.ndarray, *,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean of other - full over the same samples (0/1 hits [n] each), with a percentile
    bootstrap interval resampling samples (pairs stay together)."""
    diffs = np.asarray(other, np.float64) - np.asarray(full, np.float64)
    if diffs.ndim != 1 or not len(diffs):
        raise ValueError("paired_difference needs two equal-length 1-D hit arrays")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(diffs.mean()), "ci_low": float(low), "ci_high": float(high)}


def density(stats: np.ndarray) -> float | None:
    """selected / candidate blocks of stats [2]; None when there were no sparse heads."""
    return float(stats[0] / stats[1]) if stats[1] > 0 else None


def pad_row_stats(sparse: SparseConfig | None) -> np.ndarray:
    """[selected, candidate] one padding row adds to the prefill stats: its single block, once
    for every sparse KV group of every layer (design "indexer"), or its single key, once for
    every query head of every layer (design "paper")."""
    if sparse is None:
        return np.zeros(2)
    if sparse.design == "paper":
        return np.full(2, float(sparse.num_layers * len(sparse.retrieval_mask[0])))
    groups = sum(len(sparse.sparse_groups(layer)) for layer in range(sparse.num_layers))
    return np.full(2, float(groups))


def batch_prompts(prompts: Sequence[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-length prompts (at most batch_size) -> (tokens [batch_size, len], lengths
    [batch_size]), filled up with PAD_ROW_TOKENS-long padding rows so every batch of a length
    has one shape."""
    rows = np.stack(prompts).astype(np.int32)
    n, width = rows.shape
    if n > batch_size:
        raise ValueError(f"{n} prompts do not fit a batch of {batch_size}")
    tokens = np.concatenate([rows, np.repeat(rows[:1], batch_size - n, axis=0)])
    lengths = np.array([width] * n + [PAD_ROW_TOKENS] * (batch_size - n), np.int32)
    return tokens, lengths


def completion_text(new_tokens: np.ndarray, tokenizer: Any, eos_ids: Sequence[int]) -> str:
    """new_tokens [max_new_tokens] -> the text before the first end-of-sequence token."""
    ids = [int(t) for t in new_tokens]
    stop = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
    return tokenizer.decode(ids[:stop], skip_special_tokens=True)


def generate_batch(model: SparseModel, tokens: np.ndarray, lengths: np.ndarray,
                   max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy new tokens [batch, max_new_tokens] and the selection stats [2, 2] of the prefill
    (row 0) and the decode steps (row 1)."""
    eos = model.config.eos_token_ids
    out, stats = gen.generate(
        model.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(GREEDY_KEY_SEED),
        config=model.config, max_new_tokens=max_new_tokens, sampling=GREEDY, eos_ids=eos,
        pad_id=eos[0] if eos else 0, backend=model.backend, sparse=model.sparse,
        indexer=model.indexer)
    return np.asarray(out), np.asarray(stats, np.float64)


@dataclasses.dataclass(frozen=True)
class CellResult:
    """correct of n samples (hits [n]: each sample's 0/1); stats [2]: the real rows' summed
    prefill [selected, candidate]; decode_stats [2]: the decode steps' (padding rows included:
    choose a batch size that divides the samples to leave none)."""

    correct: int
    n: int
    stats: np.ndarray
    hits: np.ndarray
    decode_stats: np.ndarray


def run_cell(model: SparseModel, samples: Sequence[Sample], tokenizer: Any, batch_size: int,
             max_new_tokens: int, on_samples: Callable[[int], Any] | None = None) -> CellResult:
    """Greedy answers to equal-length samples, batched; on_samples(n) after each batch."""
    hits, stats, decode_stats = [], np.zeros(2), np.zeros(2)
    pad_stats = pad_row_stats(model.sparse)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        tokens, lengths = batch_prompts([s.prompt for s in chunk], batch_size)
        new, batch_stats = generate_batch(model, tokens, lengths, max_new_tokens)
        hits += [is_correct(completion_text(row, tokenizer, model.config.eos_token_ids), s.answer)
                 for row, s in zip(new[:len(chunk)], chunk, strict=True)]
        stats += batch_stats[0] - (batch_size - len(chunk)) * pad_stats
        decode_stats += batch_stats[1]
        if on_samples is not None:
            on_samples(len(chunk))
    hit_array = np.asarray(hits, bool)
    return CellResult(int(hit_array.sum()), len(samples), stats, hit_array, decode_stats)


def _window_nll(params: Any, tokens: jax.Array, config: ModelConfig, backend: str,
                sparse: SparseConfig | None, indexer: Any) -> jax.Array:
    """Summed next-token NLL of each full window: tokens [batch, len] -> [batch] (float32)."""
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    logits, _ = gen.forward(params, tokens, lengths, config, backend, sparse, indexer)
    logits = logits[:, :-1].astype(jnp.float32)
    # logsumexp - target logit: the same NLL as log_softmax without a second [b, len, vocab].
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - target, axis=-1)


_window_nll_jit = jax.jit(_window_nll, static_argnames=("config", "backend", "sparse"))


def perplexity(model: SparseModel, windows: np.ndarray, batch_size: int) -> dict[str, float]:
    """Perplexity of windows [n, len] of text: {"ppl", "nll" (mean per token), "tokens"}."""
    n, length = windows.shape
    total = 0.0
    for start in range(0, n, batch_size):
        chunk = windows[start:start + batch_size]
        # Padding copies keep one compiled shape; rows are independent and theirs are dropped.
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
        nll = _window_nll_jit(model.params, jnp.asarray(padded), model.config, model.backend,
                              model.sparse, model.indexer)
        total += float(np.sum(np.asarray(nll, np.float64)[:len(chunk)]))
    tokens = n * (length - 1)
    mean = total / tokens
    return {"ppl": float(np.exp(mean)), "nll": mean, "tokens": tokens}


def build_samples(tasks: Sequence[str], lengths: Sequence[int], ev: Any, tokenizer: Any
                  ) -> dict[tuple[str, int], list[Sample]]:
    """Every cell's samples, made before any model runs so a length too short for a task fails
    at once."""
    out = {}
    for length in lengths:
        prompt_len = prompt_tokens(length, ev.max_new_tokens)
        for task in tasks:
            try:
                out[task, length] = make_samples(task, prompt_len, ev.samples, tokenizer, ev.seed)
            except ValueError as err:
                raise ValueError(f"eval length {length} ({LENGTH_RULE} = {prompt_len}): "
                                 f"{err}") from err
    return out


def run_suite(model: SparseModel, tokenizer: Any, ev: Any, progress: bool = False,
              designs: dict[str, Checkpoint] | None = None,
              full_model: SparseModel | None = None) -> dict[str, Any]:
    """Accuracy, density and perplexity of every mode; `model` carries the sparse checkpoint of
    mode rtpurbo, `designs` those of the modes paper and indexer, full_model (if not None) the
    original weights of mode full (see `mode_model`).

    Loop order is length, mode, task: one compiled generate program per (length, mode) serves
    every task, since all prompts of a length have one shape. Returns {"cells", "density",
    "paired", "kv_bytes", "topk_budget", "perplexity"} as in the results JSON.
    """
    designs = designs or {}
    if model.sparse is None:
        raise ValueError("the suite needs a sparse model (a sparse checkpoint attached)")
    check_eval_config(ev, model.config.max_position_embeddings)
    sparse = model.sparse
    tasks, lengths = tuple(ev.tasks), sorted(ev.lengths)
    modes = [m for m in MODES if m in ev.modes]  # rtpurbo before topk: its density sets k
    samples = build_samples(tasks, lengths, ev, tokenizer)
    cells: list[dict[str, Any]] = []
    densities: list[dict[str, Any]] = []
    budgets: dict[int, dict[str, Any]] = {}
    hits: dict[tuple[int, str], np.ndarray] = {}
    kv_bytes: list[dict[str, Any]] = []
    total = len(lengths) * len(modes) * len(tasks) * ev.samples
    with tqdm(total=total, desc="eval", unit="sample", disable=not progress) as bar:
        for length in lengths:
            prompt_len = prompt_tokens(length, ev.max_new_tokens)
            for mode in modes:
                k = None
                if mode == "topk":
                    rtpurbo = next(d["density"] for d in densities
                                   if d["length"] == length and d["mode"] == "rtpurbo")
                    k = topk_budget(rtpurbo, prompt_len, sparse)
                    budgets[length] = {
                        "length": length, "prompt_tokens": prompt_len, "rtpurbo_density": rtpurbo,
                        "mean_candidate_blocks": mean_candidate_blocks(
                            prompt_len, sparse.block_q, sparse.block_k),
                        "top_k_blocks": k}
                run_model = mode_model(mode, model, designs, k, full_model)
                stats, decode_stats, mode_hits = np.zeros(2), np.zeros(2), []
                for task in tasks:
                    bar.set_postfix_str(f"{length} tokens, {mode}, {task}")
                    cell = run_cell(run_model, samples[task, length], tokenizer, ev.batch_size,
                                    ev.max_new_tokens, bar.update)
                    stats += cell.stats
                    decode_stats += cell.decode_stats
                    mode_hits.append(cell.hits)
                    cells.append({"task": task, "length": length, "mode": mode,
                                  "accuracy": cell.correct / cell.n, "n": cell.n,
                                  "density": None if mode == "full" else density(cell.stats),
                                  "compute_density": compute_density(cell.stats,
                                                                     run_model.sparse)})
                hits[length, mode] = np.concatenate(mode_hits)
                kv_bytes.append({"length": length, "mode": mode, **kv_cache_bytes(
                    model.config, run_model.sparse, 1, length, model.params["embed"].dtype)})
                if mode != "full":
                    densities.append({
                        "length": length, "mode": mode, "density": density(stats),
                        "compute_density": compute_density(stats, run_model.sparse),
                        "decode_density": compute_density(decode_stats, run_model.sparse)})
    for budget in budgets.values():
        budget["topk_density"] = next(d["density"] for d in densities
                                      if d["length"] == budget["length"] and d["mode"] == "topk")
    paired = [{"length": length, "mode": mode,
               **paired_difference(hits[length, "full"], hits[length, mode])}
              for length in lengths for mode in modes if mode != "full" and "full" in modes]
    return {"cells": cells, "density": densities, "paired": paired, "kv_bytes": kv_bytes,
            "topk_budget": list(budgets.values()),
            "perplexity": run_perplexity(model, tokenizer, ev, modes, budgets, progress,
                                         designs, full_model)}


def run_perplexity(model: SparseModel, tokenizer: Any, ev: Any, modes: Sequence[str],
                   budgets: dict[int, dict[str, Any]], progress: bool = False,
                   designs: dict[str, Checkpoint] | None = None,
                   full_model: SparseModel | None = None) -> list[dict[str, Any]]:
    """Per mode, perplexity on eval.perplexity_windows held-out windows of the largest length
    (topk with that length's budget)."""
    if ev.perplexity_windows == 0:
        return []
    length = max(ev.lengths)
    rng = np.random.default_rng([ev.seed, PERPLEXITY_STREAM])
    windows = text_windows(text_tokens(tokenizer, "heldout"), length, ev.perplexity_windows, rng)
    out = []
    for mode in tqdm(modes, desc="perplexity", unit="mode", disable=not progress):
        k = budgets[length]["top_k_blocks"] if mode == "topk" else None
        result = perplexity(mode_model(mode, model, designs or {}, k, full_model), windows,
                            ev.perplexity_batch_size)
        out.append({"mode": mode, "length": length, "windows": ev.perplexity_windows, **result})
    return out


def load_eval_model(model_config: Any, sparse_path: str | os.PathLike[str], *,
                    backend: str = "auto") -> SparseModel:
    """The model a config's `model` section describes, with a sparse checkpoint attached; or,
    when sparse_path is a stage-2 model directory (train.py's <run>/model), that model.

    A checkpoint made for other base weights is refused (by `api.load`); random weights
    (source "random") have no fingerprint, so only a checkpoint made on random weights fits.
    """
    path = Path(sparse_path)
    if not (path / CONFIG_FILE).exists():
        raise SparseCheckpointError(
            f"no sparse checkpoint at {path} (no {CONFIG_FILE}): train one with train.py, or "
            "point --config.eval.sparse (or --config.eval.run_dir) at one")
    if (path / ORIGIN_FILE).exists():  # a stage-2 model: its own weights, sparse attached
        model = load(path, dtype=jnp.dtype(model_config.dtype), backend=backend)
        check_arch(ModelConfig.from_hf(dict(model_config.arch)), model.config)
        return model
    if model_config.source != "random":
        model = load(model_config.source, sparse=path, dtype=jnp.dtype(model_config.dtype),
                     backend=backend)
        check_arch(ModelConfig.from_hf(dict(model_config.arch)), model.config)
        return model
    model = load_from_config(model_config, backend=backend)
    sparse, indexer, base = load_sparse(path)
    if base["fingerprint"] != model.fingerprint:
        raise SparseCheckpointError(f"sparse checkpoint {path} was made for base model "
                                    f"{base['name']!r}, not for random weights")
    return model.with_sparse(sparse, indexer)


def load_original(model_config: Any, model: SparseModel, *, backend: str = "auto"
                  ) -> SparseModel | None:
    """The original weights for mode full when `model` is a stage-2 model (its weights
    fine-tuned; its origin records the base), else None (mode full runs model's own weights).
    Refuses a base that is not the stage-2 model's origin."""
    origin = model.origin
    if not origin:
        return None
    original = load_from_config(model_config, backend=backend)
    base = origin["base"]
    if original.fingerprint != base["fingerprint"]:
        raise SparseCheckpointError(
            f"the stage-2 model was fine-tuned from {base['name']!r} (fingerprint "
            f"{base['fingerprint'][:12]}), but config.model.source loads {original.config.name!r} "
            f"(fingerprint {original.fingerprint[:12]}): point it at the original")
    return original


def load_designs(model: SparseModel, ev: Any) -> dict[str, Checkpoint]:
    """The checkpoints named by eval.paper and eval.indexer, each checked to be of that design
    and made for the loaded base weights."""
    designs = {}
    for name in DESIGN_MODES:
        if not ev.get(name):
            continue
        sparse, indexer, base = load_sparse(ev[name])
        if sparse.design != name:
            raise SparseCheckpointError(f"eval.{name} = {ev[name]} is a {sparse.design}-design "
                                        f"checkpoint, not a {name}-design one")
        if base["fingerprint"] != model.fingerprint:
            raise SparseCheckpointError(f"eval.{name} = {ev[name]} was made for base model "
                                        f"{base['name']!r}, not for {model.config.name!r}")
        designs[name] = (sparse, indexer)
    return designs


def device_name() -> str:
    """The first device's kind (e.g. "NVIDIA H100 80GB HBM3"), else its platform."""
    device = jax.devices()[0]
    return getattr(device, "device_kind", None) or device.platform


def git_commit(repo: Path) -> str:
    """$COMMIT when set (a copy of the tree without git), else HEAD of the git checkout at
    repo, else "unknown" (an installed package)."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def train_metadata(run_dir: Path, ev: Any) -> dict[str, Any]:
    """{"steps", "train_minutes", "stages"}: the config's values, else the run's
    train_summary.json (steps: of both stages), else None."""
    summary_file = run_dir / TRAIN_SUMMARY
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    stages = summary.get("stages", ["indexer"] if summary else None)
    steps = summary.get("steps", 0) if "indexer" in (stages or ()) else 0
    if "distill" in (stages or ()):
        steps += summary["distill"]["steps"]
    return training_metadata({"steps": steps if summary else None, "stages": stages,
                              "train_minutes": summary.get("train_minutes")}, ev)


def origin_metadata(origin: dict[str, Any], ev: Any) -> dict[str, Any]:
    """{"steps", "train_minutes", "stages"} of a stage-2 model, from its rtpurbo.json (steps
    and minutes of both stages; the config's values win)."""
    minutes = origin.get("minutes") or {}
    return training_metadata({"steps": sum(origin.get("steps", {}).values()),
                              "train_minutes": sum(minutes.values()) if minutes else None,
                              "stages": origin.get("stages")}, ev)


@dataclasses.dataclass(frozen=True)
class EvalPaths:
    """The training run, the sparse checkpoint, the head profile and the output directory."""

    run_dir: Path
    sparse: Path
    heads: Path
    out_dir: Path


def resolve_paths(config: Any, ev: Any) -> EvalPaths:
    """Where the inputs are and where the outputs go; empty fields take their defaults."""
    run_dir = Path(ev.run_dir or config.get("run_dir") or os.path.join("runs", config.name))
    return EvalPaths(
        run_dir=run_dir,
        sparse=Path(ev.sparse) if ev.sparse else run_dir / "sparse",
        heads=Path(ev.heads_file) if ev.heads_file else run_dir / HEAD_PROFILE,
        out_dir=Path(ev.out_dir or os.path.join("results", "eval", config.name)),
    )


def evaluate(config: Any, progress: bool = True) -> tuple[dict[str, Any], dict[str, Path]]:
    """Runs the suite a config describes and writes its outputs.

    Returns (the results dict, as written to results.json; {output name: path written}).
    """
    ev = eval_section(config)
    arch = ModelConfig.from_hf(dict(config.model.arch))
    check_eval_config(ev, arch.max_position_embeddings)  # before the model loads
    paths = resolve_paths(config, ev)
    model_config = config.model.copy_and_resolve_references()
    model_config.dtype = ev.dtype or config.model.dtype
    model = load_eval_model(model_config, paths.sparse, backend=ev.backend)
    full_model = load_original(model_config, model, backend=ev.backend)
    designs = load_designs(model, ev)
    tokenizer = task_tokenizer(model)
    suite = run_suite(model, tokenizer, ev, progress, designs, full_model)
    results = {
        "model": model.config.name or config.name,
        "config": config.name,
        "device": device_name(),
        "commit": git_commit(Path(__file__).resolve().parents[1]),
        **(origin_metadata(model.origin, ev) if model.origin else
           train_metadata(paths.run_dir, ev)),
        "retrieval_fraction": model.sparse.retrieval_fraction,
        "sparse_checkpoint": str(paths.sparse),
        "sparse_config": json.loads(model.sparse.to_json()),
        "designs": {name: {"checkpoint": str(ev[name]), "sparse_config": json.loads(
            sparse.to_json()), "query_head_fraction": sparse.query_head_fraction,
            "kv_group_fraction": sparse.kv_group_fraction}
            for name, (sparse, _) in designs.items()},
        "settings": {"tasks": list(ev.tasks), "lengths": sorted(ev.lengths),
                     "modes": [m for m in MODES if m in ev.modes], "samples": ev.samples,
                     "seed": ev.seed, "batch_size": ev.batch_size,
                     "max_new_tokens": ev.max_new_tokens, "length_rule": LENGTH_RULE,
                     "dtype": model_config.dtype, "backend": model.backend,
                     "decoding": "greedy", "scoring": "exact match of the first answer word"},
        **suite,
        "head_profile": str(paths.heads) if paths.heads.exists() else None,
    }
    return results, write_outputs(results, paths.out_dir, paths.heads)


# Per-length result lists that merging concatenates; everything else must agree across runs.
PER_LENGTH_KEYS = ("cells", "density", "paired", "kv_bytes", "topk_budget", "perplexity")
# Run metadata that may differ between runs of one evaluation (recorded per run when merged).
PER_RUN_KEYS = ("commit", "head_profile")


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from runs of the same evaluation over disjoint lengths (e.g. one call
    per length on a time-limited machine): the per-length lists concatenated, the lengths
    united. Refuses runs whose settings (other than lengths) or checkpoints differ, or that
    share a length."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    lengths: list[int] = []
    for part in parts:
        for key in first:
            if key in (*PER_LENGTH_KEYS, *PER_RUN_KEYS, "settings"):
                continue
            if part.get(key) != first[key]:
                raise ValueError(f"runs differ in {key!r}: not one evaluation")
        settings = {k: v for k, v in part["settings"].items() if k != "lengths"}
        if settings != {k: v for k, v in first["settings"].items() if k != "lengths"}:
            raise ValueError("runs differ in their settings (other than lengths)")
        if set(part["settings"]["lengths"]) & set(lengths):
            raise ValueError(f"runs share a length: {part['settings']['lengths']}")
        lengths += part["settings"]["lengths"]
    merged = {**first, "settings": {**first["settings"], "lengths": sorted(lengths)}}
    for key in PER_LENGTH_KEYS:
        merged[key] = [row for part in parts for row in part.get(key, [])]
    for key in PER_RUN_KEYS:
        merged[key] = [part.get(key) for part in parts] if len(
            {str(part.get(key)) for part in parts}) > 1 else first.get(key)
    return merged


def write_outputs(results: dict[str, Any], out_dir: Path, heads_file: Path) -> dict[str, Path]:
    """results.json, the accuracy and density plots, and the head heatmap when heads_file (a
    profile written by heads.save_profile) exists. Returns {name: path} of what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / RESULTS_FILE, "accuracy": out_dir / ACCURACY_PLOT,
               "density": out_dir / DENSITY_PLOT}
    written["json"].write_text(json.dumps(results, indent=1))
    plot_accuracy(results, written["accuracy"])
    plot_density(results, written["density"])
    if heads_file.exists():
        written["heads"] = out_dir / HEADS_PLOT
        plot_head_profile(heads_file, written["heads"])
    return written


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mode_style(mode: str) -> dict[str, Any]:
    """One color and marker per mode in every plot; markers shrink down the list so lines that
    coincide (equal accuracies) stay visible."""
    i = MODES.index(mode)
    return {"color": f"C{i}", "marker": "osD^vP*"[i], "markersize": 9 - i, "label": mode}


def _length_axis(ax: Any, lengths: Sequence[int]) -> None:
    # Lengths double from one point to the next: a log2 axis spaces them evenly.
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")


def mean_accuracy(cells: Sequence[dict[str, Any]], length: int, mode: str) -> float:
    """Accuracy over every task's samples at (length, mode)."""
    chosen = [c for c in cells if c["length"] == length and c["mode"] == mode]
    return sum(c["accuracy"] * c["n"] for c in chosen) / sum(c["n"] for c in chosen)


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    """One panel per task and one over all tasks: accuracy vs length, a line per mode."""
    plt = pyplot()
    cells, settings = results["cells"], results["settings"]
    lengths, modes, tasks = settings["lengths"], settings["modes"], settings["tasks"]
    panels = [*tasks, "all tasks"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharey=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for mode in modes:
            if panel == "all tasks":
                ys = [mean_accuracy(cells, n, mode) for n in lengths]
            else:
                ys = [next(c["accuracy"] for c in cells if c["task"] == panel
                           and c["length"] == n and c["mode"] == mode) for n in lengths]
            ax.plot(lengths, ys, **_mode_style(mode))
        _length_axis(ax, lengths)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(panel, fontsize=10)
    axes[0][0].set_ylabel("exact-match accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: accuracy (n={settings['samples']} per point)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_density(results: dict[str, Any], path: Path) -> None:
    """Density of each sparse mode vs length (over all tasks)."""
    plt = pyplot()
    lengths = results["settings"]["lengths"]
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for mode in (m for m in results["settings"]["modes"] if m != "full"):
        points = [(d["length"], d["density"]) for d in results["density"]
                  if d["mode"] == mode and d["density"] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), **_mode_style(mode))
    _length_axis(ax, lengths)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("density (attended / causal key blocks)")
    ax.set_title(f"{results['model']}: sparse-head density in the prefill "
                 f"(retrieval heads {results['retrieval_fraction']:.0%})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_head_profile(profile_file: Path, path: Path) -> None:
    """The retrieval-score heatmap of a head profile JSON ("score", "retrieval_mask")."""
    from rtpurbo_jax.heads import plot_heatmap

    profile = json.loads(profile_file.read_text())
    missing = [k for k in ("score", "retrieval_mask") if k not in profile]
    if missing:
        raise ValueError(f"head profile {profile_file} lacks {missing}")
    name = profile.get("model", "model")
    plot_heatmap(np.asarray(profile["score"], np.float64), profile["retrieval_mask"], path,
                 title=f"{name}: retrieval score (needle attention mass)")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_report(results: dict[str, Any]) -> str:
    """Markdown tables: accuracy per (task, length) and mode, density and the top-k budget per
    length, perplexity per mode."""
    settings = results["settings"]
    modes, lengths, cells = settings["modes"], settings["lengths"], results["cells"]
    lines = [
        f"**{results['model']}** — retrieval heads {results['retrieval_fraction']:.1%}, "
        f"{settings['samples']} samples per cell, seed {settings['seed']}, "
        f"{results['device']}, commit {results['commit'][:12]}",
        "",
        "Accuracy (exact match, greedy):",
        "",
        "| task | length | " + " | ".join(modes) + " |",
        "|---|---:|" + "---:|" * len(modes),
    ]
    for task in settings["tasks"]:
        for length in lengths:
            row = [next(c["accuracy"] for c in cells if c["task"] == task
                        and c["length"] == length and c["mode"] == m) for m in modes]
            lines.append(f"| {task} | {length} | " + " | ".join(_fmt(a) for a in row) + " |")
    for length in lengths:
        row = [mean_accuracy(cells, length, m) for m in modes]
        lines.append(f"| **all** | {length} | " + " | ".join(_fmt(a) for a in row) + " |")
    sparse_modes = [m for m in modes if m != "full"]
    if sparse_modes:
        budgets = {b["length"]: b["top_k_blocks"] for b in results["topk_budget"]}
        lines += ["", "Density (fraction of causal key blocks the sparse heads attend, prefill):",
                  "", "| length | " + " | ".join(sparse_modes) + " | top-k blocks |",
                  "|---:|" + "---:|" * (len(sparse_modes) + 1)]
        for length in lengths:
            row = [next(d["density"] for d in results["density"]
                        if d["length"] == length and d["mode"] == m) for m in sparse_modes]
            lines.append(f"| {length} | " + " | ".join(_fmt(d) for d in row)
                         + f" | {budgets.get(length, '-')} |")
    if results.get("paired"):
        lines += ["", "Difference to full (same samples, all tasks) [95% paired bootstrap "
                  "interval]:", "", "| length | " + " | ".join(
                      m for m in modes if m != "full") + " |",
                  "|---:|" + "---:|" * (len(modes) - 1)]
        for length in lengths:
            row = [next((p for p in results["paired"] if p["length"] == length
                         and p["mode"] == m), None) for m in modes if m != "full"]
            lines.append(f"| {length} | " + " | ".join(
                "-" if p is None else f"{p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"
                for p in row) + " |")
    if sparse_modes and all("compute_density" in d for d in results["density"]):
        lines += ["", "Compute density per query head, prefill / decode (attended / causal "
                  "keys, all heads):", "", "| length | " + " | ".join(sparse_modes) + " |",
                  "|---:|" + "---:|" * len(sparse_modes)]
        for length in lengths:
            row = [next(d for d in results["density"] if d["length"] == length
                        and d["mode"] == m) for m in sparse_modes]
            lines.append(f"| {length} | " + " | ".join(
                f"{_fmt(d['compute_density'])} / {_fmt(d['decode_density'])}" for d in row) + " |")
    if results.get("kv_bytes"):
        lines += ["", "KV cache of one row, MiB (with indexer keys):", "",
                  "| length | " + " | ".join(modes) + " |", "|---:|" + "---:|" * len(modes)]
        for length in lengths:
            row = [next(k["total"] for k in results["kv_bytes"] if k["length"] == length
                        and k["mode"] == m) for m in modes]
            lines.append(f"| {length} | " + " | ".join(f"{b / 2**20:.1f}" for b in row) + " |")
    if results["perplexity"]:
        # Merged runs hold one perplexity per length: a row per (length, mode).
        first = results["perplexity"][0]
        lines += ["", f"Perplexity on held-out text (windows of the given length, "
                  f"n = {first['windows']}):", "", "| length | mode | ppl |", "|---:|---|---:|"]
        lines += [f"| {p['length']} | {p['mode']} | {p['ppl']:.3f} |"
                  for p in results["perplexity"]]
    return "\n".join(lines)

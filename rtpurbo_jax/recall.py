"""Which indexer should the paper design's retrieval heads use in decode, and at which rank?

Two layouts compete, each at several ranks:
  ("paper", r): one pre-RoPE indexer per retrieval query head (the paper's Eq. 4);
  ("group", r): one post-RoPE indexer per KV group (our first design), on exactly the groups
                that hold a retrieval head; the group's selection serves each of its heads.
Every variant is initialised from the model's own queries (`convert.initial_indexer`) and
trained as the paper's stage 1 (token-level forward KL to the whole attention distribution),
all variants in one jitted step over one shared frozen forward, each with its own optimiser.

Then, on held-out text, decode-style: at query positions in the second half of each window,
each query token selects for itself among the key blocks it can see. For each retrieval query
head h and top-p p: T = the top-p block set of h's true (post-RoPE) attention summed per block,
I = the top-p block set of the indexer's block distribution (softmax of the per-block
logsumexp of its token scores); recall = |T & I| / |T|, densities = |T| and |I| over the
candidate blocks. Pure top-p: no forced blocks.

    python -m rtpurbo_jax.recall --config=configs/smollm2_135m_paper.py \
        --mask=runs/smollm2_135m_paper/heads.json --steps=200 --ranks=8,16,32 --length=8192 \
        --windows=4 --query-positions=256 --out=results/profile/indexer_recall

writes <out>.json (settings, per-variant losses, the rows) and <out>.png, and prints a Markdown
table. Without an accelerator, lengths over CPU_MAX_LENGTH need --allow_cpu.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pallas_kernels.indexer_topp import block_logits_reference
from rtpurbo_jax.api import SparseModel
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.convert import CALIBRATION_STREAM, initial_indexer, read_mask
from rtpurbo_jax.heads import kv_retrieval_mask
from rtpurbo_jax.indexer import indexer_keys, indexer_queries
from rtpurbo_jax.model import head_keys
from rtpurbo_jax.teacher import attention_probs, collect_qk, top_p_mask
from rtpurbo_jax.training import layer_loss_inputs, make_optimizer, states_distillation_loss

# Variant kinds: the paper's per-head pre-RoPE indexer, our per-group post-RoPE one.
KINDS = ("paper", "group")
DESIGN_OF_KIND = {"paper": "paper", "group": "indexer"}
# The decode top-p values the question asks about.
TOP_PS = (0.5, 0.7, 0.8, 0.9, 0.95)
# The paper's stage 1: token-level forward KL to the whole attention distribution.
STAGE1_LEVEL = "token"
STAGE1_TEACHER_TOP_P = 1.0
# Query positions scored at once: memory stays [batch, heads, QUERY_CHUNK, seq] per layer.
QUERY_CHUNK = 64
# Without an accelerator the cost (quadratic in the length, for every step and variant) makes
# longer windows take hours; --allow_cpu overrides.
CPU_MAX_LENGTH = 1024
# Separates the held-out windows' random stream from the calibration and training streams.
HELDOUT_STREAM = 13
# The reported final loss also as the mean of the last tenth of the steps: one batch's loss
# swings with what it holds (a task prompt or plain text).
FINAL_LOSS_FRACTION = 0.1
# Metric axes of the per-query statistics (the order of `block_set_metrics`).
METRICS = ("recall", "teacher_density", "indexer_density")

Variant = tuple[SparseConfig, dict[str, Any]]  # (its SparseConfig, its indexer params)


# ---------------------------------------------------------------------------- variants


def variant_name(kind: str, rank: int) -> str:
    """The key of a variant in dicts and files, e.g. "paper_r16"."""
    return f"{kind}_r{rank}"


def group_mask(heads_mask: Sequence[Sequence[bool]], group_size: int
               ) -> tuple[tuple[bool, ...], ...]:
    """The design-"indexer" mask [layers][kv_heads] whose SPARSE (indexed) groups are exactly the
    KV groups holding a retrieval head of heads_mask [layers][query heads]: True (dense, no
    indexer) for the groups without one."""
    with_retrieval = kv_retrieval_mask(heads_mask, group_size)
    return tuple(tuple(not x for x in row) for row in with_retrieval)


def variant_config(kind: str, heads_mask: Sequence[Sequence[bool]], rank: int,
                   model: ModelConfig, sparse_fields: dict[str, Any]) -> SparseConfig:
    """The SparseConfig of variant (kind, rank); sparse_fields are the config's sparse section
    (block sizes, temperature, ...), whose design and rank the variant replaces."""
    if kind not in KINDS:
        raise ValueError(f"variant kind must be one of {KINDS}, got {kind!r}")
    fields = {**sparse_fields, "design": DESIGN_OF_KIND[kind], "rank": rank,
              "group_size": model.group_size}
    mask = heads_mask if kind == "paper" else group_mask(heads_mask, model.group_size)
    sparse = SparseConfig(mask, **fields)
    sparse.check_model(model)
    return sparse


def make_variants(model: SparseModel, heads_mask: Sequence[Sequence[bool]],
                  ranks: Sequence[int], sparse_fields: dict[str, Any],
                  calibration: np.ndarray) -> dict[str, Variant]:
    """Every (kind, rank) variant, SVD-initialised on calibration tokens [n, seq]."""
    variants = {}
    for kind in KINDS:
        for rank in ranks:
            sparse = variant_config(kind, heads_mask, rank, model.config, sparse_fields)
            variants[variant_name(kind, rank)] = (sparse, initial_indexer(model, sparse,
                                                                          calibration))
    return variants


def variant_kind(sparse: SparseConfig) -> str:
    """"paper" or "group", from the variant's design."""
    return "paper" if sparse.design == "paper" else "group"


# ---------------------------------------------------------------------------- training


def joint_loss(indexers: dict[str, Any], params: Any, tokens: jax.Array, lengths: jax.Array,
               *, config: ModelConfig, sparses: dict[str, SparseConfig], level: str,
               teacher_top_p: float, backend: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum of the variants' losses, each variant's loss) over one frozen dense forward.

    tokens: [batch, seq] right-padded; lengths: [batch]. The variants' parameters are disjoint,
    so the gradient of the sum with respect to a variant is the gradient of its own loss.
    """
    states = collect_qk(jax.lax.stop_gradient(params), tokens, lengths, config, backend)
    losses = {name: states_distillation_loss(indexers[name], states, lengths, config=config,
                                             sparse=sparse, level=level,
                                             teacher_top_p=teacher_top_p)
              for name, sparse in sparses.items()}
    return sum(losses.values()), losses


def make_joint_step(config: ModelConfig, sparses: dict[str, SparseConfig],
                    optimizers: dict[str, optax.GradientTransformation], backend: str, *,
                    level: str = STAGE1_LEVEL, teacher_top_p: float = STAGE1_TEACHER_TOP_P
                    ) -> Any:
    """A jitted step(indexers, opt_states, params, tokens, lengths) -> (indexers, opt_states,
    {"loss": {name: .}, "grad_norm": {name: .}}). Each variant's update runs through its own
    optimiser and state, so gradient clipping is per variant, never over the union."""

    def step(indexers, opt_states, params, tokens, lengths):
        grad_fn = jax.value_and_grad(joint_loss, has_aux=True)
        (_, losses), grads = grad_fn(indexers, params, tokens, lengths, config=config,
                                     sparses=sparses, level=level,
                                     teacher_top_p=teacher_top_p, backend=backend)
        new_indexers, new_states, norms = {}, {}, {}
        for name in sparses:
            updates, new_states[name] = optimizers[name].update(grads[name], opt_states[name],
                                                                indexers[name])
            new_indexers[name] = optax.apply_updates(indexers[name], updates)
            norms[name] = optax.tree.norm(grads[name])
        return new_indexers, new_states, {"loss": losses, "grad_norm": norms}

    return jax.jit(step, donate_argnums=(0, 1))


def train_variants(model: SparseModel, variants: dict[str, Variant], dataset: Any, train: Any,
                   *, level: str = STAGE1_LEVEL, teacher_top_p: float = STAGE1_TEACHER_TOP_P,
                   max_minutes: float = 0.0, progress: bool = True
                   ) -> tuple[dict[str, Variant], list[dict[str, Any]]]:
    """Trains every variant jointly, one step per batch of dataset ({"tokens", "length"}), each
    with `make_optimizer(train)`, stopping after the step that passes max_minutes (> 0). Returns
    (the trained variants, metrics of every step taken)."""
    from tqdm import tqdm

    sparses = {name: sparse for name, (sparse, _) in variants.items()}
    optimizers = {name: make_optimizer(train) for name in variants}
    # A copy: the step donates its state buffers, which must not be the caller's arrays.
    indexers = jax.tree.map(jnp.array, {name: index for name, (_, index) in variants.items()})
    opt_states = {name: optimizers[name].init(indexers[name]) for name in variants}
    step_fn = make_joint_step(model.config, sparses, optimizers, model.backend, level=level,
                              teacher_top_p=teacher_top_p)
    history = []
    bar = tqdm(dataset, total=len(dataset), desc="distilling", disable=not progress)
    start = time.perf_counter()
    for step, batch in enumerate(bar, 1):
        tick = time.perf_counter()
        indexers, opt_states, metrics = step_fn(indexers, opt_states, model.params,
                                                jnp.asarray(batch["tokens"]),
                                                jnp.asarray(batch["length"]))
        metrics = jax.device_get(metrics)
        record = {"step": step, "seconds": time.perf_counter() - tick,
                  **{key: {n: float(v) for n, v in values.items()}
                     for key, values in metrics.items()}}
        history.append(record)
        bar.set_postfix({n: f"{v:.3f}" for n, v in record["loss"].items()})
        if max_minutes > 0 and time.perf_counter() - start > 60 * max_minutes:
            break
    trained = {name: (sparses[name], jax.device_get(indexers[name])) for name in variants}
    return trained, history


def loss_summary(history: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per variant: first and final loss, and the mean over the last FINAL_LOSS_FRACTION of
    the steps (at least one)."""
    tail = history[-max(1, round(len(history) * FINAL_LOSS_FRACTION)):]
    return {name: {"first_loss": history[0]["loss"][name],
                   "final_loss": history[-1]["loss"][name],
                   "final_loss_mean": float(np.mean([h["loss"][name] for h in tail]))}
            for name in history[0]["loss"]}


# ---------------------------------------------------------------------------- measurement


def query_positions_of(length: int, count: int) -> np.ndarray:
    """`count` evenly spaced query positions in the second half of a window (the last token
    included): [count] int32, distinct."""
    first = length // 2
    if not 1 <= count <= length - first:
        raise ValueError(f"query positions must be in 1..{length - first} (the second half of "
                         f"{length} tokens), got {count}")
    return np.round(np.linspace(first, length - 1, count)).astype(np.int32)


def head_columns(sparse: SparseConfig, layer: int, heads: Sequence[int], group_size: int
                 ) -> np.ndarray:
    """Which of the variant's indexed heads (paper) or groups (group) selects for each query
    head of `heads` in `layer`: [len(heads)] int32."""
    indexed = sparse.indexed_heads(layer)
    owners = heads if sparse.design == "paper" else [h // group_size for h in heads]
    missing = [h for h, o in zip(heads, owners, strict=True) if o not in indexed]
    if missing:
        raise ValueError(f"a {variant_kind(sparse)} rank-{sparse.rank} variant has no indexer "
                         f"for query heads {missing} of layer {layer}")
    return np.asarray([indexed.index(o) for o in owners], np.int32)


def teacher_block_mass(q: jax.Array, k: jax.Array, positions: jax.Array, lengths: jax.Array,
                       block_k: int) -> jax.Array:
    """Each head's true attention summed per key block, causal keys only.

    q: [batch, n, heads, head_dim] rotated queries at positions [batch, n]; k: [batch, seq,
    heads, head_dim] each head's own rotated keys. Returns [batch, heads, n, num_k_blocks].
    """
    probs = attention_probs(q, k, positions, lengths, q.shape[-1] ** -0.5)[:, :, 0]
    b, h, n, s = probs.shape
    nk = -(-s // block_k)
    probs = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, nk * block_k - s)))
    return probs.reshape(b, h, n, nk, block_k).sum(-1)


def block_set_metrics(teacher_mass: jax.Array, indexer_logits: jax.Array,
                      candidates: jax.Array, top_ps: Sequence[float]) -> jax.Array:
    """Recall and densities of pure top-p block sets, per query.

    teacher_mass: [..., nk] the true block distribution (zero outside the candidates);
    indexer_logits: [..., nk] (-inf outside the candidates); candidates: broadcastable to
    teacher_mass[..., 0], the number of candidate blocks. Returns [len(top_ps), 3, ...]: per p
    the METRICS (|T & I| / |T|, |T| / candidates, |I| / candidates).
    """
    indexer_probs = jax.nn.softmax(indexer_logits, axis=-1)
    out = []
    for p in top_ps:
        teacher_set = top_p_mask(teacher_mass, p)
        indexer_set = top_p_mask(indexer_probs, p)
        teacher_count = teacher_set.sum(-1)
        both = (teacher_set & indexer_set).sum(-1)
        out.append(jnp.stack([both / jnp.maximum(teacher_count, 1), teacher_count / candidates,
                              indexer_set.sum(-1) / candidates]))
    return jnp.stack(out)


def layer_statistics(qkv: Any, layer: int, heads: tuple[int, ...], sparses: Sequence[SparseConfig],
                     indexers: Sequence[dict[str, Any]], positions: jax.Array, valid: jax.Array,
                     lengths: jax.Array, *, config: ModelConfig, top_ps: Sequence[float],
                     block_k: int) -> jax.Array:
    """Sums over (row, head, valid query) of the METRICS of one layer's retrieval heads.

    qkv: the layer's `model.QKV`; positions, valid: [chunks, QUERY_CHUNK] query positions and
    whether each is real (padding repeats a position). Returns [variants, len(top_ps), 3].
    """
    index = np.asarray(heads, np.int32)
    q_teacher, k_teacher = qkv.q[:, :, index], head_keys(qkv.k, heads, config.group_size)
    scored = []  # per variant: (indexer queries, indexer keys, scale, columns)
    for sparse, indexer in zip(sparses, indexers, strict=True):
        inputs = layer_loss_inputs(qkv, layer, config, sparse)
        params = indexer["layers"][layer]
        qi = indexer_queries(inputs.get("q_index", inputs["q"]), params["wq"])
        ki = indexer_keys(inputs.get("k_index", inputs["k"]), params["wk"])
        scored.append((qi, ki, 1.0 / sparse.temperature,
                       head_columns(sparse, layer, heads, config.group_size)))
    b = qkv.q.shape[0]

    def one_chunk(chunk: tuple[jax.Array, jax.Array]) -> jax.Array:
        pos, ok = chunk
        rows = jnp.broadcast_to(pos, (b, pos.shape[0]))
        teacher = teacher_block_mass(q_teacher[:, pos], k_teacher, rows, lengths, block_k)
        candidates = (rows // block_k + 1)[:, None, :]
        sums = []
        for qi, ki, scale, columns in scored:
            logits = block_logits_reference(qi[:, pos], ki, lengths, rows, block_k=block_k,
                                            scale=scale)[:, columns]
            metrics = block_set_metrics(teacher, logits, candidates, top_ps)
            sums.append(jnp.sum(jnp.where(ok, metrics, 0.0), axis=(2, 3, 4)))
        return jnp.stack(sums)

    return jax.lax.map(one_chunk, (positions, valid)).sum(axis=0)


def window_statistics(params: Any, tokens: jax.Array, indexers: tuple[dict[str, Any], ...],
                      positions: jax.Array, valid: jax.Array, *, config: ModelConfig,
                      sparses: tuple[SparseConfig, ...], heads: tuple[tuple[int, ...], ...],
                      top_ps: tuple[float, ...], block_k: int, backend: str) -> jax.Array:
    """Sums of the METRICS over every layer's retrieval heads (heads[layer]) and the valid query
    positions, of full-length windows tokens [batch, seq]: [variants, len(top_ps), 3]."""
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    states = collect_qk(params, tokens, lengths, config, backend)
    total = jnp.zeros((len(sparses), len(top_ps), len(METRICS)), jnp.float32)
    for layer, qkv in enumerate(states):
        if heads[layer]:
            total += layer_statistics(qkv, layer, heads[layer], sparses, indexers, positions,
                                      valid, lengths, config=config, top_ps=top_ps,
                                      block_k=block_k)
    return total


_window_statistics = jax.jit(window_statistics, static_argnames=(
    "config", "sparses", "heads", "top_ps", "block_k", "backend"))


def chunked_positions(positions: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """positions [n] -> ([chunks, chunk] positions, [chunks, chunk] bool real), padded by
    repeating the last position."""
    chunk = min(chunk, len(positions))
    chunks = -(-len(positions) // chunk)
    padded = np.full(chunks * chunk, positions[-1], np.int32)
    padded[:len(positions)] = positions
    real = np.arange(chunks * chunk) < len(positions)
    return padded.reshape(chunks, chunk), real.reshape(chunks, chunk)


def recall_table(model: SparseModel, variants: dict[str, Variant],
                 heads_mask: Sequence[Sequence[bool]], windows: np.ndarray,
                 top_ps: Sequence[float], *, query_positions: int, progress: bool = False
                 ) -> list[dict[str, Any]]:
    """Decode-style recall of each variant's top-p block sets against each retrieval query
    head's own, on windows [n, length] (each its own full-length sequence).

    heads_mask [layers][query heads]: the heads measured. Returns one row per (variant, p):
    {"variant" (kind), "name", "rank", "top_p", "teacher_density", "indexer_density", "recall",
    "queries"}: means over (window, retrieval head, query position), "queries" their count.
    """
    from tqdm import tqdm

    names = list(variants)
    sparses = tuple(variants[n][0] for n in names)
    block_sizes = {s.block_k for s in sparses}
    if len(block_sizes) != 1:
        raise ValueError(f"the variants must share one block_k, got {sorted(block_sizes)}")
    block_k = block_sizes.pop()
    heads = tuple(tuple(h for h, r in enumerate(row) if r) for row in heads_mask)
    for sparse in sparses:  # fail before any compilation if a head has no indexer
        for layer, layer_heads in enumerate(heads):
            head_columns(sparse, layer, layer_heads, model.config.group_size)
    positions, valid = chunked_positions(query_positions_of(windows.shape[1], query_positions),
                                         QUERY_CHUNK)
    indexers = tuple(jax.tree.map(jnp.asarray, variants[n][1]) for n in names)
    total = np.zeros((len(names), len(top_ps), len(METRICS)), np.float64)
    for window in tqdm(windows, desc="measuring", disable=not progress):
        total += np.asarray(_window_statistics(
            model.params, jnp.asarray(window[None]), indexers, jnp.asarray(positions),
            jnp.asarray(valid), config=model.config, sparses=sparses, heads=heads,
            top_ps=tuple(float(p) for p in top_ps), block_k=block_k, backend=model.backend))
    queries = len(windows) * query_positions * sum(map(len, heads))
    return [{"variant": variant_kind(sparse), "name": name, "rank": sparse.rank,
             "top_p": float(p), **{m: float(total[v, i, j] / queries)
                                   for j, m in enumerate(METRICS)}, "queries": queries}
            for v, (name, sparse) in enumerate(zip(names, sparses, strict=True))
            for i, p in enumerate(top_ps)]


# ---------------------------------------------------------------------------- reporting


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """| variant | rank | p | teacher density | indexer density | recall |, a row per row."""
    lines = ["| variant | rank | p | teacher density | indexer density | recall |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['rank']} | {r['top_p']:g} | {r['teacher_density']:.3f} | "
              f"{r['indexer_density']:.3f} | {r['recall']:.3f} |" for r in rows]
    return "\n".join(lines)


def plot_recall(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Left: recall vs indexer density, one line per variant, points labelled by p. Right:
    density vs p of each variant's indexer and of the teacher (the reference)."""
    from rtpurbo_jax.evaluation import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    names = list(dict.fromkeys(r["name"] for r in rows))
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        label = f"{mine[0]['variant']} r{mine[0]['rank']}"
        style = "-" if mine[0]["variant"] == "paper" else "--"
        line, = left.plot([r["indexer_density"] for r in mine], [r["recall"] for r in mine],
                          style, marker="o", label=label)
        for r in mine:
            left.annotate(f"{r['top_p']:g}", (r["indexer_density"], r["recall"]), fontsize=7,
                          textcoords="offset points", xytext=(3, -9))
        right.plot([r["top_p"] for r in mine], [r["indexer_density"] for r in mine], style,
                   marker="o", color=line.get_color(), label=label)
    teacher = [r for r in rows if r["name"] == names[0]]
    right.plot([r["top_p"] for r in teacher], [r["teacher_density"] for r in teacher], "k:",
               marker="s", label="teacher (true attention)")
    left.set_xlabel("indexer density (selected / candidate blocks)")
    left.set_ylabel("recall of the teacher's top-p blocks")
    right.set_xlabel("top-p")
    right.set_ylabel("density (selected / candidate blocks)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- inputs


def parse_ranks(text: str) -> tuple[int, ...]:
    """"8,16,32" -> (8, 16, 32): distinct positive integers."""
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1 or len(set(ranks)) != len(ranks):
        raise ValueError(f"--ranks must be distinct comma-separated positive integers such as "
                         f"8,16,32, got {text!r}")
    return ranks


def load_heads_mask(path: Path, model: ModelConfig) -> tuple[tuple[bool, ...], ...]:
    """The "retrieval_mask" [layers][query heads] of a JSON file (a paper-design heads.json),
    checked against the model's shape and for at least one retrieval head."""
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} does not exist")
    try:
        mask = read_mask(path)
    except TypeError as err:
        raise ValueError(f"{path}: \"retrieval_mask\" is not a [layers][query heads] grid: "
                         f"{err}") from err
    widths = sorted({len(row) for row in mask})
    if len(mask) != model.num_layers or widths != [model.num_heads]:
        raise ValueError(
            f"{path}: retrieval_mask is [{len(mask)}][{'|'.join(map(str, widths))}], the model "
            f"has [layers][query heads] = [{model.num_layers}][{model.num_heads}] (a KV-group "
            f"mask of the indexer design would have {model.num_kv_heads} columns)")
    if not any(map(any, mask)):
        raise ValueError(f"{path}: retrieval_mask marks no retrieval head")
    return mask


def mask_summary(heads_mask: Sequence[Sequence[bool]], model: ModelConfig) -> dict[str, Any]:
    """Counts and fractions of the retrieval heads and of the KV groups that hold one."""
    groups = kv_retrieval_mask(heads_mask, model.group_size)
    heads = sum(map(sum, heads_mask))
    cells = model.num_layers * model.num_heads
    with_retrieval = sum(map(sum, groups))
    return {"retrieval_heads": heads, "query_head_fraction": heads / cells,
            "groups_with_retrieval_head": with_retrieval,
            "kv_group_fraction": with_retrieval / (model.num_layers * model.num_kv_heads)}


# ---------------------------------------------------------------------------- the whole run


def run_recall(config: Any, *, mask_path: Path, ranks: Sequence[int], windows: int,
               query_positions: int, out: Path, max_minutes: float = 0.0,
               progress: bool = True) -> dict[str, Any]:
    """Initialise, jointly train (for train.steps, or fewer when max_minutes > 0 run out) and
    measure every variant as `config` describes (its train.steps and train.seq_len already the
    run's); writes <out>.json and <out>.png and returns the record."""
    from rtpurbo_jax.api import load_from_config
    from rtpurbo_jax.convert import task_tokenizer
    from rtpurbo_jax.data import corpus_tokens, training_dataset
    from rtpurbo_jax.evaluation import device_name, git_commit
    from rtpurbo_jax.text import text_tokens, text_windows

    model = load_from_config(config.model)
    heads_mask = load_heads_mask(mask_path, model.config)
    tokenizer, train, length = task_tokenizer(model), config.train, config.train.seq_len
    calibration = text_windows(corpus_tokens(tokenizer, tuple(config.data.files)), length,
                               train.calibration_windows,
                               np.random.default_rng([config.seed, CALIBRATION_STREAM]))
    variants = make_variants(model, heads_mask, ranks, config.sparse.to_dict(), calibration)
    dataset = training_dataset(tokenizer, config.data, seq_len=length,
                               batch_size=train.batch_size, steps=train.steps, seed=config.seed)
    tick = time.perf_counter()
    trained, history = train_variants(model, variants, dataset, train, max_minutes=max_minutes,
                                      progress=progress)
    steps = len(history)
    train_minutes = (time.perf_counter() - tick) / 60
    held_out = text_windows(text_tokens(tokenizer, "heldout"), length, windows,
                            np.random.default_rng([config.seed, HELDOUT_STREAM]))
    tick = time.perf_counter()
    rows = recall_table(model, trained, heads_mask, held_out, TOP_PS,
                        query_positions=query_positions, progress=progress)
    name, losses = model.config.name or config.name, loss_summary(history)
    record = {
        "model": name, "config": config.name, "device": device_name(),
        "jax": jax.__version__, "commit": git_commit(Path(__file__).resolve().parents[1]),
        "steps": steps, "steps_planned": train.steps, "seq_len": length,
        "batch": train.batch_size,
        "windows": windows, "query_positions": query_positions, "top_ps": list(TOP_PS),
        "block_k": config.sparse.block_k,
        "stage1": {"level": STAGE1_LEVEL, "teacher_top_p": STAGE1_TEACHER_TOP_P},
        "train": train.to_dict(), "held_out": "stdlib heldout split (rtpurbo_jax.text)",
        "mask": {"file": str(mask_path), **mask_summary(heads_mask, model.config)},
        "variants": {n: {"kind": variant_kind(s), "rank": s.rank, **losses[n]}
                     for n, (s, _) in trained.items()},
        "train_minutes": train_minutes, "measure_minutes": (time.perf_counter() - tick) / 60,
        "rows": rows, "history": history,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    json_path.write_text(json.dumps(record, indent=1))
    plot_recall(rows, png_path, f"{name}: decode recall of retrieval heads at {length} tokens "
                f"({steps} steps, {windows} held-out windows x {query_positions} queries)")
    return record


def define_flags() -> dict[str, Any]:
    """The CLI's absl flags (defined on demand, so importing this module defines none)."""
    from absl import flags
    from ml_collections import config_flags

    default_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "configs", "smollm2_135m_paper.py")
    holders = {
        "config": config_flags.DEFINE_config_file(
            "config", default_config, "model/data/train config (a configs/*.py file)"),
        "mask": flags.DEFINE_string("mask", None, "JSON with \"retrieval_mask\" [layers][query "
                                    "heads] (the paper design's heads.json)", required=True),
        "steps": flags.DEFINE_integer("steps", 200, "training steps (overrides train.steps)"),
        "minutes": flags.DEFINE_float("minutes", 0.0, "stop training after this many minutes "
                                      "even before --steps (0: no limit); the JSON records the "
                                      "steps taken"),
        "ranks": flags.DEFINE_string("ranks", "8,16,32", "comma-separated indexer ranks"),
        "length": flags.DEFINE_integer("length", 8192, "tokens per training sequence and per "
                                       "held-out window (overrides train.seq_len)"),
        "windows": flags.DEFINE_integer("windows", 4, "held-out windows measured"),
        "query_positions": flags.DEFINE_integer(
            "query_positions", 256, "query positions per window, evenly spaced in its second "
            "half"),
        "out": flags.DEFINE_string("out", "results/profile/indexer_recall",
                                   "output path prefix: <out>.json, <out>.png"),
        "allow_cpu": flags.DEFINE_bool("allow_cpu", False, f"run lengths over {CPU_MAX_LENGTH} "
                                       "without an accelerator"),
    }
    flags.DEFINE_alias("query-positions", "query_positions")
    return holders


def check_flags(values: dict[str, Any], config: Any) -> tuple[int, ...]:
    """Raises ValueError / FileNotFoundError, with a one-line message, on bad input; returns the
    ranks."""
    ranks = parse_ranks(values["ranks"])
    load_heads_mask(Path(values["mask"]), ModelConfig.from_hf(dict(config.model.arch)))
    query_positions_of(values["length"], values["query_positions"])
    for flag in ("steps", "windows"):
        if values[flag] < 1:
            raise ValueError(f"--{flag} must be >= 1, got {values[flag]}")
    if values["minutes"] < 0:
        raise ValueError(f"--minutes must be >= 0 (0: no limit), got {values['minutes']}")
    if (jax.default_backend() == "cpu" and values["length"] > CPU_MAX_LENGTH
            and not values["allow_cpu"]):
        raise ValueError(f"no accelerator: --length {values['length']} would take hours on the "
                         f"CPU; use --length <= {CPU_MAX_LENGTH} or pass --allow_cpu")
    return ranks


def print_report(record: dict[str, Any], out: str) -> None:
    """The recall table, the losses and where the files went, in Markdown."""
    print(markdown_table(record["rows"]))
    print("\n| variant | rank | first loss | final loss | mean of the last steps |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for v in record["variants"].values():
        print(f"| {v['kind']} | {v['rank']} | {v['first_loss']:.4f} | {v['final_loss']:.4f} | "
              f"{v['final_loss_mean']:.4f} |")
    print(f"\nwrote {out}.json, {out}.png ({record['steps']} steps, "
          f"{record['train_minutes']:.1f} min training, "
          f"{record['measure_minutes']:.1f} min measuring on {record['device']})")


def main(argv: Sequence[str], holders: dict[str, Any]) -> None:
    if len(argv) > 1:
        sys.exit(f"rtpurbo_jax.recall: unexpected arguments {argv[1:]}")
    values = {name: holder.value for name, holder in holders.items()}
    config = values.pop("config")
    try:
        ranks = check_flags(values, config)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"rtpurbo_jax.recall: {err}")
    config.train.update(steps=values["steps"], seq_len=values["length"])
    record = run_recall(config, mask_path=Path(values["mask"]), ranks=ranks,
                        windows=values["windows"], query_positions=values["query_positions"],
                        out=Path(values["out"]), max_minutes=values["minutes"])
    print_report(record, values["out"])


if __name__ == "__main__":
    import functools

    from absl import app

    app.run(functools.partial(main, holders=define_flags()))

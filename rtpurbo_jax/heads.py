"""Retrieval-head profiling: which heads must keep full attention.

Two profiles live here.

Task-based, per KV head. A retrieval head is one that, when the model copies a fact from far
back, looks at that fact. We measure it directly on long-context retrieval samples: run the
frozen model over prompt + correct answer (teacher forcing) and, at each position that predicts
an answer token, read every KV group's attention (averaged over its query heads):

  retrieval score = attention mass on the needle tokens the answer comes from;
  far mass        = attention mass outside the sink block and the local window.

The score of a (layer, KV head) is its mean needle mass over samples; the heads with the highest
scores keep full attention. The far mass is reported beside it: a head with high far mass but
low needle mass reads long range without retrieving (a candidate if the budget allows).

Needle-copy, per query head (the paper's calibration, Eq. 3). One long real document carries the
same needle span twice, at its beginning and at its end. A query head's score is the attention
mass that the later copy's tokens put on the earlier copy, averaged over the later copy's tokens:

  R_h = 1/|N_post| * sum_{t in N_post} sum_{j in N_pre} A_h(t, j).

Heads are ranked globally across layers (no per-layer quota). The sparse model keeps whole KV
groups dense, so a chosen query head keeps its group full (`kv_retrieval_mask`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.attention import dense_prefill
from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.kernels import check_backend
from rtpurbo_jax.model import Params, decoder
from rtpurbo_jax.tasks import Sample
from rtpurbo_jax.teacher import attention_probs

# The sink and local window excluded from the far mass, in tokens.
FAR_SINK_TOKENS = 64
FAR_LOCAL_TOKENS = 128

# Real-text tokens before the earlier needle copy. The first few positions are attention sinks
# (StreamingLLM keeps 4) that draw heavy attention from almost every head whatever they hold;
# a needle there would credit every head's sink mass as retrieval.
NEEDLE_PREFIX_TOKENS = 4
# The least haystack between the two copies: the local window, so that a head that only reads
# nearby tokens cannot reach the earlier copy and score as a retrieval head.
MIN_NEEDLE_GAP_TOKENS = FAR_LOCAL_TOKENS
# The needle profile's heatmap title.
NEEDLE_SCORE_LABEL = ("needle-copy score R_h\n(attention mass from the later needle copy on the "
                      "earlier one)")
# The paper's default share of query heads kept as retrieval heads.
DEFAULT_RETRIEVAL_FRACTION = 0.15
# "query": rank query heads (the paper); "kv": rank whole KV groups (what the sparse model keeps).
GRANULARITIES = ("query", "kv")
# A mask that is the union of both granularities' choices (indexers trained for either).
UNION_GRANULARITY = "both"
# Added before rounding half up, so that a product such as 0.29 * 50 = 14.499999999999998 that
# is a half in exact arithmetic rounds up as it should.
ROUNDING_SLACK = 1e-9
# Decimals of the scores written to JSON (attention mass; finer is noise).
JSON_DECIMALS = 6


def _profile_batch(params: Params, tokens: jax.Array, lengths: jax.Array, query_pos: jax.Array,
                   query_valid: jax.Array, needle_mask: jax.Array, config: ModelConfig,
                   backend: str) -> tuple[jax.Array, jax.Array]:
    """(needle mass, far mass), each [layers, batch, kv_heads].

    tokens: [b, t]; query_pos: [b, n] positions of the answer-predicting queries (query_valid
    [b, n] marks real ones); needle_mask: [b, t] bool.
    """
    b, t = tokens.shape
    kpos = jnp.arange(t)
    far_keys = (kpos[None, None, :] >= FAR_SINK_TOKENS) & (
        kpos[None, None, :] < query_pos[:, :, None] - FAR_LOCAL_TOKENS)  # [b, n, t]
    weights = query_valid / jnp.maximum(query_valid.sum(-1, keepdims=True), 1)  # [b, n]

    def attend(i: int, qkv: Any, state: Any):
        q, k = qkv.q, qkv.k
        out = dense_prefill(q, k, qkv.v, lengths, backend=backend)
        qa = jnp.take_along_axis(q, query_pos[:, :, None, None], axis=1)
        probs = attention_probs(qa, k, query_pos, lengths, config.head_dim**-0.5).mean(axis=2)
        needle = jnp.einsum("bknt,bt,bn->bk", probs, needle_mask.astype(jnp.float32), weights)
        far = jnp.einsum("bknt,bnt,bn->bk", probs, far_keys.astype(jnp.float32), weights)
        return out, (needle, far)

    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    _, states = decoder(params, tokens, positions, config, attend, [None] * config.num_layers)
    return jnp.stack([s[0] for s in states]), jnp.stack([s[1] for s in states])


_profile_jit = jax.jit(_profile_batch, static_argnames=("config", "backend"))


def profile_heads(
    params: Params,
    config: ModelConfig,
    samples: Sequence[Sample],
    answer_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 4,
    backend: str = "auto",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Scores every (layer, KV head) on retrieval samples.

    answer_ids[i]: the token ids of sample i's answer as the model would write it after the
    prompt. Returns {"score": [layers, kv_heads], "far_mass": [layers, kv_heads]} (means over
    samples).
    """
    from tqdm import tqdm

    needle_sum = np.zeros((config.num_layers, config.num_kv_heads))
    far_sum = np.zeros_like(needle_sum)
    width = max(len(s.prompt) + len(a) for s, a in zip(samples, answer_ids, strict=True))
    n_ans = max(len(a) for a in answer_ids)
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="profiling heads", disable=not progress):
        chunk = list(zip(samples[start:start + batch_size], answer_ids[start:start + batch_size],
                         strict=True))
        rows = len(chunk)
        tokens = np.zeros((batch_size, width), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        query_pos = np.zeros((batch_size, n_ans), np.int32)
        query_valid = np.zeros((batch_size, n_ans), np.float32)
        needle = np.zeros((batch_size, width), bool)
        for r, (sample, ans) in enumerate(chunk):
            seq = np.concatenate([sample.prompt, np.asarray(ans, np.int32)])
            tokens[r, :len(seq)] = seq
            lengths[r] = len(seq)
            # The query at position p predicts token p + 1: the last prompt token and every
            # answer token but the last predict answer tokens.
            query_pos[r, :len(ans)] = len(sample.prompt) - 1 + np.arange(len(ans))
            query_valid[r, :len(ans)] = 1.0
            for lo, hi in sample.needles:
                needle[r, lo:hi] = True
        n_mass, f_mass = _profile_jit(params, jnp.asarray(tokens), jnp.asarray(lengths),
                                      jnp.asarray(query_pos), jnp.asarray(query_valid),
                                      jnp.asarray(needle), config, backend)
        needle_sum += np.asarray(n_mass)[:, :rows].sum(axis=1)
        far_sum += np.asarray(f_mass)[:, :rows].sum(axis=1)
    return {"score": needle_sum / len(samples), "far_mass": far_sum / len(samples)}


def choose_retrieval_heads(scores: np.ndarray, *, threshold: float | None = None,
                           fraction: float | None = None,
                           count: int | None = None) -> tuple[tuple[bool, ...], ...]:
    """The retrieval mask [layers][kv_heads]: heads scoring at least `threshold`, or the `count`
    (or `fraction` of all) best heads."""
    if sum(x is not None for x in (threshold, fraction, count)) != 1:
        raise ValueError("give exactly one of threshold, fraction and count")
    total = scores.size
    if threshold is not None:
        count = int(np.sum(scores >= threshold))
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        count = int(round(fraction * total))
    if not 0 <= count <= total:
        raise ValueError(f"count must be in [0, {total}], got {count}")
    chosen = np.zeros(total, bool)
    chosen[np.argsort(-scores.reshape(-1), kind="stable")[:count]] = True
    return tuple(tuple(bool(x) for x in row) for row in chosen.reshape(scores.shape))


def save_profile(path: str | os.PathLike[str], profile: dict[str, np.ndarray],
                 mask: tuple[tuple[bool, ...], ...], model_name: str,
                 samples_info: dict[str, Any]) -> tuple[Path, Path]:
    """Writes <path>.json (scores, far mass, mask) and <path>.png (the heatmap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = path.with_suffix(".json"), path.with_suffix(".png")
    json_path.write_text(json.dumps({
        "model": model_name,
        "samples": samples_info,
        "score": np.round(profile["score"], 6).tolist(),
        "far_mass": np.round(profile["far_mass"], 6).tolist(),
        "retrieval_mask": [list(row) for row in mask],
        "retrieval_fraction": float(np.mean(mask)),
    }, indent=1))
    plot_heatmap(profile["score"], mask, png_path,
                 title=f"{model_name}: retrieval score (needle attention mass)")
    return json_path, png_path


def plot_heatmap(scores: np.ndarray, mask: tuple[tuple[bool, ...], ...], path: Path,
                 title: str) -> None:
    plt = _pyplot()
    layers, heads = scores.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.9 * heads), 1.2 + 0.28 * layers))
    image = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")
    for layer in range(layers):
        for head in range(heads):
            if mask[layer][head]:
                ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False,
                                           edgecolor="red", linewidth=2))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(title + "\n(red: kept as retrieval heads)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (profiling runs on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# The needle-copy profile (the paper's Eq. 3), per query head.

# Figure geometry of the needle plots, in inches: one cell per head and layer, so that both a
# 30 x 9 (SmolLM2-135M) and a 32 x 32 (Llama-3-8B) grid read at PLOT_DPI, capped for huge ones.
HEATMAP_CELL_INCHES = 0.3
HEATMAP_ROW_INCHES = 0.2
BAR_INCHES = 0.3
BAR_FIGURE_HEIGHT_INCHES = 3.2
FIGURE_MARGIN_INCHES = 2.2
MIN_FIGURE_INCHES = 6.0
MAX_FIGURE_INCHES = 18.0
PLOT_DPI = 120
# Past this many query heads, tick only the first head of each KV group.
MAX_LABELED_HEADS = 32


@dataclasses.dataclass(frozen=True, eq=False)
class NeedleDocument:
    """One calibration document holding the same needle twice.

    tokens: [length] int32; pre, post: the [start, end) spans of the earlier and the later copy
    (equal lengths, identical tokens, pre before post).
    """

    tokens: np.ndarray
    pre: tuple[int, int]
    post: tuple[int, int]

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens, np.int32)
        pre = (int(self.pre[0]), int(self.pre[1]))
        post = (int(self.post[0]), int(self.post[1]))
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "pre", pre)
        object.__setattr__(self, "post", post)
        if tokens.ndim != 1:
            raise ValueError(f"a needle document's tokens must be 1-D, got shape {tokens.shape}")
        if not 0 <= pre[0] < pre[1] <= post[0] < post[1] <= len(tokens):
            raise ValueError(f"needle spans must be ordered within the {len(tokens)} tokens "
                             f"(pre before post, neither empty), got pre {pre}, post {post}")
        if not np.array_equal(tokens[pre[0]:pre[1]], tokens[post[0]:post[1]]):
            raise ValueError(f"the needle copies at {pre} and {post} are not identical")

    @property
    def needle_tokens(self) -> int:
        return self.pre[1] - self.pre[0]


def needle_document(text: np.ndarray, length: int, needle_tokens: int,
                    rng: np.random.Generator, *,
                    prefix_tokens: int = NEEDLE_PREFIX_TOKENS) -> NeedleDocument:
    """A calibration document of exactly `length` tokens of real text with a needle copied.

    text: [n_tokens] token ids (e.g. `text.text_tokens`). Layout:
      [prefix_tokens of haystack][needle][rest of the haystack][needle]
    The haystack is one contiguous window of `text`; the needle is a span of `needle_tokens`
    from elsewhere in `text` (not overlapping the window). The later copy ends at the last
    position, the earlier one starts right after the sink prefix (NEEDLE_PREFIX_TOKENS says why).
    """
    text = np.asarray(text)
    if text.ndim != 1:
        raise ValueError(f"text must be a 1-D token array, got shape {text.shape}")
    if needle_tokens < 1 or prefix_tokens < 0:
        raise ValueError(f"needle_tokens must be >= 1 and prefix_tokens >= 0, got "
                         f"{needle_tokens} and {prefix_tokens}")
    gap = length - prefix_tokens - 2 * needle_tokens
    if gap < MIN_NEEDLE_GAP_TOKENS:
        raise ValueError(f"length {length} leaves {gap} haystack tokens between two needles of "
                         f"{needle_tokens} (after a prefix of {prefix_tokens}); at least "
                         f"{MIN_NEEDLE_GAP_TOKENS} are needed, so length >= "
                         f"{prefix_tokens + 2 * needle_tokens + MIN_NEEDLE_GAP_TOKENS}")
    hay, n, size = length - 2 * needle_tokens, needle_tokens, len(text)
    if size < hay + n:
        raise ValueError(f"the text has {size} tokens, fewer than the {hay + n} that a haystack "
                         f"of {hay} and a separate needle of {n} need")
    # Haystack start s, uniform over the starts that leave room for the needle before the
    # window (s >= n) or after it (s <= last_after); those in between leave none.
    top, last_after = size - hay, size - hay - n
    if last_after + 1 >= n:
        s = int(rng.integers(top + 1))
    else:
        u = int(rng.integers(last_after + 1 + top - n + 1))
        s = u if u <= last_after else n + u - last_after - 1
    # Needle start, uniform over the spans wholly before or wholly after the window.
    before, after = max(0, s - n + 1), max(0, size - n - s - hay + 1)
    u = int(rng.integers(before + after))
    start = u if u < before else s + hay + u - before
    needle, haystack = text[start:start + n], text[s:s + hay]
    tokens = np.concatenate([haystack[:prefix_tokens], needle, haystack[prefix_tokens:], needle])
    pre = (prefix_tokens, prefix_tokens + n)
    return NeedleDocument(tokens.astype(np.int32), pre, (length - n, length))


def _needle_batch(params: Params, tokens: jax.Array, lengths: jax.Array, post_pos: jax.Array,
                  post_valid: jax.Array, pre_mask: jax.Array, config: ModelConfig,
                  backend: str) -> jax.Array:
    """R_h of every row and query head: [layers, batch, heads].

    tokens: [b, t]; lengths: [b]; post_pos: [b, n] positions of the later copy's tokens
    (post_valid [b, n] marks real ones); pre_mask: [b, t] float, 1 on the earlier copy.
    """
    b, t = tokens.shape
    weights = post_valid / jnp.maximum(post_valid.sum(-1, keepdims=True), 1)  # [b, n]

    def attend(i: int, qkv: Any, state: Any):
        q, k = qkv.q, qkv.k
        out = dense_prefill(q, k, qkv.v, lengths, backend=backend)
        q_post = jnp.take_along_axis(q, post_pos[:, :, None, None], axis=1)
        # Only the later copy's rows: [b, kv_heads, group, n, t], never [t, t].
        probs = attention_probs(q_post, k, post_pos, lengths, config.head_dim**-0.5)
        score = jnp.einsum("bkgnt,bt,bn->bkg", probs, pre_mask, weights)
        # (kv_head, group) flattens to the query head index, as the model's GQA reshape does.
        return out, score.reshape(b, config.num_heads)

    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    _, states = decoder(params, tokens, positions, config, attend, [None] * config.num_layers)
    return jnp.stack(states)


_needle_jit = jax.jit(_needle_batch, static_argnames=("config", "backend"))


def needle_scores(
    params: Params,
    config: ModelConfig,
    documents: Sequence[NeedleDocument],
    *,
    batch_size: int = 1,
    backend: str = "auto",
    progress: bool = False,
) -> np.ndarray:
    """R_h of every query head, the mean over documents: [layers, heads] float64.

    R_h is the attention mass from the later needle copy's tokens to the earlier copy, averaged
    over the later copy's tokens (the paper's Eq. 3). Documents of different lengths are
    right-padded to the longest.
    """
    from tqdm import tqdm

    check_backend(backend)
    if not documents:
        raise ValueError("needle_scores needs at least one document")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for doc in documents:
        if doc.tokens.min() < 0 or doc.tokens.max() >= config.vocab_size:
            raise ValueError(f"a needle document has token ids outside the vocabulary "
                             f"[0, {config.vocab_size})")
    width = max(len(d.tokens) for d in documents)
    n_post = max(d.needle_tokens for d in documents)
    total = np.zeros((config.num_layers, config.num_heads))
    starts = range(0, len(documents), batch_size)
    for start in tqdm(starts, desc="needle scores", disable=not progress):
        chunk = documents[start:start + batch_size]
        # The last batch is padded to batch_size so that every batch has one compiled shape.
        tokens = np.zeros((batch_size, width), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        post_pos = np.zeros((batch_size, n_post), np.int32)
        post_valid = np.zeros((batch_size, n_post), np.float32)
        pre_mask = np.zeros((batch_size, width), np.float32)
        for r, doc in enumerate(chunk):
            tokens[r, :len(doc.tokens)] = doc.tokens
            lengths[r] = len(doc.tokens)
            post_pos[r, :doc.needle_tokens] = np.arange(*doc.post)
            post_valid[r, :doc.needle_tokens] = 1.0
            pre_mask[r, doc.pre[0]:doc.pre[1]] = 1.0
        scores = _needle_jit(params, jnp.asarray(tokens), jnp.asarray(lengths),
                             jnp.asarray(post_pos), jnp.asarray(post_valid),
                             jnp.asarray(pre_mask), config, backend)
        total += np.asarray(scores, np.float64)[:, :len(chunk)].sum(axis=1)
    return total / len(documents)


def _check_grid(shape: tuple[int, ...], group_size: int) -> None:
    if len(shape) != 2:
        raise ValueError(f"head scores must be [layers, heads], got shape {shape}")
    if group_size < 1 or shape[1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {shape[1]} query heads")


def group_scores(scores: np.ndarray, group_size: int) -> np.ndarray:
    """Each KV group's mean over its query heads: scores [layers, heads] -> [layers, kv_heads].

    Comparable with the task-based profile's "score" and what "kv" granularity ranks by.
    """
    scores = np.asarray(scores, np.float64)
    _check_grid(scores.shape, group_size)
    layers, heads = scores.shape
    return scores.reshape(layers, heads // group_size, group_size).mean(axis=-1)


def kv_retrieval_mask(mask: Sequence[Sequence[bool]], group_size: int
                      ) -> tuple[tuple[bool, ...], ...]:
    """The KV groups that hold any retrieval head: mask [layers][heads] -> [layers][kv_heads].

    A group's query heads share its keys, so one retrieval head keeps the whole group dense;
    this is the mask a SparseConfig takes.
    """
    grid = np.asarray(mask, bool)
    _check_grid(grid.shape, group_size)
    layers, heads = grid.shape
    kept = grid.reshape(layers, heads // group_size, group_size).any(axis=-1)
    return tuple(tuple(bool(x) for x in row) for row in kept)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + ROUNDING_SLACK)


def choose_query_heads(
    scores: np.ndarray,
    group_size: int,
    *,
    granularity: str = "query",
    fraction: float | None = None,
    count: int | None = None,
    threshold: float | None = None,
) -> tuple[tuple[bool, ...], ...]:
    """The retrieval mask [layers][heads] of query heads, ranked globally across layers.

    scores: [layers, heads] (`needle_scores`). Give exactly one of `fraction` (of all query
    heads, in (0, 1]; the paper uses DEFAULT_RETRIEVAL_FRACTION), `count` (query heads) or
    `threshold` (least score). A fraction's head count rounds half up, and a positive fraction
    or count keeps at least one head.
    granularity "query": the best query heads, ties broken by index. "kv": whole KV groups ranked
    by `group_scores`, as many as the target number of query heads rounded (half up) to whole
    groups; a threshold then applies to the group mean. UNION_GRANULARITY: the heads either
    would choose (indexers for both, so both can be compared without retraining).
    """
    if granularity == UNION_GRANULARITY:
        rule = dict(fraction=fraction, count=count, threshold=threshold)
        masks = [np.asarray(choose_query_heads(scores, group_size, granularity=g, **rule))
                 for g in GRANULARITIES]
        return tuple(tuple(bool(x) for x in row) for row in np.logical_or(*masks))
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if sum(x is not None for x in (fraction, count, threshold)) != 1:
        raise ValueError("give exactly one of fraction, count and threshold")
    scores = np.asarray(scores, np.float64)
    _check_grid(scores.shape, group_size)
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if count is not None and not 0 <= count <= scores.size:
        raise ValueError(f"count must be in [0, {scores.size}] query heads, got {count}")
    unit = 1 if granularity == "query" else group_size
    ranked = scores if granularity == "query" else group_scores(scores, group_size)
    if threshold is not None:
        chosen = choose_retrieval_heads(ranked, threshold=threshold)
    else:
        target = fraction * scores.size if fraction is not None else count
        units = max(_round_half_up(target / unit), 1) if target > 0 else 0
        chosen = choose_retrieval_heads(ranked, count=units)
    return tuple(tuple(bool(x) for x in np.repeat(row, unit)) for row in chosen)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks of x (1-D); tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts + 1) / 2)[inverse.reshape(-1)]


def _top_set(x: np.ndarray, top: int) -> set[int]:
    # Ties broken by index, as choose_retrieval_heads does.
    return {int(i) for i in np.argsort(-x, kind="stable")[:top]}


def ranking_agreement(a: np.ndarray, b: np.ndarray, top: int) -> dict[str, float]:
    """How alike two head rankings are; a, b: scores of one shape (e.g. the task profile's
    "score" [layers, kv_heads] and `group_scores` of the needle scores).

    Returns {"spearman": the rank correlation over all entries (tied entries share their mean
    rank; nan when either is constant), "top_overlap": |top(a) & top(b)| / top, where top(x) is
    the set of x's `top` best entries (ties broken by index), "top": top}.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rankings of different shapes: {a.shape} and {b.shape}")
    a, b = a.reshape(-1), b.reshape(-1)
    if not 1 <= top <= a.size:
        raise ValueError(f"top must be in [1, {a.size}], got {top}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = math.sqrt(float(ra @ ra) * float(rb @ rb))
    spearman = float(ra @ rb) / norm if norm > 0 else float("nan")
    overlap = len(_top_set(a, top) & _top_set(b, top)) / top
    return {"spearman": spearman, "top_overlap": overlap, "top": top}


def save_needle_profile(
    path: str | os.PathLike[str],
    scores: np.ndarray,
    mask: Sequence[Sequence[bool]],
    model_name: str,
    info: dict[str, Any],
    group_size: int,
    *,
    granularity: str = "query",
    score_label: str = NEEDLE_SCORE_LABEL,
) -> tuple[Path, Path, Path]:
    """Writes a per-query-head profile (the needle score's, or another score ranked the same
    way, named by `score_label` in the heatmap): returns (<path>.json, <path>.png,
    <path>_layers.png).

    JSON: "model", "info", "granularity" (how `mask` was chosen), "group_size", "score"
    [layers][heads], "group_score" [layers][kv_heads], "retrieval_mask" [layers][heads] (query
    heads), "kv_retrieval_mask" [layers][kv_heads] (groups kept full: those holding any
    retrieval head; what a SparseConfig takes), "query_head_fraction" and "kv_group_fraction"
    (the shares of query heads and of KV groups kept full).
    PNGs: the score heatmap (layers x query heads, retrieval heads outlined in red, lines between
    KV groups) and a bar chart of retrieval heads per layer.
    """
    if granularity not in (*GRANULARITIES, UNION_GRANULARITY):
        raise ValueError(f"granularity must be one of {GRANULARITIES} or "
                         f"{UNION_GRANULARITY!r}, got {granularity!r}")
    scores = np.asarray(scores, np.float64)
    _check_grid(scores.shape, group_size)
    grid = np.asarray(mask, bool)
    if grid.shape != scores.shape:
        raise ValueError(f"mask is {list(grid.shape)}, scores are {list(scores.shape)}")
    kv_mask = kv_retrieval_mask(grid, group_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.with_suffix("")
    json_path, png_path = path.with_suffix(".json"), path.with_suffix(".png")
    counts_path = base.with_name(base.name + "_layers.png")
    json_path.write_text(json.dumps({
        "model": model_name,
        "info": info,
        "granularity": granularity,
        "group_size": group_size,
        "score": np.round(scores, JSON_DECIMALS).tolist(),
        "group_score": np.round(group_scores(scores, group_size), JSON_DECIMALS).tolist(),
        "retrieval_mask": grid.tolist(),
        "kv_retrieval_mask": [list(row) for row in kv_mask],
        "query_head_fraction": float(grid.mean()),
        "kv_group_fraction": float(np.mean(kv_mask)),
    }, indent=1))
    chosen = f"{int(grid.sum())} of {grid.size} query heads"
    _plot_needle_heatmap(scores, grid, group_size, png_path,
                         title=f"{model_name}: {score_label}\nred: retrieval heads, "
                               f"{chosen} ({granularity} granularity)\nwhite lines: KV groups")
    _plot_layer_counts(grid, group_size, counts_path,
                       title=f"{model_name}: retrieval heads per layer ({chosen}; "
                             f"{int(np.sum(kv_mask))} of {np.size(kv_mask)} KV groups kept full)")
    return json_path, png_path, counts_path


def _figure_inches(base: float, per_item: float, items: int) -> float:
    return float(np.clip(base + per_item * items, MIN_FIGURE_INCHES, MAX_FIGURE_INCHES))


def _plot_needle_heatmap(scores: np.ndarray, mask: np.ndarray, group_size: int, path: Path,
                         title: str) -> None:
    """scores, mask: [layers, heads]."""
    plt = _pyplot()
    layers, heads = scores.shape
    fig, ax = plt.subplots(figsize=(
        _figure_inches(FIGURE_MARGIN_INCHES, HEATMAP_CELL_INCHES, heads),
        _figure_inches(FIGURE_MARGIN_INCHES, HEATMAP_ROW_INCHES, layers)))
    image = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")
    for layer, head in zip(*np.nonzero(mask), strict=True):
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False,
                                   edgecolor="red", linewidth=1.5))
    for boundary in range(group_size, heads, group_size):
        ax.axvline(boundary - 0.5, color="white", linewidth=0.8)
    step = 1 if heads <= MAX_LABELED_HEADS else group_size
    ax.set_xticks(range(0, heads, step))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def _plot_layer_counts(mask: np.ndarray, group_size: int, path: Path, title: str) -> None:
    """mask: [layers, heads]; bars of retrieval heads per layer over the heads kept full."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    layers, heads = mask.shape
    chosen = mask.sum(axis=1)
    full = np.asarray(kv_retrieval_mask(mask, group_size)).sum(axis=1) * group_size
    fig, ax = plt.subplots(figsize=(_figure_inches(FIGURE_MARGIN_INCHES, BAR_INCHES, layers),
                                    BAR_FIGURE_HEIGHT_INCHES))
    x = np.arange(layers)
    ax.bar(x, full, color="lightgray", label="query heads in KV groups kept full")
    ax.bar(x, chosen, width=0.5, color="tab:red", label="retrieval heads")
    ax.set_xlim(-0.5, layers - 0.5)
    ax.set_ylim(0, heads)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("query heads")
    ax.set_title(title, fontsize=8)
    # Outside the axes: a full layer's bar reaches the top.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)

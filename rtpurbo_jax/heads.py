"""Retrieval-head profiling: which KV heads must keep full attention.

A retrieval head is one that, when the model copies a fact from far back, looks at that fact.
We measure it directly on long-context retrieval samples: run the frozen model over prompt +
correct answer (teacher forcing) and, at each position that predicts an answer token, read every
KV group's attention (averaged over its query heads):

  retrieval score = attention mass on the needle tokens the answer comes from;
  far mass        = attention mass outside the sink block and the local window.

The score of a (layer, KV head) is its mean needle mass over samples; the heads with the highest
scores keep full attention. The far mass is reported beside it: a head with high far mass but
low needle mass reads long range without retrieving (a candidate if the budget allows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.attention import dense_prefill
from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.model import Params, decoder
from rtpurbo_jax.tasks import Sample
from rtpurbo_jax.teacher import attention_probs

# The sink and local window excluded from the far mass, in tokens.
FAR_SINK_TOKENS = 64
FAR_LOCAL_TOKENS = 128


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

    def attend(i: int, q: jax.Array, k: jax.Array, v: jax.Array, state: Any):
        out = dense_prefill(q, k, v, lengths, backend=backend)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

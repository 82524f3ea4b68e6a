"""A functional Llama-family decoder: a params pytree in, hidden states and logits out.

Parameters are a plain dict:
  embed:      [vocab, embed]
  layers:     a list, one dict per layer:
    attn_norm [embed]; wq [embed, heads, head_dim]; wk, wv [embed, kv_heads, head_dim];
    wo [heads, head_dim, embed]; optional bq [heads, head_dim], bk, bv [kv_heads, head_dim],
    bo [embed];
    optional q_norm, k_norm [head_dim] (Qwen3);
    mlp_norm [embed]; w_gate, w_up [embed, mlp]; w_down [mlp, embed]; optional b_gate, b_up [mlp],
    b_down [embed]
  final_norm: [embed]
  lm_head:    [embed, vocab] (absent when the embedding is tied)

Layers are a Python list rather than one stacked array so that each layer can route its heads
differently (retrieval heads are chosen per layer) with static shapes.
Attention itself is passed in (`attend`), so this file knows nothing of caches or sparsity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.rope import apply_rope, rope_tables

Params = dict[str, Any]


class QKV(NamedTuple):
    """One layer's attention inputs.

    q: [batch, seq, heads, head_dim] and k: [batch, seq, kv_heads, head_dim] rotated (RoPE
    applied), as attention uses them; v like k; q_pre, k_pre: the same before RoPE (what the
    paper's indexer reads; unused arrays cost nothing under jit).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_pre: jax.Array
    k_pre: jax.Array


# attend(layer_index, qkv, layer_state) -> (out like qkv.q, layer_state)
AttendFn = Callable[[int, QKV, Any], tuple[jax.Array, Any]]

# Standard deviation of the random initialisation used for test models.
INIT_STDDEV = 0.02


def query_heads(kv_groups: tuple[int, ...], group_size: int) -> np.ndarray:
    """Indices of the query heads that belong to the given KV heads (GQA groups)."""
    return np.array([g * group_size + j for g in kv_groups for j in range(group_size)], np.int32)


def take_heads(x: jax.Array, index: np.ndarray) -> jax.Array:
    """x[:, :, index] along the head axis; no copy when index is every head in order."""
    if len(index) == x.shape[2] and (index == np.arange(x.shape[2])).all():
        return x
    return x[:, :, index]


def head_keys(k: jax.Array, heads: tuple[int, ...], group_size: int) -> jax.Array:
    """k: [b, t, kv_heads, d] -> [b, t, len(heads), d]: each query head's own KV head."""
    return k[:, :, np.asarray([h // group_size for h in heads], np.int32)]


def merge_heads(parts: list[tuple[Any, jax.Array]], num_heads: int) -> jax.Array:
    """Reassembles [b, t, n_i, d] pieces, given the query heads of each, into head order."""
    index = np.concatenate([np.asarray(h, np.int32) for h, _ in parts])
    out = jnp.concatenate([x for _, x in parts], axis=2) if len(parts) > 1 else parts[0][1]
    return out if (index == np.arange(num_heads)).all() else out[:, :, np.argsort(index)]


def layer_param_axes(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Logical axis names of one layer's parameters (for sharding rules)."""
    axes = {
        "attn_norm": ("embed",),
        "wq": ("embed", "heads", "head_dim"),
        "wk": ("embed", "kv_heads", "head_dim"),
        "wv": ("embed", "kv_heads", "head_dim"),
        "wo": ("heads", "head_dim", "embed"),
        "mlp_norm": ("embed",),
        "w_gate": ("embed", "mlp"),
        "w_up": ("embed", "mlp"),
        "w_down": ("mlp", "embed"),
    }
    if config.qkv_bias:
        axes.update(bq=("heads", "head_dim"), bk=("kv_heads", "head_dim"),
                    bv=("kv_heads", "head_dim"))
    if config.o_bias:
        axes["bo"] = ("embed",)
    if config.qk_norm:
        axes.update(q_norm=("head_dim",), k_norm=("head_dim",))
    if config.mlp_bias:
        axes.update(b_gate=("mlp",), b_up=("mlp",), b_down=("embed",))
    return axes


def param_axes(config: ModelConfig) -> Params:
    """A pytree shaped like the params whose leaves are tuples of logical axis names."""
    axes: Params = {
        "embed": ("vocab", "embed"),
        "layers": [layer_param_axes(config) for _ in range(config.num_layers)],
        "final_norm": ("embed",),
    }
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> Params:
    """A pytree shaped like the params whose leaves are the expected shapes."""
    sizes = {
        "vocab": config.vocab_size,
        "embed": config.hidden_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "mlp": config.intermediate_size,
    }
    return jax.tree.map(
        lambda names: tuple(sizes[n] for n in names),
        param_axes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_params(config: ModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random parameters (normal weights, norms near one) for tests and tiny experiments."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys, strict=True):
        noise = INIT_STDDEV * jax.random.normal(k, shape, jnp.float32)
        out.append((1.0 + noise if "norm" in path else noise).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 and cast back (as Hugging Face does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _project_rows(h: jax.Array, weights: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """h: [batch, seq, embed] @ each w: [embed, heads, head_dim] -> [batch, seq, heads, head_dim].

    A single row (batch-1 decode) goes through the GEMMs with a zero second row: XLA's GPU
    compiler rewrites a vector-matrix product under 10M weight entries (the K and V projections
    of an 8B model) as a multiply and a reduction, which on the H100 wrote the bf16 products of
    K and V as weight-sized arrays and read them back (0.9 ms of an 11 ms step at 128K, and
    products rounded to bf16 before the sum).
    """
    rows = h.shape[1]
    if h.shape[0] * rows == 1:
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 0)))
    return tuple(jnp.einsum("bse,ehd->bshd", h, w)[:, :rows] for w in weights)


def project_qkv(
    layer: Params, h: jax.Array, cos: jax.Array, sin: jax.Array, config: ModelConfig
) -> QKV:
    """Projects h: [batch, seq, embed] to q, k, v, rotated and before RoPE (see QKV)."""
    q, k, v = _project_rows(h, (layer["wq"], layer["wk"], layer["wv"]))
    if config.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    if config.qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    return QKV(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, q, k)


def output_projection(layer: Params, attn: jax.Array, config: ModelConfig) -> jax.Array:
    """attn: [batch, seq, heads, head_dim] -> [batch, seq, embed]."""
    out = jnp.einsum("bshd,hde->bse", attn, layer["wo"])
    return out + layer["bo"] if config.o_bias else out


def mlp(layer: Params, h: jax.Array, config: ModelConfig) -> jax.Array:
    """SwiGLU feed-forward. h: [batch, seq, embed] -> [batch, seq, embed]."""
    gate = h @ layer["w_gate"]
    up = h @ layer["w_up"]
    if config.mlp_bias:
        gate, up = gate + layer["b_gate"], up + layer["b_up"]
    out = (jax.nn.silu(gate) * up) @ layer["w_down"]
    return out + layer["b_down"] if config.mlp_bias else out


def decoder(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    config: ModelConfig,
    attend: AttendFn,
    states: list[Any],
) -> tuple[jax.Array, list[Any]]:
    """Runs every layer.

    tokens, positions: [batch, seq] int32. states: one attention state per layer (a KV cache slice,
    or None), threaded through `attend`. Returns (final normed hidden [batch, seq, embed], states).
    """
    x = params["embed"][tokens]
    cos, sin = rope_tables(positions, config)
    new_states = []
    for i, layer in enumerate(params["layers"]):
        h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        attn, state = attend(i, project_qkv(layer, h, cos, sin, config), states[i])
        new_states.append(state)
        x = x + output_projection(layer, attn, config)
        h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
        x = x + mlp(layer, h, config)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), new_states


def lm_logits(params: Params, hidden: jax.Array, config: ModelConfig) -> jax.Array:
    """hidden: [..., embed] -> float32 logits [..., vocab]."""
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return (hidden @ head).astype(jnp.float32)

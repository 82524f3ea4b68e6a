"""LoRA adapters on named projections of every layer, for stage 2's low-rank fine-tune.

An adapter on a weight W of a layer holds a: [in..., rank] and b: [rank, out...], where in...
and out... are W's input and output dimensions in our layout (model.py): wq [embed | heads,
head_dim], wk, wv [embed | kv_heads, head_dim], wo [heads, head_dim | embed], w_gate, w_up
[embed | mlp], w_down [mlp | embed]. The adapted weight is W + (alpha / rank) * a @ b; b starts
at zero, so fresh adapters change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rtpurbo_jax.config import ConfigError, ModelConfig
from rtpurbo_jax.model import Params, layer_param_axes

# Weight name -> how many of its leading dimensions are inputs (the rest are outputs).
INPUT_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
TARGETS = tuple(INPUT_DIMS)

Adapters = dict[str, Any]  # {"layers": [{weight name: {"a": ..., "b": ...}}, ...]}


def check_lora(rank: int, targets: Sequence[str]) -> None:
    """One ConfigError per misuse: rank < 0, or a target that is not an adaptable weight."""
    if rank < 0:
        raise ConfigError(f"distill.lora_rank must be >= 0 (0: full fine-tune), got {rank}")
    unknown = [t for t in targets if t not in INPUT_DIMS]
    if unknown:
        raise ConfigError(f"distill.lora_targets {unknown} are not adaptable weights; choose "
                          f"from {TARGETS}")
    if rank > 0 and not targets:
        raise ConfigError("distill.lora_rank > 0 needs at least one of distill.lora_targets")


def init_lora(config: ModelConfig, rank: int, targets: Sequence[str], key: jax.Array,
              dtype: Any = jnp.float32) -> Adapters:
    """Fresh adapters: a ~ N(0, 1 / fan_in) so the first update moves every direction, b = 0."""
    check_lora(rank, targets)
    axes = layer_param_axes(config)
    sizes = {"embed": config.hidden_size, "heads": config.num_heads,
             "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
             "mlp": config.intermediate_size}
    layers = []
    for layer_key in jax.random.split(key, config.num_layers):
        layer = {}
        for name, k in zip(targets, jax.random.split(layer_key, len(targets)), strict=True):
            dims = [sizes[a] for a in axes[name]]
            fan_in = dims[:INPUT_DIMS[name]]
            a = jax.random.normal(k, (*fan_in, rank), jnp.float32) / math.sqrt(math.prod(fan_in))
            b = jnp.zeros((rank, *dims[INPUT_DIMS[name]:]), jnp.float32)
            layer[name] = {"a": a.astype(dtype), "b": b.astype(dtype)}
        layers.append(layer)
    return {"layers": layers}


def lora_delta(adapter: dict[str, jax.Array], alpha: float) -> jax.Array:
    """(alpha / rank) * a @ b, shaped like the adapted weight."""
    a, b = adapter["a"], adapter["b"]
    rank = a.shape[-1]
    return (alpha / rank) * jnp.tensordot(a, b, axes=1)


def apply_lora(params: Params, adapters: Adapters, alpha: float) -> Params:
    """params with every adapted weight replaced by W + delta (in W's dtype). Differentiable in
    the adapters; the merged weights of an exported model are exactly this."""
    layers = []
    for layer, adapted in zip(params["layers"], adapters["layers"], strict=True):
        layer = dict(layer)
        for name, adapter in adapted.items():
            layer[name] = (layer[name] + lora_delta(adapter, alpha)).astype(layer[name].dtype)
        layers.append(layer)
    return {**params, "layers": layers}


def lora_axes(config: ModelConfig, targets: Sequence[str]) -> Adapters:
    """Logical axis names of the adapters (for sharding): a keeps W's input axes, b its output
    axes; the rank axis is never split."""
    axes = layer_param_axes(config)
    layer = {name: {"a": (*axes[name][:INPUT_DIMS[name]], "lora_rank"),
                    "b": ("lora_rank", *axes[name][INPUT_DIMS[name]:])} for name in targets}
    return {"layers": [layer for _ in range(config.num_layers)]}

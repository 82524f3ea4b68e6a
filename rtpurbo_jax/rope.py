"""Rotary position embeddings (RoPE) with the scaling variants of the supported families.

Uses the "rotate half" layout of Hugging Face checkpoints: dimension i pairs with i + head_dim/2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.config import ModelConfig

# YaRN defaults from the YaRN paper, as Hugging Face applies them.
_YARN_BETA_FAST = 32.0
_YARN_BETA_SLOW = 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Returns (inv_freq: [head_dim // 2] float32, attention_factor) for the config's rope type.

    attention_factor multiplies cos and sin (only YaRN sets it away from 1). Computed in float32,
    as Hugging Face does, so that the rotations match theirs to the last bit where possible.
    """
    dim = config.head_dim
    base = np.float32(config.rope_theta)
    inv_freq = np.float32(1.0) / base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    scaling = config.rope_scaling_dict
    kind = config.rope_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "factors":
        return (inv_freq / np.asarray(scaling["factors"], np.float32)).astype(np.float32), 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low_wavelen = original / float(scaling["low_freq_factor"])
        high_wavelen = original / float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling["low_freq_factor"]) / (
            scaling["high_freq_factor"] - scaling["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or _YARN_BETA_FAST
    beta_slow = scaling.get("beta_slow") or _YARN_BETA_SLOW

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_tables(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [*positions.shape, head_dim] float32 for integer positions."""
    inv_freq, factor = inverse_frequencies(config)
    # Angles in float32 as Hugging Face computes them, so parity holds at long positions too.
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, head_dim]. Same dtype as x."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)

"""A tiny random model for fast tests (no checkpoint needed)."""

from __future__ import annotations

import jax

from rtpurbo_jax.api import SparseModel
from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.model import init_params

TINY = ModelConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=256, eos_token_ids=(1,))


def tiny_model(seed: int = 0, config: ModelConfig = TINY, **kwargs) -> SparseModel:
    # Scaled-up weights so that logits are far from uniform and greedy choices are stable.
    params = jax.tree.map(lambda x: x * 4.0, init_params(config, jax.random.key(seed)))
    return SparseModel(config, params, **kwargs)

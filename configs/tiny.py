"""A tiny randomly initialised Llama-architecture model for tests (no checkpoint)."""

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.name = "tiny"
    config.model = ml_collections.ConfigDict()
    # "random": build the architecture below with random weights (seeded).
    config.model.source = "random"
    config.model.seed = 0
    config.model.dtype = "float32"
    config.model.arch = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
    ))
    config.sparse.update(rank=4, block_q=16, block_k=16)
    config.heads.update(length=512, samples=2, batch_size=2, rule="count", rule_value=1)
    config.train.update(steps=6, seq_len=256, batch_size=2, warmup_steps=2, checkpoint_every=2,
                        calibration_windows=2)
    config.data.tasks = ("passkey",)  # the one task that fits 256 byte tokens
    config.eval.update(lengths=(512, 1024), samples=2, batch_size=2, max_new_tokens=4,
                       perplexity_windows=2)
    config.schedule = "full"  # already tiny
    return config

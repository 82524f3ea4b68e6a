"""Llama-3-8B-Instruct-Gradient-1048k: Llama 3 8B with its context extended to 1,048,576 tokens."""

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.name = "llama_1m"
    config.model = ml_collections.ConfigDict()
    config.model.source = "gradientai/Llama-3-8B-Instruct-Gradient-1048k"
    config.model.dtype = "bfloat16"
    config.model.arch = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=3580165449.0, max_position_embeddings=1048576,
        tie_word_embeddings=False,
    ))
    # The known recipe: ~600 steps at 128K tokens, warm-up 100; heads profiled at 32K.
    config.train.steps = 600
    config.train.seq_len = 131072
    config.train.batch_size = 1
    config.train.warmup_steps = 100
    config.heads.length = 32768
    config.eval.lengths = (8192, 32768, 131072)
    return config

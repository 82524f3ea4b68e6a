"""Llama-3-8B-Instruct-Gradient-1048k: Llama 3 8B with its context extended to 1,048,576 tokens."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
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
    return config

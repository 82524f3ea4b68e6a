"""Shared fixtures. Tests run on the CPU; the default model is fetched once into the cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct), float32, loaded once per session."""
    import rtpurbo_jax

    return rtpurbo_jax.load()


@pytest.fixture(scope="session")
def default_model_hf():
    """transformers' own reading of the same GGUF file, the reference for parity."""
    import torch
    from transformers import AutoModelForCausalLM

    from rtpurbo_jax.assets import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()

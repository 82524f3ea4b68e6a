"""Shared fixtures. Tests run on the CPU; the default model is fetched once into the cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops every compiled program after each test module. Each XLA:CPU executable holds a
    few memory mappings (its LLVM JIT sections) while JAX's caches keep it: the whole suite in
    one process passed Linux's vm.max_map_count (65530 mappings), where the next compile failed
    (LLVM "Cannot allocate memory", then an abort or a segfault)."""
    yield
    import jax

    jax.clear_caches()


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

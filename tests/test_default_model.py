"""The embedded default model (SmolLM2-135M-Instruct) against transformers' reading of it."""

from __future__ import annotations

import inspect

import numpy as np
import torch

import rtpurbo_jax
from rtpurbo_jax.assets import DEFAULT_MODEL_NAME

PARITY = 1e-5  # max |ours - ref| / max |ref|, float32
PROMPT_TOKENS = 512


def _prompt(tokenizer) -> np.ndarray:
    # Real text: the source of this package, which every install has.
    text = inspect.getsource(rtpurbo_jax.hf)
    ids = tokenizer(text, return_tensors="np").input_ids[:, :PROMPT_TOKENS]
    assert ids.shape[1] == PROMPT_TOKENS
    return ids


def test_config(default_model):
    c = default_model.config
    assert (c.family, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama", 30, 9, 3, 64)
    assert c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert c.tie_word_embeddings and c.name == DEFAULT_MODEL_NAME


def test_logits_match_transformers(default_model, default_model_hf):
    ids = _prompt(default_model.tokenizer)
    with torch.no_grad():
        ref = default_model_hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(default_model(ids))
    error = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"parity default model, {ids.shape[1]} tokens: {error:.2e}")  # pytest -s
    assert error <= PARITY


def test_greedy_generation_matches_transformers(default_model, default_model_hf):
    tok = default_model.tokenizer
    chat = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="np",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = default_model_hf.generate(torch.tensor(ids), max_new_tokens=20, do_sample=False,
                                        eos_token_id=None, pad_token_id=tok.eos_token_id)
    ref_new = ref.numpy()[0, ids.shape[1]:]
    ours = default_model.generate(ids, 20, eos_token_id=())[0]
    assert len(ref_new) == 20
    np.testing.assert_array_equal(ours, ref_new)

"""Export of a converted model as a Hugging Face directory, the inverse of hf.py's import.

Stage 2 of the conversion fine-tunes the model's own weights, so its result is a new model; this
writes it where transformers (dense) and `rtpurbo_jax.load` (dense or sparse) both read it:

  <path>/config.json              Hugging Face config, with torch_dtype
  <path>/model.safetensors        Hugging Face tensor names and [out, in] layouts
  <path>/tokenizer*.json, ...     the tokenizer's own files (tokenizer.save_pretrained)
  <path>/sparse.json              the sparse checkpoint (checkpoint.py), its base being these
  <path>/indexer.safetensors        weights and "derived_from" the original base model
  <path>/rtpurbo.json             where the model comes from (see `export_model`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.checkpoint import export_safetensors
from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig
from rtpurbo_jax.hf import LAYER_MAP, weights_fingerprint
from rtpurbo_jax.model import Params

FORMAT = "rtpurbo_jax.model/1"
ORIGIN_FILE = "rtpurbo.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# ModelConfig fields whose value each transformers class hard-codes (attention_bias, where a
# class reads it, sets qkv_bias and o_bias together).
_FIXED = {
    "llama": {"qk_norm": False, "sliding_window": None},
    "mistral": {"qkv_bias": False, "o_bias": False, "mlp_bias": False, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False,
              "sliding_window": None},
    "qwen3": {"mlp_bias": False, "qk_norm": True, "sliding_window": None},
}


def _check_expressible(config: ModelConfig) -> None:
    """Raises ConfigError naming what the family's transformers class cannot express."""
    problems = [f"{field}={getattr(config, field)!r} (transformers fixes {value!r})"
                for field, value in _FIXED[config.family].items()
                if getattr(config, field) != value]
    if config.qkv_bias != config.o_bias and config.family != "qwen2":
        problems.append(f"qkv_bias={config.qkv_bias} with o_bias={config.o_bias} (one "
                        "attention_bias sets both)")
    if config.rope_type == "factors":
        problems.append("rope type 'factors' (per-frequency divisors, as a GGUF file stores "
                        "Llama 3 scaling; load the model's safetensors checkpoint instead)")
    if problems:
        raise ConfigError(f"{config.name or config.family} has no Hugging Face "
                          f"{config.family} config: " + "; ".join(problems))


def hf_config(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The Hugging Face config.json dict of `config`: `ModelConfig.from_hf` inverted.

    dtype: the weights' dtype, recorded as torch_dtype. RoPE is written both in the transformers 5
    layout (rope_parameters) and the transformers 4 one (rope_theta + rope_scaling), which other
    readers of config.json still use. Raises ConfigError for a config that the family's
    transformers class cannot express (see _FIXED).
    """
    _check_expressible(config)
    scaling = config.rope_scaling_dict
    eos = list(config.eos_token_ids)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": {"rope_type": config.rope_type, "rope_theta": config.rope_theta,
                            **scaling},
        "rope_theta": config.rope_theta,
        "rope_scaling": {"rope_type": config.rope_type, **scaling} if scaling else None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if config.family != "qwen2":  # Qwen2's biases are fixed by its class
        hf["attention_bias"] = config.qkv_bias
    if config.family == "llama":
        hf["mlp_bias"] = config.mlp_bias
    # Mistral's class defaults to a 4096-token window, so "none" must be written out.
    hf["sliding_window"] = config.sliding_window
    if config.family.startswith("qwen"):
        hf["use_sliding_window"] = False
    return hf


def _unlayout(array: np.ndarray, how: str) -> np.ndarray:
    """hf._layout inverted: our layout -> Hugging Face's ([out, in] weights, flat biases)."""
    if how == "vector":
        return array
    if how == "transpose":
        return array.T
    if how in ("in_heads", "in_kv_heads"):  # [embed, heads, d] -> [heads*d, embed]
        return array.reshape(array.shape[0], -1).T
    if how == "out_heads":  # [heads, d, embed] -> [embed, heads*d]
        return array.reshape(-1, array.shape[-1]).T
    if how in ("bias_heads", "bias_kv_heads"):  # [heads, d] -> [heads*d]
        return array.reshape(-1)
    raise AssertionError(how)


def hf_state_dict(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params pytree -> Hugging Face tensors (contiguous numpy, the params' dtype).

    `hf.convert_state_dict` inverted: a tied embedding gets no lm_head.weight.
    """
    def host(array: Any, how: str = "vector") -> np.ndarray:
        return np.ascontiguousarray(_unlayout(np.asarray(array), how))

    tensors = {"model.embed_tokens.weight": host(params["embed"]),
               "model.norm.weight": host(params["final_norm"])}
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = host(params["lm_head"], "transpose")
    for i, layer in enumerate(params["layers"]):
        for name, array in layer.items():
            suffix, how = LAYER_MAP[name]
            tensors[f"model.layers.{i}.{suffix}"] = host(array, how)
    return tensors


def export_model(
    path: str | os.PathLike[str],
    params: Params,
    config: ModelConfig,
    tokenizer: Any = None,
    *,
    sparse: SparseConfig | None = None,
    indexer: dict[str, Any] | None = None,
    origin: dict[str, Any],
    dtype: str = "bfloat16",
    name: str | None = None,
) -> Path:
    """Writes the model into the new (or empty) directory `path`; returns it.

    Files: see the module docstring. origin: where the model comes from; it must hold "base":
    {"name", "fingerprint"} of the original model (the one stage 1 and 2 started from) and may
    hold anything else JSON can ("stages", "steps", ...). rtpurbo.json is {"format", "base",
    "design" (sparse.design or None), **origin, "weights": {"fingerprint", "dtype"}}, the
    fingerprint being the one `rtpurbo_jax.load(path)` computes. With sparse and indexer, the
    sparse checkpoint's base is these weights, derived from origin["base"], so `load(path)`
    attaches it and `load(<original base>, sparse=path)` is refused.
    dtype: "bfloat16" or "float32", of the weights in model.safetensors.
    name: what the sparse checkpoint calls these weights (default: the directory's name; a
    caller that writes aside and renames passes the final one).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    base = origin.get("base")
    if not isinstance(base, dict) or not {"name", "fingerprint"} <= base.keys():
        raise ValueError('origin must hold "base": {"name", "fingerprint"} of the original model')
    if (sparse is None) != (indexer is None):
        raise ValueError("give sparse and indexer together (or neither, for a dense model)")
    if sparse is not None:
        sparse.check_model(config)
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty: export into a new directory, so that no "
                              "file of another model mixes with this one")
    config_dict = hf_config(config, dtype)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: array.astype(DTYPES[dtype])
               for name, array in hf_state_dict(params, config).items()}
    from safetensors.numpy import save_file

    # "format": "pt" is the metadata transformers expects of a PyTorch-readable file.
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    # The same tensors load_checkpoint reads back (bfloat16 widens to float32 exactly).
    fingerprint = weights_fingerprint(tensors)
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    if sparse is not None:
        export_safetensors(path, sparse, indexer, name or path.absolute().name, fingerprint,
                           derived_from=base)
    record = {"format": FORMAT, "design": None if sparse is None else sparse.design, **origin,
              "weights": {"fingerprint": fingerprint, "dtype": dtype}}
    (path / ORIGIN_FILE).write_text(json.dumps(record, indent=2))
    return path

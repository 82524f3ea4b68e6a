"""Import of Hugging Face checkpoints: a hub id, a local safetensors directory, or a GGUF file.

Every source is first turned into one flat dict of Hugging Face tensor names -> numpy arrays
(GGUF names are mapped to Hugging Face names and dequantised), then converted to our params
pytree by one name map that the four supported families share.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.config import ConfigError, ModelConfig
from rtpurbo_jax.model import Params, param_shapes

# Tensors a checkpoint may carry that the model does not use.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Elements per tensor that enter the weights fingerprint.
FINGERPRINT_SAMPLES = 65536

# Our per-layer parameter name -> (Hugging Face suffix, how to lay it out); export.py inverts it.
LAYER_MAP = {
    "attn_norm": ("input_layernorm.weight", "vector"),
    "wq": ("self_attn.q_proj.weight", "in_heads"),
    "wk": ("self_attn.k_proj.weight", "in_kv_heads"),
    "wv": ("self_attn.v_proj.weight", "in_kv_heads"),
    "wo": ("self_attn.o_proj.weight", "out_heads"),
    "bq": ("self_attn.q_proj.bias", "bias_heads"),
    "bk": ("self_attn.k_proj.bias", "bias_kv_heads"),
    "bv": ("self_attn.v_proj.bias", "bias_kv_heads"),
    "bo": ("self_attn.o_proj.bias", "vector"),
    "q_norm": ("self_attn.q_norm.weight", "vector"),
    "k_norm": ("self_attn.k_norm.weight", "vector"),
    "mlp_norm": ("post_attention_layernorm.weight", "vector"),
    "w_gate": ("mlp.gate_proj.weight", "transpose"),
    "w_up": ("mlp.up_proj.weight", "transpose"),
    "w_down": ("mlp.down_proj.weight", "transpose"),
    "b_gate": ("mlp.gate_proj.bias", "vector"),
    "b_up": ("mlp.up_proj.bias", "vector"),
    "b_down": ("mlp.down_proj.bias", "vector"),
}

# GGUF tensor names (llama.cpp) -> Hugging Face names.
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF metadata keys (after "<arch>.") -> Hugging Face config keys.
_GGUF_CONFIG_FIELDS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_GGUF_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# llama.cpp stores Llama-architecture q/k rows interleaved for its RoPE kernel; these undo it.
_GGUF_PERMUTED_ARCHS = ("llama", "mistral")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match its config."""


def _layout(array: np.ndarray, how: str, config: ModelConfig) -> np.ndarray:
    d = config.head_dim
    if how == "vector":
        return array
    if how == "transpose":
        return array.T
    if how in ("in_heads", "in_kv_heads"):  # [heads*d, embed] -> [embed, heads, d]
        return array.T.reshape(array.shape[1], -1, d)
    if how == "out_heads":  # [embed, heads*d] -> [heads, d, embed]
        return array.T.reshape(-1, d, array.shape[0])
    if how in ("bias_heads", "bias_kv_heads"):  # [heads*d] -> [heads, d]
        return array.reshape(-1, d)
    raise AssertionError(how)


def convert_state_dict(
    tensors: Mapping[str, np.ndarray], config: ModelConfig, dtype: Any, source: str
) -> Params:
    """Hugging Face tensors (numpy, [out, in] weights) -> our params pytree in `dtype`.

    Raises CheckpointError naming the source and the tensors that are missing, unexpected, or of
    the wrong shape for the config.
    """
    shapes = param_shapes(config)
    used: set[str] = set()
    problems: list[str] = []

    def take(hf_name: str, how: str, expected: tuple[int, ...]) -> Any:
        if hf_name not in tensors:
            problems.append(f"missing {hf_name} (expected shape {expected})")
            return None
        used.add(hf_name)
        raw = np.asarray(tensors[hf_name])
        try:
            array = _layout(raw, how, config)
        except ValueError:  # a reshape that cannot fit: reported as a shape mismatch below
            array = raw
        if array.shape != expected:
            problems.append(f"{hf_name} has shape {raw.shape}, the config implies {expected}")
            return None
        return jnp.asarray(array, dtype=dtype)

    params: Params = {
        "embed": take("model.embed_tokens.weight", "vector", shapes["embed"]),
        "final_norm": take("model.norm.weight", "vector", shapes["final_norm"]),
        "layers": [],
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = take("lm_head.weight", "transpose", shapes["lm_head"])
    for i, layer_shapes in enumerate(shapes["layers"]):
        params["layers"].append({
            name: take(f"model.layers.{i}.{LAYER_MAP[name][0]}", LAYER_MAP[name][1], shape)
            for name, shape in layer_shapes.items()
        })
    unexpected = sorted(n for n in tensors if n not in used and not _IGNORED.match(n))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # some tied checkpoints still carry a copy
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        problems.append(f"{len(unexpected)} tensors the config does not use: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not match its config ({config.family}, "
            f"{config.num_layers} layers):\n  " + "\n  ".join(problems[:20])
        )
    return params


def weights_fingerprint(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, shape and a fixed strided sample of its values.

    Cheap even for 8B models, and it changes when any tensor's shape or sampled weights change,
    which is what a sparse checkpoint needs to refuse a base model it was not made for.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        flat = array.reshape(-1)
        stride = max(1, flat.size // FINGERPRINT_SAMPLES)
        digest.update(name.encode())
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(flat[::stride].astype(np.float32)).tobytes())
    return digest.hexdigest()


def read_safetensors_dir(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a directory's weights: model.safetensors, shards named by
    model.safetensors.index.json, or else every `*.safetensors`.

    Naming the files keeps other safetensors beside the weights (an exported model's
    indexer.safetensors) out of the model.
    """
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no weights in {directory}: expected model.safetensors, or shards with "
            "model.safetensors.index.json"
        )
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    return tensors


def _unpermute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's interleaving of q/k rows ([n_head*head_dim, ...] or bias)."""
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _gguf_config(reader: Any, tensor_names: set[str]) -> dict[str, Any]:
    """A Hugging Face style config dict from a GGUF file's metadata (and which tensors it has)."""
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("tokenizer.ggml.") or name.endswith("_token_id")}
    arch = str(fields.get("general.architecture", ""))
    hf: dict[str, Any] = {"model_type": arch}
    for key, hf_key in _GGUF_CONFIG_FIELDS.items():
        if f"{arch}.{key}" in fields:
            hf[hf_key] = fields[f"{arch}.{key}"]
    if "vocab_size" not in hf and "tokenizer.ggml.tokens" in reader.fields:
        hf["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    rope = {"rope_theta": hf.pop("rope_theta", 10000.0)}
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        rope.update(rope_type=scaling, factor=fields[f"{arch}.rope.scaling.factor"])
        original = fields.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            rope["original_max_position_embeddings"] = original
    hf["rope_parameters"] = rope
    hf["tie_word_embeddings"] = "output.weight" not in tensor_names
    hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names and arch != "qwen2"
    hf["mlp_bias"] = "blk.0.ffn_gate.bias" in tensor_names
    hf["bos_token_id"] = fields.get("tokenizer.ggml.bos_token_id")
    hf["eos_token_id"] = fields.get("tokenizer.ggml.eos_token_id")
    return hf


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], bool]:
    """(Hugging Face config dict, Hugging Face tensors, has a tokenizer) of a GGUF file.

    Tensors are dequantised to float32. Llama 3 GGUFs carry their rope scaling as a
    `rope_freqs.weight` tensor of per-frequency divisors; it becomes rope type "factors".
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    hf_config = _gguf_config(reader, names)
    arch = hf_config["model_type"]
    n_head = int(hf_config.get("num_attention_heads", 1))
    n_kv = int(hf_config.get("num_key_value_heads") or n_head)
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        name = tensor.name
        if name == "rope_freqs.weight":
            hf_config["rope_parameters"].update(rope_type="factors",
                                                factors=[float(x) for x in array.reshape(-1)])
            continue
        if name in _GGUF_GLOBAL:
            tensors[_GGUF_GLOBAL[name]] = array
            continue
        match = _GGUF_LAYER_NAME.match(name)
        if not match or match.group(2) not in _GGUF_LAYER:
            tensors[name] = array  # reported as unexpected by convert_state_dict
            continue
        layer, part, kind = match.groups()
        if arch in _GGUF_PERMUTED_ARCHS and part in ("attn_q", "attn_k"):
            array = _unpermute_rows(array, n_head if part == "attn_q" else n_kv)
        tensors[f"model.layers.{layer}.{_GGUF_LAYER[part]}.{kind}"] = array
    return hf_config, tensors, "tokenizer.ggml.model" in reader.fields


def load_tokenizer(directory: Path, gguf_file: str | None = None) -> Any:
    """The source's tokenizer through transformers, or None when it ships none."""
    from transformers import AutoTokenizer

    if gguf_file is None and not any(
        (directory / f).exists()
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def resolve_source(source: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a path or a hub id; downloads hub ids."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; give a directory with "
                                  "config.json and *.safetensors, or a .gguf file")
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise CheckpointError(f"{path} has no config.json (and not exactly one .gguf file)")
    looks_like_path = str(source).startswith((".", "/", "~")) or str(source).endswith(".gguf")
    if looks_like_path or str(source).count("/") != 1:
        raise CheckpointError(f"{source}: no such file or directory (and not a hub id 'org/name')")
    return _download_from_hub(str(source)), None


def load_checkpoint(
    source: str | os.PathLike[str],
    dtype: Any = jnp.float32,
    with_tokenizer: bool = True,
    name: str | None = None,
) -> tuple[ModelConfig, Params, Any, str]:
    """Loads any supported source. Returns (config, params, tokenizer or None, fingerprint).

    name: the model's name in its config (default: the hub id, or the file or directory name).
    """
    directory, gguf_file = resolve_source(source)
    origin = str(directory / gguf_file) if gguf_file else str(directory)
    has_tokenizer = True
    if gguf_file:
        hf_config, tensors, has_tokenizer = read_gguf(directory / gguf_file)
    else:
        config_path = directory / "config.json"
        try:
            hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config_path} is not valid JSON: {err}") from err
        tensors = read_safetensors_dir(directory)
    if name is None:
        name = str(source) if not Path(str(source)).expanduser().exists() else Path(origin).stem
    config = ModelConfig.from_hf(hf_config, name=name)
    params = convert_state_dict(tensors, config, dtype, origin)
    tokenizer = load_tokenizer(directory, gguf_file) if with_tokenizer and has_tokenizer else None
    return config, params, tokenizer, weights_fingerprint(tensors)

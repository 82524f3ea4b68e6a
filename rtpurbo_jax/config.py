"""Model configuration parsed from a Hugging Face config, and the sparse (RTPurbo) configuration."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# "factors" divides each frequency by a given factor (how GGUF files store Llama 3 scaling).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "factors")


class ConfigError(ValueError):
    """A configuration is invalid or unsupported; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a decoder-only Llama-family transformer.

    Built from a Hugging Face `config.json` dict with `ModelConfig.from_hf`. Frozen and hashable so
    it can be a static argument of jitted functions.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Sorted (key, value) pairs of the rope scaling dict; () means plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"unsupported architecture family {self.family!r}; supported: {SUPPORTED_FAMILIES}"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def rope_type(self) -> str:
        return str(self.rope_scaling_dict.get("rope_type", "default"))

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], name: str = "") -> ModelConfig:
        """Parses a Hugging Face config dict (`config.json` or `PretrainedConfig.to_dict()`).

        Handles both the transformers 4 layout (`rope_theta` + `rope_scaling`) and the
        transformers 5 layout (`rope_parameters`).
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_FAMILIES:
            archs = hf.get("architectures")
            raise ConfigError(
                f"unsupported model_type {model_type!r} (architectures={archs}); "
                f"supported: {SUPPORTED_FAMILIES}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"config is missing the required field {key!r}")
        if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise ConfigError(f"{model_type} with use_sliding_window=True is not supported")
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if "factors" in rope:
            rope["factors"] = tuple(rope["factors"])
        if rope.get("rope_type", "default") == "default":
            rope = {}
        elif "original_max_position_embeddings" not in rope and "factors" not in rope:
            rope["original_max_position_embeddings"] = hf.get("max_position_embeddings")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial rotary embeddings are not supported")
        rope.pop("partial_rotary_factor", None)
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            family=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no output bias; the others follow attention_bias.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            # Qwen configs carry a sliding_window that only applies with use_sliding_window.
            sliding_window=None if model_type.startswith("qwen") else hf.get("sliding_window"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            name=name or str(hf.get("_name_or_path", "")),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        fields = json.loads(text)
        fields["rope_scaling"] = tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in fields["rope_scaling"])
        fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        return cls(**fields)


SELECTION_MODES = ("top_p", "top_k")
# Where block scores come from: the trained indexer, the model's true attention (an upper bound
# for any indexer), or nowhere (only the forced sink and local blocks).
SCORERS = ("indexer", "oracle", "none")
# How heads are routed (see SparseConfig).
DESIGNS = ("indexer", "paper")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """What turns a dense model into an RTPurbo one, in one of two designs.

    design "indexer" (our first design): retrieval_mask[layer][kv_head] is True for KV heads (GQA
    groups) that keep full attention; every other group attends, in prefill and decode, to the
    key blocks its post-RoPE indexer selects. Every group keeps its full KV cache.

    design "paper" (the paper's): retrieval_mask[layer][query_head] is True for retrieval query
    heads: dense in prefill, top-p block-sparse in decode, the blocks chosen by a pre-RoPE indexer
    of their own. Every other query head is local: it sees the first `sink_tokens` keys and the
    last `window` keys (itself included), in prefill and decode. A KV group whose query heads are
    all local keeps only a ring buffer of sink_tokens + window keys; `group_size` (query heads per
    KV head) maps query heads to groups.

    Blocks are `block_k` keys; in prefill a query block of `block_q` tokens shares one selection.
    The first `sink_blocks` blocks and the last `local_blocks` causal blocks are always kept; then
    either top-p (the smallest set whose indexer mass reaches `top_p`) or top-k (`top_k_blocks`
    blocks in all), clamped to [min_blocks, max_blocks] (max_blocks None: no cap). The indexer
    projects queries and keys to `rank` dims; its logits are scaled by 1 / temperature. `scorer`
    says what ranks the blocks (see SCORERS).
    """

    retrieval_mask: tuple[tuple[bool, ...], ...]
    rank: int = 16
    top_p: float = 0.9
    block_q: int = 64
    block_k: int = 64
    sink_blocks: int = 1
    local_blocks: int = 2
    min_blocks: int = 0
    max_blocks: int | None = None
    temperature: float = 1.0
    selection: str = "top_p"
    top_k_blocks: int | None = None
    scorer: str = "indexer"
    design: str = "indexer"
    group_size: int = 1
    sink_tokens: int = 4
    window: int = 1024

    def __post_init__(self) -> None:
        mask = tuple(tuple(bool(x) for x in row) for row in self.retrieval_mask)
        object.__setattr__(self, "retrieval_mask", mask)
        if self.design not in DESIGNS:
            raise ConfigError(f"design must be one of {DESIGNS}, got {self.design!r}")
        if not mask or len({len(row) for row in mask}) != 1 or not mask[0]:
            raise ConfigError("retrieval_mask must be a non-empty [layers][heads] grid")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.rank <= 0:
            raise ConfigError(f"rank must be positive, got {self.rank}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        for name in ("block_q", "block_k"):
            if not _is_power_of_two(getattr(self, name)):
                raise ConfigError(f"{name} must be a power of two, got {getattr(self, name)}")
        if self.sink_blocks < 0 or self.local_blocks < 1:
            raise ConfigError("sink_blocks must be >= 0 and local_blocks >= 1 (the diagonal "
                              f"block), got {self.sink_blocks} and {self.local_blocks}")
        if self.min_blocks < 0:
            raise ConfigError(f"min_blocks must be >= 0, got {self.min_blocks}")
        forced = self.sink_blocks + self.local_blocks
        if self.max_blocks is not None and self.max_blocks < max(forced, self.min_blocks):
            raise ConfigError(f"max_blocks ({self.max_blocks}) must be >= sink_blocks + "
                              f"local_blocks ({forced}) and >= min_blocks ({self.min_blocks})")
        if self.selection not in SELECTION_MODES:
            raise ConfigError(f"selection must be one of {SELECTION_MODES}, got {self.selection!r}")
        if self.selection == "top_k" and (self.top_k_blocks is None or self.top_k_blocks < 1):
            raise ConfigError("selection 'top_k' needs top_k_blocks >= 1")
        if self.scorer not in SCORERS:
            raise ConfigError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.design == "paper":
            self._check_paper()

    def _check_paper(self) -> None:
        if self.group_size < 1 or len(self.retrieval_mask[0]) % self.group_size:
            raise ConfigError(f"group_size ({self.group_size}) must divide the query heads per "
                              f"layer ({len(self.retrieval_mask[0])})")
        if self.window < self.block_k:
            raise ConfigError(f"window ({self.window} tokens) is smaller than a block (block_k "
                              f"= {self.block_k}); use a window of at least one block")
        if not 0 <= self.sink_tokens <= self.window:
            raise ConfigError(f"sink_tokens ({self.sink_tokens}) must be in [0, window = "
                              f"{self.window}]")

    @property
    def num_layers(self) -> int:
        return len(self.retrieval_mask)

    @property
    def num_kv_heads(self) -> int:
        if self.design == "paper":
            return len(self.retrieval_mask[0]) // self.group_size
        return len(self.retrieval_mask[0])

    def retrieval_groups(self, layer: int) -> tuple[int, ...]:
        """KV heads of `layer` that keep full attention (design "indexer")."""
        return tuple(g for g, dense in enumerate(self.retrieval_mask[layer]) if dense)

    def sparse_groups(self, layer: int) -> tuple[int, ...]:
        """KV heads of `layer` that attend to selected blocks (design "indexer")."""
        return tuple(g for g, dense in enumerate(self.retrieval_mask[layer]) if not dense)

    def retrieval_heads(self, layer: int) -> tuple[int, ...]:
        """Query heads of `layer` that are retrieval heads (design "paper")."""
        return tuple(h for h, r in enumerate(self.retrieval_mask[layer]) if r)

    def local_heads(self, layer: int) -> tuple[int, ...]:
        """Query heads of `layer` on sinks + window (design "paper")."""
        return tuple(h for h, r in enumerate(self.retrieval_mask[layer]) if not r)

    def full_groups(self, layer: int) -> tuple[int, ...]:
        """KV heads of `layer` that keep their full KV cache (design "paper"): those with a
        retrieval query head. A group may drop its far past only when all its heads are local."""
        return tuple(sorted({h // self.group_size for h in self.retrieval_heads(layer)}))

    def window_groups(self, layer: int) -> tuple[int, ...]:
        """KV heads of `layer` whose query heads are all local (design "paper"): they keep a ring
        buffer of sink_tokens + window keys."""
        full = set(self.full_groups(layer))
        return tuple(g for g in range(self.num_kv_heads) if g not in full)

    def indexed_heads(self, layer: int) -> tuple[int, ...]:
        """What carries indexer weights in `layer`: the sparse KV groups (design "indexer") or
        the retrieval query heads (design "paper")."""
        if self.design == "paper":
            return self.retrieval_heads(layer)
        return self.sparse_groups(layer)

    @property
    def query_head_fraction(self) -> float:
        """Fraction of query heads with full attention in prefill (retrieval heads)."""
        cells = [x for row in self.retrieval_mask for x in row]
        return sum(cells) / len(cells)

    @property
    def kv_group_fraction(self) -> float:
        """Fraction of KV groups that keep their full KV cache."""
        if self.design == "indexer":
            return 1.0
        full = sum(len(self.full_groups(layer)) for layer in range(self.num_layers))
        return full / (self.num_layers * self.num_kv_heads)

    @property
    def retrieval_fraction(self) -> float:
        """Fraction of heads that are retrieval heads: of KV heads (design "indexer"), of query
        heads (design "paper")."""
        return self.query_head_fraction

    def check_model(self, model: ModelConfig) -> None:
        """Raises ConfigError unless this config fits `model`."""
        if self.design == "paper":
            shape = (model.num_layers, model.num_heads)
            what = "[layers][query heads]"
            if self.group_size != model.group_size:
                raise ConfigError(f"group_size is {self.group_size}, the model's GQA group is "
                                  f"{model.group_size}")
        else:
            shape = (model.num_layers, model.num_kv_heads)
            what = "[layers][kv_heads]"
        have = (self.num_layers, len(self.retrieval_mask[0]))
        if have != shape:
            raise ConfigError(f"retrieval_mask is [{have[0]}][{have[1]}], the model has {what} "
                              f"= {list(shape)}")
        if model.sliding_window is not None and self.query_head_fraction < 1.0:
            raise ConfigError("sparse heads on a sliding-window model are not supported")

    def replace(self, **changes: Any) -> SparseConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SparseConfig:
        return cls(**json.loads(text))

"""A Flax NNX surface over the functional core: modules that hold the weights, code that doesn't.

    from rtpurbo_jax import load, nnx as rnnx
    decoder = rnnx.from_model(load(...))            # nnx.Module; its Params wrap model.params
    logits = decoder(tokens, lengths)               # == generate.forward(...)[0]
    attn = decoder.layers[3].attn                   # RTPurboAttention: drop into your own model
    params, indexer = rnnx.to_params(decoder)       # back to the functional pytrees

No computation lives here. `RTPurboAttention.__call__` runs `model.project_qkv`, the routed
attention of `attention.prefill_attend` (dense, indexer or paper design) and
`model.output_projection`; `Decoder.__call__` runs `generate.forward` on the pytree that
`to_params` rebuilds. The nnx.Params wrap the caller's arrays themselves (no copies either way),
so an NNX model and a `SparseModel` can share one set of device buffers.

Every nnx.Param carries its logical sharding axes (`model.param_axes`; the indexer's
`INDEXER_AXES`) as the metadata key "out_sharding", the key flax >= 0.12 reads for sharding
(`nnx.get_partition_spec`; map the names to mesh axes with `nnx.logical_axis_rules` or
`sharding.logical_sharding`). The Params are made with eager_sharding off: the arrays are placed
already, and flax's eager sharding would otherwise reshard (copy) them under an active mesh.

Shapes: b batch, t sequence, e embed, h heads, g kv_heads, d head_dim, m mlp, v vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from rtpurbo_jax import generate as gen
from rtpurbo_jax.attention import prefill_attend
from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig
from rtpurbo_jax.kernels import check_backend
from rtpurbo_jax.model import Params, layer_param_axes, output_projection, param_axes, project_qkv
from rtpurbo_jax.rope import rope_tables

if TYPE_CHECKING:  # api imports the checkpoint readers; only from_model's signature needs it
    from rtpurbo_jax.api import SparseModel

# The layer params that belong to attention (`project_qkv`, `output_projection`); the rest of a
# layer (norms, MLP) stays with the decoder layer.
ATTENTION_KEYS = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "q_norm", "k_norm")

# Logical axes of one layer's indexer weights (`indexer` module docstring): the indexed KV groups
# (design "indexer") or retrieval heads (design "paper"), the query heads of each, the rank.
# Names the sharding rules don't list stay replicated (`sharding.logical_sharding`).
INDEXER_AXES = {
    "wq": ("indexed", "indexed_heads", "head_dim", "indexer_rank"),
    "wk": ("indexed", "head_dim", "indexer_rank"),
}

# The Variable metadata key holding the logical axes (flax >= 0.12; "sharding_names" and
# "sharding" are its deprecated aliases).
AXES_KEY = "out_sharding"


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    """An nnx.Param wrapping `value` itself (no copy) with its logical axes as metadata."""
    return nnx.Param(value, eager_sharding=False, **{AXES_KEY: axes})


def _check_keys(given: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    if set(given) != set(expected):
        raise ValueError(f"{what} has keys {sorted(given)}, the config expects {sorted(expected)}")


class RTPurboAttention(nnx.Module):
    """One decoder layer's attention, routed as the library routes it, over a whole sequence.

    Holds the layer's q/k/v/o projections (wq [e, h, d], wk, wv [e, g, d], wo [h, d, e], the
    biases and q/k norms the config has) and, for a sparse model with an indexer, the layer's
    indexer weights (`indexer`: an nnx.Dict, None without). `layer` picks this layer's routing in
    the SparseConfig (which heads are retrieval / sparse). Input: the normed hidden states; the
    residual and norms around it are the caller's.
    """

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        weights: Mapping[str, jax.Array],
        *,
        sparse: SparseConfig | None = None,
        indexer: Mapping[str, jax.Array] | None = None,
        backend: str = "auto",
    ) -> None:
        """weights: the layer's params dict (`model` module docstring); keys other than the
        attention's (norms, MLP) are ignored, so `params["layers"][i]` can be passed as is.
        indexer: `indexer_params["layers"][i]` (None: dense, or the oracle scorer)."""
        check_backend(backend)
        if sparse is not None:
            sparse.check_model(config)
        self.config, self.layer, self.sparse, self.backend = config, layer, sparse, backend
        axes = {k: v for k, v in layer_param_axes(config).items() if k in ATTENTION_KEYS}
        _check_keys({k: v for k, v in weights.items() if k in ATTENTION_KEYS}, axes,
                    f"layer {layer}'s attention weights")
        self.param_names = tuple(axes)  # static: which Params this config has, in a fixed order
        for name, names in axes.items():
            setattr(self, name, _param(weights[name], names))
        self.indexer = None if indexer is None else nnx.Dict(
            {name: _param(w, INDEXER_AXES[name]) for name, w in indexer.items()})

    def weights(self) -> dict[str, jax.Array]:
        """The attention's part of the layer params dict: the wrapped arrays themselves."""
        return {name: getattr(self, name)[...] for name in self.param_names}

    def indexer_weights(self) -> dict[str, jax.Array] | None:
        """The layer's indexer params dict (the wrapped arrays), or None."""
        return None if self.indexer is None else {k: v[...] for k, v in self.indexer.items()}

    def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        """x: [b, t, e] normed hidden states of a right-padded batch at positions 0 .. t-1;
        lengths: [b]. Returns the attention output [b, t, e] (before the residual add).
        Positions past a row's length hold padding garbage, as in `generate.forward`."""
        b, t = x.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        weights = self.weights()
        qkv = project_qkv(weights, x, *rope_tables(positions, self.config), self.config)
        layer_indexer = self.indexer_weights()
        # The attend function reads indexer["layers"][i]; a dict keyed by this layer's index
        # serves that lookup without the other layers' weights.
        indexer = None if layer_indexer is None else {"layers": {self.layer: layer_indexer}}
        attend = prefill_attend(self.config, lengths, self.backend, self.sparse, indexer)
        out, _ = attend(self.layer, qkv, None)  # no cache: the state going in is None
        return output_projection(weights, out, self.config)


class DecoderLayer(nnx.Module):
    """A decoder layer's weights: `attn` (RTPurboAttention), attn_norm, mlp_norm [e] and the
    SwiGLU MLP (w_gate, w_up [e, m], w_down [m, e], biases when the config has them)."""

    def __init__(self, config: ModelConfig, layer: int, weights: Mapping[str, jax.Array], *,
                 sparse: SparseConfig | None, indexer: Mapping[str, jax.Array] | None,
                 backend: str) -> None:
        axes = layer_param_axes(config)
        _check_keys(weights, axes, f"layer {layer}'s params")
        self.attn = RTPurboAttention(config, layer, weights, sparse=sparse, indexer=indexer,
                                     backend=backend)
        self.param_names = tuple(k for k in axes if k not in ATTENTION_KEYS)
        for name in self.param_names:
            setattr(self, name, _param(weights[name], axes[name]))

    def weights(self) -> dict[str, jax.Array]:
        """The layer params dict (`model` module docstring): the wrapped arrays themselves."""
        return {**self.attn.weights(), **{n: getattr(self, n)[...] for n in self.param_names}}


class Decoder(nnx.Module):
    """The whole decoder (embed [v, e], layers, final_norm [e], lm_head [e, v] unless tied) as an
    nnx.Module; `__call__` is `generate.forward` on the wrapped arrays.

    It is a container over the functional forward: swapping a submodule for one of your own
    does not change what `__call__` computes; build your own model around `RTPurboAttention`
    for that.
    """

    def __init__(self, config: ModelConfig, params: Params, sparse: SparseConfig | None = None,
                 indexer: gen.Indexer = None, *, backend: str = "auto") -> None:
        """params, sparse, indexer: what `generate.forward` takes (`from_params`)."""
        check_backend(backend)
        if sparse is not None:
            sparse.check_model(config)
            if sparse.scorer == "indexer" and indexer is None:
                raise ConfigError("a sparse model with the 'indexer' scorer needs indexer params")
        axes = param_axes(config)
        _check_keys({k: v for k, v in params.items() if k != "layers"},
                    {k: v for k, v in axes.items() if k != "layers"}, "params")
        if len(params["layers"]) != config.num_layers:
            raise ValueError(f"params have {len(params['layers'])} layers, the config "
                             f"{config.num_layers}")
        self.config, self.sparse, self.backend = config, sparse, backend
        self.embed = _param(params["embed"], axes["embed"])
        self.layers = nnx.List([
            DecoderLayer(config, i, layer, sparse=sparse, backend=backend,
                         indexer=None if indexer is None else indexer["layers"][i])
            for i, layer in enumerate(params["layers"])])
        self.final_norm = _param(params["final_norm"], axes["final_norm"])
        self.lm_head = (None if config.tie_word_embeddings
                        else _param(params["lm_head"], axes["lm_head"]))

    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """tokens: [b, t] int32 right-padded; lengths: [b]. Returns float32 logits [b, t, v]
        (`generate.forward`; positions past a row's length hold padding garbage)."""
        params, indexer = to_params(self)
        logits, _ = gen.forward(params, tokens, lengths, self.config, self.backend, self.sparse,
                                indexer)
        return logits


def from_params(config: ModelConfig, params: Params, sparse: SparseConfig | None = None,
                indexer: gen.Indexer = None, *, backend: str = "auto") -> Decoder:
    """A Decoder whose nnx.Params wrap the very arrays of `params` and `indexer` (no copies).

    params: the functional params pytree (`model` module docstring); sparse, indexer: the
    sparse config and indexer params (None, None: dense). backend: as `generate.forward`'s.
    """
    return Decoder(config, params, sparse, indexer, backend=backend)


def from_model(model: SparseModel) -> Decoder:
    """The Decoder of a loaded model (`api.load`): its params, sparse config, indexer, backend."""
    return from_params(model.config, model.params, model.sparse, model.indexer,
                       backend=model.backend)


def to_params(decoder: Decoder) -> tuple[Params, gen.Indexer]:
    """(params, indexer): the pytrees the functional API takes, holding the wrapped arrays
    themselves (no copies). indexer is None when no layer holds indexer weights."""
    params: Params = {"embed": decoder.embed[...],
                      "layers": [layer.weights() for layer in decoder.layers],
                      "final_norm": decoder.final_norm[...]}
    if decoder.lm_head is not None:
        params["lm_head"] = decoder.lm_head[...]
    layers = [layer.attn.indexer_weights() for layer in decoder.layers]
    indexer = None if all(w is None for w in layers) else {"layers": layers}
    return params, indexer

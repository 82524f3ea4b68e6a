"""The Flax NNX surface (`rtpurbo_jax.nnx`): conversion both ways without copies, the Decoder's
logits equal to the functional forward (dense and both sparse designs), a user's own NNX model
built around RTPurboAttention matching it too, and the logical axes carried as metadata."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtpurbo_jax import generate as gen
from rtpurbo_jax import nnx as rnnx
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.model import param_axes
from rtpurbo_jax.sharding import LOGICAL_AXIS_RULES
from tests.tiny import TINY, tiny_model

# float32, relative to the largest |logit| (the convention of test_chunked_prefill): the user's
# model computes the same ops unfused, in another order (flax's RMSNorm, Linear).
TOL = 1e-5
SEQ = 64  # four 16-token key blocks: the sparse selection has blocks to drop
LENGTHS = (SEQ, SEQ - 21)
DESIGNS = {
    "dense": None,
    # KV groups [layers][groups]: one retrieval group in layer 0, the rest selected.
    "indexer": SparseConfig(((True, False), (False, False)), rank=8, block_q=16, block_k=16,
                            top_p=0.5),
    # Query heads [layers][heads]: retrieval heads sharing groups with local ones.
    "paper": SparseConfig(((True, False, False, True), (False, True, False, False)),
                          design="paper", group_size=TINY.group_size, rank=4, block_q=16,
                          block_k=16, sink_tokens=4, window=16, local_blocks=1, top_p=0.5),
}


@functools.cache
def _model(design: str):
    sparse = DESIGNS[design]
    model = tiny_model(backend="reference")
    if sparse is None:
        return model
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(64, TINY.num_heads, TINY.head_dim)) for _ in range(2)]
    return model.with_sparse(sparse, init_indexer(queries, TINY, sparse))


def _batch() -> tuple[jax.Array, jax.Array]:
    tokens = np.random.default_rng(1).integers(2, TINY.vocab_size, (len(LENGTHS), SEQ))
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(LENGTHS, jnp.int32)


@functools.cache
def _reference_logits(design: str) -> np.ndarray:
    model = _model(design)
    logits, _ = gen.forward(model.params, *_batch(), TINY, "reference", model.sparse,
                            model.indexer)
    return np.asarray(logits)


def _valid(logits: jax.Array | np.ndarray) -> np.ndarray:
    """The positions inside each row's length (past it is padding garbage)."""
    return np.concatenate([np.asarray(logits)[i, :n] for i, n in enumerate(LENGTHS)])


def _assert_close(got: jax.Array, want: np.ndarray) -> None:
    got, want = _valid(got), _valid(want)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= TOL * scale, np.abs(got - want).max() / scale


@pytest.mark.parametrize("design", ["dense", "indexer"])
def test_nnx_round_trip_wraps_the_same_arrays(design):
    model = _model(design)
    decoder = rnnx.from_model(model)
    params, indexer = rnnx.to_params(decoder)
    assert jax.tree.structure(params) == jax.tree.structure(model.params)
    assert jax.tree.structure(indexer) == jax.tree.structure(model.indexer)
    pairs = list(zip(jax.tree.leaves((params, indexer)),
                     jax.tree.leaves((model.params, model.indexer)), strict=True))
    assert all(got is want for got, want in pairs)
    # And the Params themselves hold those arrays: one device buffer, never copied.
    assert decoder.layers[1].attn.wq[...] is model.params["layers"][1]["wq"]
    assert all(got.unsafe_buffer_pointer() == want.unsafe_buffer_pointer()
               for got, want in pairs)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_nnx_decoder_logits_equal_functional_forward(design):
    logits = rnnx.from_model(_model(design))(*_batch())
    np.testing.assert_array_equal(np.asarray(logits), _reference_logits(design))
    if design != "dense":  # the sparse path really ran: it differs from dense attention
        assert np.abs(_valid(logits) - _valid(_reference_logits("dense"))).max() > 1e-3


def test_nnx_decoder_under_nnx_jit():
    # Traced through nnx.jit the Params hold tracers; the program is the same forward.
    decoder = rnnx.from_model(_model("dense"))
    logits = nnx.jit(lambda d, tokens, lengths: d(tokens, lengths))(decoder, *_batch())
    _assert_close(logits, _reference_logits("dense"))


class UserBlock(nnx.Module):
    """A user's pre-norm block: flax's own RMSNorm and Linear layers around RTPurboAttention."""

    def __init__(self, config: ModelConfig, attn: rnnx.RTPurboAttention, rngs: nnx.Rngs):
        e, m, eps = config.hidden_size, config.intermediate_size, config.rms_norm_eps
        self.attn_norm = nnx.RMSNorm(e, epsilon=eps, rngs=rngs)
        self.attn = attn
        self.mlp_norm = nnx.RMSNorm(e, epsilon=eps, rngs=rngs)
        self.gate = nnx.Linear(e, m, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(e, m, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(m, e, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), lengths)
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class UserModel(nnx.Module):
    """A user's 2-layer language model: embedding, two UserBlocks, final norm, head."""

    def __init__(self, config: ModelConfig, attns: list[rnnx.RTPurboAttention],
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.blocks = nnx.List([UserBlock(config, attn, rngs) for attn in attns])
        self.final_norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps,
                                      rngs=rngs)
        self.head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, lengths)
        return self.head(self.final_norm(x))


def user_model(config: ModelConfig, params, sparse, indexer) -> UserModel:
    """The user's model on the functional params: RTPurboAttention over each layer's arrays
    (and indexer), flax's own layers initialised at random, then set by value."""
    attns = [rnnx.RTPurboAttention(config, i, layer, sparse=sparse, backend="reference",
                                   indexer=None if indexer is None else indexer["layers"][i])
             for i, layer in enumerate(params["layers"])]
    user = UserModel(config, attns, nnx.Rngs(0))
    user.embed.embedding[...] = params["embed"]
    for block, layer in zip(user.blocks, params["layers"], strict=True):
        block.attn_norm.scale[...] = layer["attn_norm"]
        block.mlp_norm.scale[...] = layer["mlp_norm"]
        block.gate.kernel[...] = layer["w_gate"]
        block.up.kernel[...] = layer["w_up"]
        block.down.kernel[...] = layer["w_down"]
    user.final_norm.scale[...] = params["final_norm"]
    user.head.kernel[...] = params["lm_head"]
    return user


@pytest.mark.parametrize("design", ["dense", "indexer", "paper"])
def test_nnx_user_model_with_rtpurbo_attention_matches_functional(design):
    model = _model(design)
    user = user_model(TINY, model.params, model.sparse, model.indexer)
    logits = nnx.jit(lambda m, tokens, lengths: m(tokens, lengths))(user, *_batch())
    _assert_close(logits, _reference_logits(design))


def test_nnx_params_carry_logical_axes():
    decoder = rnnx.from_model(_model("indexer"))
    axes = param_axes(TINY)

    def axes_of(var: nnx.Variable) -> tuple[str, ...]:
        return var.get_metadata(rnnx.AXES_KEY)

    assert axes_of(decoder.embed) == axes["embed"]
    assert axes_of(decoder.final_norm) == axes["final_norm"]
    assert axes_of(decoder.lm_head) == axes["lm_head"]
    for layer, layer_axes in zip(decoder.layers, axes["layers"], strict=True):
        for name, names in layer_axes.items():
            owner = layer.attn if name in rnnx.ATTENTION_KEYS else layer
            assert axes_of(getattr(owner, name)) == names, name
    for layer in decoder.layers:
        for name, var in (layer.attn.indexer or {}).items():
            assert axes_of(var) == rnnx.INDEXER_AXES[name]
            assert len(rnnx.INDEXER_AXES[name]) == var[...].ndim
    # flax reads them: logical names as they are, mesh axes under the library's rules.
    specs = nnx.get_partition_spec(nnx.state(decoder, nnx.Param))
    wq_spec = specs["layers"][0]["attn"]["wq"].get_value()
    assert wq_spec == jax.sharding.PartitionSpec(*axes["layers"][0]["wq"])
    with nnx.logical_axis_rules(tuple(LOGICAL_AXIS_RULES.items())):
        specs = nnx.get_partition_spec(nnx.state(decoder, nnx.Param))
    assert specs["embed"].get_value() == jax.sharding.PartitionSpec(None, "fsdp")

"""Forward pass, prefill and decode with a KV cache, sampling, and the generation loop.

All functions are pure; `generate` is one jitted program (prefill, then a while loop of decode
steps that stops early once every row has produced an end-of-sequence token).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from rtpurbo_jax.attention import decode_attend, prefill_attend, train_attend
from rtpurbo_jax.cache import Cache, empty_cache
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.model import Params, decoder, lm_logits

# The sparse state of a model: its SparseConfig (static) and indexer params (a pytree), or None.
Indexer = dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _positions(batch: int, seq: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))


@functools.partial(jax.jit, static_argnames=("config", "backend", "sparse"))
def forward(
    params: Params, tokens: jax.Array, lengths: jax.Array, config: ModelConfig, backend: str,
    sparse: SparseConfig | None = None, indexer: Indexer = None,
) -> tuple[jax.Array, jax.Array]:
    """Logits of every position. tokens: [batch, seq] right-padded; lengths: [batch].

    Returns (float32 logits [batch, seq, vocab], selection stats [2] = selected and candidate
    key blocks of the sparse heads, summed over layers). Positions past a row's length hold
    padding garbage.
    """
    hidden, stats = _forward_hidden(params, tokens, lengths, config, backend, sparse, indexer)
    return lm_logits(params, hidden, config), stats


def _forward_hidden(
    params: Params, tokens: jax.Array, lengths: jax.Array, config: ModelConfig, backend: str,
    sparse: SparseConfig | None, indexer: Indexer,
) -> tuple[jax.Array, jax.Array]:
    """(final normed hidden states [batch, seq, embed], selection stats [2]) of the inference
    forward pass (no cache)."""
    b, t = tokens.shape
    attend = prefill_attend(config, lengths, backend, sparse, indexer)
    hidden, states = decoder(params, tokens, _positions(b, t), config, attend,
                             [None] * config.num_layers)
    return hidden, _sum_stats(states)


def hidden_states(
    params: Params, tokens: jax.Array, lengths: jax.Array, config: ModelConfig, backend: str,
    sparse: SparseConfig | None = None, indexer: Indexer = None,
) -> jax.Array:
    """Final normed hidden states [batch, seq, embed] of the inference path (the fast kernels
    where `backend` allows): stage 2's dense teacher, which needs no gradient."""
    return _forward_hidden(params, tokens, lengths, config, backend, sparse, indexer)[0]


def training_hidden(
    params: Params, tokens: jax.Array, lengths: jax.Array, config: ModelConfig,
    sparse: SparseConfig | None = None, indexer: Indexer = None,
) -> jax.Array:
    """Final normed hidden states [batch, seq, embed] in training mode (`train_attend`): the
    dense teacher (sparse None) or the sparse student of stage 2, differentiable in params.
    Logits are left to the loss, which makes them a chunk of positions at a time."""
    b, t = tokens.shape
    attend = train_attend(config, lengths, sparse, indexer)
    hidden, _ = decoder(params, tokens, _positions(b, t), config, attend,
                        [None] * config.num_layers)
    return hidden


def _sum_stats(states: list[dict[str, Any]]) -> jax.Array:
    return sum(s["stats"] for s in states)


def last_valid(hidden: jax.Array, lengths: jax.Array) -> jax.Array:
    """hidden: [batch, seq, embed] -> [batch, embed] at position lengths[b]-1."""
    index = jnp.maximum(lengths - 1, 0)[:, None, None]
    return jnp.take_along_axis(hidden, index, axis=1)[:, 0]


def chunk_last_token(hidden: jax.Array, lengths: jax.Array, offset: int | jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """Where a chunk of a prompt (hidden: [batch, chunk, embed], positions offset ..) holds each
    row's last prompt token, as `last_valid` reads it: (whether it does [batch], the state
    there [batch, embed], garbage where it does not)."""
    at = jnp.maximum(lengths - 1, 0) - offset
    here = (at >= 0) & (at < hidden.shape[1])
    return here, last_valid(hidden, jnp.clip(at, 0, hidden.shape[1] - 1) + 1)


def prefill(
    params: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    config: ModelConfig,
    max_len: int,
    backend: str,
    sparse: SparseConfig | None = None,
    indexer: Indexer = None,
) -> tuple[jax.Array, Cache, jax.Array]:
    """Runs the prompt and fills a cache of max_len positions.

    Returns (logits of each row's last prompt token [batch, vocab], cache, selection stats [2]).
    """
    b, t = tokens.shape
    cache = empty_cache(config, b, max_len, params["embed"].dtype, sparse)
    attend = prefill_attend(config, lengths, backend, sparse, indexer)
    hidden, states = decoder(params, tokens, _positions(b, t), config, attend, cache["layers"])
    logits = lm_logits(params, last_valid(hidden, lengths), config)
    layers = [s["cache"] for s in states]
    return logits, {"layers": layers, "lengths": lengths.astype(jnp.int32)}, _sum_stats(states)


def check_prefill_chunk(chunk: int, sparse: SparseConfig | None) -> None:
    """Raises ValueError unless `chunk` query tokens can split a prompt (`prefill_chunked`)."""
    if chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive number of tokens, got {chunk}")
    if sparse is not None and chunk % sparse.block_q:
        # A query block shares one selection: one straddling two chunks could not select as a
        # whole-prompt pass does.
        fit = max(sparse.block_q, chunk // sparse.block_q * sparse.block_q)
        raise ValueError(f"prefill_chunk ({chunk}) must be a multiple of the sparse config's "
                         f"block_q ({sparse.block_q}); use e.g. {fit}")


def _prefill_chunks(
    params: Params, tokens: jax.Array, lengths: jax.Array, config: ModelConfig, max_len: int,
    backend: str, sparse: SparseConfig | None, indexer: Indexer, chunk: int,
    every_position: bool,
) -> tuple[jax.Array, Cache, jax.Array]:
    """Runs the prompt `chunk` queries at a time against the growing cache (see
    `prefill_chunked`). Returns (final normed hidden states: of every position [batch,
    chunks * chunk, embed] with every_position, else of each row's last prompt token [batch,
    embed]; the filled cache; selection stats [2])."""
    check_prefill_chunk(chunk, sparse)
    b, t = tokens.shape
    num_chunks = -(-t // chunk)
    # The last chunk is padded to `chunk`, so one compiled step serves every chunk: the lengths
    # mask the padding. The cache holds the padding's writes too (an in-place slice write
    # can't cut them), and is cut back to max_len at the end when they passed it.
    padded = jnp.pad(tokens, ((0, 0), (0, num_chunks * chunk - t)))
    lengths = lengths.astype(jnp.int32)
    capacity = max(max_len, num_chunks * chunk)
    cache = empty_cache(config, b, capacity, params["embed"].dtype, sparse)
    dtype = jnp.result_type(params["embed"], params["final_norm"])
    out = jnp.zeros((b, num_chunks * chunk if every_position else 1, config.hidden_size), dtype)

    def step(i: jax.Array, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        layers, out, stats = carry
        offset = i * chunk
        attend = prefill_attend(config, lengths, backend, sparse, indexer, q_offset=offset,
                                prompt_len=t)
        hidden, states = decoder(params, jax.lax.dynamic_slice_in_dim(padded, offset, chunk, 1),
                                 offset + _positions(b, chunk), config, attend, layers)
        if every_position:
            out = jax.lax.dynamic_update_slice_in_dim(out, hidden, offset, axis=1)
        else:  # keep the last token's state from the chunk that holds it
            here, mine = chunk_last_token(hidden, lengths, offset)
            out = jnp.where(here[:, None, None], mine[:, None], out)
        return [s["cache"] for s in states], out, stats + _sum_stats(states)

    init = (cache["layers"], out, jnp.zeros((2,), jnp.float32))
    layers, out, stats = jax.lax.fori_loop(0, num_chunks, step, init)
    if capacity > max_len:  # max_len's layout: the first slots of every part
        shapes = jax.eval_shape(lambda: empty_cache(config, b, max_len, params["embed"].dtype,
                                                    sparse))
        layers = jax.tree.map(lambda x, like: x[:, :like.shape[1]], layers, shapes["layers"])
    hidden = out if every_position else out[:, 0]
    return hidden, {"layers": layers, "lengths": lengths}, stats


def prefill_chunked(
    params: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    config: ModelConfig,
    max_len: int,
    backend: str,
    sparse: SparseConfig | None = None,
    indexer: Indexer = None,
    *,
    chunk: int,
) -> tuple[jax.Array, Cache, jax.Array]:
    """`prefill` with the prompt run `chunk` query tokens at a time (the last chunk may be
    short), each chunk attending to the cache that the earlier chunks filled plus itself
    (causal): activation memory is bounded by the chunk, not the prompt.

    tokens: [batch, seq] right-padded; lengths: [batch]. chunk: a multiple of the sparse
    config's block_q when sparse (`check_prefill_chunk`). Returns what `prefill` returns: the
    same logits (up to float32 reordering), cache and stats, the sparse groups selecting the
    very blocks a one-pass prefill selects. One compiled chunk step serves every chunk (a
    fori_loop over a traced offset).
    """
    hidden, cache, stats = _prefill_chunks(params, tokens, lengths, config, max_len, backend,
                                           sparse, indexer, chunk, every_position=False)
    return lm_logits(params, hidden, config), cache, stats


@functools.partial(jax.jit, static_argnames=("config", "backend", "sparse", "chunk"))
def forward_chunked(
    params: Params, tokens: jax.Array, lengths: jax.Array, config: ModelConfig, backend: str,
    sparse: SparseConfig | None = None, indexer: Indexer = None, *, chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`forward` run as `prefill_chunked` runs a prompt: (float32 logits [batch, seq, vocab],
    selection stats [2])."""
    t = tokens.shape[1]
    hidden, _, stats = _prefill_chunks(params, tokens, lengths, config, t, backend, sparse,
                                       indexer, chunk, every_position=True)
    return lm_logits(params, hidden[:, :t], config), stats


def decode_step(
    params: Params, cache: Cache, tokens: jax.Array, config: ModelConfig, backend: str,
    sparse: SparseConfig | None = None, indexer: Indexer = None,
) -> tuple[jax.Array, Cache, jax.Array]:
    """Appends one token per row. tokens: [batch].

    Returns (logits [batch, vocab], cache, the step's selection stats [2]).
    """
    lengths = cache["lengths"]
    attend = decode_attend(config, lengths, backend, sparse, indexer)
    hidden, states = decoder(params, tokens[:, None], lengths[:, None], config, attend,
                             cache["layers"])
    layers = [s["cache"] for s in states]
    new_cache = {"layers": layers, "lengths": lengths + 1}
    return lm_logits(params, hidden[:, 0], config), new_cache, _sum_stats(states)


def sample(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits: [batch, vocab] float32 -> tokens [batch] int32."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
        # is still below top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_index = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "eos_ids", "pad_id",
                              "backend", "sparse", "prefill_chunk")
)
def generate(
    params: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    key: jax.Array,
    new_tokens: jax.Array | None = None,
    *,
    config: ModelConfig,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
    backend: str,
    sparse: SparseConfig | None = None,
    indexer: Indexer = None,
    prefill_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Generates up to max_new_tokens per row after a right-padded prompt.

    tokens: [batch, prompt_len]; lengths: [batch]. new_tokens: an int32 scalar <= max_new_tokens,
    the steps to run (None: max_new_tokens). Traced, so one compiled program serves every
    new_tokens up to its capacity max_new_tokens (the static output and cache size).
    prefill_chunk: run the prompt in chunks of that many query tokens (`prefill_chunked`);
    None: in one pass.
    Returns ([batch, max_new_tokens] int32: each row's new tokens, its end-of-sequence token
    included, then pad_id; selection stats [2, 2]: the prompt's (row 0) and the decode steps'
    summed (row 1), each [attended, candidates]).
    """
    b, t = tokens.shape
    if prefill_chunk is None:
        logits, cache, stats = prefill(params, tokens, lengths, config, t + max_new_tokens,
                                       backend, sparse, indexer)
    else:
        logits, cache, stats = prefill_chunked(params, tokens, lengths, config,
                                               t + max_new_tokens, backend, sparse, indexer,
                                               chunk=prefill_chunk)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    steps = max_new_tokens if new_tokens is None else jnp.minimum(new_tokens, max_new_tokens)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, out, done, decode_stats = carry
        token = sample(logits, jax.random.fold_in(key, step), sampling)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, eos)
        # The last step's logits are never sampled: no decode step after the final token.
        logits, cache, step_stats = decode_step(params, cache, token, config, backend, sparse,
                                                indexer)
        return step + 1, logits, cache, out, done, decode_stats + step_stats

    carry = (jnp.int32(0), logits, cache, out, jnp.zeros((b,), bool), jnp.zeros_like(stats))
    final = jax.lax.while_loop(cond, body, carry)
    return final[3], jnp.stack([stats, final[5]])

"""Prefill of long prompts with the sequence and its KV cache sharded over a mesh axis.

The prompt's padded width T splits into n contiguous shards of S = T / n positions over the
mesh axis `axis` (SEQ_AXIS, "seq", by default: a mesh axis of its own, so that it can sit beside
"data" and "fsdp" of `sharding.make_mesh`; the inputs are replicated over any other axis). Shard
i holds positions i*S .. (i+1)*S - 1: their tokens, activations and KV cache. Every layer runs
on each shard as one chunk of `generate.prefill_chunked` runs, with q_offset i*S, and gets from
the other shards what that chunk reads from the cache:

  positional parts (k, v; the indexer design's ks, vs, ki; the paper design's full groups'
  k, v, ki): all-gathered along the sequence (`jax.lax.all_gather`), so that the dense heads see
  the causal prefix and the selection scores the prompt's first T keys as one device does;
  the paper design's ring buffers (all-local groups): only their sinks + window slots, summed
  over shards (`_exchange_ring`), never the groups' whole K/V.

All-gather rather than a ring of `ppermute`s: the last shard reads every earlier key anyway
(dense retrieval heads, top-p over every causal block), and a ring would pay off only with
attention that merges partial softmaxes across steps, which the kernels do not return. The cost
is memory and traffic: a shard receives the later shards' parts too, which it never reads, and
besides its own T/n positions of every layer's cache it holds one layer's gathered positional
parts (T positions) while that layer runs, n rings per all-local group, and the activations of
S queries. The output is the one-device prefill's up to float32 reordering: the same logits of
each row's last token, the same cache, the same selections and stats.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtpurbo_jax import attention, paper_attention
from rtpurbo_jax.cache import POSITIONAL_PARTS, Cache, layer_part_shapes, ring_size, ring_take
from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.generate import Indexer, chunk_last_token
from rtpurbo_jax.model import QKV, AttendFn, Params, decoder, lm_logits, take_heads

SEQ_AXIS = "seq"


def check_sequence_sharding(seq: int, mesh: Mesh, axis: str, max_len: int,
                            sparse: SparseConfig | None) -> int:
    """Raises ValueError unless a prompt of padded width `seq` splits over mesh axis `axis`
    into shards that `prefill_sequence_sharded` can run; returns the number of shards."""
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {axis!r} (its axes: {mesh.axis_names}); build "
                         f"one with it, e.g. Mesh(jax.devices(), ({axis!r},))")
    shards = mesh.shape[axis]
    unit = shards * (sparse.block_q if sparse is not None else 1)
    fit = -(-seq // unit) * unit
    if seq % shards:
        raise ValueError(f"the padded prompt length ({seq}) must be a multiple of the {shards} "
                         f"shards of mesh axis {axis!r}; pad the prompt to {fit}")
    if sparse is not None and (seq // shards) % sparse.block_q:
        # A query block shares one selection: one straddling two shards could not select as
        # the one-device prefill does.
        raise ValueError(f"the shard length ({seq // shards} = {seq} / {shards} shards) must be "
                         f"a multiple of the sparse config's block_q ({sparse.block_q}); pad "
                         f"the prompt to {fit}")
    if max_len < seq or max_len % shards:
        raise ValueError(f"max_len ({max_len}) must be at least the padded prompt length "
                         f"({seq}) and a multiple of the {shards} shards it is split over; use "
                         f"{-(-max(max_len, seq) // shards) * shards}")
    return shards


def _exchange_ring(x: jax.Array, lengths: jax.Array, sparse: SparseConfig, size: int,
                   offset: jax.Array, shards: int, axis: str) -> tuple[jax.Array, jax.Array]:
    """The ring buffers of an all-local group built from every shard's positions.

    x: this shard's k or v of the group, [b, S, g, d] at positions offset .. offset+S-1.
    Returns (the ring before this shard: positions below min(lengths, offset), what a chunk at
    offset reads; the ring after the whole prompt), each [b, size, g, d]. A slot holds one
    position, which one shard has: each shard fills the slots of its own positions (zeros
    elsewhere) for every shard's ring, and the sum over shards is each ring exactly.
    """
    seq = x.shape[1]

    def own(filled: jax.Array) -> jax.Array:
        from_x, taken = ring_take(x, filled, sparse, size, start=offset)
        return jnp.where(from_x[:, :, None, None], taken, 0)

    starts = jnp.arange(shards, dtype=jnp.int32) * seq
    rings = jax.vmap(lambda start: own(jnp.minimum(lengths, start)))(starts)  # [n, b, size, ..]
    before = jax.lax.psum_scatter(rings, axis, scatter_dimension=0)
    return before, jax.lax.psum(own(lengths), axis)


def _shard_attend(config: ModelConfig, lengths: jax.Array, backend: str,
                  sparse: SparseConfig | None, indexer: Indexer, offset: jax.Array, seq: int,
                  max_len: int, dtype: Any, shards: int, axis: str) -> AttendFn:
    """An `attend` for one shard's positions (offset ..) of a prompt of padded width `seq`:
    the layer runs as a chunk of `prefill_chunked` over the cache it would find, assembled
    from every shard (module docstring). Layer states going in are unused; coming out
    {"cache": this shard's parts, positional [b, S, ...] and ring [b, ring, ...], "stats"}."""
    paper = sparse is not None and sparse.design == "paper"

    def cast(parts: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {name: x.astype(dtype) for name, x in parts.items()}

    def gather(parts: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {name: jax.lax.all_gather(x, axis, axis=1, tiled=True)
                for name, x in parts.items()}

    def attend(i: int, qkv: QKV, _: Any) -> tuple[jax.Array, dict[str, Any]]:
        layer_indexer = indexer["layers"][i] if indexer is not None else {}
        if not paper:
            parts = cast(attention.positional_parts(qkv.k, qkv.v, i, config, sparse,
                                                    layer_indexer))
            out, _, stats = attention.layer_prefill(
                qkv.q, qkv.k, qkv.v, lengths, i, config, sparse, layer_indexer, backend,
                q_offset=offset, layer_cache=gather(parts), prompt_len=seq)
            return out, {"cache": parts, "stats": stats}
        parts = cast(paper_attention.positional_parts(qkv, i, config, sparse, layer_indexer))
        cache, rings = gather(parts), {}
        window = np.asarray(sparse.window_groups(i), np.int32)
        if len(window):
            size = ring_size(sparse, max_len)
            for name, x in (("kw", qkv.k), ("vw", qkv.v)):
                cache[name], rings[name] = _exchange_ring(
                    take_heads(x, window).astype(dtype), lengths, sparse, size, offset, shards,
                    axis)
        out, _, stats = paper_attention.layer_prefill(
            qkv, lengths, i, config, sparse, layer_indexer, backend, attention.dense_prefill,
            None, q_offset=offset, layer_cache=cache)
        return out, {"cache": {**parts, **rings}, "stats": stats}

    return attend


def prefill_sequence_sharded(
    params: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    config: ModelConfig,
    max_len: int,
    backend: str,
    sparse: SparseConfig | None = None,
    indexer: Indexer = None,
    *,
    mesh: Mesh,
    axis: str = SEQ_AXIS,
) -> tuple[jax.Array, Cache, jax.Array]:
    """`generate.prefill` with the prompt's sequence and its KV cache split over mesh axis
    `axis` (module docstring): equal to one device's `prefill_chunked` with chunk T / n.

    tokens: [batch, T] right-padded, T a multiple of the n shards and T / n of the sparse
    config's block_q; lengths: [batch]; max_len >= T, a multiple of n
    (`check_sequence_sharding`). params and the indexer are replicated over the mesh. Returns
    what `prefill` returns: (logits of each row's last prompt token [batch, vocab], replicated;
    the cache of max_len positions, its positional parts [batch, max_len, ...] split over
    `axis` along positions, ring parts replicated; selection stats [2]). Pure: jit it with
    config, max_len, backend, sparse, mesh and axis static.
    """
    b, seq = tokens.shape
    shards = check_sequence_sharding(seq, mesh, axis, max_len, sparse)
    shard_len = seq // shards
    lengths = lengths.astype(jnp.int32)
    dtype = params["embed"].dtype
    along = PartitionSpec(None, axis)
    part_specs = [{name: along if name in POSITIONAL_PARTS else PartitionSpec()
                   for name in layer_part_shapes(config, sparse, i, b, max_len)}
                  for i in range(config.num_layers)]

    def shard(params: Params, tokens: jax.Array, lengths: jax.Array, indexer: Indexer
              ) -> tuple[jax.Array, list[dict[str, jax.Array]], jax.Array]:
        offset = jax.lax.axis_index(axis) * shard_len
        attend = _shard_attend(config, lengths, backend, sparse, indexer, offset, seq, max_len,
                               dtype, shards, axis)
        positions = offset + jnp.broadcast_to(jnp.arange(shard_len, dtype=jnp.int32),
                                              (b, shard_len))
        hidden, states = decoder(params, tokens, positions, config, attend,
                                 [None] * config.num_layers)
        # One shard holds each row's last token; the others add zeros.
        here, last = chunk_last_token(hidden, lengths, offset)
        last = jax.lax.psum(jnp.where(here[:, None], last, 0), axis)
        stats = jax.lax.psum(sum(s["stats"] for s in states), axis)
        return lm_logits(params, last, config), [s["cache"] for s in states], stats

    # check_vma off: pallas_call refuses it, its outputs carry no varying-axes type.
    logits, layers, stats = jax.shard_map(
        shard, mesh=mesh, in_specs=(PartitionSpec(), along, PartitionSpec(), PartitionSpec()),
        out_specs=(PartitionSpec(), part_specs, PartitionSpec()), check_vma=False,
    )(params, tokens, lengths, indexer)

    def to_capacity(name: str, x: jax.Array) -> jax.Array:
        """Positional parts [b, T, ...] -> [b, max_len, ...], the room for decode zero; XLA
        lays them out as max_len / n positions per shard, moving data when max_len > T."""
        if name not in POSITIONAL_PARTS:
            return x
        x = jnp.pad(x, ((0, 0), (0, max_len - seq)) + ((0, 0),) * (x.ndim - 2))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, along))

    layers = [{name: to_capacity(name, x) for name, x in layer.items()} for layer in layers]
    return logits, {"layers": layers, "lengths": lengths}, stats

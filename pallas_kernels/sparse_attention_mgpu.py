"""Block-sparse flash attention for prefill on Hopper GPUs: a Mosaic GPU (Pallas) kernel.

Same contract as `pallas_kernels.sparse_attention.sparse_attention` (its jnp reference is the
definition of correct), for the shapes this kernel tiles: 16-bit q/k/v, head_dim 64 or 128, an
even GQA group, block_q and block_k multiples of 64, no window.

Why a second prefill kernel: the Triton-lowered one runs a FlashAttention-2 loop and reaches
360-420 TFLOP/s on the listed blocks of an H100, 58-82% of cuDNN's dense rate. This one is
FlashAttention-3 shaped (the structure of JAX's `attention_mgpu` example): a producer
warpgroup streams the listed K/V blocks into shared memory with the tensor-memory accelerator,
two consumer warpgroups each own 64 query rows of one head (the two heads of a pair share the
KV head, so one copy of a block serves both), run their matrix products as asynchronous wgmma
and take turns on the tensor cores (a schedule barrier), so one's softmax overlaps the
other's matrix products.

Work: an item is (query tile, head pair, batch), heaviest tiles (the latest queries) first.
Where items are few, persistent programs, one per SM, walk them in turn (FA3's scheduler,
statically); else each item is a program (`default_num_programs`). An item's steps are its
tile's list entries: [0, n_full) unmasked, [n_full, n_live) masked by causality and the
row's length, computed once for all items by `_tile_ranges`.

Keys and values past a row's length may be garbage, even NaN. Scores there are masked, but
0 * NaN in the P @ V product is not 0, and a copy moves whole blocks: so the one listed block
that straddles a row's length (its "tail") is copied from a small zero-padded copy of those
values instead of from v.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention import (
    LOG2_E,
    MASK_VALUE,
    _check_shapes,
    _default_sm_scale,
    _tile_ranges,
    sparse_attention,
)
from pallas_kernels.sparse_decode import sm_count

# Query rows of one consumer warpgroup: the M size of a wgmma.
WG_ROWS = 64
COMPUTE_WGS = 2
# The producer warpgroup's index (after the consumers), and the register split of FA3: the
# producer only issues copies, the consumers hold a [64, head_dim] float32 accumulator.
PRODUCER_WG = COMPUTE_WGS
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
# Shared-memory layout of every [rows, head_dim] tile: 8 x 64 tiles, 128-byte swizzle (what
# wgmma reads without bank conflicts for 16-bit operands).
SMEM_TILING = (8, 64)
SMEM_SWIZZLE = 128
# The default tiles (two query tiles, three steps of two blocks for K and for V) fill a
# Hopper SM's shared memory at this head_dim.
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Measured on an H100 (Llama-3-8B heads, block 64; benchmarks/NOTES.md): two list entries per
# step (128-key score tiles) and three steps in flight run 10-25% faster at 10-30% density
# than one entry with four steps; three steps of two 16 KiB blocks each for K and V, and the
# two query tiles, fill the 227 KiB of shared memory at head_dim 128.
DEFAULT_STEPS_IN_FLIGHT = 3
DEFAULT_BLOCKS_PER_STEP = 2
# Measured on an H100 (Llama-3-8B heads, batch 1, 10-30% density; benchmarks/NOTES.md):
# persistent programs run 5-7% faster than one program per item at 32K tokens (62 items an
# SM), within +-2.5% at 128K (248) and 12% slower at 512K (993).
MAX_PERSISTENT_ITEMS = 128


def unsupported_reason(
    q_shape: tuple[int, ...], k_shape: tuple[int, ...], dtype, *, block_q: int, block_k: int,
    window: int | None,
) -> str | None:
    """Why this kernel cannot run these shapes, or None when it can."""
    head_dim = q_shape[-1]
    num_heads, num_kv_heads = q_shape[2], k_shape[2]
    group = num_heads // num_kv_heads if num_kv_heads and num_heads % num_kv_heads == 0 else 0
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype)} is not 16-bit"
    if head_dim % SMEM_TILING[1] or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not a multiple of {SMEM_TILING[1]} up to {MAX_HEAD_DIM}"
    if group == 0 or group % COMPUTE_WGS:
        return f"the GQA group ({num_heads} / {num_kv_heads} heads) is not a multiple of 2"
    if block_q % WG_ROWS or block_k % WG_ROWS:
        return f"block_q {block_q} and block_k {block_k} must be multiples of {WG_ROWS}"
    if window is not None:
        return "a window (the local heads run through cuDNN or the Triton kernel)"
    return None


def _kernel(
    q_ref, k_ref, v_ref, v_tail_ref, idx_ref, range_ref, len_ref, off_ref, o_ref, scoped, *,
    num_tiles: int, num_pairs: int, num_items: int, tiles_per_block: int, block_k: int,
    group: int, qk_scale: float, steps_in_flight: int, blocks_per_step: int,
):
    """One program: it walks work items program, program + P, ... (P programs; one item
    each when P is the number of items), an item being WG_ROWS queries of two heads of one KV
    head over their tile's list.

    Items are ordered head pair of a KV head first, then tile (latest, heaviest first), then
    KV head, then batch: the programs running at once read one KV head's blocks for both its
    pairs and for neighbouring tiles (L2 hits: at long lengths the listed blocks stream at
    more than HBM's bandwidth), and the lightest items come last. The shared-memory slots and
    their barriers run on one step count across a program's items, so a persistent program's
    producer fetches the next item's first blocks while its consumers finish the last one.

    A step covers blocks_per_step consecutive list entries (a [rows, blocks_per_step * block_k]
    score tile: fewer, larger matrix products); a step's entries past n_live repeat the last
    live block and are masked.

    q_ref, o_ref: [B, T, H, D]; k_ref, v_ref: [B, S, K, D]; v_tail_ref: [B, block_k, K, D],
    v's block holding each row's last key, zero past the length; idx_ref: [B, K, nq, max_sel];
    range_ref: [B, K, num_tiles, 2] (n_full, n_live); len_ref, off_ref: [B].
    """
    (qo_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
    program = lax.axis_index("program")
    num_programs = lax.axis_size("program")
    my_items = lax.div(num_items - program + num_programs - 1, num_programs)
    per_step = jnp.int32(blocks_per_step)
    step_k = blocks_per_step * block_k
    wg = lax.axis_index("wg")
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]

    def slot_of(step):
        return lax.rem(step, jnp.int32(steps_in_flight))

    def item_of(j):
        """(batch, pair, kv_head, tile, n_full, n_live, n_steps) of this program's j-th item."""
        item = program + j * num_programs
        pairs_per_kv = group // COMPUTE_WGS
        within = lax.rem(item, jnp.int32(pairs_per_kv))
        rest = lax.div(item, jnp.int32(pairs_per_kv))
        tile = num_tiles - 1 - lax.rem(rest, jnp.int32(num_tiles))
        rest = lax.div(rest, jnp.int32(num_tiles))
        num_kv = num_pairs // pairs_per_kv
        pair = lax.rem(rest, jnp.int32(num_kv)) * pairs_per_kv + within
        batch = lax.div(rest, jnp.int32(num_kv))
        kv_head = lax.div(COMPUTE_WGS * pair, jnp.int32(group))
        n_full = range_ref[batch, kv_head, tile, 0]
        n_live = range_ref[batch, kv_head, tile, 1]
        n_steps = lax.div(n_live + per_step - 1, per_step)
        return batch, pair, kv_head, tile, n_full, n_live, n_steps

    def block_id(batch, kv_head, tile, n_live, entry):
        list_row = lax.div(tile, jnp.int32(tiles_per_block))
        return idx_ref[batch, kv_head, list_row, jnp.minimum(entry, n_live - 1)]

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < PRODUCER_WG)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        qo_smem = qo_smem2.at[wg]
        row_layout = plgpu.Layout.WGMMA.reduce(1)

        def run_item(j, first_step):
            batch, pair, kv_head, tile, n_full, n_live, n_steps = item_of(j)
            head = COMPUTE_WGS * pair + wg
            row0 = tile * WG_ROWS
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, WG_ROWS), head], qo_smem,
                                    q_ready.at[wg])
            length = len_ref[batch]
            first_pos = off_ref[batch] + row0
            plgpu.barrier_wait(q_ready.at[wg])
            m = plgpu.layout_cast(jnp.full((WG_ROWS,), MASK_VALUE, jnp.float32), row_layout)
            row_sum = plgpu.layout_cast(jnp.full((WG_ROWS,), 0, jnp.float32), row_layout)
            acc = plgpu.layout_cast(jnp.full((WG_ROWS, head_dim), 0, jnp.float32),
                                    plgpu.Layout.WGMMA)

            @pl.when(n_steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[slot_of(first_step)])

            pl.when(wg == 1)(take_turn)

            def step(i, carry, masked: bool):
                acc, m, row_sum = carry
                slot = slot_of(first_step + i)

                def qk_product(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    take_turn()
                    return acc_ref[...]

                s = pl.run_scoped(qk_product, plgpu.ACC((WG_ROWS, step_k), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                s = s * qk_scale
                if masked:
                    shape = (WG_ROWS, step_k)
                    q_pos = first_pos + plgpu.broadcasted_iota(jnp.int32, shape, 0,
                                                               layout=plgpu.Layout.WGMMA)
                    col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                    part = lax.div(col, jnp.int32(block_k))  # which entry of the step
                    first = i * per_step

                    def block_start(h):
                        return block_id(batch, kv_head, tile, n_live, first + h) * block_k

                    k_pos = block_start(0) + col
                    for h in range(1, blocks_per_step):
                        k_pos = jnp.where(part == h, block_start(h) + col - h * block_k, k_pos)
                    visible = (k_pos <= q_pos) & (k_pos < length) & (first + part < n_live)
                    s = jnp.where(visible, s, MASK_VALUE)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                if masked:
                    # A row with no visible key yet has m_new == MASK_VALUE and exp2(0) == 1.
                    p = jnp.where(visible, p, 0.0)
                row_sum = row_sum * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                plgpu.barrier_arrive(turn)  # softmax done
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)  # the tensor cores are ours

                def pv_product(pv_ref):
                    plgpu.wgmma(pv_ref, p16, v_smem.at[slot])
                    nxt = i + 1

                    @pl.when(nxt < n_steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[slot_of(first_step + nxt)])

                    return pv_ref[...]

                pv = pl.run_scoped(pv_product, plgpu.ACC((WG_ROWS, head_dim), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc + pv, m_new, row_sum

            n_unmasked = lax.div(n_full, per_step)  # steps whose every entry is unmasked
            carry = lax.fori_loop(0, n_unmasked, functools.partial(step, masked=False),
                                  (acc, m, row_sum))
            acc, m, row_sum = lax.fori_loop(n_unmasked, n_steps,
                                            functools.partial(step, masked=True), carry)
            pl.when(wg == 0)(take_turn)

            rows = first_pos + plgpu.broadcasted_iota(jnp.int32, (WG_ROWS,), 0,
                                                      layout=row_layout)
            keep = (rows < length) & (row_sum > 0)
            inv = jnp.where(keep, 1.0 / jnp.where(keep, row_sum, 1.0), 0.0)
            qo_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, pl.ds(row0, WG_ROWS), head])
            plgpu.wait_smem_to_gmem(0)  # the next item's queries reuse qo_smem
            return first_step + n_steps

        lax.fori_loop(0, my_items, run_item, jnp.int32(0))

    @pl.when(wg == PRODUCER_WG)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

        def run_item(j, first_step):
            batch, _, kv_head, tile, _, n_live, n_steps = item_of(j)
            tail = lax.div(len_ref[batch] - 1, jnp.int32(block_k))

            def fetch_block(b, k_dst, v_dst, slot):
                rows = (batch, pl.ds(b * block_k, block_k), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_dst, k_ready.at[slot])
                pl.when(b != tail)(lambda: plgpu.copy_gmem_to_smem(v_ref.at[rows], v_dst,
                                                                    v_ready.at[slot]))
                pl.when(b == tail)(lambda: plgpu.copy_gmem_to_smem(
                    v_tail_ref.at[batch, :, kv_head], v_dst, v_ready.at[slot]))

            @pl.loop(jnp.int32(0), n_steps)
            def _(i):
                step = first_step + i
                slot = slot_of(step)

                @pl.when(step >= steps_in_flight)  # the slot's previous step is consumed
                def _():
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

                for h in range(blocks_per_step):
                    part = pl.ds(h * block_k, block_k)
                    fetch_block(block_id(batch, kv_head, tile, n_live, i * per_step + h),
                                k_smem.at[slot, part], v_smem.at[slot, part], slot)

            return first_step + n_steps

        lax.fori_loop(0, my_items, run_item, jnp.int32(0))


def default_num_programs(num_items: int, sms: int | None = None) -> int:
    """One persistent program per SM (default: the device's) while each walks at most
    MAX_PERSISTENT_ITEMS items, else one program per item.

    Persistence hides each item's start-up and epilogue behind the next item's copies, which
    pays where items are short (32K tokens); over many items the statically assigned programs
    drift apart, the blocks read at once spread over more of the cache, and the hardware's own
    scheduling of one program per item keeps more of them in L2 (512K tokens)."""
    sms = sm_count() if sms is None else sms
    if sms and num_items <= MAX_PERSISTENT_ITEMS * sms:
        return sms
    return num_items


def _tail_values(v: jax.Array, lengths: jax.Array, block_k: int) -> jax.Array:
    """[B, block_k, K, D]: per row, v's block holding its last valid key, zero past the length
    (a row of length 0 gets block 0, all zero)."""
    first = jnp.maximum(lengths - 1, 0) // block_k * block_k
    pos = first[:, None] + jnp.arange(block_k)  # [B, block_k]
    rows = jnp.take_along_axis(v, pos[:, :, None, None], axis=1)
    return jnp.where((pos < lengths[:, None])[:, :, None, None], rows, 0).astype(v.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_q", "block_k", "sm_scale", "steps_in_flight", "blocks_per_step", "num_programs",
    ),
)
def sparse_attention_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    *,
    block_q: int,
    block_k: int,
    lengths: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    sm_scale: float | None = None,
    steps_in_flight: int = DEFAULT_STEPS_IN_FLIGHT,
    blocks_per_step: int = DEFAULT_BLOCKS_PER_STEP,
    num_programs: int | None = None,
) -> jax.Array:
    """Block-sparse flash attention (Pallas, Mosaic GPU lowering); the reference's contract.

    Args:
      q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim].
      block_indices: [batch, num_kv_heads, num_q_blocks, max_sel] int32, ascending.
      block_counts: [batch, num_kv_heads, num_q_blocks] int32.
      block_q, block_k: selection granularity (multiples of 64).
      lengths: [batch] int32, valid keys per row (<= kv_len); defaults to kv_len.
      q_offset: absolute position of query 0 (an int or a traced int32 scalar).
      sm_scale: softmax scale; defaults to 1 / sqrt(head_dim).
      steps_in_flight: steps' K/V held in shared memory at once (>= 2).
      blocks_per_step: list entries per step (its score tile is blocks_per_step * block_k
        keys wide).
      num_programs: programs sharing the work items (`default_num_programs` by default;
        one item each where the device reports no SMs).

    Returns:
      [batch, q_len, num_heads, head_dim] in q's dtype.
    """
    _, num_q_blocks = _check_shapes(q, k, v, block_indices, block_counts, block_q)
    reason = unsupported_reason(q.shape, k.shape, q.dtype, block_q=block_q, block_k=block_k,
                                window=None)
    if reason is not None:
        raise ValueError(f"sparse_attention_mgpu cannot tile this input: {reason}")
    if steps_in_flight < 2 or blocks_per_step < 1:
        raise ValueError(f"{steps_in_flight=} must be >= 2 and {blocks_per_step=} >= 1")
    batch, q_len, num_heads, head_dim = q.shape
    _, kv_len, num_kv_heads, _ = k.shape
    if lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    if block_indices.shape[-1] == 0:
        return jnp.zeros_like(q)
    tiles_per_block = block_q // WG_ROWS
    num_tiles = num_q_blocks * tiles_per_block
    num_pairs = num_heads // COMPUTE_WGS
    num_items = num_tiles * num_pairs * batch
    if num_programs is None:
        num_programs = default_num_programs(num_items)
    num_programs = max(1, min(num_programs, num_items))
    lengths = lengths.astype(jnp.int32)
    ranges = _tile_ranges(
        block_indices.astype(jnp.int32), block_counts.astype(jnp.int32), lengths,
        tile_q=WG_ROWS, tiles_per_block=tiles_per_block, block_k=block_k, q_len=q_len,
        q_offset=q_offset,
    )
    offsets = jnp.full((batch,), q_offset, jnp.int32)
    # Whole tiles only: the copies move fixed [rows, head_dim] boxes.
    q_pad = num_tiles * WG_ROWS - q_len
    kv_pad = pl.cdiv(kv_len, block_k) * block_k - kv_len
    qp = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, 0))) if q_pad else q
    if kv_pad:
        k, v = (jnp.pad(x, ((0, 0), (0, kv_pad), (0, 0), (0, 0))) for x in (k, v))

    transforms = (plgpu.TilingTransform(SMEM_TILING), plgpu.SwizzleTransform(SMEM_SWIZZLE))

    def body(q_ref, k_ref, v_ref, v_tail_ref, idx_ref, range_ref, len_ref, off_ref, o_ref):
        tile_smem = functools.partial(plgpu.SMEM, dtype=q.dtype, transforms=transforms)
        pl.run_scoped(
            lambda *scoped: _kernel(
                q_ref, k_ref, v_ref, v_tail_ref, idx_ref, range_ref, len_ref, off_ref, o_ref,
                scoped,
                num_tiles=num_tiles, num_pairs=num_pairs, num_items=num_items,
                tiles_per_block=tiles_per_block, block_k=block_k,
                group=num_heads // num_kv_heads,
                qk_scale=_default_sm_scale(head_dim, sm_scale) * LOG2_E,
                steps_in_flight=steps_in_flight, blocks_per_step=blocks_per_step,
            ),
            (
                tile_smem((COMPUTE_WGS, WG_ROWS, head_dim)),
                tile_smem((steps_in_flight, blocks_per_step * block_k, head_dim)),
                tile_smem((steps_in_flight, blocks_per_step * block_k, head_dim)),
            ),
            (  # one arrival per copy into the slot
                plgpu.Barrier(num_arrivals=blocks_per_step, num_barriers=steps_in_flight),
                plgpu.Barrier(num_arrivals=blocks_per_step, num_barriers=steps_in_flight),
                plgpu.Barrier(num_barriers=COMPUTE_WGS),
            ),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=steps_in_flight),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        grid=(num_programs,),
        grid_names=("program",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(qp, k, v, _tail_values(v, lengths, block_k), block_indices.astype(jnp.int32), ranges,
      lengths, offsets)
    return out[:, :q_len] if q_pad else out


def is_hopper() -> bool:
    """Whether the default device runs this kernel's instructions (wgmma, sm_90a)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith(
        "9.")


def sparse_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    *,
    block_q: int,
    block_k: int,
    lengths: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    sm_scale: float | None = None,
    interpret: bool = False,
    window: int | None = None,
    sink_tokens: int = 0,
    **triton_launch,
) -> jax.Array:
    """The GPU family's block-sparse prefill: this Mosaic GPU kernel on a Hopper GPU for the
    inputs it tiles (`unsupported_reason`), the Triton kernel otherwise (other GPUs, a window,
    odd GQA groups, float32, interpret mode). Both meet the reference's contract.

    triton_launch: the Triton kernel's launch parameters (tile_q, num_warps, ...), which pin
    it: a caller tuning Triton gets Triton.
    """
    common = dict(block_q=block_q, block_k=block_k, lengths=lengths, q_offset=q_offset,
                  sm_scale=sm_scale)
    if (not interpret and not triton_launch and is_hopper() and unsupported_reason(
            q.shape, k.shape, q.dtype, block_q=block_q, block_k=block_k, window=window) is None):
        return sparse_attention_mgpu(q, k, v, block_indices, block_counts, **common)
    return sparse_attention(q, k, v, block_indices, block_counts, **common, interpret=interpret,
                            window=window, sink_tokens=sink_tokens, **triton_launch)

"""The Mosaic GPU block-sparse prefill kernel on the CPU: it lowers for CUDA at every shape
family it tiles, refuses the others with a reason, and the GPU family's dispatcher runs the
Triton kernel off Hopper. Its values are checked against the reference on a GPU
(tests/test_gpu.py): this JAX's GPU interpret mode cannot run wgmma on a transposed operand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.sparse_attention_mgpu import (
    MAX_PERSISTENT_ITEMS,
    default_num_programs,
    sparse_attention_gpu,
    sparse_attention_mgpu,
    unsupported_reason,
)
from tests.test_sparse_attention_kernel import Case, make_inputs

# (batch, q_len, heads, kv_heads, head_dim, q_offset, kv_len, blocks_per_step, steps_in_flight,
#  num_programs)
LOWERING_CASES = [
    (2, 1000, 8, 2, 128, 0, 1024, 2, 3, None),  # ragged q (padded tile), GQA 4
    (1, 256, 4, 2, 64, 3072, 4133, 2, 2, None),  # a later chunk, kv_len not a block multiple
    (2, 512, 8, 4, 128, 0, 512, 1, 4, None),  # one entry per step
    (2, 1000, 8, 2, 128, 0, 1024, 2, 3, 5),  # persistent programs walking several items
    (1, 700, 16, 2, 64, 0, 700, 2, 3, 3),  # GQA 8: four head pairs a KV head
]


@pytest.mark.parametrize("case", LOWERING_CASES, ids=str)
def test_kernel_lowers_for_cuda(case):
    batch, q_len, heads, kv_heads, dim, q_offset, kv_len, per_step, in_flight, programs = case
    nq = -(-q_len // 64)
    sds = jax.ShapeDtypeStruct
    args = (sds((batch, q_len, heads, dim), jnp.bfloat16),
            sds((batch, kv_len, kv_heads, dim), jnp.bfloat16),
            sds((batch, kv_len, kv_heads, dim), jnp.bfloat16),
            sds((batch, kv_heads, nq, 9), jnp.int32), sds((batch, kv_heads, nq), jnp.int32),
            sds((batch,), jnp.int32))

    def run(q, k, v, idx, cnt, lengths):
        return sparse_attention_mgpu(q, k, v, idx, cnt, block_q=64, block_k=64, lengths=lengths,
                                     q_offset=q_offset, blocks_per_step=per_step,
                                     steps_in_flight=in_flight, num_programs=programs)

    text = jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize(
    "q_shape, k_shape, dtype, block_q, block_k, window, needle",
    [
        ((1, 64, 8, 128), (1, 64, 2, 128), jnp.float32, 64, 64, None, "16-bit"),
        ((1, 64, 8, 96), (1, 64, 2, 96), jnp.bfloat16, 64, 64, None, "head_dim"),
        ((1, 64, 8, 256), (1, 64, 2, 256), jnp.bfloat16, 64, 64, None, "head_dim"),
        ((1, 64, 9, 64), (1, 64, 3, 64), jnp.bfloat16, 64, 64, None, "group"),
        ((1, 64, 8, 64), (1, 64, 2, 64), jnp.bfloat16, 32, 64, None, "multiples of 64"),
        ((1, 64, 8, 64), (1, 64, 2, 64), jnp.bfloat16, 64, 64, 128, "window"),
    ],
)
def test_unsupported_inputs_are_named(q_shape, k_shape, dtype, block_q, block_k, window, needle):
    reason = unsupported_reason(q_shape, k_shape, dtype, block_q=block_q, block_k=block_k,
                                window=window)
    assert reason is not None and needle in reason
    assert unsupported_reason((1, 64, 8, 128), (1, 64, 2, 128), jnp.bfloat16, block_q=128,
                              block_k=64, window=None) is None


def test_kernel_refuses_what_it_cannot_tile():
    q = jnp.zeros((1, 64, 9, 64), jnp.bfloat16)
    k = jnp.zeros((1, 64, 3, 64), jnp.bfloat16)
    idx, cnt = jnp.zeros((1, 3, 1, 1), jnp.int32), jnp.ones((1, 3, 1), jnp.int32)
    with pytest.raises(ValueError, match="cannot tile this input: the GQA group"):
        sparse_attention_mgpu(q, k, k, idx, cnt, block_q=64, block_k=64)


def test_gpu_dispatch_runs_triton_when_interpreting():
    case = Case(5, 2, 64, 4, 2, 16, 16, 16, jnp.bfloat16, lengths=(64, 40))
    q, k, v, idx, cnt, lengths = make_inputs(case)
    kwargs = dict(block_q=16, block_k=16, lengths=lengths, interpret=True)
    out = sparse_attention_gpu(q, k, v, idx, cnt, **kwargs)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(sparse_attention(q, k, v, idx, cnt, **kwargs),
                                             np.float32))


def test_programs_are_persistent_only_over_few_items():
    sms = 132
    assert default_num_programs(64 * sms, sms) == sms
    assert default_num_programs(MAX_PERSISTENT_ITEMS * sms, sms) == sms
    many = MAX_PERSISTENT_ITEMS * sms + 1
    assert default_num_programs(many, sms) == many
    assert default_num_programs(10, None) == 10  # this CPU reports no SMs

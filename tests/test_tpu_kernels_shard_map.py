"""The Mosaic (TPU) kernels under `jax.shard_map` on a 4-device CPU mesh equal the unsharded
jnp references: block-sparse prefill, sparse decode, local attention and the indexer's scoring +
selection, each in TPU interpret mode with rows sharded over "data" and KV heads (indexer
groups) over "heads", on fresh random inputs with ragged lengths and GQA.

Four CPU devices need XLA_FLAGS before JAX starts, and this process started it with one: one
subprocess runs every check (`sharded_failures`) and each test reads its kernel's outcome.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.indexer_topp import indexer_topp_reference
from pallas_kernels.local_attention import local_attention_reference
from pallas_kernels.sparse_attention import sparse_attention_reference
from pallas_kernels.sparse_decode import sparse_decode_reference
from pallas_kernels.tpu_indexer_topp import indexer_topp_tpu
from pallas_kernels.tpu_local_attention import local_attention_tpu
from pallas_kernels.tpu_sparse_attention import sparse_attention_tpu
from pallas_kernels.tpu_sparse_decode import sparse_decode_tpu
from tests import test_indexer_topp_kernel as indexer_tests
from tests import test_local_attention as local_tests
from tests import test_sparse_attention_kernel as prefill_tests
from tests import test_sparse_decode_kernel as decode_tests

REPO = Path(__file__).resolve().parents[1]
MESH_SHAPE, MESH_AXES = (2, 2), ("data", "heads")
# Query head h belongs to KV head h // G, so contiguous head shards keep each group whole.
TOKENS_HEADS = P("data", None, "heads")  # [B, T, H or K, D]
ROWS_HEADS = P("data", "heads")  # block lists [B, K, ...]; decode queries [B, H, D]
ROWS = P("data")  # [B]

# Prefill: G = 4, float32, ragged rows, a later chunk (q_offset); the drawn lists cycle through
# empty, full, random, with the diagonal and with future blocks.
PREFILL = prefill_tests.Case(60, 2, 48, 8, 2, 64, 16, 16, jnp.float32, lengths=(80, 53),
                             q_offset=32, kv_len=80)
# Decode: G = 8, bfloat16, ragged rows, max_len not a multiple of block_k; empty and full lists.
DECODE = decode_tests.Case(61, (100, 37), 100, 16, 2, 64, 16, jnp.bfloat16, None)
# Local attention: G = 1, float32, sinks + a window across key blocks, ragged rows.
LOCAL = local_tests.Case(62, 2, 200, 2, 2, 64, window=40, sink_tokens=4, lengths=(200, 71),
                         block_q=32, block_k=128)
# Indexer: bfloat16 keys, ragged rows, 2 groups; lists and counts must match exactly.
INDEXER = indexer_tests.Case(63, 100, 100, (100, 41), 2, 16, 16, 16, jnp.bfloat16)
INDEXER_RULE = dict(block_q=INDEXER.block_q, block_k=INDEXER.block_k, scale=0.6, top_p=0.9,
                    sink_blocks=indexer_tests.SINK, local_blocks=indexer_tests.LOCAL)


def _sharded(kernel, mesh: Mesh, in_specs, out_specs):
    # check_vma=False: pallas_call's out_shape states no per-axis variance, which the check
    # requires (and whose spelling differs between JAX versions).
    return jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False))


def check_prefill(mesh: Mesh) -> None:
    q, k, v, idx, cnt, lengths = prefill_tests.make_inputs(PREFILL)
    kw = dict(block_q=PREFILL.block_q, block_k=PREFILL.block_k, q_offset=PREFILL.q_offset)
    ref = sparse_attention_reference(q, k, v, idx, cnt, lengths=lengths, **kw)
    out = _sharded(
        lambda q, k, v, idx, cnt, n: sparse_attention_tpu(q, k, v, idx, cnt, lengths=n,
                                                          interpret=True, **kw),
        mesh, (TOKENS_HEADS, TOKENS_HEADS, TOKENS_HEADS, ROWS_HEADS, ROWS_HEADS, ROWS),
        TOKENS_HEADS)(q, k, v, idx, cnt, lengths)
    prefill_tests.assert_close(out, ref, PREFILL.dtype)


def check_decode(mesh: Mesh) -> None:
    q, k, v, idx, cnt, lengths = decode_tests.make_inputs(DECODE)
    ref = sparse_decode_reference(q, k, v, idx, cnt, lengths, block_k=DECODE.block_k)
    out = _sharded(
        functools.partial(sparse_decode_tpu, block_k=DECODE.block_k, interpret=True),
        mesh, (ROWS_HEADS, TOKENS_HEADS, TOKENS_HEADS, ROWS_HEADS, ROWS_HEADS, ROWS),
        ROWS_HEADS)(q, k, v, idx, cnt, lengths)
    prefill_tests.assert_close(out, ref, DECODE.dtype)


def check_local(mesh: Mesh) -> None:
    q, k, v, lengths = local_tests.make_inputs(LOCAL)
    kw = dict(sink_tokens=LOCAL.sink_tokens, window=LOCAL.window)
    ref = local_attention_reference(q, k, v, lengths, **kw)
    out = _sharded(
        functools.partial(local_attention_tpu, block_q=LOCAL.block_q, block_k=LOCAL.block_k,
                          interpret=True, **kw),
        mesh, (TOKENS_HEADS, TOKENS_HEADS, TOKENS_HEADS, ROWS), TOKENS_HEADS)(q, k, v, lengths)
    local_tests.assert_close(out, ref, LOCAL.dtype)


def check_indexer(mesh: Mesh) -> None:
    qi, ki, q_start, lengths = indexer_tests.make_inputs(INDEXER)
    ref = indexer_topp_reference(qi, ki, q_start, lengths, **INDEXER_RULE)
    out = _sharded(functools.partial(indexer_topp_tpu, interpret=True, **INDEXER_RULE),
                   mesh, (TOKENS_HEADS, TOKENS_HEADS, ROWS, ROWS), (ROWS_HEADS, ROWS_HEADS))(
        qi, ki, q_start, lengths)
    for got, want, what in zip(out, ref, ("indices", "counts"), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=what)


CHECKS = {"prefill": check_prefill, "decode": check_decode, "local": check_local,
          "indexer": check_indexer}


def sharded_failures() -> dict[str, str | None]:
    """Every check on a (2, 2) ("data", "heads") mesh of the first 4 devices: {kernel: None if
    it matched its reference, else what differed}."""
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(MESH_SHAPE), MESH_AXES)
    failures: dict[str, str | None] = {}
    for name, check in CHECKS.items():
        try:
            check(mesh)
        except AssertionError:
            failures[name] = traceback.format_exc(limit=-1)  # the failing assert and its message
        else:
            failures[name] = None
    return failures


@pytest.fixture(scope="module")
def failures() -> dict[str, str | None]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    script = ("import json; from tests.test_tpu_kernels_shard_map import sharded_failures; "
              "print(json.dumps(sharded_failures()))")
    # A timeout: a kernel failing on one device would leave the others waiting at interpret
    # mode's cross-device barrier.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", list(CHECKS))
def test_tpu_kernel_under_shard_map_matches_reference(failures, kernel):
    assert failures[kernel] is None, failures[kernel]

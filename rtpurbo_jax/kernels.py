"""Which Pallas kernels a `backend` runs, in one table so that every call site dispatches alike.

  "pallas": the GPU kernels: Triton-lowered, with the block-sparse prefill lowered through
            Mosaic GPU on Hopper for the shapes that kernel tiles;
  "mosaic": the Mosaic-lowered kernels (written for TPUs);
  "auto":   the GPU's kernels on a GPU, the TPU's on a TPU, the jnp references elsewhere;
  "reference": the jnp references everywhere.
Off their platform the kernels run in Pallas interpret mode (the tests' CPU path). A shape a
kernel can't tile raises its ValueError: nothing falls back silently to another implementation.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax

from pallas_kernels.indexer_topp import block_logits, select_blocks
from pallas_kernels.local_attention import local_attention
from pallas_kernels.sparse_attention_mgpu import sparse_attention_gpu
from pallas_kernels.sparse_decode import sparse_decode
from pallas_kernels.tpu_indexer_topp import block_logits_tpu, select_blocks_tpu
from pallas_kernels.tpu_local_attention import local_attention_tpu
from pallas_kernels.tpu_sparse_attention import sparse_attention_tpu
from pallas_kernels.tpu_sparse_decode import sparse_decode_tpu

BACKENDS = ("reference", "pallas", "mosaic", "auto")
_FAMILY = {"pallas": "triton", "mosaic": "mosaic"}
_AUTO = {"gpu": "triton", "tpu": "mosaic"}  # jax.default_backend() -> kernel family
_PLATFORM = {"triton": "gpu", "mosaic": "tpu"}


class Kernels(NamedTuple):
    """One family's kernels, `interpret` bound (each has its module's signature)."""
    sparse_attention: Any
    sparse_decode: Any
    local_attention: Any
    block_logits: Any
    select_blocks: Any


_TABLE = {
    "triton": (sparse_attention_gpu, sparse_decode, local_attention, block_logits, select_blocks),
    "mosaic": (sparse_attention_tpu, sparse_decode_tpu, local_attention_tpu, block_logits_tpu,
               select_blocks_tpu),
}


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def family(backend: str) -> str | None:
    """"triton", "mosaic", or None (the jnp references) for `backend` on this platform."""
    if backend == "auto":
        return _AUTO.get(jax.default_backend())
    return _FAMILY.get(backend)


def use_kernels(backend: str) -> bool:
    """Whether `backend` runs Pallas kernels here (else the jnp references)."""
    return family(backend) is not None


def kernels(backend: str) -> Kernels:
    """The kernels `backend` runs, interpreted off their platform. Raises ValueError for a
    backend that runs the references."""
    name = family(backend)
    if name is None:
        raise ValueError(f"backend {backend!r} runs the jnp references here, not kernels")
    interpret = jax.default_backend() != _PLATFORM[name]
    return Kernels(*(functools.partial(fn, interpret=interpret) for fn in _TABLE[name]))

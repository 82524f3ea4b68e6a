"""Device mesh and shardings by logical axis names (MaxText style).

The mesh has two axes: "data" (batch parallel) and "fsdp" (batch parallel too, and the frozen
base weights are split along their embed dimension over it). Logical axis names come from
`rtpurbo_jax.model.param_axes`; LOGICAL_AXIS_RULES maps them onto mesh axes. One device is the
degenerate 1 x 1 mesh. Multi-host runs call `jax.distributed.initialize()` first.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtpurbo_jax.config import ModelConfig
from rtpurbo_jax.model import param_axes

MESH_AXES = ("data", "fsdp")
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": None,
    "mlp": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "lora_rank": None,
}


def make_mesh(data: int, fsdp: int) -> Mesh:
    """A (data, fsdp) mesh over all devices; data = -1 takes what fsdp leaves."""
    count = jax.device_count()
    if fsdp < 1 or (data != -1 and data < 1):
        raise ValueError(f"mesh sizes must be positive (data may be -1), got {data}, {fsdp}")
    if data == -1:
        data = count // fsdp
    if data * fsdp != count:
        raise ValueError(f"a {data} x {fsdp} (data x fsdp) mesh needs {data * fsdp} devices, "
                         f"there are {count}")
    return Mesh(np.asarray(jax.devices()).reshape(data, fsdp), MESH_AXES)


def _mesh_size(mesh: Mesh, axes: Any) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in names]))


def logical_sharding(mesh: Mesh, axes: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
    """The sharding of an array with these logical axes; a dimension that does not divide by
    its mesh axes stays replicated."""
    spec = []
    for name, size in zip(axes, shape, strict=True):
        target = LOGICAL_AXIS_RULES.get(name)
        spec.append(target if target is not None and size % _mesh_size(mesh, target) == 0
                    else None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def param_shardings(config: ModelConfig, params: Any, mesh: Mesh) -> Any:
    """NamedShardings for the base params, from their logical axis names."""
    return jax.tree.map(lambda axes, p: logical_sharding(mesh, axes, p.shape),
                        param_axes(config), params, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, batch_size: int, ndim: int) -> NamedSharding:
    """Batch-major arrays split over every mesh axis."""
    return logical_sharding(mesh, ("batch",) + (None,) * (ndim - 1),
                            (batch_size,) + (1,) * (ndim - 1))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

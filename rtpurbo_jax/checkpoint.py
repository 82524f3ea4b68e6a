"""The sparse checkpoint: small and separate from the base model.

A directory holding
  sparse.json          {"format", "sparse_config": SparseConfig, "base": {"name", "fingerprint"}}
                       (plus "base"."derived_from": {"name", "fingerprint"} of the original model
                       when the base is a fine-tuned (stage-2) model that export.py wrote)
  indexer/             the indexer weights: an Orbax checkpoint of a flat
                       {"layers.<i>.wq": ..., "layers.<i>.wk": ...} dict
or, exported for other frameworks, the same sparse.json beside
  indexer.safetensors  the same flat dict.
The retrieval-head mask lives in the SparseConfig. The base model is identified by the
fingerprint of its weights, so a checkpoint is never attached to a model it was not made for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.config import SparseConfig

FORMAT = "rtpurbo_jax.sparse/1"
CONFIG_FILE = "sparse.json"
ORBAX_DIR = "indexer"
SAFETENSORS_FILE = "indexer.safetensors"


class SparseCheckpointError(ValueError):
    """A sparse checkpoint is missing, malformed, or made for another base model."""


def flatten_indexer(indexer: dict[str, Any]) -> dict[str, jax.Array]:
    """{"layers": [{"wq": ..., "wk": ...}, {}, ...]} -> {"layers.0.wq": ..., "layers.0.wk": ...}."""
    return {f"layers.{i}.{name}": array for i, layer in enumerate(indexer["layers"])
            for name, array in layer.items()}


def unflatten_indexer(flat: dict[str, Any], num_layers: int) -> dict[str, Any]:
    layers: list[dict[str, jax.Array]] = [{} for _ in range(num_layers)]
    for key, array in flat.items():
        _, index, name = key.split(".")
        layers[int(index)][name] = jnp.asarray(array)
    return {"layers": layers}


def _metadata(sparse: SparseConfig, base_name: str, fingerprint: str,
              derived_from: dict[str, str] | None) -> str:
    base: dict[str, Any] = {"name": base_name, "fingerprint": fingerprint}
    if derived_from is not None:
        base["derived_from"] = {"name": derived_from["name"],
                                "fingerprint": derived_from["fingerprint"]}
    return json.dumps({"format": FORMAT, "sparse_config": json.loads(sparse.to_json()),
                       "base": base}, indent=2)


def save_sparse(path: str | os.PathLike[str], sparse: SparseConfig, indexer: dict[str, Any],
                base_name: str, fingerprint: str) -> Path:
    """Writes a sparse checkpoint directory with Orbax (overwriting one that is there)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / ORBAX_DIR, flatten_indexer(indexer), force=True)
    checkpointer.wait_until_finished()
    (path / CONFIG_FILE).write_text(_metadata(sparse, base_name, fingerprint, None))
    return path


def export_safetensors(path: str | os.PathLike[str], sparse: SparseConfig,
                       indexer: dict[str, Any], base_name: str, fingerprint: str,
                       derived_from: dict[str, str] | None = None) -> Path:
    """Writes sparse.json + indexer.safetensors (float32), readable without JAX.

    derived_from: {"name", "fingerprint"} of the model the base was fine-tuned from, if any.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, np.float32) for k, v in flatten_indexer(indexer).items()}
    save_file(arrays, str(path / SAFETENSORS_FILE))
    (path / CONFIG_FILE).write_text(_metadata(sparse, base_name, fingerprint, derived_from))
    return path


def load_sparse(
    path: str | os.PathLike[str],
) -> tuple[SparseConfig, dict[str, Any], dict[str, Any]]:
    """Reads either form: (SparseConfig, indexer params, base identity {name, fingerprint} and,
    for a fine-tuned base, "derived_from")."""
    path = Path(path).absolute()
    meta_file = path / CONFIG_FILE
    if not meta_file.exists():
        raise SparseCheckpointError(f"{path} is not a sparse checkpoint: no {CONFIG_FILE}")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise SparseCheckpointError(f"{meta_file} has format {meta.get('format')!r}, "
                                    f"expected {FORMAT!r}")
    sparse = SparseConfig.from_json(json.dumps(meta["sparse_config"]))
    if (path / SAFETENSORS_FILE).exists():
        from safetensors.numpy import load_file

        flat = load_file(str(path / SAFETENSORS_FILE))
    elif (path / ORBAX_DIR).exists():
        import orbax.checkpoint as ocp

        flat = ocp.StandardCheckpointer().restore(path / ORBAX_DIR)
    else:
        raise SparseCheckpointError(f"{path} has no indexer weights ({ORBAX_DIR}/ or "
                                    f"{SAFETENSORS_FILE})")
    indexer = unflatten_indexer(flat, sparse.num_layers)
    for layer in range(sparse.num_layers):
        if bool(sparse.indexed_heads(layer)) != bool(indexer["layers"][layer]):
            raise SparseCheckpointError(f"{path}: layer {layer}'s indexer weights do not match "
                                        "its retrieval mask")
    return sparse, indexer, meta["base"]


def check_base(path: str | os.PathLike[str], base: dict[str, Any], fingerprint: str,
               model_name: str) -> None:
    """Raises SparseCheckpointError unless the checkpoint at `path`, made for `base`, fits the
    weights with `fingerprint` (of the model called `model_name`).

    A checkpoint of a fine-tuned (stage-2) model, attached to the model it was fine-tuned from,
    gets its own message: the sparse design only holds with the fine-tuned weights.
    """
    if base["fingerprint"] == fingerprint:
        return
    if base.get("derived_from", {}).get("fingerprint") == fingerprint:
        raise SparseCheckpointError(
            f"sparse checkpoint {path} belongs to the fine-tuned (stage-2) model in {path}, not "
            f"to {model_name!r} that it was fine-tuned from: load that directory instead, "
            f"rtpurbo_jax.load({str(path)!r})")
    raise SparseCheckpointError(
        f"sparse checkpoint {path} was made for base model {base['name']!r} (weights "
        f"fingerprint {base['fingerprint'][:12]}), not for {model_name!r} (fingerprint "
        f"{fingerprint[:12]})")

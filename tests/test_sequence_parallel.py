"""Sequence-parallel prefill on 4 virtual CPU devices: the prompt and its KV cache split over a
"seq" mesh axis give what one device's chunked prefill gives with chunk = shard length (the
last tokens' logits, every cache array, the selection stats), for a dense model and both sparse
designs (ragged rows: one ending in each of shards 0, 2 and 3), the reference path and the
Pallas kernels interpreted; the cache's positional parts stay split over the axis; shapes that
cannot split are refused with one clear error each.

The 4 devices need their own process (this one started JAX with one): a subprocess runs every
case once and saves its arrays; the tests compare them here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.test_chunked_prefill import _assert_close, _assert_same_cache

REPO = Path(__file__).resolve().parent.parent
CASES = [("dense", "reference"), ("indexer", "reference"), ("paper_head_routed", "reference"),
         ("indexer", "pallas")]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from rtpurbo_jax import generate as gen, sequence_parallel as sp
    from rtpurbo_jax.api import right_pad
    from tests.test_chunked_prefill import DESIGNS, TINY, _indexer, _model
    out_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    L, MAX_LEN, SHARDS = 128, 136, 4  # rows of 128, 91 and 20 tokens; shards of 32
    rows = [list(np.random.default_rng(s).integers(2, TINY.vocab_size, n))
            for s, n in ((11, L), (12, L - 37), (13, 20))]
    tokens, lengths = (jnp.asarray(x) for x in right_pad(rows))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), (sp.SEQ_AXIS,))
    static = ("config", "max_len", "backend", "sparse")
    chunked = jax.jit(gen.prefill_chunked, static_argnames=static + ("chunk",))
    sharded = jax.jit(sp.prefill_sequence_sharded, static_argnames=static + ("mesh", "axis"))
    params, report = _model().params, {"split": True, "errors": []}
    for design, backend in cases:
        kw = dict(config=TINY, max_len=MAX_LEN, backend=backend, sparse=DESIGNS[design],
                  indexer=_indexer(design))
        arrays = {}
        for name, (logits, cache, stats) in {
                "one": chunked(params, tokens, lengths, chunk=L // SHARDS, **kw),
                "four": sharded(params, tokens, lengths, mesh=mesh, **kw)}.items():
            arrays.update({f"{name}/logits": logits, f"{name}/stats": stats,
                           f"{name}/lengths": cache["lengths"]})
            for i, layer in enumerate(cache["layers"]):
                for part, x in layer.items():
                    arrays[f"{name}/{i}/{part}"] = x
                    if name == "four" and part in ("k", "v", "ks", "vs", "ki"):
                        report["split"] &= (x.sharding.spec == jax.P(None, sp.SEQ_AXIS) and
                                            x.addressable_shards[0].data.shape[1]
                                            == MAX_LEN // SHARDS)
        np.savez(f"{out_dir}/{design}_{backend}.npz", **arrays)
    sparse, indexer = DESIGNS["indexer"], _indexer("indexer")
    for width, max_len in ((126, MAX_LEN), (72, MAX_LEN), (L, L + 2)):
        try:
            sp.prefill_sequence_sharded(params, tokens[:, :width], lengths, TINY, max_len,
                                        "reference", sparse, indexer, mesh=mesh)
        except ValueError as e:
            report["errors"].append(str(e))
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sequence_parallel")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out), json.dumps(CASES)],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def _load(path: Path, name: str) -> tuple[np.ndarray, dict, np.ndarray]:
    """(logits, cache, stats) of one run ("one": one device, "four": sharded)."""
    arrays = np.load(path)
    layers: dict[int, dict] = {}
    for key in arrays.files:
        run, *rest = key.split("/")
        if run == name and len(rest) == 2:
            layers.setdefault(int(rest[0]), {})[rest[1]] = arrays[key]
    cache = {"layers": [layers[i] for i in sorted(layers)],
             "lengths": arrays[f"{name}/lengths"]}
    return arrays[f"{name}/logits"], cache, arrays[f"{name}/stats"]


@pytest.mark.parametrize(("design", "backend"), CASES)
def test_sharded_prefill_equals_one_device_chunked(results, design, backend):
    path = results[0] / f"{design}_{backend}.npz"
    logits, cache, stats = _load(path, "one")
    s_logits, s_cache, s_stats = _load(path, "four")
    _assert_close(s_logits, logits)
    _assert_same_cache(s_cache, cache)
    # Integer counts summed in float32: equal, so each shard selected as its chunk did.
    np.testing.assert_array_equal(s_stats, stats)


def test_cache_stays_split_over_the_sequence(results):
    assert results[1]["split"]


def test_shapes_that_cannot_split_are_refused(results):
    errors = results[1]["errors"]
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "padded prompt length (126) must be a multiple of the 4 shards" in errors[0]
    assert "shard length (18 = 72 / 4 shards) must be a multiple of" in errors[1]
    assert "pad the prompt to 128" in errors[1]
    assert "max_len (130) must be at least" in errors[2] and "use 132" in errors[2]

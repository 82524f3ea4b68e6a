"""WiSE-FT interpolation of a stage-2 model with its base: the endpoints are the two models,
the middle is the mean of their weights, the sparse checkpoint and origin carry over, and a
wrong base or t fails clearly."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import rtpurbo_jax
from rtpurbo_jax.config import ConfigError
from rtpurbo_jax.interpolation import interpolate, interpolate_model, main
from tests import hf_models
from tests.test_export import _sparse_design


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(base directory, its model, a stand-in stage-2 model directory: weights moved, sparse)."""
    root = tmp_path_factory.mktemp("interp")
    hf_models.build("llama").save_pretrained(root / "base")
    base = rtpurbo_jax.load(root / "base", with_tokenizer=False)
    sparse, indexer = _sparse_design(base)
    tuned = jax.tree.map(lambda x: x * 1.5 + 0.01, base.params)
    origin = {"base": {"name": base.config.name, "fingerprint": base.fingerprint},
              "stages": ["distill"], "steps": {"indexer": 0, "distill": 2}}
    rtpurbo_jax.export_model(root / "tuned", tuned, base.config, origin=origin, sparse=sparse,
                             indexer=indexer, dtype="float32")
    return root, base


def _leaves(params):
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_interpolated_model_is_the_weighted_mean(exported, t):
    root, base = exported
    out = interpolate_model(root / "tuned", t, root / f"t{t}", base=str(root / "base"))
    tuned = rtpurbo_jax.load(root / "tuned", with_tokenizer=False)
    mixed = rtpurbo_jax.load(out, with_tokenizer=False)
    for b, f, m in zip(_leaves(base.params), _leaves(tuned.params), _leaves(mixed.params),
                       strict=True):
        np.testing.assert_allclose(m, b + t * (f - b), rtol=1e-6, atol=1e-6)
    assert mixed.sparse == tuned.sparse
    for a, b in zip(_leaves(mixed.indexer), _leaves(tuned.indexer), strict=True):
        np.testing.assert_array_equal(a, b)
    origin = json.loads((out / "rtpurbo.json").read_text())
    assert origin["interpolation"]["t"] == t and origin["stages"] == ["distill"]
    assert origin["base"]["fingerprint"] == base.fingerprint
    assert origin["interpolation"]["tuned_fingerprint"] == tuned.fingerprint


def test_wrong_base_and_bad_t_fail_clearly(exported, tmp_path, capsys):
    root, base = exported
    other = tmp_path / "other"
    hf_models.build("qwen2").save_pretrained(other)
    with pytest.raises(ConfigError, match="is not the base"):
        interpolate_model(root / "tuned", 0.5, tmp_path / "x", base=str(other))
    with pytest.raises(ValueError, match="t must be in"):
        interpolate(base.params, base.params, 1.5)
    with pytest.raises(SystemExit):
        main([str(root / "base"), "--t", "0.5", "--out", str(tmp_path / "y"),
              "--base", str(root / "base")])
    assert "no rtpurbo.json" in capsys.readouterr().err

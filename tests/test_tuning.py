"""Tuning a trained checkpoint: widening the retrieval set keeps the right indexer weights and
is the only direction allowed, the choice respects the budgets, and tune.py writes a sweep and a
loadable checkpoint on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rtpurbo_jax import tuning
from rtpurbo_jax.api import load_from_config
from rtpurbo_jax.checkpoint import load_sparse
from rtpurbo_jax.config import SparseConfig
from rtpurbo_jax.indexer import init_indexer

REPO = Path(__file__).resolve().parents[1]
MASK = ((True, False), (False, False))
SCORES = np.array([[0.9, 0.1], [0.5, 0.3]])


def _sparse_model():
    config = tiny.get_config()
    model = load_from_config(config.model, backend="reference")
    sparse = SparseConfig(MASK, **config.sparse.to_dict())
    rng = np.random.default_rng(0)
    arch = model.config
    queries = [rng.normal(size=(64, arch.num_heads, arch.head_dim)) for _ in MASK]
    return model.with_sparse(sparse, init_indexer(queries, arch, sparse))


def test_added_heads_take_the_best_scores_and_keep_the_old_ones():
    sparse = SparseConfig(MASK, rank=4, block_q=16, block_k=16)
    assert tuning.add_retrieval_heads(sparse, SCORES, 0.5) == ((True, False), (True, False))
    assert tuning.add_retrieval_heads(sparse, SCORES, 0.75) == ((True, False), (True, True))
    # The checkpoint's head stays even where another scores higher.
    low_first = SparseConfig(((False, True), (False, False)), rank=4, block_q=16, block_k=16)
    assert tuning.add_retrieval_heads(low_first, SCORES, 0.5) == ((True, True), (False, False))
    with pytest.raises(ValueError, match="only retrieval heads can be added"):
        tuning.add_retrieval_heads(sparse, SCORES, 0.0)
    with pytest.raises(ValueError, match="head scores are"):
        tuning.add_retrieval_heads(sparse, SCORES[:1], 0.5)


def test_widening_keeps_each_remaining_groups_weights():
    model = _sparse_model()
    indexer = model.indexer
    sparse, narrowed = tuning.remask(model.sparse, indexer,
                                              ((True, False), (True, False)))
    assert sparse.sparse_groups(1) == (1,)
    # Layer 1 had groups (0, 1); only group 1 (its second row) remains.
    for name in ("wq", "wk"):
        np.testing.assert_array_equal(narrowed["layers"][1][name], indexer["layers"][1][name][1:])
        np.testing.assert_array_equal(narrowed["layers"][0][name], indexer["layers"][0][name])
    _, all_dense = tuning.remask(model.sparse, indexer, ((True, True), (True, True)))
    assert all_dense["layers"] == [{}, {}]
    with pytest.raises(ValueError, match="may only add retrieval heads"):
        tuning.remask(model.sparse, indexer, ((False, False), (True, True)))


def test_a_variant_routes_like_a_checkpoint_made_with_its_mask():
    """Widened to every head, the sparse model is the dense one; widened by one head, it equals
    the model built directly with that mask and the surviving weights."""
    model = _sparse_model()
    tokens = np.random.default_rng(3).integers(0, 256, size=(2, 200))
    dense = model.with_sparse(None)(tokens)
    np.testing.assert_allclose(tuning.variant(model, SCORES, 0.9, 1.0)(tokens), dense,
                               rtol=0, atol=1e-6)
    widened = tuning.variant(model, SCORES, 0.5, 0.5)
    assert widened.sparse.top_p == 0.5 and widened.sparse.retrieval_fraction == 0.5
    direct = model.with_sparse(SparseConfig(((True, False), (True, False)),
                                            **{**tiny.get_config().sparse.to_dict(),
                                               "top_p": 0.5}),
                               {"layers": [model.indexer["layers"][0],
                                           {k: w[1:] for k, w in
                                            model.indexer["layers"][1].items()}]})
    np.testing.assert_array_equal(widened(tokens), direct(tokens))
    assert not np.allclose(widened(tokens), dense, atol=1e-3)


def _row(top_p, fraction, accuracy, density, ppl):
    return {"top_p": top_p, "retrieval_fraction": fraction, "accuracy": accuracy,
            "accuracy_by_length": {}, "density_by_length": {"512": 0.9, "1024": density},
            "ppl": ppl}


def test_choice_respects_budgets_and_breaks_ties():
    tune = tuning.default_tune_config()
    rows = [_row(0.99, 0.1, 0.9, 0.35, 5.0),  # over the density budget at the largest length
            _row(0.9, 0.3, 0.9, 0.1, 5.0),  # too many retrieval heads
            _row(0.95, 0.2, 0.6, 0.25, 5.2),
            _row(0.98, 0.2, 0.6, 0.28, 5.1),  # as accurate, lower perplexity
            _row(0.9, 0.1, 0.5, 0.1, 5.0)]
    assert tuning.choose(rows, tune) is rows[3]
    with pytest.raises(ValueError, match="no variant is within"):
        tuning.choose(rows[:2], tune)


def test_bad_tune_settings_fail_clearly():
    ev, tune = tiny.get_config().eval, tuning.default_tune_config()
    tune.seed = ev.seed
    with pytest.raises(ValueError, match="test seed"):
        tuning.check_tune_config(tune, ev)
    tune = tuning.default_tune_config()
    tune.top_p = (0.9, 1.5)
    with pytest.raises(ValueError, match="top_p values"):
        tuning.check_tune_config(tune, ev)


def test_tune_cli_writes_a_sweep_and_a_loadable_checkpoint(tmp_path):
    model = _sparse_model()
    run_dir = tmp_path / "run"
    model.save_sparse(run_dir / "sparse")
    (run_dir / "heads.json").write_text(json.dumps({"score": SCORES.tolist(),
                                                    "retrieval_mask": MASK}))
    config_file = tmp_path / "tiny_tune.py"
    config_file.write_text(textwrap.dedent("""
        from configs import tiny

        def get_config():
            return tiny.get_config()
    """))
    out_dir = tmp_path / "out"
    args = [f"--config={config_file}", f"--config.eval.run_dir={run_dir}",
            "--config.eval.lengths=(512,)", "--config.eval.backend=reference",
            "--config.tune.top_p=(0.5,1.0)", "--config.tune.retrieval_fraction=(0.25,1.0)",
            "--config.tune.tasks=('passkey',)", "--config.tune.samples=2",
            "--config.tune.perplexity_windows=1", "--config.tune.max_density=1.0",
            "--config.tune.max_retrieval_fraction=0.25", f"--config.tune.out_dir={out_dir}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "tune.py"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = json.loads((out_dir / "tuning.json").read_text())
    assert [(v["top_p"], v["retrieval_fraction"]) for v in sweep["variants"]] == [
        (0.5, 0.25), (0.5, 1.0), (1.0, 0.25), (1.0, 1.0)]
    full = sweep["full"]
    for v in sweep["variants"]:
        if v["retrieval_fraction"] == 1.0:  # every head dense: the full model's answers
            assert v["accuracy"] == full["accuracy"]
            assert v["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    assert sweep["chosen"]["retrieval_fraction"] == 0.25
    assert (out_dir / "tuning.png").exists() and "(chosen)" in result.stdout
    sparse, indexer, _ = load_sparse(run_dir / "sparse_tuned")
    assert sparse.top_p == sweep["chosen"]["top_p"] and sparse.retrieval_mask == MASK
    assert load_sparse(run_dir / "sparse_tuned_safetensors")[0] == sparse
    assert jnp.asarray(indexer["layers"][1]["wq"]).shape[0] == 2


# Paper design on the tiny model (2 layers x 4 query heads, KV groups of 2).
PAPER_SCORES = np.array([[0.9, 0.1, 0.2, 0.8], [0.3, 0.7, 0.6, 0.05]])
PAPER_FRACTION = 3 / 8


def _paper_model():
    """A checkpoint trained (here: initialised) for the union of both routings' choices."""
    from rtpurbo_jax.heads import choose_query_heads

    model = load_from_config(tiny.get_config().model, backend="reference")
    arch = model.config
    union = choose_query_heads(PAPER_SCORES, arch.group_size, granularity="both",
                               fraction=PAPER_FRACTION)
    sparse = SparseConfig(union, design="paper", group_size=arch.group_size, rank=4,
                          block_q=16, block_k=16, window=32, local_blocks=1)
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(64, arch.num_heads, arch.head_dim)) for _ in union]
    return model.with_sparse(sparse, init_indexer(queries, arch, sparse))


@pytest.mark.parametrize("granularity", ["query", "kv"])
def test_paper_variants_keep_each_heads_own_indexer(granularity):
    from rtpurbo_jax.heads import choose_query_heads

    model = _paper_model()
    chosen = tuning.variant(model, PAPER_SCORES, 0.9, PAPER_FRACTION, granularity)
    assert chosen.sparse.retrieval_mask == choose_query_heads(
        PAPER_SCORES, 2, granularity=granularity, fraction=PAPER_FRACTION)
    assert chosen.sparse.top_p == 0.9
    for layer in range(2):
        old = model.sparse.retrieval_heads(layer)
        for i, h in enumerate(chosen.sparse.retrieval_heads(layer)):
            for w in ("wq", "wk"):
                np.testing.assert_array_equal(
                    np.asarray(chosen.indexer["layers"][layer][w][i]),
                    np.asarray(model.indexer["layers"][layer][w][old.index(h)]))


def test_paper_variants_refuse_heads_without_an_indexer():
    model = _paper_model()
    with pytest.raises(ValueError, match="no trained indexer"):
        tuning.variant(model, PAPER_SCORES, 0.9, 1.0, "query")

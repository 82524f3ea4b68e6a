"""The indexer-recall tool: the metric is exact for an exact indexer, the joint step trains each
variant as if alone, and the CLI writes its outputs (and refuses bad input in one line)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from rtpurbo_jax import recall
from rtpurbo_jax.data import training_dataset
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.tasks import ByteTokenizer
from tests.tiny import TINY, tiny_model

REPO = Path(__file__).resolve().parents[1]
# Retrieval query heads of the tiny model (2 layers x 4 heads, groups of 2): one head of group
# 0 in layer 0, both heads of group 1 in layer 1.
HEADS = ((True, False, False, False), (False, False, True, True))
SPARSE_FIELDS = dict(block_q=16, block_k=16, window=64)
TOP_PS = (0.5, 0.9)
TRAIN = dict(steps=8, learning_rate=3e-2, warmup_steps=1, final_lr_fraction=1.0,
             weight_decay=0.0, grad_clip=1.0)


def _random_variants(model, ranks=(4,)):
    """Variants from random queries, scrambled so that there is a lot to learn."""
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(64, TINY.num_heads, TINY.head_dim)) for _ in range(2)]
    keys = iter(jax.random.split(jax.random.key(1), 64))
    variants = {}
    for kind in recall.KINDS:
        for rank in ranks:
            sparse = recall.variant_config(kind, HEADS, rank, model.config, SPARSE_FIELDS)
            indexer = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape),
                                   init_indexer(queries, model.config, sparse))
            variants[recall.variant_name(kind, rank)] = (sparse, indexer)
    return variants


def _batch():
    data = ConfigDict(dict(files=(), task_fraction=0.0, tasks=()))
    return training_dataset(ByteTokenizer(), data, seq_len=128, batch_size=2, steps=1,
                            seed=0)[0]


def test_group_mask_indexes_exactly_the_groups_with_a_retrieval_head():
    assert recall.group_mask(HEADS, 2) == ((False, True), (True, False))
    variants = _random_variants(tiny_model())
    group = variants["group_r4"][0]
    assert group.design == "indexer" and [group.sparse_groups(i) for i in (0, 1)] == [(0,), (1,)]
    np.testing.assert_array_equal(recall.head_columns(group, 1, (2, 3), 2), [0, 0])
    paper = variants["paper_r4"][0]
    np.testing.assert_array_equal(recall.head_columns(paper, 1, (2, 3), 2), [0, 1])
    with pytest.raises(ValueError, match=r"query heads \[1\] of layer 0"):
        recall.head_columns(paper, 0, (1,), 2)


def test_metric_is_exact_for_an_exact_indexer():
    rng = np.random.default_rng(0)
    nk, candidates = 12, np.array([[3, 7, 12]])  # [rows, queries]
    visible = np.arange(nk) < candidates[..., None]
    logits = np.where(visible, rng.normal(size=(1, 3, nk)) * 3.0, -np.inf)
    mass = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    top_ps = (0.5, 0.7, 0.9, 0.95)
    exact = recall.block_set_metrics(mass, jnp.log(mass), jnp.asarray(candidates), top_ps)
    np.testing.assert_allclose(exact[:, 0], 1.0)
    np.testing.assert_allclose(exact[:, 1], exact[:, 2])
    assert (np.asarray(exact[:, 1]) <= 1.0).all() and (np.diff(exact[:, 1].mean(-1)) >= 0).all()
    # Reversed preferences miss the teacher's best blocks.
    reversed_ = recall.block_set_metrics(mass, jnp.where(visible, -jnp.log(mass), -jnp.inf),
                                         jnp.asarray(candidates), top_ps)
    assert float(reversed_[0, 0].mean()) < 0.5


def test_recall_table_of_an_identity_indexer_is_exact():
    """Multi-head attention (groups of one): a group indexer of rank head_dim with identity
    projections scores exactly the true post-RoPE logits, so its sets are the teacher's."""
    config = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
    model = tiny_model(config=config)
    sparse = recall.variant_config("group", HEADS, config.head_dim, config, SPARSE_FIELDS)
    eye = np.eye(config.head_dim, dtype=np.float32)
    layers = [{"wq": jnp.asarray(np.stack([eye[None] * config.head_dim ** -0.5] * n)),
               "wk": jnp.asarray(np.stack([eye] * n))}
              for n in (len(sparse.sparse_groups(i)) for i in range(2))]
    paper = recall.variant_config("paper", HEADS, 4, config, SPARSE_FIELDS)
    rng = np.random.default_rng(0)
    variants = {"exact": (sparse, {"layers": layers}),
                "paper": (paper, init_indexer([rng.normal(size=(64, 4, 16))] * 2, config, paper))}
    windows = rng.integers(0, config.vocab_size, size=(2, 256)).astype(np.int32)
    rows = recall.recall_table(model, variants, HEADS, windows, TOP_PS, query_positions=10)
    assert len(rows) == 4 and rows[0]["queries"] == 2 * 10 * 3
    for row in rows:
        assert set(row) == {"variant", "name", "rank", "top_p", "teacher_density",
                            "indexer_density", "recall", "queries"}
        assert 0.0 < row["teacher_density"] <= 1.0 and 0.0 < row["indexer_density"] <= 1.0
    exact = [r for r in rows if r["name"] == "exact"]
    for row, other in zip(exact, rows[2:], strict=True):
        assert row["recall"] == pytest.approx(1.0, abs=1e-3)
        assert row["indexer_density"] == pytest.approx(row["teacher_density"], abs=1e-3)
        assert other["teacher_density"] == pytest.approx(row["teacher_density"], rel=1e-6)


def test_joint_step_trains_each_variant_as_if_alone():
    model = tiny_model()
    variants = _random_variants(model)
    batch = _batch()
    args = (model.params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["length"]))
    train = ConfigDict(dict(TRAIN))

    def run(names, steps):
        sparses = {n: variants[n][0] for n in names}
        optimizers = {n: recall.make_optimizer(train) for n in names}
        indexers = jax.tree.map(jnp.array, {n: variants[n][1] for n in names})
        states = {n: optimizers[n].init(indexers[n]) for n in names}
        step = recall.make_joint_step(model.config, sparses, optimizers, "reference")
        history = []
        for _ in range(steps):
            indexers, states, metrics = step(indexers, states, *args)
            history.append(jax.device_get(metrics))
        return indexers, history

    names = list(variants)
    _, history = run(names, train.steps)
    for name in names:
        losses = [h["loss"][name] for h in history]
        assert losses[-1] < 0.8 * losses[0], (name, losses)
    # Clipping engaged (norms above grad_clip), so one clipping over the union of the variants
    # would change each variant's steps.
    train.grad_clip = 0.01
    assert all(h["grad_norm"][n] > train.grad_clip for h in history for n in names)
    steps = 3
    joint, _ = run(names, steps)
    for name in names:
        alone, _ = run([name], steps)
        for a, b in zip(jax.tree.leaves(joint[name]), jax.tree.leaves(alone[name]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_time_budget_stops_after_the_step_that_passes_it():
    model = tiny_model()
    variants = _random_variants(model)
    data = ConfigDict(dict(files=(), task_fraction=0.0, tasks=()))
    dataset = training_dataset(ByteTokenizer(), data, seq_len=128, batch_size=2, steps=3, seed=0)
    train = ConfigDict(dict(TRAIN))
    _, history = recall.train_variants(model, variants, dataset, train, max_minutes=1e-9,
                                       progress=False)
    assert len(history) == 1
    _, history = recall.train_variants(model, variants, dataset, train, progress=False)
    assert len(history) == 3


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        recall.load_heads_mask(tmp_path / "nope.json", TINY)
    kv_shaped = tmp_path / "kv.json"
    kv_shaped.write_text(json.dumps({"retrieval_mask": [[True, False]] * 2}))
    with pytest.raises(ValueError, match=r"is \[2\]\[2\], the model has .* = \[2\]\[4\]"):
        recall.load_heads_mask(kv_shaped, TINY)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"retrieval_mask": [[False] * 4] * 2}))
    with pytest.raises(ValueError, match="no retrieval head"):
        recall.load_heads_mask(empty, TINY)
    (tmp_path / "flat.json").write_text(json.dumps({"retrieval_mask": [1, 0]}))
    with pytest.raises(ValueError, match="not a"):
        recall.load_heads_mask(tmp_path / "flat.json", TINY)
    assert recall.parse_ranks("8,16,32") == (8, 16, 32)
    for bad in ("8;16", "", "0,8", "8,8", "r16"):
        with pytest.raises(ValueError, match="--ranks"):
            recall.parse_ranks(bad)
    with pytest.raises(ValueError, match="query positions"):
        recall.query_positions_of(256, 129)
    positions = recall.query_positions_of(256, 128)
    assert positions[0] == 128 and positions[-1] == 255 and len(set(positions)) == 128


def _cli(*args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "rtpurbo_jax.recall", *args],
                          capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_end_to_end(tmp_path):
    mask = tmp_path / "heads.json"
    mask.write_text(json.dumps({"retrieval_mask": [list(row) for row in HEADS]}))
    out = tmp_path / "recall" / "tiny"
    result = _cli("--config=configs/tiny.py", f"--mask={mask}", "--steps=2", "--ranks=4,8",
                  "--length=256", "--windows=2", "--query-positions=8", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert "| variant | rank | p | teacher density | indexer density | recall |" in result.stdout
    record = json.loads(out.with_suffix(".json").read_text())
    for key in ("model", "device", "jax", "commit", "steps", "seq_len", "batch", "windows",
                "query_positions", "mask", "variants", "rows", "history"):
        assert key in record, key
    assert record["steps"] == 2 and record["seq_len"] == 256 and len(record["history"]) == 2
    assert record["mask"]["retrieval_heads"] == 3 and record["mask"]["kv_group_fraction"] == 0.5
    assert set(record["variants"]) == {"paper_r4", "paper_r8", "group_r4", "group_r8"}
    assert all(np.isfinite(v["final_loss"]) for v in record["variants"].values())
    assert len(record["rows"]) == 4 * len(recall.TOP_PS)
    assert out.with_suffix(".png").stat().st_size > 0


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    result = _cli("--config=configs/tiny.py", f"--mask={tmp_path / 'missing.json'}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"rtpurbo_jax.recall: mask file {tmp_path / 'missing.json'} does not exist"]

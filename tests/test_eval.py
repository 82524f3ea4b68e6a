"""The evaluation suite on the tiny random model: every cell, mode and output is there, density
is exact despite batch padding, and bad settings fail clearly."""

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
from rtpurbo_jax import evaluation as ev_lib
from rtpurbo_jax import generate as gen
from rtpurbo_jax.api import load_from_config
from rtpurbo_jax.checkpoint import SparseCheckpointError
from rtpurbo_jax.config import SparseConfig
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.tasks import TASKS, ByteTokenizer, make_samples

REPO = Path(__file__).resolve().parents[1]
MASK = ((True, False), (False, False))
# Byte prompts: every task fits in 512 - MAX_NEW tokens (niah_multikey needs about 440).
LENGTHS = (512, 640)
SAMPLES = 2
MAX_NEW = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sparse_model():
    config = tiny.get_config()
    model = load_from_config(config.model)
    sparse = SparseConfig(MASK, **config.sparse.to_dict())
    rng = np.random.default_rng(0)
    arch = model.config
    queries = [rng.normal(size=(64, arch.num_heads, arch.head_dim)) for _ in MASK]
    return config, model.with_sparse(sparse, init_indexer(queries, arch, sparse))


def _eval_section(**changes):
    ev = ev_lib.default_eval_config()
    ev.update(dict(lengths=LENGTHS, samples=SAMPLES, batch_size=SAMPLES, max_new_tokens=MAX_NEW,
                   perplexity_windows=3, perplexity_batch_size=2, backend="reference"))
    ev.update(changes)
    return ev


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """eval.py run once on the tiny model: (stdout, results dict, out dir)."""
    tmp = tmp_path_factory.mktemp("eval")
    _, model = _sparse_model()
    run_dir = tmp / "run"
    model.save_sparse(run_dir / "sparse", safetensors=True)
    (run_dir / "train_summary.json").write_text(json.dumps({"steps": 6, "train_minutes": 0.5}))
    scores = np.random.default_rng(1).random((len(MASK), len(MASK[0])))
    (run_dir / "heads.json").write_text(json.dumps({"model": "tiny", "score": scores.tolist(),
                                                    "retrieval_mask": MASK}))
    config_file = tmp / "tiny_eval.py"
    config_file.write_text(textwrap.dedent("""
        from configs import tiny
        from rtpurbo_jax.evaluation import default_eval_config

        def get_config():
            config = tiny.get_config()
            config.eval = default_eval_config()
            return config
    """))
    out_dir = tmp / "out"
    args = [f"--config={config_file}", f"--config.eval.run_dir={run_dir}",
            f"--config.eval.out_dir={out_dir}", f"--config.eval.lengths={LENGTHS}",
            f"--config.eval.samples={SAMPLES}", f"--config.eval.batch_size={SAMPLES}",
            f"--config.eval.max_new_tokens={MAX_NEW}", "--config.eval.perplexity_windows=3",
            "--config.eval.backend=reference"]
    stdout = _run_eval_cli(args)
    return stdout, json.loads((out_dir / "results.json").read_text()), out_dir


def _run_eval_cli(args):
    """eval.py with args on the CPU; asserts it succeeded and returns its stdout."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "eval.py"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_cell_and_mode_is_reported(cli_run):
    _, results, _ = cli_run
    cells = {(c["task"], c["length"], c["mode"]): c for c in results["cells"]}
    assert set(cells) == {(t, n, m) for t in TASKS for n in LENGTHS
                          for m in ev_lib.DEFAULT_MODES}
    for (_, _, mode), cell in cells.items():
        assert cell["n"] == SAMPLES
        assert 0.0 <= cell["accuracy"] <= 1.0
        if mode == "full":
            assert cell["density"] is None
        else:
            assert 0.0 < cell["density"] <= 1.0
    assert {(d["length"], d["mode"]) for d in results["density"]} == {
        (n, m) for n in LENGTHS for m in ev_lib.DEFAULT_MODES[1:]}
    by_mode = {(d["length"], d["mode"]): d["density"] for d in results["density"]}
    for n in LENGTHS:  # the forced blocks alone are the sparsest selection
        assert by_mode[n, "streaming"] < by_mode[n, "rtpurbo"]


def test_metadata_budget_and_perplexity(cli_run):
    _, results, _ = cli_run
    assert results["steps"] == 6 and results["train_minutes"] == 0.5
    assert results["retrieval_fraction"] == 0.25
    assert results["device"] and results["commit"]
    assert results["settings"]["length_rule"] == ev_lib.LENGTH_RULE
    budgets = {b["length"]: b for b in results["topk_budget"]}
    assert set(budgets) == set(LENGTHS)
    sparse = SparseConfig(MASK, **tiny.get_config().sparse.to_dict())
    for n, budget in budgets.items():
        assert budget["top_k_blocks"] == ev_lib.topk_budget(
            budget["rtpurbo_density"], n - MAX_NEW, sparse)
        assert budget["top_k_blocks"] >= sparse.sink_blocks + sparse.local_blocks
    ppl = {p["mode"]: p for p in results["perplexity"]}
    assert set(ppl) == set(ev_lib.DEFAULT_MODES)
    for p in ppl.values():
        assert p["length"] == max(LENGTHS) and p["tokens"] == 3 * (max(LENGTHS) - 1)
        assert np.isfinite(p["ppl"]) and p["ppl"] > 1.0


def test_plots_and_table(cli_run):
    stdout, _, out_dir = cli_run
    for name in (ev_lib.ACCURACY_PLOT, ev_lib.DENSITY_PLOT, ev_lib.HEADS_PLOT):
        assert (out_dir / name).read_bytes()[:len(PNG_MAGIC)] == PNG_MAGIC
    assert "| task | length | full | rtpurbo | topk | streaming | oracle |" in stdout
    assert f"| passkey | {LENGTHS[0]} |" in stdout
    assert "| length | mode | ppl |" in stdout


def test_padding_rows_leave_density_and_answers_unchanged():
    """Two samples in a batch of 2 and in a batch of 3 (one padding row) give the same density
    and answers; the candidates are exactly the causal blocks of every query block."""
    _, model = _sparse_model()
    samples = make_samples("passkey", 256, 2, ByteTokenizer(), seed=0)
    cells = [ev_lib.run_cell(model, samples, ByteTokenizer(), batch, MAX_NEW) for batch in (2, 3)]
    assert cells[0].correct == cells[1].correct
    np.testing.assert_allclose(cells[0].stats, cells[1].stats)
    sparse = model.sparse
    groups = ev_lib.pad_row_stats(sparse)[1]
    num_q_blocks = -(-256 // sparse.block_q)
    mean = ev_lib.mean_candidate_blocks(256, sparse.block_q, sparse.block_k)
    assert cells[0].stats[1] == 2 * groups * num_q_blocks * mean


def test_mean_candidate_blocks_and_budget():
    assert ev_lib.mean_candidate_blocks(64, 16, 16) == 2.5  # 1 + 2 + 3 + 4 blocks
    assert ev_lib.mean_candidate_blocks(40, 16, 16) == 2.0  # the last query block is partial
    assert ev_lib.mean_candidate_blocks(64, 32, 16) == 3.0  # 2 and 4 blocks
    sparse = SparseConfig(MASK, block_q=16, block_k=16)
    # Candidates 1..64: sum(min(k, c)) first reaches half of 2080 at k = 19 (1045; k = 18: 999).
    assert ev_lib.topk_budget(0.5, 16 * 64, sparse) == 19
    assert ev_lib.topk_budget(0.01, 16 * 64, sparse) == 3  # never below sink + local
    assert ev_lib.topk_budget(None, 16 * 64, sparse) == 3


def test_modes_derive_from_the_checkpoint_config():
    sparse = SparseConfig(MASK, block_q=16, block_k=16)
    assert ev_lib.mode_sparse("full", sparse) is None
    assert ev_lib.mode_sparse("rtpurbo", sparse) == sparse
    topk = ev_lib.mode_sparse("topk", sparse, 5)
    assert (topk.selection, topk.top_k_blocks, topk.scorer) == ("top_k", 5, "indexer")
    assert ev_lib.mode_sparse("streaming", sparse).scorer == "none"
    assert ev_lib.mode_sparse("oracle", sparse).scorer == "oracle"


def test_paper_streaming_is_every_head_on_sinks_and_window():
    sparse = SparseConfig(((True, False, False, False), (False,) * 4), design="paper",
                          group_size=2, block_k=16, window=32)
    streaming = ev_lib.mode_sparse("streaming", sparse)
    assert streaming.design == "paper" and streaming.query_head_fraction == 0.0
    with pytest.raises(ValueError, match="indexer-design checkpoint"):
        ev_lib.mode_sparse("topk", sparse, 3)


def test_both_designs_side_by_side_with_paired_intervals():
    """Modes paper and indexer on the same samples: a paired interval per (length, mode) that
    contains its difference, and the paper design's KV cache below the dense one."""
    config, model = _sparse_model()
    arch = model.config
    paper = SparseConfig(((True, False, False, False), (False, False, False, True)),
                         design="paper", group_size=arch.group_size, rank=4, block_q=16,
                         block_k=16, sink_tokens=4, window=64, local_blocks=1)
    rng = np.random.default_rng(1)
    queries = [rng.normal(size=(64, arch.num_heads, arch.head_dim)) for _ in MASK]
    designs = {"paper": (paper, init_indexer(queries, arch, paper)),
               "indexer": (model.sparse, model.indexer)}
    ev = _eval_section(lengths=(512,), tasks=("passkey",), perplexity_windows=0,
                       modes=("full", "paper", "indexer", "streaming", "oracle"),
                       paper="given", indexer="given")
    suite = ev_lib.run_suite(model, ByteTokenizer(), ev, designs=designs)
    assert {(p["length"], p["mode"]) for p in suite["paired"]} == {
        (512, m) for m in ("paper", "indexer", "streaming", "oracle")}
    for p in suite["paired"]:
        assert -1.0 <= p["ci_low"] <= p["diff"] <= p["ci_high"] <= 1.0
    kv = {k["mode"]: k["total"] for k in suite["kv_bytes"]}
    assert kv["indexer"] == kv["full"] + sum(  # full KV everywhere, plus indexer keys
        k["indexer"] for k in suite["kv_bytes"] if k["mode"] == "indexer")
    assert kv["streaming"] < kv["paper"] < kv["full"]
    dens = {d["mode"]: d for d in suite["density"]}
    assert 0.0 < dens["streaming"]["compute_density"] < dens["paper"]["compute_density"] <= 1.0
    assert 0.0 < dens["paper"]["decode_density"] <= 1.0


def test_paired_difference_on_known_hits():
    full = np.array([1, 1, 0, 0, 1, 0, 1, 1], bool)
    same = ev_lib.paired_difference(full, full)
    assert same == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    worse = ev_lib.paired_difference(full, np.zeros(8, bool))
    assert worse["diff"] == -5 / 8 and worse["ci_low"] < -5 / 8 < worse["ci_high"] <= 0.0


def test_completion_cut_at_eos():
    tok = ByteTokenizer()
    assert ev_lib.completion_text(np.array([32, 52, 50, 7, 65]), tok, (7,)) == " 42"
    assert ev_lib.completion_text(np.array([32, 52, 50]), tok, ()) == " 42"


def test_perplexity_of_a_batch_matches_its_rows():
    _, model = _sparse_model()
    windows = np.random.default_rng(0).integers(0, 256, (3, 64)).astype(np.int32)
    together = ev_lib.perplexity(model, windows, batch_size=2)
    rows = [ev_lib.perplexity(model, windows[i:i + 1], batch_size=1) for i in range(3)]
    np.testing.assert_allclose(together["nll"], np.mean([r["nll"] for r in rows]), rtol=1e-6)
    logits, _ = gen.forward(model.params, jnp.asarray(windows[:1]), jnp.asarray([64]),
                            model.config, model.backend, model.sparse, model.indexer)
    logp = np.asarray(logits[0, :-1], np.float64)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(63), windows[0, 1:]].mean()
    np.testing.assert_allclose(rows[0]["nll"], nll, rtol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    (dict(modes=("full", "magic")), "unknown eval mode"),
    (dict(modes=()), "unknown eval mode"),
    (dict(modes=("full", "topk")), "needs 'rtpurbo'"),
    (dict(modes=("full", "paper")), "needs its checkpoint"),
    (dict(tasks=("passkey", "sudoku")), "unknown eval task"),
    (dict(samples=0), "eval.samples must be positive"),
    (dict(samples=-3), "eval.samples must be positive"),
    (dict(batch_size=0), "eval.batch_size must be positive"),
    (dict(lengths=(512, 4096)), "beyond the model's context"),
    (dict(lengths=(4,)), "leaves no room"),
    (dict(lengths=()), "distinct context lengths"),
    (dict(stages=("distill", "indexer")), "eval.stages must list"),
    (dict(stages=("indexer", "lora")), "eval.stages must list"),
    (dict(steps=-1), "eval.steps must be >= 0"),
])
def test_bad_settings_fail_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        ev_lib.check_eval_config(_eval_section(**change), max_context=2048)


def test_length_too_short_for_a_task():
    _, model = _sparse_model()
    with pytest.raises(ValueError, match="too short for a niah_multikey"):
        ev_lib.run_suite(model, ByteTokenizer(), _eval_section(lengths=(256,)))


def test_missing_or_mismatched_sparse_checkpoint(tmp_path):
    config, model = _sparse_model()
    with pytest.raises(SparseCheckpointError, match="no sparse checkpoint"):
        ev_lib.load_eval_model(config.model, tmp_path / "nowhere")
    model.fingerprint = "f" * 64
    model.save_sparse(tmp_path / "other", safetensors=True)
    with pytest.raises(SparseCheckpointError, match="not for random weights"):
        ev_lib.load_eval_model(config.model, tmp_path / "other")


def test_evaluate_refuses_bad_settings_before_loading(tmp_path):
    config = tiny.get_config()
    config.eval = _eval_section(samples=0, sparse=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="eval.samples must be positive"):
        ev_lib.evaluate(config, progress=False)
    config.eval.samples = SAMPLES
    with pytest.raises(SparseCheckpointError, match="no sparse checkpoint"):
        ev_lib.evaluate(config, progress=False)


def test_runs_over_disjoint_lengths_merge():
    def run(lengths, commit):
        return {"model": "m", "commit": commit, "head_profile": None,
                "settings": {"lengths": lengths, "seed": 1},
                "cells": [{"length": n} for n in lengths], "density": [], "paired": [],
                "kv_bytes": [], "topk_budget": [],
                "perplexity": [{"length": n} for n in lengths if n == 8]}

    merged = ev_lib.merge_results([run([2, 4], "a"), run([8], "b")])
    assert merged["settings"]["lengths"] == [2, 4, 8]
    assert [c["length"] for c in merged["cells"]] == [2, 4, 8]
    assert merged["perplexity"] == [{"length": 8}] and merged["commit"] == ["a", "b"]
    with pytest.raises(ValueError, match="share a length"):
        ev_lib.merge_results([run([2], "a"), run([2], "a")])
    other = run([8], "a")
    other["settings"]["seed"] = 2
    with pytest.raises(ValueError, match="settings"):
        ev_lib.merge_results([run([2], "a"), other])


def test_training_metadata_set_in_the_eval_section_wins(tmp_path):
    origin = {"stages": ["distill"], "steps": {"indexer": 0, "distill": 300},
              "minutes": {"distill": 14.3}}
    recorded = {"steps": 300, "train_minutes": 14.3, "stages": ["distill"]}
    assert ev_lib.origin_metadata(origin, _eval_section()) == recorded
    given = _eval_section(steps=700, stages=("indexer", "distill"))
    assert ev_lib.origin_metadata(origin, given) == {**recorded, "steps": 700,
                                                     "stages": ["indexer", "distill"]}
    (tmp_path / ev_lib.TRAIN_SUMMARY).write_text(json.dumps({"steps": 6, "train_minutes": 0.5}))
    assert ev_lib.train_metadata(tmp_path, _eval_section(train_minutes=2.0)) == {
        "steps": 6, "train_minutes": 2.0, "stages": ["indexer"]}


def test_merge_takes_training_metadata_from_the_command_line(cli_run, tmp_path):
    _, results, out_dir = cli_run
    args = [f"--config={out_dir.parent / 'tiny_eval.py'}", f"--merge={out_dir / 'results.json'}",
            f"--config.eval.out_dir={tmp_path}", "--config.eval.steps=9",
            "--config.eval.stages=('indexer','distill')"]
    _run_eval_cli(args)
    merged = json.loads((tmp_path / "results.json").read_text())
    assert merged["steps"] == 9 and merged["stages"] == ["indexer", "distill"]
    assert merged["train_minutes"] == results["train_minutes"]
    assert merged["cells"] == results["cells"]


@pytest.mark.parametrize("program,args,message", [
    ("eval.py", ["--config.eval.sparse=/nonexistent/sparse"], "no sparse checkpoint"),
    ("train.py", ["--config.schedule=bogus"], "schedule must be auto, full or cpu"),
])
def test_programs_report_bad_input_in_one_line(program, args, message):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("RTPURBO_TRACEBACK", None)
    result = subprocess.run([sys.executable, str(REPO / program), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith(program)]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr

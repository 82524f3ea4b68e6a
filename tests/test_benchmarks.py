"""Every benchmark script still runs: its --smoke mode (tiny sizes, CPU, kernels interpreted)
exits 0 and writes its JSON. The timings themselves are taken on a GPU, never here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


def test_every_benchmark_is_covered():
    assert SCRIPTS == ["bench_generate.py", "bench_kernels.py", "bench_layer.py", "bench_local.py",
                       "bench_model.py", "bench_paper_layer.py", "kv_bytes.py",
                       "profile_decode.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_mode_runs(script, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke",
                             "--out-dir", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(tmp_path.glob("*.json"))
    assert written, f"{script} --smoke wrote no JSON"
    for path in written:
        record = json.loads(path.read_text())
        assert record.get("commit") and record.get("jax_version"), path


def test_model_bench_labels_dense_rows_that_do_not_fit():
    """A dense prefill that ran out of memory gets a time extrapolated from the measured dense
    rows, labelled as such, and the sparse row's speedup is against it."""
    from benchmarks.bench_model import attach_dense, extrapolate_dense

    def row(design, length, ms):
        return {"bench": "model_prefill", "design": design, "length": length, "batch": 1,
                "ms": ms, "kv_bytes": length, "note": None if ms else "does not fit"}

    # Dense time 2e-3 L + 1e-6 L^2 (per token and per pair of tokens) at two lengths: the fit
    # recovers it at 4096 (a line through the two would say 11.2, not 24.97).
    dense = [row("dense", n, 2e-3 * n + 1e-6 * n * n) for n in (1024, 2048)]
    rows = [*dense, row("dense", 4096, None), row("paper", 4096, 5.0)]
    extrapolate_dense(rows)
    attach_dense(rows)
    expected = 2e-3 * 4096 + 1e-6 * 4096 ** 2
    assert rows[2]["extrapolated_ms"] == pytest.approx(expected)
    assert "extrapolated" in rows[2]["note"] and rows[2]["ms"] is None
    assert rows[3]["speedup"] == pytest.approx(expected / 5.0)
    assert rows[3]["dense_kv_bytes"] == 4096


def test_model_bench_extrapolates_dense_decode_over_batch():
    """A dense decode batch that does not fit gets a time from a line through the dense batches
    measured at the same length (never from another length)."""
    from benchmarks.bench_model import attach_dense, extrapolate_dense

    def row(design, length, batch, ms):
        return {"bench": "model_decode", "design": design, "length": length, "batch": batch,
                "ms": ms, "kv_bytes": batch, "note": None if ms else "does not fit"}

    rows = [row("dense", 1024, 1, 3.0), row("dense", 1024, 2, 5.0), row("dense", 1024, 16, None),
            row("dense", 2048, 16, None), row("dense", 2048, 1, 9.0),
            row("paper", 1024, 16, 11.0)]
    extrapolate_dense(rows)
    attach_dense(rows)
    assert rows[2]["extrapolated_ms"] == pytest.approx(1.0 + 2.0 * 16)
    assert "extrapolated" in rows[2]["note"] and rows[2]["note"].startswith("does not fit")
    assert "extrapolated_ms" not in rows[3]  # one measured batch at 2048: no line
    assert rows[5]["speedup"] == pytest.approx(33.0 / 11.0)


def test_model_bench_appends_runs_into_one_table():
    """Rows of a later job join the earlier ones (the same row replaced), and a dense row that
    did not fit is extrapolated again from every measured length."""
    from benchmarks.bench_model import merge_rows

    def row(design, length, ms):
        return {"bench": "model_prefill", "design": design, "length": length, "batch": 1,
                "ms": ms, "kv_bytes": length, "note": None if ms else "does not fit"}

    def dense_ms(n):
        return 2e-3 * n + 1e-6 * n * n

    first = merge_rows([], [row("dense", 512, dense_ms(512)), row("dense", 4096, None),
                            row("paper", 4096, 99.0)])
    assert "extrapolated_ms" not in first[1]  # one length: no fit
    rows = merge_rows(first, [row("dense", 1024, dense_ms(1024)), row("dense", 2048,
                                                                      dense_ms(2048)),
                              row("paper", 4096, 5.0)])
    assert len(rows) == 5 and [r["ms"] for r in rows if r["design"] == "paper"] == [5.0]
    rows = merge_rows(rows, [])  # appending again does not stack notes
    dense = next(r for r in rows if r["design"] == "dense" and r["length"] == 4096)
    assert dense["extrapolated_ms"] == pytest.approx(dense_ms(4096))
    assert dense["note"].count("extrapolated") == 1 and "[512, 1024, 2048]" in dense["note"]
    assert rows[-1]["speedup"] == pytest.approx(dense_ms(4096) / 5.0)


def test_decode_profile_names_the_operation_of_a_fusion_kernel():
    """A GPU kernel is named after its fusion with underscores where the instruction has dots,
    or after the deduplicated instruction it shares code with; both find the HLO op."""
    from benchmarks.profile_decode import instruction_info, summarise

    hlo = ("  %loop_add_fusion.7 = bf16[1,4096]{1,0} fusion(%a, %b), kind=kLoop, "
           'metadata={op_name="jit(step)/add" deduplicated_name="loop_add_fusion.3"}\n'
           "  ROOT %gemm_fusion_dot.2 = bf16[1,8]{1,0} fusion(%c), kind=kCustom, "
           'metadata={op_name="jit(step)/dot_general"}\n')
    info = instruction_info(hlo)
    events = [("loop_add_fusion_3", 4.0), ("gemm_fusion_dot_2", 10.0), ("gemm_fusion_dot_2", 6.0),
              ("cudnn_kernel", 2.0)]
    out = summarise(events, steps=2, info=info, top=2)
    assert out["kernel_us"] == 11.0 and out["launches"] == 2.0
    assert out["kernels"] == [
        {"name": "gemm_fusion_dot_2", "calls": 1.0, "us": 8.0, "op": "jit(step)/dot_general",
         "shape": "bf16[1,8]{1,0}"},
        {"name": "loop_add_fusion_3", "calls": 0.5, "us": 2.0, "op": "jit(step)/add",
         "shape": "bf16[1,4096]{1,0}"}]

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
                       "kv_bytes.py"]


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

"""JAX's persistent compilation cache, as `load(..., compilation_cache=True)` and the CLI turn
it on: a second process running the same program loads what the first one compiled instead of
compiling it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax

from rtpurbo_jax.compiles import use_compilation_cache

ROOT = Path(__file__).resolve().parents[1]

# One process: the cache on in `argv[1]` (every program stored, however fast it compiled), one
# tiny jitted program; prints how many compiles the cache served and missed.
PROGRAM = """
import sys, jax, jax.numpy as jnp
from rtpurbo_jax.compiles import use_compilation_cache
use_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
events = {"hits": 0, "misses": 0}
def count(name, **kwargs):
    for key in events:
        if name == "/jax/compilation_cache/cache_" + key:
            events[key] += 1
jax.monitoring.register_event_listener(count)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.ones((8, 8))).block_until_ready()
print(events["hits"], events["misses"])
"""


def _run(cache: Path) -> tuple[int, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(cache)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[-2]), int(out[-1])


def test_second_process_loads_from_the_compilation_cache(tmp_path):
    hits, misses = _run(tmp_path / "xla")
    assert misses > 0 and any((tmp_path / "xla").iterdir())
    hits_again, misses_again = _run(tmp_path / "xla")
    assert (hits_again, misses_again) == (misses, 0)


def test_compilation_cache_keeps_a_directory_the_program_chose(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        assert use_compilation_cache(tmp_path / "ours") == tmp_path / "mine"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)

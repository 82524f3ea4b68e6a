"""Counting XLA compilations, to check that shape buckets work and to time first calls.

JAX records every backend compilation as a duration event named BACKEND_COMPILE_EVENT with the
jitted function's name ("jit(generate)"); `jax.monitoring` listeners see it on jax 0.10 and
0.11 alike, where `jit(...)._cache_size()` is private API and jax.log_compiles only logs.
A compile served by JAX's persistent compilation cache is still counted (it is still an event).

`use_compilation_cache` points that persistent cache at our cache directory, so that a new
process does not compile again what an earlier one compiled (`load(..., compilation_cache=True)`
and the CLI do it).
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from rtpurbo_jax.assets import cache_dir

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
COMPILATION_CACHE_SUBDIR = "xla"


def use_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in `path` (default: <cache_dir()>/xla), unless
    the program already chose a directory, which is kept. Programs that took JAX's minimum
    compile time (`jax_persistent_cache_min_compile_time_secs`, 1 s by default) are stored, so a
    later process running the same shapes (generate in a bucket compiled before) loads them
    instead of compiling. Returns the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    target = Path(path) if path is not None else cache_dir() / COMPILATION_CACHE_SUBDIR
    jax.config.update("jax_compilation_cache_dir", str(target))
    return target


@contextlib.contextmanager
def count_compiles() -> Iterator[collections.Counter[str]]:
    """Yields a Counter, filled while the block runs: compilations per jitted function name
    (e.g. "jit(generate)"), every program compiled in the block, small eager ops included."""
    counts: collections.Counter[str] = collections.Counter()

    def listener(event: str, duration: float, **kwargs: str | int) -> None:
        del duration  # only whether it happened
        if event == BACKEND_COMPILE_EVENT:
            counts[str(kwargs.get("fun_name", "?"))] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def memory_analysis(compiled: Any) -> dict[str, float]:
    """XLA's memory analysis of a compiled program: {"argument", "output", "temp", "alias"}
    bytes; empty where the backend reports none."""
    analysis = compiled.memory_analysis()
    return {} if analysis is None else {
        name: float(getattr(analysis, f"{name}_size_in_bytes", 0))
        for name in ("argument", "output", "temp", "alias")}


def needed_bytes(memory: dict[str, float]) -> float:
    """What a program needs on its device: arguments + outputs - aliased + temporaries."""
    return memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]

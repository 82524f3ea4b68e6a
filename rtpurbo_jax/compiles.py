"""Counting XLA compilations, to check that shape buckets work and to time first calls.

JAX records every backend compilation as a duration event named BACKEND_COMPILE_EVENT with the
jitted function's name ("jit(generate)"); `jax.monitoring` listeners see it on jax 0.10 and
0.11 alike, where `jit(...)._cache_size()` is private API and jax.log_compiles only logs.
A compile served by JAX's persistent compilation cache is still counted (it is still an event).
Tracing to a jaxpr and lowering to StableHLO are recorded alike (`compile_seconds` splits a
first call into the three), and `compile_profile` names the phases inside XLA's compile.

`use_compilation_cache` points that persistent cache at our cache directory, so that a new
process does not compile again what an earlier one compiled (`load(..., compilation_cache=True)`
and the CLI do it).
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax

from rtpurbo_jax.assets import cache_dir

T = TypeVar("T")

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# The phases of a first call, by the event JAX records for each.
PHASES = {TRACE_EVENT: "trace", LOWER_EVENT: "lower", BACKEND_COMPILE_EVENT: "compile"}
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
def _duration_events(record: Callable[[str, float, dict[str, Any]], None]) -> Iterator[None]:
    """Calls record(event, seconds, attributes) for every duration event JAX records in the
    block."""

    def listener(event: str, duration: float, **kwargs: str | int) -> None:
        record(event, duration, kwargs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def count_compiles() -> Iterator[collections.Counter[str]]:
    """Yields a Counter, filled while the block runs: compilations per jitted function name
    (e.g. "jit(generate)"), every program compiled in the block, small eager ops included."""
    counts: collections.Counter[str] = collections.Counter()

    def record(event: str, seconds: float, attributes: dict[str, Any]) -> None:
        del seconds  # only whether it happened
        if event == BACKEND_COMPILE_EVENT:
            counts[str(attributes.get("fun_name", "?"))] += 1

    with _duration_events(record):
        yield counts


@contextlib.contextmanager
def compile_seconds() -> Iterator[dict[str, float]]:
    """Yields {"trace", "lower", "compile"}, filled while the block runs: the seconds JAX spent
    tracing jitted functions to jaxprs, lowering those to StableHLO and compiling that with
    XLA, each summed over every program of the block. A jit nested in another is traced and
    lowered as part of it, so nothing is counted twice."""
    seconds = dict.fromkeys(PHASES.values(), 0.0)

    def record(event: str, duration: float, attributes: dict[str, Any]) -> None:
        del attributes
        if event in PHASES:
            seconds[PHASES[event]] += duration

    with _duration_events(record):
        yield seconds


def compile_profile(fn: Callable[[], T], top: int = 25) -> tuple[T, list[dict[str, Any]]]:
    """Runs fn under JAX's profiler (no Python tracer): (its result, its `top` heaviest host
    events, heaviest first, each {"name", "seconds", "count"}).

    For a first call these are XLA's compile phases (HLO pass pipelines, code generation,
    kernel and autotuning work: what they are named depends on the backend). Seconds are
    inclusive (a phase holds its sub-phases) and summed over threads, so they add up to more
    than the wall clock. fn must return a result that is ready (on the host)."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames would slow tracing and lowering down
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, profiler_options=options):
            result = fn()
        (path,) = Path(tmp).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(path))
    seconds: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for event in line.events:
                seconds[event.name] += event.duration_ns / 1e9
                counts[event.name] += 1
    return result, [{"name": name, "seconds": round(s, 3), "count": counts[name]}
                    for name, s in seconds.most_common(top)]


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

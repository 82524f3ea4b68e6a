"""Stage 2: self-distillation of the model's own weights in sparse mode, a sharded Optax loop.

The teacher is the frozen original weights run dense; the student is the same model run sparse
(the chosen design, its indexer frozen), with every weight training (full fine-tune: float32
master weights, compute in `compute_dtype`) or LoRA adapters on named projections. The loss
(`self_distill`) is KL from the teacher's next-token distribution (its top-k ids, k = 10 as in
the paper, or the whole vocabulary) to the student's. The paper design's retrieval heads attend
decode-style at every position (`paper_attention.retrieval_train`), so the weights adapt to
what decode does.

Layout under <run_dir>/distill/: checkpoints/ (Orbax, atomic saves; a killed run resumes from
the last one), metrics.jsonl (and tensorboard/ when tensorboardX is installed), teacher/ (the
cached teacher top-k, distill.teacher = "cached").
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtpurbo_jax.compiles import memory_analysis, needed_bytes
from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig
from rtpurbo_jax.generate import hidden_states, training_hidden
from rtpurbo_jax.lora import apply_lora, check_lora, init_lora, lora_axes
from rtpurbo_jax.model import Params, param_axes
from rtpurbo_jax.self_distill import LOSSES, full_loss, teacher_top_k, top_k_loss
from rtpurbo_jax.sharding import batch_sharding, logical_sharding, replicated

SCHEDULES = ("constant", "cosine")
TEACHER_MODES = ("live", "cached")
# Separates stage 2's data stream from stage 1's (training_dataset's `stream`).
DATA_STREAM = 2
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Stage2Spec:
    """What a stage-2 step computes (static under jit)."""

    loss: str = "top_k"
    top_k: int = 10
    lora_rank: int = 0  # 0: full fine-tune
    lora_alpha: float = 16.0
    compute_dtype: str = "bfloat16"
    backend: str = "auto"  # the teacher's dense attention (no gradient through it)
    answer_weight: float = 0.0  # the loss's share on task answers (self_distill)
    dense_anchor: float = 0.0  # weight of the student's dense-mode KL added to the loss

    @classmethod
    def from_config(cls, distill: Any, backend: str) -> Stage2Spec:
        return cls(loss=distill.loss, top_k=distill.top_k, lora_rank=distill.lora_rank,
                   lora_alpha=distill.lora_alpha, compute_dtype=distill.compute_dtype,
                   backend=backend, answer_weight=distill.answer_weight,
                   dense_anchor=distill.dense_anchor)


def check_distill(distill: Any, config: ModelConfig) -> None:
    """One ConfigError per misuse of the config's `distill` section."""
    if distill.loss not in LOSSES:
        raise ConfigError(f"distill.loss must be one of {LOSSES}, got {distill.loss!r}")
    if distill.loss == "top_k" and not 1 <= distill.top_k <= config.vocab_size:
        raise ConfigError(f"distill.top_k must be in [1, vocab_size={config.vocab_size}], got "
                          f"{distill.top_k}")
    if distill.schedule not in SCHEDULES:
        raise ConfigError(f"distill.schedule must be one of {SCHEDULES}, got "
                          f"{distill.schedule!r}")
    if distill.teacher not in TEACHER_MODES:
        raise ConfigError(f"distill.teacher must be one of {TEACHER_MODES}, got "
                          f"{distill.teacher!r}")
    if distill.teacher == "cached" and distill.loss != "top_k":
        raise ConfigError("distill.teacher='cached' keeps the teacher's top-k only; the 'full' "
                          "loss needs the live teacher")
    if not 0.0 <= distill.answer_weight <= 1.0:
        raise ConfigError(f"distill.answer_weight must be in [0, 1], got "
                          f"{distill.answer_weight}")
    if distill.dense_anchor < 0.0:
        raise ConfigError(f"distill.dense_anchor must be >= 0, got {distill.dense_anchor}")
    check_lora(distill.lora_rank, tuple(distill.lora_targets))
    try:
        jnp.dtype(distill.compute_dtype)
    except TypeError as err:
        raise ConfigError(f"distill.compute_dtype {distill.compute_dtype!r} is not a dtype"
                          ) from err
    for field in ("steps", "seq_len", "batch_size"):
        if distill[field] < 1:
            raise ConfigError(f"distill.{field} must be >= 1, got {distill[field]}")


def make_optimizer(distill: Any) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, with linear warm-up to a constant or cosine-decaying
    learning rate."""
    warmup = optax.linear_schedule(0.0, distill.learning_rate, max(distill.warmup_steps, 1))
    if distill.schedule == "constant":
        after = optax.constant_schedule(distill.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            distill.learning_rate, max(distill.steps - distill.warmup_steps, 1),
            alpha=distill.final_lr_fraction)
    schedule = optax.join_schedules([warmup, after], [max(distill.warmup_steps, 1)])
    return optax.chain(optax.clip_by_global_norm(distill.grad_clip),
                       optax.adamw(schedule, weight_decay=distill.weight_decay))


def cast(tree: Any, dtype: Any) -> Any:
    """Every floating leaf in dtype."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def student_params(trainable: Any, teacher: Params, spec: Stage2Spec) -> Params:
    """The student's weights in the compute dtype: the float32 master weights (full
    fine-tune) or the frozen teacher weights with the LoRA adapters merged in."""
    if spec.lora_rank:
        return apply_lora(teacher, trainable, spec.lora_alpha)
    return cast(trainable, jnp.dtype(spec.compute_dtype))


def teacher_signal(teacher: Params, tokens: jax.Array, lengths: jax.Array,
                   config: ModelConfig, spec: Stage2Spec) -> tuple[jax.Array, jax.Array]:
    """The teacher's top-k logits and ids [batch, seq, k] (what distill.teacher="cached"
    stores)."""
    hidden = hidden_states(teacher, tokens, lengths, config, spec.backend)
    return teacher_top_k(teacher, hidden, lengths, config, spec.top_k)


def stage2_loss(
    trainable: Any,
    teacher: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    answer_spans: jax.Array,
    cached: tuple[jax.Array, jax.Array] | None,
    *,
    config: ModelConfig,
    sparse: SparseConfig,
    indexer: Any,
    spec: Stage2Spec,
) -> jax.Array:
    """The stage-2 loss of a batch; tokens: [batch, seq] right-padded, lengths: [batch],
    answer_spans: [batch, 2] (the positions predicting a task's answer; [0, 0] for text).

    trainable: the float32 master weights (full fine-tune) or the LoRA adapters; teacher: the
    frozen original weights in the compute dtype; cached: the teacher's top-k logits and ids
    when precomputed, else None (computed here, dense). Gradients reach `trainable` only.
    With spec.dense_anchor > 0 the loss adds that weight times the same KL for the student in
    dense mode: it holds the shared weights to the teacher's function where the sparse loss
    says nothing, e.g. prompts that the local heads' window holds whole.
    """
    teacher = jax.lax.stop_gradient(teacher)
    params = student_params(trainable, teacher, spec)
    if spec.loss == "full":
        hidden = jax.lax.stop_gradient(hidden_states(teacher, tokens, lengths, config,
                                                     spec.backend))

        def kl(student: jax.Array) -> jax.Array:
            return full_loss(params, teacher, hidden, student, lengths, config, answer_spans,
                             spec.answer_weight)
    else:
        values, ids = cached if cached is not None else teacher_signal(teacher, tokens,
                                                                       lengths, config, spec)

        def kl(student: jax.Array) -> jax.Array:
            return top_k_loss(params, student, values, ids, lengths, config, answer_spans,
                              spec.answer_weight)
    loss = kl(training_hidden(params, tokens, lengths, config, sparse,
                              jax.lax.stop_gradient(indexer)))
    if spec.dense_anchor:
        loss = loss + spec.dense_anchor * kl(training_hidden(params, tokens, lengths, config))
    return loss


# ---------------------------------------------------------------------------- sharding


def tree_shardings(mesh: Any, axes: Any, tree: Any) -> Any:
    """NamedShardings of `tree` from a same-shaped pytree of logical axis-name tuples."""
    return jax.tree.map(lambda names, x: logical_sharding(mesh, names, x.shape), axes, tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def trainable_axes(config: ModelConfig, distill: Any) -> Any:
    return (lora_axes(config, tuple(distill.lora_targets)) if distill.lora_rank
            else param_axes(config))


def initial_trainable(params: Params, config: ModelConfig, distill: Any, seed: int) -> Any:
    """Fresh LoRA adapters, or float32 master copies of the weights (new buffers, never the
    caller's: the step donates them)."""
    if distill.lora_rank:
        return init_lora(config, distill.lora_rank, tuple(distill.lora_targets),
                         jax.random.key(seed))
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)


def place_trainable(trainable: Any, config: ModelConfig, distill: Any,
                    optimizer: optax.GradientTransformation, mesh: Any) -> dict[str, Any]:
    """{"trainable", "opt_state"} on the mesh: the weights (or adapters) by their logical axes,
    the optimiser's moments like the weights they follow, its counters replicated."""
    shardings = tree_shardings(mesh, trainable_axes(config, distill), trainable)
    trainable = jax.device_put(trainable, shardings)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, trainable),
        shardings, transform_non_params=lambda _: replicated(mesh))
    return {"trainable": trainable,
            "opt_state": jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)}


def make_step(config: ModelConfig, sparse: SparseConfig, indexer: Any, spec: Stage2Spec,
              optimizer: optax.GradientTransformation) -> Any:
    """step(state, teacher, tokens, lengths, answer_spans, cached) -> (state, {"loss",
    "grad_norm"}), where state = {"trainable", "opt_state"} (not jitted here: `compile_step`
    places it)."""

    def step(state, teacher, tokens, lengths, answer_spans, cached):
        loss, grads = jax.value_and_grad(stage2_loss)(
            state["trainable"], teacher, tokens, lengths, answer_spans, cached, config=config,
            sparse=sparse, indexer=indexer, spec=spec)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        return ({"trainable": trainable, "opt_state": opt_state},
                {"loss": loss, "grad_norm": optax.tree.norm(grads)})

    return step


def compile_step(step: Any, mesh: Any, state: Any, teacher: Params, tokens: jax.Array,
                 lengths: jax.Array, answer_spans: jax.Array, cached: Any
                 ) -> tuple[Any, dict[str, float]]:
    """The step compiled ahead of time for these (already placed) arguments, and what it needs:
    {"argument", "output", "temp", "alias"} bytes from XLA's memory analysis (empty when the
    backend reports none). The state keeps its shardings and is donated."""
    batch = batch_sharding(mesh, tokens.shape[0], 2)
    cached_sharding = None if cached is None else (batch_sharding(mesh, tokens.shape[0], 3),) * 2
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(step, in_shardings=(
        state_shardings, jax.tree.map(lambda x: x.sharding, teacher), batch,
        batch_sharding(mesh, tokens.shape[0], 1), batch, cached_sharding),
        out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
    compiled = jitted.lower(state, teacher, tokens, lengths, answer_spans, cached).compile()
    return compiled, memory_analysis(compiled)


def memory_line(memory: dict[str, float]) -> str:
    """One line: what the step needs against what the device has."""
    if not memory:
        return "stage 2 step: this backend reports no memory analysis"
    need = needed_bytes(memory)
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    have = f" of the {limit / GIB:.1f} GiB on {jax.devices()[0].device_kind}" if limit else ""
    return (f"stage 2 step needs {need / GIB:.2f} GiB per device{have} (arguments "
            f"{memory['argument'] / GIB:.2f}, temporaries {memory['temp'] / GIB:.2f})")


# ---------------------------------------------------------------------------- the loop


class TeacherCache:
    """The teacher's top-k of every batch, computed once and kept as <dir>/<step>.npz, so a
    resumed or repeated run never runs the teacher again on a batch it has seen."""

    def __init__(self, directory: Path, teacher: Params, config: ModelConfig,
                 spec: Stage2Spec) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.fn = jax.jit(lambda t, tokens, lengths: teacher_signal(t, tokens, lengths, config,
                                                                     spec))
        self.teacher = teacher

    def __call__(self, step: int, tokens: np.ndarray, lengths: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        path = self.directory / f"{step}.npz"
        if path.exists():
            with np.load(path) as saved:
                return saved["values"], saved["ids"]
        values, ids = jax.device_get(self.fn(self.teacher, tokens, lengths))
        partial = path.with_suffix(".tmp.npz")
        np.savez(partial, values=values, ids=ids)
        partial.rename(path)  # a kill mid-write leaves no half file under the final name
        return values, ids


def run_stage2(
    *, config: ModelConfig, params: Params, sparse: SparseConfig, indexer: Any, dataset: Any,
    distill: Any, run_dir: Path, mesh: Any, backend: str, seed: int = 0, progress: bool = True,
) -> tuple[Params, list[dict[str, float]]]:
    """Trains from the latest checkpoint in <run_dir>/distill (or from the original weights) to
    distill.steps; dataset[i] is batch i. Returns (the student's weights at full precision,
    adapters merged; the metrics of the steps run)."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from rtpurbo_jax.training import MetricsWriter, checkpoint_manager, log_step

    check_distill(distill, config)
    spec = Stage2Spec.from_config(distill, backend)
    directory = run_dir / "distill"
    compute = jnp.dtype(spec.compute_dtype)
    # The teacher is the frozen original, in the compute dtype, split like the weights.
    teacher = jax.device_put(cast(params, compute),
                             tree_shardings(mesh, param_axes(config), params))
    optimizer = make_optimizer(distill)
    state = place_trainable(initial_trainable(params, config, distill, seed), config, distill,
                            optimizer, mesh)
    manager = checkpoint_manager(directory / "checkpoints", distill)
    start = manager.latest_step()
    if start is not None:
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
    start = start or 0
    indexer = jax.device_put(indexer, replicated(mesh))
    cache = (TeacherCache(directory / "teacher", teacher, config, spec)
             if distill.teacher == "cached" else None)

    def inputs(step: int, batch: dict[str, np.ndarray]) -> tuple[Any, ...]:
        tokens, lengths = np.asarray(batch["tokens"]), np.asarray(batch["length"])
        rows = tokens.shape[0]
        # Batches of text alone (no task) may come without spans: they hold no answer.
        spans = np.asarray(batch.get("answer_span", np.zeros((rows, 2), np.int32)))
        cached = cache(step, tokens, lengths) if cache else None
        return (jax.device_put(tokens, batch_sharding(mesh, rows, 2)),
                jax.device_put(lengths, batch_sharding(mesh, rows, 1)),
                jax.device_put(spans, batch_sharding(mesh, rows, 2)),
                None if cached is None else jax.device_put(cached,
                                                           batch_sharding(mesh, rows, 3)))

    step_fn = None
    writer = MetricsWriter(directory)
    history = []
    bar = tqdm(range(start, distill.steps), initial=start, total=distill.steps,
               desc="stage 2", disable=not progress)
    for step, batch in zip(bar, dataset[start:], strict=False):
        tokens, lengths, spans, cached = inputs(step, batch)
        if step_fn is None:
            step_fn, memory = compile_step(make_step(config, sparse, indexer, spec, optimizer),
                                           mesh, state, teacher, tokens, lengths, spans, cached)
            tqdm.write(memory_line(memory))
        tick = time.perf_counter()
        state, metrics = step_fn(state, teacher, tokens, lengths, spans, cached)
        log_step(step + 1, jax.device_get(metrics), batch["length"], time.perf_counter() - tick,
                 writer, bar, history)
        manager.save(step + 1, args=ocp.args.StandardSave(state),
                     force=step + 1 == distill.steps)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    # At full precision: the float32 master weights, or the adapters merged into the weights
    # as loaded (the export casts to distill.export_dtype).
    trainable = jax.device_get(state["trainable"])
    final = apply_lora(params, trainable, spec.lora_alpha) if spec.lora_rank else trainable
    return final, history

"""Distilling the indexer: the loss over all layers, the optimiser, the sharded train step, and
the checkpointed training loop. Only indexer parameters train; the base model never changes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtpurbo_jax.config import ModelConfig, SparseConfig
from rtpurbo_jax.indexer import layer_distillation_loss
from rtpurbo_jax.model import Params, head_keys, query_heads
from rtpurbo_jax.sharding import batch_sharding, param_shardings, replicated
from rtpurbo_jax.teacher import collect_qk


def layer_loss_inputs(qkv: Any, layer: int, config: ModelConfig, sparse: SparseConfig
                      ) -> dict[str, jax.Array]:
    """What one layer's indexer loss reads from the frozen model's projections: the teacher's
    rotated q, k of the indexed groups (design "indexer") or of each retrieval head with its own
    KV head (design "paper", whose indexer also reads the pre-RoPE q_index, k_index)."""
    if sparse.design == "paper":
        heads = sparse.retrieval_heads(layer)
        index = np.asarray(heads, np.int32)
        return {"q": qkv.q[:, :, index], "k": head_keys(qkv.k, heads, config.group_size),
                "q_index": qkv.q_pre[:, :, index],
                "k_index": head_keys(qkv.k_pre, heads, config.group_size)}
    groups = sparse.sparse_groups(layer)
    return {"q": qkv.q[:, :, query_heads(groups, config.group_size)],
            "k": qkv.k[:, :, np.asarray(groups)]}


def states_distillation_loss(
    indexer: dict[str, Any], states: list[Any], lengths: jax.Array, *, config: ModelConfig,
    sparse: SparseConfig, level: str, teacher_top_p: float,
) -> jax.Array:
    """Mean over layers with indexed heads of each layer's distillation loss, on given frozen
    projections (states: one `model.QKV` per layer, from `collect_qk`), so several indexers can
    share one forward pass."""
    losses = [layer_distillation_loss(indexer["layers"][layer], lengths=lengths, sparse=sparse,
                                      level=level, teacher_top_p=teacher_top_p,
                                      **layer_loss_inputs(qkv, layer, config, sparse))
              for layer, qkv in enumerate(states) if sparse.indexed_heads(layer)]
    if not losses:
        raise ValueError("no head has an indexer (every KV head is a retrieval head of the "
                         "indexer design, or no retrieval head in the paper design): nothing "
                         "to train")
    return jnp.mean(jnp.stack(losses))


def model_distillation_loss(
    indexer: dict[str, Any], params: Params, tokens: jax.Array, lengths: jax.Array, *,
    config: ModelConfig, sparse: SparseConfig, level: str, teacher_top_p: float, backend: str,
) -> jax.Array:
    """`states_distillation_loss` over a dense forward pass of the frozen model.

    tokens: [batch, seq] right-padded; lengths: [batch]. No gradient flows into the model.
    """
    states = collect_qk(jax.lax.stop_gradient(params), tokens, lengths, config, backend)
    return states_distillation_loss(indexer, states, lengths, config=config, sparse=sparse,
                                    level=level, teacher_top_p=teacher_top_p)


def make_optimizer(train: Any) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, after global-norm gradient clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(train.grad_clip),
                       optax.adamw(schedule, weight_decay=train.weight_decay))


def make_train_step(config: ModelConfig, sparse: SparseConfig, train: Any, backend: str,
                    optimizer: optax.GradientTransformation, mesh: Any, params: Params
                    ) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """A jitted step(indexer, opt_state, params, tokens, lengths) -> (indexer, opt_state,
    metrics), sharded over `mesh`: params by their logical axes, the batch over all devices,
    the (small) indexer and optimiser state replicated."""

    def step(indexer, opt_state, params, tokens, lengths):
        loss_fn = jax.value_and_grad(model_distillation_loss)
        loss, grads = loss_fn(indexer, params, tokens, lengths, config=config, sparse=sparse,
                              level=train.loss_level, teacher_top_p=train.teacher_top_p,
                              backend=backend)
        updates, opt_state = optimizer.update(grads, opt_state, indexer)
        indexer = optax.apply_updates(indexer, updates)
        return indexer, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    rep = replicated(mesh)
    batch = batch_sharding(mesh, train.batch_size, 2)
    return jax.jit(step, in_shardings=(rep, rep, param_shardings(config, params, mesh), batch,
                                       batch_sharding(mesh, train.batch_size, 1)),
                   out_shardings=(rep, rep, rep), donate_argnums=(0, 1))


class MetricsWriter:
    """Appends metrics to <dir>/metrics.jsonl, and to TensorBoard when tensorboardX is there."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "metrics.jsonl"
        try:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(directory / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def log_step(step: int, metrics: dict[str, Any], lengths: np.ndarray, seconds: float,
             writer: MetricsWriter, bar: Any, history: list[dict[str, float]]) -> None:
    """Records a finished step (1-based) of a training loop: its metrics as floats plus
    tokens/s and seconds, into history, the metrics file and the progress bar."""
    values = {k: float(v) for k, v in metrics.items()}
    values.update(tokens_per_s=float(np.sum(lengths)) / seconds, seconds=seconds)
    history.append({"step": step, **values})
    writer.write(step, values)
    bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")


def checkpoint_manager(directory: Path, train: Any) -> Any:
    """Orbax manager: a checkpoint every `checkpoint_every` steps and at the end, the last
    `keep_checkpoints` kept. Saves are atomic (written aside, then renamed), so a run killed
    mid-save leaves the previous checkpoint intact."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=train.keep_checkpoints,
                                           save_interval_steps=train.checkpoint_every,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def run_training(
    *, config: ModelConfig, sparse: SparseConfig, params: Params, indexer: dict[str, Any],
    dataset: Any, train: Any, run_dir: Path, mesh: Any, backend: str, progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Trains from the latest checkpoint in run_dir (or from `indexer` at step 0) to
    train.steps. dataset[i] is batch i. Returns (final indexer, metrics of the steps run)."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    optimizer = make_optimizer(train)
    manager = checkpoint_manager(run_dir / "checkpoints", train)
    state = {"indexer": indexer, "opt_state": optimizer.init(indexer)}
    start = manager.latest_step()
    if start is not None:
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
    start = 0 if start is None else start
    rep = replicated(mesh)
    # A copy: the step donates its state buffers, which must not be the caller's arrays.
    state = jax.device_put(jax.tree.map(jnp.array, state), rep)
    params = jax.device_put(params, param_shardings(config, params, mesh))
    step_fn = make_train_step(config, sparse, train, backend, optimizer, mesh, params)
    writer = MetricsWriter(run_dir)
    history = []
    bar = tqdm(range(start, train.steps), initial=start, total=train.steps, desc="distilling",
               disable=not progress)
    batches = dataset[start:]
    for step, batch in zip(bar, batches, strict=False):
        tick = time.perf_counter()
        indexer_state, opt_state, metrics = step_fn(
            state["indexer"], state["opt_state"], params, jnp.asarray(batch["tokens"]),
            jnp.asarray(batch["length"]))
        state = {"indexer": indexer_state, "opt_state": opt_state}
        log_step(step + 1, jax.device_get(metrics), batch["length"], time.perf_counter() - tick,
                 writer, bar, history)
        manager.save(step + 1, args=ocp.args.StandardSave(state),
                     force=step + 1 == train.steps)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return jax.device_get(state["indexer"]), history

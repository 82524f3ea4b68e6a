"""The conversion steps a dense model goes through to become an RTPurbo model.

calibrate heads -> choose retrieval heads -> initialise the indexer from the model's own queries
-> (train.py distils it: stage 1) -> a sparse checkpoint -> (stage 2, optional: the model's
weights self-distil in sparse mode) -> a new model exported with its sparse checkpoint. Each
step is a function of a loaded model; `indexer_quality` measures how well an indexer's
selection covers the true attention.

Heads are calibrated by `heads.method`: "needle" (the paper's Eq. 3: attention from a repeated
span to its first copy, per query head), "tasks" (attention on the needles of retrieval-task
answers, per KV head), "gates" (design "paper": per query head, what its window costs the
output, learnt under a budget, `head_gates`) or "ablation" (design "paper": the same cost,
measured by backward elimination of KV groups or query heads, `head_gates`). The design
decides the granularity of the mask: KV heads ("indexer") or query heads ("paper", choosing
single heads or whole KV groups by `heads.granularity`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.api import RANDOM_NAME, SparseModel
from rtpurbo_jax.config import ConfigError, SparseConfig
from rtpurbo_jax.data import corpus_tokens
from rtpurbo_jax.heads import (
    NEEDLE_SCORE_LABEL,
    choose_query_heads,
    choose_retrieval_heads,
    group_scores,
    needle_document,
    needle_scores,
    profile_heads,
    ranking_agreement,
    save_needle_profile,
    save_profile,
)
from rtpurbo_jax.indexer import indexer_keys, init_indexer
from rtpurbo_jax.model import query_heads
from rtpurbo_jax.selection import select_prefill, selection_quality
from rtpurbo_jax.tasks import ByteTokenizer, make_samples
from rtpurbo_jax.teacher import block_attention_mass, collect_qk
from rtpurbo_jax.text import text_tokens, text_windows

# Query rows per layer kept for the SVD initialisation (a random subset of the calibration
# tokens is plenty for a [head_dim, head_dim] second moment).
CALIBRATION_ROWS = 16384
# Separates the calibration text's random stream from the training data's.
CALIBRATION_STREAM = 7
RULES = ("threshold", "fraction", "count")
# Where the profiling CLI writes when --out is not given.
DEFAULT_PROFILE_PREFIX = "results/profile/model"
METHODS = ("needle", "tasks", "gates", "ablation")
# The methods that weigh the paper design's local window and rank heads under a budget.
WINDOW_METHODS = ("gates", "ablation")
# Separates the needle documents' random stream from the other calibration streams.
NEEDLE_STREAM = 11
# What a profile's heatmap shows, per method.
SCORE_LABELS = {"needle": NEEDLE_SCORE_LABEL,
                "gates": "gate: share of causal attention in the head's output\n(learnt under "
                         "the budget to keep the dense model's outputs)",
                "ablation": "elimination rank (1: the last moved to its window;\nbackward "
                            "elimination of KL(dense || model))"}
# The gates' and the ablation's examples: a stream of their own (stage 1's is None, stage 2's
# 2).
GATE_STREAM = 13

_collect_qk = jax.jit(collect_qk, static_argnames=("config", "backend"))


def profile(model: SparseModel, *, tasks: Sequence[str], length: int, samples_per_task: int,
            seed: int, batch_size: int = 4, progress: bool = False,
            tokenizer: Any = None) -> dict[str, np.ndarray]:
    """Retrieval scores of every (layer, KV head) on generated retrieval tasks."""
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise ValueError("profiling needs a tokenizer to build its task prompts")
    samples = [s for task in tasks
               for s in make_samples(task, length, samples_per_task, tokenizer, seed)]
    answers = [tokenizer.encode(s.completion, add_special_tokens=False) for s in samples]
    return profile_heads(model.params, model.config, samples, answers, batch_size=batch_size,
                         backend=model.backend, progress=progress)


def calibration_queries(model: SparseModel, tokens: np.ndarray, seed: int = 0,
                        batch_size: int = 1, pre_rope: bool = False) -> list[np.ndarray]:
    """Per layer, queries [rows, heads, head_dim] of the model on tokens [n, seq]: rotated, or
    before RoPE (`pre_rope`, what the paper design's indexer reads)."""
    per_layer: list[list[np.ndarray]] = [[] for _ in range(model.config.num_layers)]
    for start in range(0, len(tokens), batch_size):
        chunk = jnp.asarray(tokens[start:start + batch_size])
        lengths = jnp.full((chunk.shape[0],), chunk.shape[1], jnp.int32)
        for layer, qkv in enumerate(_collect_qk(model.params, chunk, lengths, model.config,
                                                model.backend)):
            q = qkv.q_pre if pre_rope else qkv.q
            per_layer[layer].append(np.asarray(q, np.float32).reshape(-1, *q.shape[2:]))
    rng = np.random.default_rng(seed)
    out = []
    for rows in per_layer:
        stacked = np.concatenate(rows)
        keep = rng.choice(len(stacked), min(CALIBRATION_ROWS, len(stacked)), replace=False)
        out.append(stacked[np.sort(keep)])
    return out


def initial_indexer(model: SparseModel, sparse: SparseConfig, tokens: np.ndarray) -> dict[str, Any]:
    """The SVD-initialised indexer of `sparse`'s indexed heads, calibrated on tokens [n, seq]."""
    queries = calibration_queries(model, tokens, pre_rope=sparse.design == "paper")
    return init_indexer(queries, model.config, sparse)


def indexer_quality(model: SparseModel, sparse: SparseConfig, indexer: dict[str, Any],
                    tokens: np.ndarray) -> dict[str, Any]:
    """Captured true attention mass and density of the indexer's selection, per layer and mean.

    tokens: [batch, seq] full-length rows. Only the sparse groups are measured.
    """
    batch = jnp.asarray(tokens)
    lengths = jnp.full((batch.shape[0],), batch.shape[1], jnp.int32)
    states = _collect_qk(model.params, batch, lengths, model.config, model.backend)
    g_size = model.config.group_size
    per_layer = []
    for layer, qkv in enumerate(states):
        q, k = qkv.q, qkv.k
        groups = sparse.sparse_groups(layer)
        if not groups:
            per_layer.append(None)
            continue
        heads = query_heads(groups, g_size)
        qs, ks = q[:, :, heads], k[:, :, np.array(groups)]
        mass = block_attention_mass(qs, ks, lengths, block_q=sparse.block_q,
                                    block_k=sparse.block_k)
        layer_indexer = indexer["layers"][layer]
        ki = indexer_keys(ks, layer_indexer["wk"])
        indices, counts = select_prefill(qs, ks, ki, lengths, sparse, layer_indexer,
                                         model.backend)
        per_layer.append({k: float(v) for k, v in selection_quality(
            mass, indices, counts, lengths, sparse).items()})
    measured = [m for m in per_layer if m is not None]
    mean = {key: float(np.mean([m[key] for m in measured])) for key in measured[0]}
    return {"mean": mean, "per_layer": per_layer}


def task_tokenizer(model: SparseModel) -> Any:
    """The model's tokenizer, or bytes for a tokenizer-less model with a 256-token vocabulary
    or random weights (`load_from_config`'s "random" source: token meanings are arbitrary, so
    the first 256 ids of a larger vocabulary serve, e.g. llama_1m's shapes at random)."""
    if model.tokenizer is not None:
        return model.tokenizer
    vocab = model.config.vocab_size
    if vocab == ByteTokenizer.vocab_size or (model.config.name == RANDOM_NAME
                                             and vocab > ByteTokenizer.vocab_size):
        return ByteTokenizer()
    raise ValueError(f"{model.config.name} has no tokenizer, and its vocabulary ({vocab}) is "
                     "not bytes: load it with its tokenizer")


def read_mask(path: Path) -> tuple[tuple[bool, ...], ...]:
    """The "retrieval_mask" of a JSON file (a heads.json profile, or one written by hand)."""
    try:
        rows = json.loads(path.read_text())["retrieval_mask"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} has no valid \"retrieval_mask\": {err}") from err
    return tuple(tuple(bool(x) for x in row) for row in rows)


def _rule(heads: Any) -> dict[str, float]:
    if heads.rule not in RULES:
        raise ValueError(f"heads.rule must be one of {RULES}, got {heads.rule!r}")
    return {heads.rule: int(heads.rule_value) if heads.rule == "count" else
            float(heads.rule_value)}


def needle_calibration(model: SparseModel, heads: Any, seed: int, tokenizer: Any
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """The paper's retrieval score of every query head: [layers, heads], and what it ran on."""
    rng = np.random.default_rng([seed, NEEDLE_STREAM])
    text = text_tokens(tokenizer, "train")
    documents = [needle_document(text, heads.length, heads.needle_tokens, rng)
                 for _ in range(heads.documents)]
    scores = needle_scores(model.params, model.config, documents, backend=model.backend,
                           progress=True)
    return scores, {"method": "needle", "length": heads.length,
                    "needle_tokens": heads.needle_tokens, "documents": heads.documents}


def _window_method_inputs(model: SparseModel, heads: Any, seed: int, tokenizer: Any,
                          data: Any, steps: int) -> tuple[Any, Any]:
    """What the window methods (gates, ablation) run on: `steps` batches of text and tasks from
    their own stream, and the model's params in heads.gate_dtype."""
    from rtpurbo_jax.data import training_dataset

    batches = training_dataset(tokenizer, data, seq_len=heads.length,
                               batch_size=heads.batch_size, steps=steps, seed=seed,
                               stream=GATE_STREAM, min_task_len=heads.gate_min_task_len)
    return batches, jax.tree.map(lambda x: x.astype(heads.gate_dtype), model.params)


def _window_method_info(heads: Any, sparse: Any) -> dict[str, Any]:
    """The settings the window methods share, for the profile's info."""
    return {"length": heads.length, "batch_size": heads.batch_size,
            "answer_weight": heads.gate_answer_weight, "min_task_len": heads.gate_min_task_len,
            "window": sparse.window, "sink_tokens": sparse.sink_tokens}


def gate_calibration(model: SparseModel, heads: Any, seed: int, tokenizer: Any, sparse: Any,
                     data: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Every query head's gate after `head_gates.train_gates` under the rule's share of query
    heads: [layers, heads], and what it ran on."""
    from rtpurbo_jax.head_gates import train_gates

    config = model.config
    budget = (float(heads.rule_value) if heads.rule == "fraction"
              else int(heads.rule_value) / (config.num_layers * config.num_heads))
    batches, params = _window_method_inputs(model, heads, seed, tokenizer, data,
                                            heads.gate_steps)
    gates, losses = train_gates(params, config, batches, budget=budget, window=sparse.window,
                                sink_tokens=sparse.sink_tokens,
                                learning_rate=heads.gate_learning_rate,
                                answer_weight=heads.gate_answer_weight, backend=model.backend,
                                progress=True)
    return gates, {"method": "gates", **_window_method_info(heads, sparse), "budget": budget,
                   "steps": heads.gate_steps, "learning_rate": heads.gate_learning_rate,
                   "first_loss": losses[0], "final_loss": losses[-1]}


def ablation_calibration(model: SparseModel, heads: Any, seed: int, tokenizer: Any, sparse: Any,
                         data: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Every query head's rank in `head_gates.ablation_scores`' elimination of whole KV groups
    (heads.granularity "kv" or "both") or single query heads ("query"): [layers, heads], and
    what it ran on."""
    from rtpurbo_jax.head_gates import ablation_scores

    batches, params = _window_method_inputs(model, heads, seed, tokenizer, data,
                                            heads.ablation_batches)
    unit = 1 if heads.granularity == "query" else model.config.group_size
    scores, info = ablation_scores(params, model.config, list(batches), unit=unit,
                                   window=sparse.window, sink_tokens=sparse.sink_tokens,
                                   answer_weight=heads.gate_answer_weight,
                                   round_share=heads.ablation_round_share,
                                   backend=model.backend, progress=True)
    return scores, {"method": "ablation", **_window_method_info(heads, sparse),
                    "batches": heads.ablation_batches, **info}


def retrieval_mask(model: SparseModel, heads: Any, seed: int, run_dir: Path,
                   design: str = "indexer", *, sparse: Any = None, data: Any = None
                   ) -> tuple[tuple[bool, ...], ...]:
    """The mask from heads.mask_file, from an earlier calibration in run_dir, or calibrated now
    (written to run_dir/heads.json and heads.png): [layers][kv_heads] for design "indexer",
    [layers][query heads] for design "paper". Methods "gates" and "ablation" need the sparse
    config (its window) and the data config."""
    if heads.mask_file:
        if not Path(heads.mask_file).exists():
            raise FileNotFoundError(f"heads.mask_file {heads.mask_file} does not exist")
        return read_mask(Path(heads.mask_file))
    if (run_dir / "heads.json").exists():
        return read_mask(run_dir / "heads.json")
    if heads.method not in METHODS:
        raise ValueError(f"heads.method must be one of {METHODS}, got {heads.method!r}")
    rule, tokenizer, config = _rule(heads), task_tokenizer(model), model.config
    tick = time.perf_counter()
    if heads.method in WINDOW_METHODS and design != "paper":
        raise ConfigError(f"heads.method={heads.method!r} weighs the paper design's local window: "
                          "set sparse.design='paper' or another heads.method")
    if heads.method in WINDOW_METHODS and heads.rule == "threshold":
        raise ConfigError(f"heads.method={heads.method!r} ranks heads under a budget: set "
                          "heads.rule to 'fraction' or 'count'")
    if heads.method != "tasks":
        if heads.method == "needle":
            scores, info = needle_calibration(model, heads, seed, tokenizer)
        else:
            calibrate = gate_calibration if heads.method == "gates" else ablation_calibration
            scores, info = calibrate(model, heads, seed, tokenizer, sparse, data)
        info.update(rule, design=design, granularity=heads.granularity)
        if design == "paper":
            mask = choose_query_heads(scores, config.group_size, granularity=heads.granularity,
                                      **rule)
            path, _, _ = save_needle_profile(run_dir / "heads", scores, mask, config.name, info,
                                             config.group_size, granularity=heads.granularity,
                                             score_label=SCORE_LABELS[heads.method])
        else:  # one score per KV head: its query heads' mean
            per_group = group_scores(scores, config.group_size)
            mask = choose_query_heads(per_group, 1, granularity="query", **rule)
            path, _, _ = save_needle_profile(run_dir / "heads", per_group, mask, config.name,
                                             info, 1, score_label=SCORE_LABELS[heads.method])
        _record_seconds(path, time.perf_counter() - tick)
        return mask
    prof = profile(model, tasks=tuple(heads.tasks), length=heads.length,
                   samples_per_task=heads.samples, seed=seed, batch_size=heads.batch_size,
                   progress=True, tokenizer=tokenizer)
    mask = choose_retrieval_heads(prof["score"], **rule)
    info = {"method": "tasks", "tasks": list(heads.tasks), "length": heads.length,
            "samples": heads.samples * len(heads.tasks), **rule}
    json_path, _ = save_profile(run_dir / "heads", prof, mask, config.name, info)
    if design == "paper":  # a KV head's query heads all follow it
        mask = tuple(tuple(x for x in row for _ in range(config.group_size)) for row in mask)
        record = json.loads(json_path.read_text())
        record.update(retrieval_mask=[list(row) for row in mask], granularity="kv")
        json_path.write_text(json.dumps(record, indent=1))
    _record_seconds(json_path, time.perf_counter() - tick)
    return mask


def _record_seconds(path: Path, seconds: float) -> None:
    """Adds the calibration's time to the profile at `path` (stage 1's minutes count it)."""
    record = json.loads(path.read_text())
    record["calibration_seconds"] = seconds
    path.write_text(json.dumps(record, indent=1))


# The stages of train.py, in the order they run.
STAGES = ("indexer", "distill")
# What train.py writes in a run directory: per stage, steps, losses and minutes.
TRAIN_SUMMARY = "train_summary.json"


def check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    """train.stages, checked: known stages, each once, in STAGES order."""
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"train.stages must be one or both of {STAGES} (in that order), got "
                          f"{stages}")
    if list(stages) != [s for s in STAGES if s in stages] or len(set(stages)) != len(stages):
        raise ConfigError(f"train.stages must list each stage once, in the order {STAGES}; got "
                          f"{stages}")
    return stages


def run_conversion(config: Any, run_dir: Path) -> dict[str, Any]:
    """The whole conversion a config describes, into run_dir: the stages of train.stages.
    Returns a summary dict (per stage: steps, losses, minutes)."""
    from rtpurbo_jax.api import load_from_config
    from rtpurbo_jax.sharding import make_mesh

    stages = check_stages(config.train.stages)
    model = load_from_config(config.model)
    if "distill" in stages:  # before stage 1 spends its time
        from rtpurbo_jax.stage2 import check_distill

        check_distill(config.distill, model.config)
        if config.distill.answer_weight and not (config.data.tasks
                                                 and config.data.task_fraction > 0):
            raise ConfigError("distill.answer_weight > 0 weights task answers, but the data has "
                              "no task samples: set data.task_fraction > 0 and data.tasks")
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    summary: dict[str, Any] = {"model": model.config.name,
                               "device": jax.devices()[0].device_kind, "stages": list(stages)}
    if "indexer" in stages:
        tick = time.perf_counter()
        sparse, indexer, stage1_summary = run_stage1(config, model, run_dir, mesh)
        # A resumed stage 1 counts the calibration and the steps of every process.
        summary.update(stage1_summary, stage1_minutes=max((time.perf_counter() - tick) / 60,
                                                  stage1_recorded_minutes(run_dir)))
        stage1 = {"steps": config.train.steps, "minutes": summary["stage1_minutes"]}
    else:
        sparse, indexer = start_checkpoint(config, model, run_dir)
        stage1 = stage1_record(start_checkpoint_path(config, run_dir))
    summary["retrieval_fraction"] = sparse.retrieval_fraction
    if "distill" in stages:
        summary["distill"] = run_distill(config, model, sparse, indexer, run_dir, mesh,
                                         stage1=stage1)
    return summary


def stage1_record(checkpoint: Path) -> dict[str, Any] | None:
    """{"steps", "minutes"} of the stage-1 run that wrote the sparse checkpoint (the
    train_summary.json of the run directory holding it), or None when no such run is recorded
    there (a checkpoint copied elsewhere, or made by a stage-2 run)."""
    summary_file = checkpoint.parent / TRAIN_SUMMARY
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    # Summaries from before train.stages existed are stage 1's.
    if "indexer" not in summary.get("stages", ["indexer"]) or "steps" not in summary:
        return None
    return {"steps": summary["steps"],
            "minutes": summary.get("stage1_minutes", summary.get("train_minutes"))}


def stage1_recorded_minutes(run_dir: Path) -> float:
    """The head calibration's time (heads.json, when this run calibrated) plus every stage-1
    step's (metrics.jsonl; each process's compile is in its first step), in minutes."""
    heads = run_dir / "heads.json"
    calibration = (json.loads(heads.read_text()).get("calibration_seconds", 0.0)
                   if heads.exists() else 0.0)
    return (calibration + sum(r["seconds"] for r in _read_metrics(run_dir))) / 60


def run_stage1(config: Any, model: SparseModel, run_dir: Path, mesh: Any
               ) -> tuple[SparseConfig, Any, dict[str, Any]]:
    """Calibrate, choose and distil the indexer; writes run_dir/sparse and sparse_safetensors.
    Returns (its SparseConfig, the indexer, {steps, first_loss, final_loss, resumed})."""
    from rtpurbo_jax.data import training_dataset
    from rtpurbo_jax.training import run_training

    tokenizer = task_tokenizer(model)
    mask = retrieval_mask(model, config.heads, config.seed, run_dir, config.sparse.design,
                          sparse=config.sparse, data=config.data)
    sparse = SparseConfig(mask, group_size=model.config.group_size, **config.sparse.to_dict())
    sparse.check_model(model.config)
    train = config.train
    rng = np.random.default_rng([config.seed, CALIBRATION_STREAM])
    calibration = text_windows(corpus_tokens(tokenizer, tuple(config.data.files)), train.seq_len,
                               train.calibration_windows, rng)
    indexer = initial_indexer(model, sparse, calibration)
    dataset = training_dataset(tokenizer, config.data, seq_len=train.seq_len,
                               batch_size=train.batch_size, steps=train.steps, seed=config.seed)
    indexer, history = run_training(config=model.config, sparse=sparse, params=model.params,
                                    indexer=indexer, dataset=dataset, train=train,
                                    run_dir=run_dir, mesh=mesh, backend=model.backend)
    trained = model.with_sparse(sparse, indexer)
    trained.save_sparse(run_dir / "sparse")
    trained.save_sparse(run_dir / "sparse_safetensors", safetensors=True)
    losses = [h["loss"] for h in _read_metrics(run_dir)]
    return sparse, indexer, {"steps": train.steps, "first_loss": losses[0],
                             "final_loss": losses[-1], "resumed": len(history) < len(losses)}


def start_checkpoint(config: Any, model: SparseModel, run_dir: Path) -> tuple[SparseConfig, Any]:
    """Stage 2 without stage 1: the sparse checkpoint at distill.sparse (default:
    run_dir/sparse), which must have been made for these base weights."""
    from rtpurbo_jax.checkpoint import check_base, load_sparse

    path = start_checkpoint_path(config, run_dir)
    sparse, indexer, base = load_sparse(path)
    if model.fingerprint:  # random weights have none
        check_base(path, base, model.fingerprint, model.config.name)
    sparse.check_model(model.config)
    return sparse, indexer


def start_checkpoint_path(config: Any, run_dir: Path) -> Path:
    """Where stage 2 without stage 1 starts: distill.sparse, default run_dir/sparse."""
    return Path(config.distill.sparse) if config.distill.sparse else run_dir / "sparse"


def run_distill(config: Any, model: SparseModel, sparse: SparseConfig, indexer: Any,
                run_dir: Path, mesh: Any, stage1: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Stage 2, then the new model exported to run_dir/model (a Hugging Face directory with
    its sparse checkpoint and origin: base, stages, steps and minutes of each stage).

    stage1: {"steps", "minutes"} of the stage 1 that made the sparse checkpoint, run here or
    recorded beside the checkpoint; None: unknown (the origin then lists stage 2 alone).
    Returns {steps, first_loss, final_loss, resumed, minutes}."""
    from rtpurbo_jax.data import training_dataset
    from rtpurbo_jax.export import export_model
    from rtpurbo_jax.stage2 import DATA_STREAM, run_stage2

    distill = config.distill
    dataset = training_dataset(task_tokenizer(model), config.data, seq_len=distill.seq_len,
                               batch_size=distill.batch_size, steps=distill.steps,
                               seed=config.seed, stream=DATA_STREAM,
                               min_task_len=distill.min_task_len)
    params, history = run_stage2(config=model.config, params=model.params, sparse=sparse,
                                 indexer=indexer, dataset=dataset, distill=distill,
                                 run_dir=run_dir, mesh=mesh, backend=model.backend,
                                 seed=config.seed)
    records = _read_metrics(run_dir / "distill")
    losses = [r["loss"] for r in records]
    steps = {"indexer": stage1["steps"] if stage1 else 0, "distill": distill.steps}
    # The time of the steps that made the model, summed over every process of a resumed run
    # (each process's compile is in its first step; a step redone after a kill counts once).
    minutes = {"distill": sum(r["seconds"] for r in records) / 60}
    if stage1 and stage1["minutes"] is not None:
        minutes["indexer"] = stage1["minutes"]
    origin = {"base": {"name": model.config.name, "fingerprint": model.fingerprint},
              "stages": [*(["indexer"] if stage1 else []), "distill"], "steps": steps,
              "minutes": minutes, "design": sparse.design,
              "distill": {k: v for k, v in distill.to_dict().items() if k != "sparse"}}
    # Written aside and renamed: a kill mid-export never leaves a half model under model/.
    partial, final = run_dir / "model.partial", run_dir / "model"
    shutil.rmtree(partial, ignore_errors=True)
    export_model(partial, params, model.config, model.tokenizer, sparse=sparse,
                 indexer=indexer, origin=origin, dtype=distill.export_dtype,
                 name=final.name)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return {"steps": distill.steps, "first_loss": losses[0], "final_loss": losses[-1],
            "resumed": len(history) < len(losses), "minutes": minutes["distill"]}


def _read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The metrics of every step, the last record of a step winning (a resumed run rewrites)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _report_quality(quality: dict[str, Any], label: str, top_p: float) -> None:
    m = quality["mean"]
    print(f"{label} at p={top_p}: captures {m['captured_mass']:.3f} of the true block attention "
          f"mass at density {m['density']:.3f} (oracle density {m['oracle_density']:.3f})")


def _profile_and_init(model: SparseModel, args: Any) -> None:
    """Profile heads, choose them by threshold, measure the SVD-initialised indexer."""
    prof = profile(model, tasks=("passkey", "niah_multikey"), length=args.length,
                   samples_per_task=args.samples, seed=args.seed, progress=True)
    mask = choose_retrieval_heads(prof["score"], threshold=args.threshold)
    info = {"tasks": ["passkey", "niah_multikey"], "length": args.length,
            "samples": 2 * args.samples, "threshold": args.threshold}
    json_path, png_path = save_profile(args.out, prof, mask, model.config.name, info)
    top_p = args.top_p[0]
    sparse = SparseConfig(mask, rank=args.rank, top_p=top_p)
    rng = np.random.default_rng(args.seed)
    train = text_tokens(model.tokenizer, "train")
    indexer = initial_indexer(model, sparse, text_windows(train, args.length, 2, rng))
    quality = indexer_quality(model, sparse, indexer, text_windows(train, args.length, 1, rng))
    report = {"model": model.config.name, "length": args.length, "top_p": top_p,
              "rank": args.rank, "retrieval_fraction": sparse.retrieval_fraction,
              "initial_indexer": quality}
    quality_path = Path(args.out).with_name(Path(args.out).name + "_init_quality.json")
    quality_path.write_text(json.dumps(report, indent=1))
    print(f"retrieval heads: {sum(map(sum, mask))} of {np.size(prof['score'])} "
          f"({sparse.retrieval_fraction:.1%}) at score >= {args.threshold}")
    _report_quality(quality, "initial indexer", top_p)
    print(f"wrote {json_path}, {png_path}, {quality_path}")


def _measure_checkpoint(model: SparseModel, args: Any) -> None:
    """The trained indexer's captured mass and density at each top-p, on training-split text
    (never the evaluation's samples)."""
    from rtpurbo_jax.checkpoint import load_sparse

    sparse, indexer, _ = load_sparse(args.sparse)
    rng = np.random.default_rng(args.seed)
    window = text_windows(text_tokens(model.tokenizer, "train"), args.length, 1, rng)
    per_p = {}
    for top_p in args.top_p:
        quality = indexer_quality(model, sparse.replace(top_p=top_p), indexer, window)
        per_p[str(top_p)] = quality
        _report_quality(quality, "trained indexer", top_p)
    path = Path(args.out).with_name(Path(args.out).name + "_quality.json")
    path.write_text(json.dumps({"model": model.config.name, "checkpoint": str(args.sparse),
                                "length": args.length, "seed": args.seed,
                                "retrieval_fraction": sparse.retrieval_fraction,
                                "quality_by_top_p": per_p}, indent=1))
    print(f"wrote {path}")


def per_kv_head_scores(profile: dict[str, Any]) -> np.ndarray:
    """[layers, kv_heads] scores of a head profile JSON: a task profile's "score", or a needle
    profile's "group_score" (its query heads' mean)."""
    return np.asarray(profile["group_score"] if "group_score" in profile else profile["score"],
                      np.float64)


def compare_profiles(paths: Sequence[str], out: str) -> dict[str, Any]:
    """How two head profiles (heads.json of either method) rank the KV heads: Spearman and the
    overlap of their top sets at 10% and 20% of the KV heads. Writes <out>.json."""
    a, b = (per_kv_head_scores(json.loads(Path(p).read_text())) for p in paths)
    if a.shape != b.shape:
        raise ValueError(f"the profiles are {list(a.shape)} and {list(b.shape)}: not one model")
    report = {"profiles": list(paths), "kv_heads": int(a.size),
              "agreement": [ranking_agreement(a, b, max(1, round(f * a.size)))
                            for f in (0.1, 0.2)]}
    path = Path(out).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


def comparison_prefix(paths: Sequence[str]) -> str:
    """Where `--compare A B` writes by default: named for the folders holding the profiles (each
    run writes its profile as heads.json), so two comparisons don't overwrite each other."""
    a, b = (Path(p).resolve().parent.name for p in paths)
    return str(Path(DEFAULT_PROFILE_PREFIX).parent / f"{a}_vs_{b}")


def main(argv: Sequence[str] | None = None) -> None:
    """Profile a model's heads and measure its SVD-initialised indexer, or (with --sparse)
    measure a trained sparse checkpoint's selection at several top-p, or (with --compare)
    compare two head profiles' rankings."""
    import argparse

    from rtpurbo_jax.api import load

    parser = argparse.ArgumentParser(prog="python -m rtpurbo_jax.convert", description=main.__doc__)
    parser.add_argument("--source", default=None, help="model (default: the embedded one)")
    parser.add_argument("--sparse", default=None, help="a trained sparse checkpoint to measure")
    parser.add_argument("--length", type=int, default=4096, help="tokens per sample")
    parser.add_argument("--samples", type=int, default=4, help="profiling samples per task")
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="retrieval score from which a head stays dense")
    parser.add_argument("--top-p", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.9], help="comma-separated; the first one without --sparse")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="output path prefix (default: results/profile/model, or with "
                             "--compare results/profile/<folder of A>_vs_<folder of B>)")
    parser.add_argument("--compare", nargs=2, metavar="HEADS_JSON", default=None,
                        help="compare two head profiles' rankings of the KV heads (no model)")
    args = parser.parse_args(argv)
    if args.compare:
        out = args.out or comparison_prefix(args.compare)
        for row in compare_profiles(args.compare, out)["agreement"]:
            print(f"top {row['top']}: Spearman {row['spearman']:.3f}, overlap "
                  f"{row['top_overlap']:.3f}")
        print(f"written: {Path(out).with_suffix('.json')}")
        return
    args.out = args.out or DEFAULT_PROFILE_PREFIX
    model = load(args.source)
    if args.sparse:
        _measure_checkpoint(model, args)
    else:
        _profile_and_init(model, args)


if __name__ == "__main__":
    main()

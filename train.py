"""Turn a full-attention model into an RTPurbo model.

    python train.py                                   # the embedded default model
    python train.py --config=configs/llama_1m.py --config.train.steps=300

    python train.py --config=configs/smollm2_135m_paper.py \
        --config.train.stages="('indexer','distill')"   # + stage 2: a new, fine-tuned model

Stage 1 ("indexer"): load the base model -> profile heads (or take a mask) -> initialise the
indexer from the model's own queries -> distil it against the frozen model -> save the sparse
checkpoint. Stage 2 ("distill", rtpurbo_jax/stage2.py): the model's own weights learn, in
sparse mode, to match the frozen dense original's next-token distribution; the result is a new
model. A run directory (default runs/<config name>) holds the config as run, the head profile,
the metrics, the Orbax checkpoints (a killed run resumes from the last one) and the results:
  sparse/               the sparse checkpoint: rtpurbo_jax.load(source, sparse="<run>/sparse")
  sparse_safetensors/   the same as safetensors + JSON
  distill/              stage 2's checkpoints, metrics (and cached teacher top-k)
  model/                stage 2's model: a Hugging Face directory with its sparse checkpoint
                        and origin (rtpurbo.json); rtpurbo_jax.load("<run>/model")
  train_summary.json    per stage: steps, minutes, losses; device
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "smollm2_135m.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "model/training config (a configs/*.py file)")
# The config sections that must not change when a run directory is resumed: those of every
# stage, and those of each stage that runs (train.stages itself may change, e.g. stage 2 later).
_RESUME_KEYS = {"all": ("model", "data", "seed"), "indexer": ("sparse", "heads", "train"),
                "distill": ("distill",)}


def apply_schedule(config: Any, backend: str) -> str:
    """Applies `cpu_schedule` when asked or when there is no accelerator; returns the name."""
    if config.schedule not in ("auto", "full", "cpu"):
        raise ValueError(f"schedule must be auto, full or cpu, got {config.schedule!r}")
    use_cpu = config.schedule == "cpu" or (config.schedule == "auto" and backend == "cpu")
    if not use_cpu:
        return "full"
    for section, values in config.cpu_schedule.items():
        config[section].update(values)
    return "cpu"


def _section(config: Any, key: str) -> Any:
    value = json.loads(config[key].to_json()) if hasattr(config[key], "to_json") else config[key]
    if key == "train":
        value.pop("stages", None)
    return value


def check_resume(run_dir: Path, config: Any) -> None:
    """Refuses to resume a run made with another config (in the sections of the stages that
    run); records the config in config.json."""
    path = run_dir / "config.json"
    stages = tuple(config.train.stages)
    keys = [k for group in ("all", *stages) for k in _RESUME_KEYS.get(group, ())]
    current = {k: _section(config, k) for k in keys}
    saved = json.loads(path.read_text()) if path.exists() else {}
    if "train" in saved:
        saved["train"].pop("stages", None)
    changed = [k for k in keys if k in saved and saved[k] != current[k]]
    if changed:
        raise ValueError(f"{run_dir} holds a run made with a different config ({changed}); "
                         "pass a new --config.run_dir to start another run")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**saved, **current}, indent=1, default=str))


def main(argv: list[str]) -> None:
    del argv
    import jax

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO
    config = _CONFIG.value
    if config.distributed:
        jax.distributed.initialize()

    from rtpurbo_jax.convert import TRAIN_SUMMARY, run_conversion

    schedule = apply_schedule(config, jax.default_backend())
    if schedule == "cpu":
        logging.warning(
            "No accelerator found: running the short CPU schedule (%d steps of %d tokens, heads "
            "profiled at %d tokens). Use --config.schedule=full for the full one.",
            config.train.steps, config.train.seq_len, config.heads.length)
    run_dir = Path(config.run_dir or os.path.join("runs", config.name))
    check_resume(run_dir, config)
    start = time.perf_counter()
    summary = run_conversion(config, run_dir)
    # A resumed stage 2 counts the steps of every process, not only this one's wall time.
    stage_minutes = [summary.get("stage1_minutes"), summary.get("distill", {}).get("minutes")]
    wall = (time.perf_counter() - start) / 60
    summary.update(schedule=schedule, train_minutes=max(
        wall, sum(m for m in stage_minutes if m is not None)))
    (run_dir / TRAIN_SUMMARY).write_text(json.dumps(summary, indent=1))
    if "indexer" in summary["stages"]:
        print(f"sparse checkpoint: {run_dir / 'sparse'}  ({summary['steps']} steps, "
              f"{summary['stage1_minutes']:.1f} min, loss {summary['first_loss']:.4f} -> "
              f"{summary['final_loss']:.4f}, retrieval heads {summary['retrieval_fraction']:.1%})")
    if "distill" in summary["stages"]:
        stage2 = summary["distill"]
        print(f"model: {run_dir / 'model'}  (stage 2: {stage2['steps']} steps, "
              f"{stage2['minutes']:.1f} min, loss {stage2['first_loss']:.4f} -> "
              f"{stage2['final_loss']:.4f})")


def _main(argv: list[str]) -> None:
    from rtpurbo_jax.cli import one_line_errors

    with one_line_errors(os.path.basename(__file__)):
        main(argv)


if __name__ == "__main__":
    from rtpurbo_jax.cli import resolve_config_name

    sys.argv = resolve_config_name(sys.argv, Path(__file__).resolve().parent / "configs")
    app.run(_main)

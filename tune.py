"""Choose top_p and the retrieval-head fraction of a trained checkpoint on a validation seed.

    python tune.py                                   # after train.py, before eval.py
    python tune.py --config.tune.top_p="(0.9,0.95)" --config.tune.retrieval_fraction="(0.1,)"

For every (tune.top_p, tune.retrieval_fraction) pair (and tune.granularity in the paper design):
the accuracy suite in mode rtpurbo on the validation seed tune.seed (never eval.seed, the test
seed), its density and perplexity; `full` once beside them. Nothing is retrained: retrieval KV
heads are only added (indexer design, best head-profile scores first), retrieval query heads
only removed (paper design: the best heads, or KV groups, among those with an indexer). The
most accurate variant within tune.max_density (at the largest length) and
tune.max_retrieval_fraction is written as a sparse checkpoint (tune.write_to, default
<run_dir>/sparse_tuned, plus a safetensors export beside it) for eval.py:

    python eval.py --config.eval.sparse=runs/smollm2_135m/sparse_tuned

Writes results/eval/<config name>_tuning/tuning.json (after every variant, so an interrupted
sweep keeps what it measured) and tuning.png (accuracy vs density per variant).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from absl import app
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "smollm2_135m.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "model config (a configs/*.py file), with its tune section")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rtpurbo_jax import evaluation as ev_lib
    from rtpurbo_jax import tuning
    from rtpurbo_jax.config import ModelConfig
    from rtpurbo_jax.convert import task_tokenizer

    config = _CONFIG.value
    ev, tune = ev_lib.eval_section(config), config.tune
    arch = ModelConfig.from_hf(dict(config.model.arch))
    ev_lib.check_eval_config(ev, arch.max_position_embeddings)
    tuning.check_tune_config(tune, ev)
    paths = ev_lib.resolve_paths(config, ev)
    if not paths.heads.exists():
        raise FileNotFoundError(f"no head profile at {paths.heads}: tuning ranks extra retrieval "
                                "heads by its scores (set --config.eval.heads_file)")
    scores = np.asarray(json.loads(paths.heads.read_text())["score"], np.float64)
    model_config = config.model.copy_and_resolve_references()
    model_config.dtype = ev.dtype or config.model.dtype
    model = ev_lib.load_eval_model(model_config, paths.sparse, backend=ev.backend)
    out_dir = Path(tune.out_dir or os.path.join("results", "eval", f"{config.name}_tuning"))
    meta = {"model": model.config.name or config.name, "config": config.name,
            "device": ev_lib.device_name(),
            "commit": ev_lib.git_commit(Path(__file__).resolve().parent),
            "sparse_checkpoint": str(paths.sparse), "head_profile": str(paths.heads),
            "settings": {**tune.to_dict(), "lengths": sorted(ev.lengths),
                         "dtype": model_config.dtype, "backend": model.backend,
                         "max_new_tokens": ev.max_new_tokens}}
    sweep = tuning.validation_sweep(
        model, task_tokenizer(model), scores, ev, tune, progress=True,
        on_result=lambda partial: tuning.write_sweep(partial, meta, out_dir))
    chosen = sweep["chosen"]
    target = Path(tune.write_to) if tune.write_to else paths.run_dir / "sparse_tuned"
    tuned = tuning.variant(model, scores, chosen["top_p"], chosen["asked_fraction"],
                           chosen["granularity"])
    tuned.save_sparse(target)
    tuned.save_sparse(target.with_name(target.name + "_safetensors"), safetensors=True)
    sweep["written"] = str(target)
    print(tuning.markdown_sweep(sweep))
    print(f"\n{tuning.write_sweep(sweep, meta, out_dir)}\nchosen checkpoint: {target}")


def _main(argv: list[str]) -> None:
    from rtpurbo_jax.cli import one_line_errors

    with one_line_errors(os.path.basename(__file__)):
        main(argv)


if __name__ == "__main__":
    from rtpurbo_jax.cli import resolve_config_name

    sys.argv = resolve_config_name(sys.argv, Path(__file__).resolve().parent / "configs")
    app.run(_main)

"""Evaluate an RTPurbo model beside its baselines: accuracy, density and perplexity.

    python eval.py                                    # the default model, runs/<name>/sparse
    python eval.py --config=configs/smollm2_135m.py --config.eval.sparse=runs/smollm2_135m/sparse
    python eval.py --config.eval.lengths="(2048,)" --config.eval.samples=10 \
        --config.eval.modes="('full','rtpurbo')"

Every task of rtpurbo_jax.tasks at each length in eval.lengths, eval.samples seeded samples per
cell, in the modes full / rtpurbo / topk / streaming / oracle (all on the same samples), plus
perplexity on held-out text. Prints a Markdown table and writes to eval.out_dir (default
results/eval/<config name>):
  results.json   the numbers (schema in the README)
  accuracy.png   accuracy vs length, a line per mode
  density.png    sparse-head density vs length
  heads.png      the retrieval-score heatmap, when the run has a head profile (heads.json)
eval.seed is the test seed: tune only on a separate validation seed. Runs over disjoint
lengths (one per call on a time-limited machine) merge into one results.json with its plots:

    python eval.py --merge=a/results.json --merge=b/results.json --config.eval.out_dir=DIR

eval.steps, eval.train_minutes and eval.stages, where set, replace the training metadata the
model records (also when merging): for stages that ran as separate runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "smollm2_135m.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "model config (a configs/*.py file), with its eval section")
_MERGE = flags.DEFINE_multi_string(
    "merge", None, "instead of evaluating: merge the results.json of runs over disjoint lengths "
    "(repeat the flag) into --config.eval.out_dir, with its plots")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rtpurbo_jax.evaluation import (
        check_training_fields,
        evaluate,
        markdown_report,
        merge_results,
        training_metadata,
        write_outputs,
    )

    if _MERGE.value:
        config = _CONFIG.value
        check_training_fields(config.eval)
        out_dir = Path(config.eval.out_dir or os.path.join("results", "eval", config.name))
        paths = [Path(p) for p in _MERGE.value]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise app.UsageError(f"no results file at {', '.join(missing)}")
        try:
            results = merge_results([json.loads(p.read_text()) for p in paths])
        except ValueError as err:
            raise app.UsageError(f"cannot merge: {err}") from err
        # Training metadata set on the command line (eval.steps, train_minutes, stages) wins.
        results.update(training_metadata(results, config.eval))
        written = write_outputs(results, out_dir, Path(config.eval.heads_file or "-"))
    else:
        results, written = evaluate(_CONFIG.value)
    print(markdown_report(results))
    print()
    if "heads" not in written:
        print("no head profile found (eval.heads_file or <run_dir>/heads.json): heatmap skipped")
    for name, path in written.items():
        print(f"{name}: {path}")


def _main(argv: list[str]) -> None:
    from rtpurbo_jax.cli import one_line_errors

    with one_line_errors(os.path.basename(__file__)):
        main(argv)


if __name__ == "__main__":
    from rtpurbo_jax.cli import resolve_config_name

    sys.argv = resolve_config_name(sys.argv, Path(__file__).resolve().parent / "configs")
    app.run(_main)

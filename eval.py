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
eval.seed is the test seed: tune only on a separate validation seed.
"""

from __future__ import annotations

import os

from absl import app
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "smollm2_135m.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "model config (a configs/*.py file), with its eval section")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rtpurbo_jax.evaluation import evaluate, markdown_report

    results, written = evaluate(_CONFIG.value)
    print(markdown_report(results))
    print()
    if "heads" not in written:
        print("no head profile found (eval.heads_file or <run_dir>/heads.json): heatmap skipped")
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    app.run(main)

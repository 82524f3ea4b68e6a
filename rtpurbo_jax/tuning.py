"""Choosing top_p and the retrieval-head fraction of a trained checkpoint on a validation seed.

Neither needs retraining: top_p is a selection setting; in the indexer design a sparse KV group
can always be turned back into a retrieval head (its indexer weights are simply dropped), and in
the paper design a retrieval query head can always become a local head (likewise). The reverse
directions are refused, since no indexer was trained for those heads. `validation_sweep` runs the
accuracy suite (mode rtpurbo, plus full once) for every (top_p, fraction) pair on the
validation seed, and `choose` picks, among the variants within the density and retrieval
budgets, the most accurate one (ties: lower perplexity, then lower density). The test seed of
eval.py is never touched, so its accuracy stays a held-out measurement.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from rtpurbo_jax.api import SparseModel
from rtpurbo_jax.config import SparseConfig
from rtpurbo_jax.evaluation import mean_accuracy, pyplot, run_suite
from rtpurbo_jax.heads import choose_query_heads, choose_retrieval_heads

IndexerParams = dict[str, Any]


def default_tune_config() -> ml_collections.ConfigDict:
    """The `tune` section of a config; every field can be set as --config.tune.<field>=..."""
    return ml_collections.ConfigDict(dict(
        # The validation seed: it must differ from eval.seed (the test seed).
        seed=2,
        top_p=(0.9, 0.95, 0.98),
        retrieval_fraction=(0.1, 0.2),
        # Design "paper": route single query heads ("query") or whole KV groups ("kv").
        granularity=("query",),
        tasks=("passkey", "niah_multikey", "kv_retrieval"),
        samples=20,  # per (task, length) cell; lengths, batch size and dtype come from `eval`
        perplexity_windows=4,
        max_density=0.3,  # at the largest length; variants above it are not chosen
        max_retrieval_fraction=0.2,
        out_dir="",  # empty: results/eval/<config name>_tuning
        write_to="",  # the chosen checkpoint; empty: <run_dir>/sparse_tuned
    ))


def remask(sparse: SparseConfig, indexer: IndexerParams, mask: Sequence[Sequence[bool]]
           ) -> tuple[SparseConfig, IndexerParams]:
    """The checkpoint with retrieval mask `mask`; every group or head that keeps an indexer
    keeps its own weights. Refused when the mask needs an indexer the checkpoint lacks: in the
    indexer design a mask may only add retrieval KV heads, in the paper design only remove
    retrieval query heads.

    indexer["layers"][i]: {"wq": [indexed, ...], "wk": [indexed, ...]} in the order of
    sparse.indexed_heads(i), or {} for a layer without any.
    """
    changed = sparse.replace(retrieval_mask=mask)
    have = (sparse.num_layers, len(sparse.retrieval_mask[0]))
    want = (changed.num_layers, len(changed.retrieval_mask[0]))
    if want != have:
        raise ValueError(f"mask is [{want[0]}][{want[1]}], the checkpoint's is "
                         f"[{have[0]}][{have[1]}]")
    layers = []
    for layer in range(sparse.num_layers):
        old, new = sparse.indexed_heads(layer), changed.indexed_heads(layer)
        missing = sorted(set(new) - set(old))
        if missing and sparse.design == "paper":
            raise ValueError(f"layer {layer}: query heads {missing} have no trained indexer; "
                             "train with a larger heads.rule_value (or heads.granularity "
                             "'both'), then narrow here")
        if missing:
            raise ValueError(f"layer {layer}: KV heads {missing} are retrieval heads of the "
                             "checkpoint and have no trained indexer; a mask may only add "
                             "retrieval heads")
        keep = np.asarray([old.index(h) for h in new], np.int32)
        layers.append({name: w[keep] for name, w in indexer["layers"][layer].items()}
                      if new else {})
    return changed, {"layers": layers}


def add_retrieval_heads(sparse: SparseConfig, scores: np.ndarray, fraction: float
                        ) -> tuple[tuple[bool, ...], ...]:
    """The checkpoint's mask plus the best-scoring other heads, until `fraction` of all KV heads
    are retrieval heads. scores: [layers, kv_heads] (a heads.json "score")."""
    mask = np.asarray(sparse.retrieval_mask, bool)
    if scores.shape != mask.shape:
        raise ValueError(f"head scores are {list(scores.shape)}, the checkpoint's mask is "
                         f"{list(mask.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"retrieval fraction must be in [0, 1], got {fraction}")
    target, have = int(round(fraction * mask.size)), int(mask.sum())
    if target < have:
        raise ValueError(f"retrieval fraction {fraction} means {target} heads, but the "
                         f"checkpoint already keeps {have} ({sparse.retrieval_fraction:.3f}); "
                         "only retrieval heads can be added without retraining")
    # The checkpoint's own retrieval heads rank first, then the others by score.
    return choose_retrieval_heads(np.where(mask, np.inf, scores), count=target)


def variant(model: SparseModel, scores: np.ndarray, top_p: float, fraction: float,
            granularity: str = "query") -> SparseModel:
    """The model's checkpoint with another top_p and retrieval fraction: retrieval KV heads
    added (design "indexer"; scores [layers, kv_heads]), or the best query heads (granularity
    "query") or KV groups ("kv") among those with a trained indexer kept (design "paper";
    scores [layers, heads]), so nothing is retrained."""
    if model.sparse.design == "paper":
        mask = choose_query_heads(scores, model.config.group_size, granularity=granularity,
                                  fraction=fraction)
    else:
        mask = add_retrieval_heads(model.sparse, scores, fraction)
    sparse, indexer = remask(model.sparse, model.indexer, mask)
    return model.with_sparse(sparse.replace(top_p=top_p), indexer)


def check_tune_config(tune: Any, ev: Any) -> None:
    """Raises ValueError naming the field for settings the sweep cannot run."""
    if int(tune.seed) == int(ev.seed):
        raise ValueError(f"tune.seed ({tune.seed}) equals eval.seed, the test seed: tune on a "
                         "separate validation seed")
    if not tune.top_p or not tune.retrieval_fraction:
        raise ValueError("tune.top_p and tune.retrieval_fraction need at least one value each")
    for p in tune.top_p:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"tune.top_p values must be in (0, 1], got {p}")
    for f in tune.retrieval_fraction:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"tune.retrieval_fraction values must be in [0, 1], got {f}")
    if int(tune.samples) <= 0 or int(tune.perplexity_windows) < 0:
        raise ValueError("tune.samples must be positive and tune.perplexity_windows >= 0")


def suite_section(ev: Any, tune: Any, modes: Sequence[str]) -> ml_collections.ConfigDict:
    """The eval section the sweep runs: eval's lengths and batching, tune's seed and samples."""
    section = ev.copy_and_resolve_references()
    section.update(dict(seed=tune.seed, tasks=tuple(tune.tasks), samples=tune.samples,
                        perplexity_windows=tune.perplexity_windows, modes=tuple(modes)))
    return section


def summarise(suite: dict[str, Any], mode: str) -> dict[str, Any]:
    """Mean accuracy (over tasks and lengths, and per length), density per length and
    perplexity of one mode in a run_suite result."""
    cells = [c for c in suite["cells"] if c["mode"] == mode]
    lengths = sorted({c["length"] for c in cells})
    by_length = {n: mean_accuracy(cells, n, mode) for n in lengths}
    ppl = next((p["ppl"] for p in suite["perplexity"] if p["mode"] == mode), None)
    return {"accuracy": float(np.mean(list(by_length.values()))),
            "accuracy_by_length": {str(n): a for n, a in by_length.items()},
            "density_by_length": {str(d["length"]): d["density"] for d in suite["density"]
                                  if d["mode"] == mode},
            "ppl": ppl}


def final_density(v: dict[str, Any]) -> float:
    """A variant's density at its largest length; 1 when no head is sparse (all attended)."""
    lengths = v["density_by_length"]
    last = lengths[max(lengths, key=int)] if lengths else None
    return 1.0 if last is None else last


def choose(variants: Sequence[dict[str, Any]], tune: Any) -> dict[str, Any]:
    """The most accurate variant within the budgets (ties: lower perplexity, then density)."""
    def eligible(v: dict[str, Any]) -> bool:
        return final_density(v) <= tune.max_density and v["retrieval_fraction"] <= (
            tune.max_retrieval_fraction + 1e-9)

    within = [v for v in variants if eligible(v)]
    if not within:
        raise ValueError(f"no variant is within max_density {tune.max_density} at the largest "
                         f"length and max_retrieval_fraction {tune.max_retrieval_fraction}")

    def key(v: dict[str, Any]) -> tuple[float, float, float]:
        return (-v["accuracy"], v["ppl"] if v["ppl"] is not None else 0.0, final_density(v))

    return min(within, key=key)


def validation_sweep(model: SparseModel, tokenizer: Any, scores: np.ndarray, ev: Any, tune: Any,
                     *, progress: bool = False,
                     on_result: Callable[[dict[str, Any]], None] | None = None
                     ) -> dict[str, Any]:
    """{"full": summary, "variants": [summary + top_p, retrieval_fraction], "chosen": ...}.

    on_result(partial) is called after every variant, so an interrupted sweep keeps what it
    measured.
    """
    check_tune_config(tune, ev)
    out: dict[str, Any] = {"full": summarise(
        run_suite(model, tokenizer, suite_section(ev, tune, ("full",)), progress), "full"),
        "variants": []}
    paper = model.sparse.design == "paper"
    granularities = tuple(tune.granularity) if paper else ("kv",)
    for granularity, top_p, fraction in itertools.product(granularities, tune.top_p,
                                                          tune.retrieval_fraction):
        candidate = variant(model, scores, top_p, fraction, granularity)
        suite = run_suite(candidate, tokenizer, suite_section(ev, tune, ("rtpurbo",)), progress)
        out["variants"].append({"top_p": top_p, "asked_fraction": fraction,
                                "granularity": granularity,
                                "retrieval_fraction": candidate.sparse.retrieval_fraction,
                                "kv_group_fraction": candidate.sparse.kv_group_fraction,
                                **summarise(suite, "rtpurbo")})
        if on_result is not None:
            on_result(out)
    out["chosen"] = choose(out["variants"], tune)
    return out


def plot_sweep(sweep: dict[str, Any], title: str, path: Path) -> None:
    """Validation accuracy vs density at the largest length, a point per variant, full as a
    line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    lines = sorted({(v.get("granularity", ""), v["retrieval_fraction"])
                    for v in sweep["variants"]})
    for granularity, fraction in lines:
        rows = [v for v in sweep["variants"] if v["retrieval_fraction"] == fraction
                and v.get("granularity", "") == granularity]
        xs = [final_density(v) for v in rows]
        routing = f"{granularity} routing, " if granularity else ""
        ax.plot(xs, [v["accuracy"] for v in rows], "o-",
                label=f"{routing}retrieval heads {fraction:.0%}")
        for x, v in zip(xs, rows, strict=True):
            ax.annotate(f"p={v['top_p']}", (x, v["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.axhline(sweep["full"]["accuracy"], color="black", ls="--", label="full")
    ax.set_xlabel("density at the largest length")
    ax.set_ylabel("mean validation accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep(sweep: dict[str, Any], meta: dict[str, Any], out_dir: Path) -> Path:
    """tuning.json (meta + sweep) in out_dir, and tuning.png once the sweep is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tuning.json"
    path.write_text(json.dumps({**meta, **sweep}, indent=1))
    if "chosen" in sweep:
        plot_sweep(sweep, f"{meta.get('model', '')}: validation seed {meta['settings']['seed']}",
                   out_dir / "tuning.png")
    return path


def markdown_sweep(sweep: dict[str, Any]) -> str:
    """A Markdown table of the sweep: a row per variant, full first, the chosen one marked."""
    lengths = sorted(sweep["full"]["accuracy_by_length"], key=int)
    head = ["variant", "mean acc", *(f"acc {n}" for n in lengths),
            *(f"density {n}" for n in lengths), "ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, v: dict[str, Any]) -> str:
        dens = [v["density_by_length"].get(n) for n in lengths]
        cells = [name, f"{v['accuracy']:.3f}",
                 *(f"{v['accuracy_by_length'][n]:.3f}" for n in lengths),
                 *(f"{d:.3f}" if d is not None else "-" for d in dens),
                 f"{v['ppl']:.3f}" if v["ppl"] is not None else "-"]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("full", sweep["full"]))
    for v in sweep["variants"]:
        mark = " (chosen)" if v is sweep.get("chosen") else ""
        routing = f"{v['granularity']} routing, " if "granularity" in v else ""
        lines.append(row(f"{routing}p={v['top_p']}, retrieval {v['retrieval_fraction']:.0%}"
                         f"{mark}", v))
    return "\n".join(lines)

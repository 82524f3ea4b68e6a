"""A stage-2 model's weights moved part of the way back to its base (WiSE-FT, Wortsman et
al., 2022): base + t * (tuned - base), t in [0, 1].

Stage 2 fine-tunes every weight for the sparse mode; what it gains at long range it can cost
where the sparse model was already exact (README, "The converted model"). Interpolating the
weights keeps a share t of the fine-tune without training again: t = 1 is the stage-2 model,
t = 0 the base with the stage-2 model's sparse checkpoint.

    python -m rtpurbo_jax.interpolation runs/<run>/model --t 0.5 --out runs/<run>/model_t0.5

The result is exported like the stage-2 model (`export.export_model`), its rtpurbo.json
recording t and the tuned weights' fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from rtpurbo_jax.config import ConfigError
from rtpurbo_jax.export import ORIGIN_FILE, export_model
from rtpurbo_jax.model import Params

# rtpurbo.json fields that export_model writes itself.
_WRITTEN_BY_EXPORT = ("format", "design", "weights")


def interpolate(base: Params, tuned: Params, t: float) -> Params:
    """base + t * (tuned - base), leaf by leaf, in float32 (params of one structure)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    return jax.tree.map(lambda b, f: (np.asarray(b, np.float32)
                                      + t * (np.asarray(f, np.float32)
                                             - np.asarray(b, np.float32))), base, tuned)


def interpolate_model(model_dir: str | os.PathLike[str], t: float,
                      out: str | os.PathLike[str], *, base: str | None = None) -> Path:
    """Writes the interpolation of the stage-2 model at model_dir with its base to `out`.

    base: the base model's source for `rtpurbo_jax.load` (None: the embedded default model);
    its fingerprint must be the one the stage-2 model records.
    """
    from rtpurbo_jax.api import load

    origin_file = Path(model_dir) / ORIGIN_FILE
    if not origin_file.is_file():
        raise ConfigError(f"{model_dir} has no {ORIGIN_FILE}: give a stage-2 model directory "
                          "(train.py writes it to <run_dir>/model)")
    origin = json.loads(origin_file.read_text())
    tuned = load(model_dir)
    original = load(base, dense=True, with_tokenizer=False)
    if original.fingerprint != origin["base"]["fingerprint"]:
        raise ConfigError(f"{base or 'the default model'} is not the base of {model_dir} (its "
                          f"weights differ from {origin['base']['name']}'s): pass --base")
    params = interpolate(original.params, tuned.params, t)
    kept = {k: v for k, v in origin.items() if k not in _WRITTEN_BY_EXPORT}
    kept["interpolation"] = {"t": t, "tuned_fingerprint": origin["weights"]["fingerprint"]}
    return export_model(out, params, tuned.config, tuned.tokenizer, sparse=tuned.sparse,
                        indexer=tuned.indexer, origin=kept, dtype=origin["weights"]["dtype"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rtpurbo_jax.interpolation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a stage-2 model directory (<run_dir>/model)")
    parser.add_argument("--t", type=float, required=True,
                        help="the share of the fine-tune kept, in [0, 1]")
    parser.add_argument("--out", required=True, help="a new directory")
    parser.add_argument("--base", default=None,
                        help="the base model's source (default: the embedded default model)")
    args = parser.parse_args(argv)
    try:
        path = interpolate_model(args.model, args.t, args.out, base=args.base)
    except (OSError, ValueError) as err:  # bad paths, t, bases: one line
        parser.error(str(err))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

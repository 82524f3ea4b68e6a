"""What the command-line programs share: bad input ends in one line, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

# Set to 1 to see the full traceback of an input error.
TRACEBACK_ENV = "RTPURBO_TRACEBACK"


@contextlib.contextmanager
def one_line_errors(program: str) -> Iterator[None]:
    """Turns ValueError (bad configs, checkpoints, data) and OSError (missing files) raised
    inside into `<program>: error: <message>` on stderr and exit status 1."""
    try:
        yield
    except (ValueError, OSError) as err:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        sys.exit(f"{program}: error: {err} (set {TRACEBACK_ENV}=1 for the traceback)")


def resolve_config_name(argv: Sequence[str], configs_dir: Path) -> list[str]:
    """argv with `--config=NAME` (or `--config NAME`) pointing into configs_dir when NAME is no
    file but configs_dir/NAME is (`python train.py --config=llama_1m.py`). A `:argument`
    suffix (ml_collections' config arguments) is kept."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            head, value = "--config=", arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(out):
            head, value, i = "", out[i + 1], i + 1
        else:
            continue
        path, sep, extra = value.partition(":")
        if path and not Path(path).exists() and (configs_dir / path).is_file():
            out[i] = f"{head}{configs_dir / path}{sep}{extra}"
    return out

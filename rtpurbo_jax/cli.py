"""What the command-line programs share: bad input ends in one line, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

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

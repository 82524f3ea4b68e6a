"""Shape buckets: the lengths that `SparseModel` pads prompts (and rounds max_new_tokens) up to.

Every new array shape compiles `generate` / `forward` again (seconds to tens of seconds), so a
call pads its right-padded batch up to the smallest bucket that holds it; the true lengths
travel in `lengths`, which every attention path honours, so outputs do not change. Above the
largest bucket a call keeps its exact length. An empty ladder turns bucketing off.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The smallest bucket of the default ladder: shorter prompts all share one program, and one
# that a few dozen tokens of padding cost next to nothing.
SMALLEST_BUCKET = 64
# The default ladder's ratio between rungs: padding costs at most this factor in prefill work;
# each doubling of the context adds one program.
BUCKET_GROWTH = 2


def default_buckets(context: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Powers of BUCKET_GROWTH times `smallest` below `context`, then `context` itself."""
    ladder = []
    size = smallest
    while size < context:
        ladder.append(size)
        size *= BUCKET_GROWTH
    return (*ladder, context)


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """The ladder as a sorted tuple of distinct positive ints; raises ValueError otherwise."""
    ladder = tuple(sorted({int(b) for b in buckets}))
    if ladder and ladder[0] < 1:
        raise ValueError(f"buckets must be positive lengths, got {tuple(buckets)}")
    return ladder


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n; n itself when no bucket holds it (or there are none)."""
    return next((b for b in buckets if b >= n), n)


def generate_shape(prompt_len: int, max_new_tokens: int, buckets: tuple[int, ...],
                   context: int) -> tuple[int, int]:
    """(padded prompt width, new-token capacity) of a generate call: each rounded up to its
    bucket, then cut back so the cache (their sum) stays within `context`.

    The cut only bites near the end of the context: there the shapes follow the exact lengths
    again rather than make a cache longer than the model can use. Needs prompt_len +
    max_new_tokens <= context.
    """
    width = min(bucket(prompt_len, buckets), context - max_new_tokens)
    capacity = min(bucket(max_new_tokens, buckets), context - width)
    return width, capacity


def pad_columns(tokens: np.ndarray, width: int, pad_id: int = 0) -> np.ndarray:
    """tokens [batch, seq] -> [batch, width] (width >= seq), new columns pad_id."""
    return np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=pad_id)

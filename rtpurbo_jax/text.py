"""Long real text that needs no download: the Python standard library's own sources.

Every Python install ships them (`sysconfig`'s stdlib directory, top-level modules only, so no
site-packages). Files are split deterministically by name into "train" and "heldout" (every
file whose crc32 falls in the held-out tenth), so perplexity is measured on text the indexer
never saw. The set of files depends on the Python version; say which when quoting numbers.
"""

from __future__ import annotations

import functools
import sysconfig
import zlib
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 10
DOCUMENT_SEPARATOR = "\n\n"


def stdlib_files(split: str) -> list[Path]:
    """The split's top-level standard-library .py files, sorted by name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    held = [zlib.crc32(f.name.encode()) % HELDOUT_BUCKETS == 0 for f in files]
    return [f for f, h in zip(files, held, strict=True) if h == (split == "heldout")]


@functools.lru_cache(maxsize=8)
def text_tokens(tokenizer: Any, split: str) -> np.ndarray:
    """All of a split's files, tokenized and concatenated: [n_tokens] int32."""
    text = DOCUMENT_SEPARATOR.join(f.read_text(encoding="utf-8", errors="replace")
                                   for f in stdlib_files(split))
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)


def text_windows(tokens: np.ndarray, length: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n windows of `length` consecutive tokens at random offsets: [n, length] int32."""
    if len(tokens) < length:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than the {length} asked for")
    starts = rng.integers(0, len(tokens) - length + 1, n)
    return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)

"""Training data with Grain: long sequences of real text mixed with long-context tasks.

Every example is a pure function of (seed, example index): example i draws its own generator
from [seed, i], so the stream is deterministic, and resuming at step s is exactly slicing the
dataset at batch s (no iterator state to save).

Text comes from the files the user names (`.txt`, or `.jsonl` with a "text" field per line),
or, by default, from the Python standard library's sources (rtpurbo_jax.text, "train" split).
Task examples are a task prompt (rtpurbo_jax.tasks) followed by its correct completion, so the
teacher's attention on them is the attention of a model that is retrieving.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rtpurbo_jax.tasks import TASKS, make_sample
from rtpurbo_jax.text import DOCUMENT_SEPARATOR, text_tokens

# Tokens kept free after a task prompt for its completion (answers are a few tokens).
COMPLETION_ROOM = 16


class DataError(ValueError):
    """A data file is missing or malformed, or the data config is invalid."""


def read_documents(files: Sequence[str]) -> list[str]:
    """Documents of .txt files (one each) and .jsonl files (one per line's "text")."""
    docs = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number} is not valid JSON: {err}") from err
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f'{path}:{number} has no string field "text"')
                docs.append(record["text"])
        elif path.suffix == ".txt":
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
        else:
            raise DataError(f"data file {path}: expected .txt or .jsonl")
    return docs


def corpus_tokens(tokenizer: Any, files: Sequence[str]) -> np.ndarray:
    """The training text as one token stream: the user's files, or the stdlib sources."""
    if not files:
        return text_tokens(tokenizer, "train")
    text = DOCUMENT_SEPARATOR.join(read_documents(files))
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)


def make_example(index: int, *, tokens: np.ndarray, tokenizer: Any, seq_len: int, seed: int,
                 task_fraction: float, tasks: Sequence[str], stream: int | None = None,
                 min_task_len: int = 0) -> dict[str, np.ndarray]:
    """Example `index`: {"tokens": [seq_len] int32 right-padded, "length": int32,
    "answer_span": [2] int32}. answer_span is [start, end) of the positions whose next token is
    a task's answer ([0, 0] for text): stage 2 can weight them (distill.answer_weight).
    `stream` (None: stage 1's) gives another stage its own examples under the same seed.
    `min_task_len` > 0: a task sample is log-uniformly min_task_len..seq_len tokens long (as
    many samples per doubling of length) and text fills the rest of the sequence; 0: every task
    sample is seq_len long."""
    rng = np.random.default_rng([seed, index] if stream is None else [seed, stream, index])
    out = np.zeros((seq_len,), np.int32)
    answer_span = np.zeros((2,), np.int32)
    if tasks and rng.random() < task_fraction:
        task = tasks[int(rng.integers(len(tasks)))]
        task_len = seq_len
        if min_task_len:
            task_len = int(np.exp(rng.uniform(np.log(min_task_len), np.log(seq_len + 1))))
        sample = make_sample(task, task_len - COMPLETION_ROOM, tokenizer, rng)
        answer = tokenizer.encode(sample.completion, add_special_tokens=False)
        seq = np.concatenate([sample.prompt, np.asarray(answer[:COMPLETION_ROOM], np.int32)])
        # Position t predicts token t + 1: the answer's tokens are predicted from the last
        # prompt position on.
        answer_span[:] = (len(sample.prompt) - 1, len(seq) - 1)
        if min_task_len:
            start = int(rng.integers(0, len(tokens) - seq_len + 1))
            seq = np.concatenate([seq, tokens[start:start + seq_len - len(seq)]])
    else:
        start = int(rng.integers(0, len(tokens) - seq_len + 1))
        seq = tokens[start:start + seq_len]
    out[:len(seq)] = seq
    return {"tokens": out, "length": np.int32(len(seq)), "answer_span": answer_span}


def training_dataset(tokenizer: Any, data_config: Any, *, seq_len: int, batch_size: int,
                     steps: int, seed: int, stream: int | None = None,
                     min_task_len: int = 0) -> Any:
    """A grain.MapDataset of `steps` batches {"tokens": [batch, seq_len], "length": [batch],
    "answer_span": [batch, 2]} (`stream`, `min_task_len`, the answer span: see make_example)."""
    import grain

    tasks = tuple(data_config.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(f"unknown tasks {unknown}; tasks: {TASKS}")
    if not 0.0 <= data_config.task_fraction <= 1.0:
        raise DataError(f"task_fraction must be in [0, 1], got {data_config.task_fraction}")
    tokens = corpus_tokens(tokenizer, tuple(data_config.files))
    if len(tokens) < seq_len:
        raise DataError(f"the training text has {len(tokens)} tokens, fewer than seq_len "
                        f"{seq_len}")
    if min_task_len and not COMPLETION_ROOM < min_task_len <= seq_len:
        raise DataError(f"min_task_len must be 0 or in ({COMPLETION_ROOM}, seq_len {seq_len}], "
                        f"got {min_task_len}")
    for task in tasks if min_task_len else ():
        try:  # fails now, not steps into a run
            make_sample(task, min_task_len - COMPLETION_ROOM, tokenizer, np.random.default_rng(0))
        except ValueError as err:
            raise DataError(f"min_task_len {min_task_len}: {err}; raise it") from err

    def example(index: int) -> dict[str, np.ndarray]:
        return make_example(int(index), tokens=tokens, tokenizer=tokenizer, seq_len=seq_len,
                            seed=seed, task_fraction=data_config.task_fraction, tasks=tasks,
                            stream=stream, min_task_len=min_task_len)

    return grain.MapDataset.range(steps * batch_size).map(example).batch(batch_size)

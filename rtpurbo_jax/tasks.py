"""Long-context tasks over a real-text haystack: passkey, multi-key needle-in-a-haystack,
key-value retrieval and variable tracking.

Each sample is built in token space to an exact prompt length: instruction, haystack tokens
with the needles spliced in at random depths, then the question, which ends where the answer
should follow (completion style). The haystack is English prose that every Python install
ships: the language reference topics of the standard library's documentation (pydoc_data).
Everything is deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

TASKS = ("passkey", "niah_multikey", "kv_retrieval", "variable_tracking")
INSTRUCTION = ("Below is a long text with some important facts hidden inside. Read it and "
               "answer the question at the end.\n\n")
_NIAH_KEYS = ("apple", "river", "violin", "forest", "lantern", "marble", "comet", "harbor",
              "meadow", "falcon", "copper", "glacier")
_ANSWER_END = re.compile(r"[\s.,;:!?\"')\]]")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): tasks and training for tiny test models."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class Sample:
    """prompt: token ids [length]; needles: token spans [start, end) of the facts the answer
    depends on (distractor facts are in the prompt but not listed)."""

    task: str
    prompt: np.ndarray
    answer: str
    needles: tuple[tuple[int, int], ...]

    @property
    def completion(self) -> str:
        """The text a correct model writes right after the prompt."""
        return " " + self.answer


@functools.lru_cache(maxsize=1)
def haystack_text() -> str:
    """The language reference topics of the Python docs, as one long text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@functools.lru_cache(maxsize=4)
def _haystack_ids(tokenizer: Any) -> np.ndarray:
    return np.asarray(tokenizer.encode(haystack_text(), add_special_tokens=False), np.int32)


def _digits(rng: np.random.Generator, n: int) -> str:
    return str(rng.integers(10 ** (n - 1), 10**n))


def _facts(task: str, rng: np.random.Generator) -> tuple[list[str], str, str, list[int]]:
    """(needle sentences in order, question ending before the answer, answer, the indices of
    the needles the answer depends on)."""
    if task == "passkey":
        key = _digits(rng, 5)
        return ([f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"],
                "What is the pass key? The pass key is", key, [0])
    if task == "niah_multikey":
        keys = rng.choice(_NIAH_KEYS, 4, replace=False)
        values = [_digits(rng, 7) for _ in keys]
        needles = [f"\nOne of the special magic numbers for {k} is: {v}.\n"
                   for k, v in zip(keys, values, strict=True)]
        target = int(rng.integers(len(keys)))
        return (needles, f"What is the special magic number for {keys[target]}? The special "
                f"magic number for {keys[target]} is:", values[target], [target])
    if task == "kv_retrieval":
        keys = rng.choice(np.arange(1000, 10000), 6, replace=False)
        pairs = [(str(k), _digits(rng, 5)) for k in keys]
        target = int(rng.integers(len(pairs)))
        needles = [f"\nThe value of key {k} is {v}.\n" for k, v in pairs]
        return (needles, f"What is the value of key {pairs[target][0]}? The value of key "
                f"{pairs[target][0]} is", pairs[target][1], [target])
    if task == "variable_tracking":
        value = _digits(rng, 5)
        names = ["".join(rng.choice(list(string.ascii_uppercase), 4)) for _ in range(3)]
        needles = [f"\nVAR {names[0]} = {value}\n"]
        needles += [f"\nVAR {names[i + 1]} = VAR {names[i]}\n" for i in range(len(names) - 1)]
        return (needles, f"What number does VAR {names[-1]} hold? VAR {names[-1]} holds the "
                "number", value, list(range(len(needles))))
    raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")


def make_sample(task: str, length: int, tokenizer: Any, rng: np.random.Generator,
                prefix_ids: Sequence[int] = ()) -> Sample:
    """A prompt of exactly `length` tokens (prefix_ids, e.g. a BOS token, included)."""
    needles, question, answer, relevant = _facts(task, rng)
    enc = functools.partial(tokenizer.encode, add_special_tokens=False)
    head = list(prefix_ids) + enc(INSTRUCTION)
    tail = enc("\n\n" + question)
    needle_ids = [enc(n) for n in needles]
    filler = length - len(head) - len(tail) - sum(map(len, needle_ids))
    if filler < len(needles):
        raise ValueError(f"length {length} is too short for a {task} sample "
                         f"(needs more than {length - filler + len(needles)} tokens)")
    hay = _haystack_ids(tokenizer)
    start = int(rng.integers(0, max(1, len(hay) - filler)))
    filler_ids = np.resize(hay[start:start + filler], filler)  # wraps if the text is short
    # Needles at sorted random depths, so chains (variable tracking) read in order.
    cuts = np.sort(rng.choice(np.arange(filler + 1), len(needles), replace=False))
    pieces, spans, pos, prev = [np.asarray(head, np.int32)], [], len(head), 0
    for cut, ids in zip(cuts, needle_ids, strict=True):
        pieces.append(filler_ids[prev:cut])
        pos += cut - prev
        pieces.append(np.asarray(ids, np.int32))
        spans.append((int(pos), int(pos) + len(ids)))
        pos += len(ids)
        prev = cut
    pieces += [filler_ids[prev:], np.asarray(tail, np.int32)]
    prompt = np.concatenate(pieces).astype(np.int32)
    assert len(prompt) == length
    return Sample(task, prompt, answer, tuple(spans[i] for i in relevant))


def make_samples(task: str, length: int, n: int, tokenizer: Any, seed: int,
                 prefix_ids: Sequence[int] = ()) -> list[Sample]:
    """n samples of one task and length; the same seed gives the same samples."""
    rng = np.random.default_rng([seed, TASKS.index(task), length])
    return [make_sample(task, length, tokenizer, rng, prefix_ids) for _ in range(n)]


def extract_answer(generated: str) -> str:
    """The first word of a completion, without surrounding quotes and punctuation."""
    text = generated.strip().lstrip("\"'")
    match = _ANSWER_END.search(text)
    return text[: match.start()] if match else text


def is_correct(generated: str, answer: str) -> bool:
    """Exact match of the completion's first word with the answer."""
    return extract_answer(generated) == answer

"""The public model object and `load()`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax import generate as gen
from rtpurbo_jax.assets import DEFAULT_MODEL_NAME, default_model_path
from rtpurbo_jax.buckets import bucket, check_buckets, default_buckets, generate_shape, pad_columns
from rtpurbo_jax.checkpoint import (
    CONFIG_FILE,
    check_base,
    export_safetensors,
    load_sparse,
    save_sparse,
)
from rtpurbo_jax.compiles import use_compilation_cache
from rtpurbo_jax.config import ConfigError, ModelConfig, SparseConfig
from rtpurbo_jax.export import ORIGIN_FILE
from rtpurbo_jax.hf import load_checkpoint
from rtpurbo_jax.kernels import check_backend
from rtpurbo_jax.model import Params, init_params


def right_pad(
    input_ids: Any, lengths: Any = None, attention_mask: Any = None, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Normalises a batch to right padding: (tokens [batch, seq] int32, lengths [batch] int32).

    input_ids: a [batch, seq] or [seq] array, or a list of token lists of different lengths.
    lengths: valid tokens per row of right-padded input_ids. attention_mask: a Hugging Face style
    0/1 mask (left or right padding); its ones must be contiguous in each row.
    """
    if lengths is not None and attention_mask is not None:
        raise ValueError("give lengths or attention_mask, not both")
    if isinstance(input_ids, Sequence) and input_ids and isinstance(input_ids[0], Sequence):
        rows = [np.asarray(r, np.int32) for r in input_ids]
        lengths = np.array([len(r) for r in rows], np.int32)
        tokens = np.full((len(rows), max(lengths)), pad_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
    else:
        tokens = np.asarray(input_ids, np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tokens.shape}")
    if attention_mask is not None:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {tokens.shape}")
        lengths = mask.sum(axis=1).astype(np.int32)
        starts = np.argmax(mask, axis=1)
        runs = zip(starts, lengths, strict=True)
        if not all(mask[i, s : s + n].all() for i, (s, n) in enumerate(runs)):
            raise ValueError("attention_mask must mark one contiguous run of tokens per row")
        tokens = np.stack([np.roll(row, -s) for row, s in zip(tokens, starts, strict=True)])
    if lengths is None:
        lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int32)
    lengths = np.asarray(lengths, np.int32)
    in_range = (lengths >= 1).all() and (lengths <= tokens.shape[1]).all()
    if lengths.shape != (tokens.shape[0],) or not in_range:
        raise ValueError(f"lengths must be [batch] in 1..{tokens.shape[1]}, got {lengths}")
    return tokens, lengths


class SparseModel:
    """A loaded model: dense, or RTPurbo-sparse once a sparse checkpoint is attached.

    Attributes: config (ModelConfig), params (a plain pytree), tokenizer (transformers tokenizer
    or None), fingerprint (of the base weights), backend (`kernels.BACKENDS`),
    sparse (SparseConfig or None: dense), indexer (the indexer params pytree or None), origin
    (a stage-2 model's rtpurbo.json: the base it was fine-tuned from, stages, steps; else None)
    and buckets (`rtpurbo_jax.buckets`: the sorted lengths that prompts are padded up to and
    max_new_tokens rounded up to, so that a call whose buckets were seen compiles nothing; None
    gives `default_buckets` of the context, () turns bucketing off).
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Params,
        tokenizer: Any = None,
        fingerprint: str = "",
        backend: str = "auto",
        sparse: SparseConfig | None = None,
        indexer: dict[str, Any] | None = None,
        origin: dict[str, Any] | None = None,
        buckets: Sequence[int] | None = None,
    ) -> None:
        check_backend(backend)
        if sparse is not None:
            sparse.check_model(config)
            if sparse.scorer == "indexer" and indexer is None:
                raise ConfigError("a sparse model with the 'indexer' scorer needs indexer params")
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.backend = backend
        self.sparse = sparse
        self.indexer = indexer
        self.origin = origin
        self.buckets = check_buckets(
            default_buckets(config.max_position_embeddings) if buckets is None else buckets)

    def with_sparse(
        self, sparse: SparseConfig | None, indexer: dict[str, Any] | None = None
    ) -> SparseModel:
        """The same base model with another sparse configuration (None: dense)."""
        indexer = self.indexer if indexer is None else indexer
        return SparseModel(self.config, self.params, self.tokenizer, self.fingerprint,
                           self.backend, sparse, indexer if sparse is not None else None,
                           origin=self.origin, buckets=self.buckets)

    def save_sparse(self, path: str | os.PathLike[str], safetensors: bool = False) -> None:
        """Writes the sparse checkpoint (Orbax, or safetensors + JSON for other frameworks)."""
        if self.sparse is None:
            raise ValueError("this model is dense: there is no sparse checkpoint to save")
        write = export_safetensors if safetensors else save_sparse
        write(path, self.sparse, self.indexer, self.config.name, self.fingerprint)

    def _check_length(self, total: int) -> None:
        limit = self.config.max_position_embeddings
        if total > limit:
            raise ValueError(f"sequence of {total} tokens is longer than the model's context "
                             f"({limit} tokens)")

    def __call__(
        self, input_ids: Any, lengths: Any = None, attention_mask: Any = None,
        prefill_chunk: int | None = None,
    ) -> jax.Array:
        """Logits [batch, seq, vocab] (float32) of a right-padded batch; see `right_pad`.

        With attention_mask the rows are re-aligned to start at position 0, so logit i of a row is
        that of its i-th real token. The batch runs padded to its bucket (`buckets`).
        prefill_chunk: run the batch in chunks of that many query tokens against a growing KV
        cache (`generate.prefill_chunked`: memory bounded by the chunk); None: in one pass.
        """
        tokens, lengths = right_pad(input_ids, lengths, attention_mask)
        seq = tokens.shape[1]
        self._check_length(seq)
        width = min(bucket(seq, self.buckets), self.config.max_position_embeddings)
        args = (self.params, jnp.asarray(pad_columns(tokens, width)), jnp.asarray(lengths),
                self.config, self.backend, self.sparse, self.indexer)
        if prefill_chunk is None:
            logits, _ = gen.forward(*args)
        else:
            logits, _ = gen.forward_chunked(*args, chunk=prefill_chunk)
        return logits if width == seq else logits[:, :seq]

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        *,
        lengths: Any = None,
        attention_mask: Any = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        prefill_chunk: int | None = None,
    ) -> np.ndarray:
        """New tokens [batch, max_new_tokens]: per row up to and including EOS, then pad_token_id.

        Greedy by default; temperature > 0 samples (optionally top-k / top-p) with `seed`.
        eos_token_id defaults to the config's; pass () to never stop early. The batch runs with
        its prompt padded to its bucket and room for max_new_tokens rounded up to its bucket
        (`buckets`); the steps themselves stop at max_new_tokens. prefill_chunk: run the prompt
        in chunks of that many query tokens (`generate.prefill_chunked`: memory bounded by the
        chunk and the cache, for long prompts); None: in one pass.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens, lengths = right_pad(input_ids, lengths, attention_mask)
        prompt_len = int(lengths.max())  # columns past every row's length are padding
        self._check_length(prompt_len + max_new_tokens)
        width, capacity = generate_shape(prompt_len, max_new_tokens, self.buckets,
                                         self.config.max_position_embeddings)
        tokens = pad_columns(tokens[:, :prompt_len], width)
        if eos_token_id is None:
            eos = self.config.eos_token_ids
        else:
            eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        sampling = gen.SamplingConfig(temperature, top_k, top_p)
        out, _ = gen.generate(
            self.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
            np.int32(max_new_tokens), config=self.config, max_new_tokens=capacity,
            sampling=sampling, eos_ids=eos, pad_id=pad, backend=self.backend,
            sparse=self.sparse, indexer=self.indexer, prefill_chunk=prefill_chunk,
        )
        return np.asarray(out)[:, :max_new_tokens]


def load(
    source: str | os.PathLike[str] | None = None,
    *,
    sparse: str | os.PathLike[str] | None = None,
    dense: bool = False,
    dtype: Any = jnp.float32,
    backend: str = "auto",
    with_tokenizer: bool = True,
    buckets: Sequence[int] | None = None,
    compilation_cache: bool = False,
) -> SparseModel:
    """Loads a model, dense or (with `sparse`, a sparse checkpoint directory) RTPurbo-sparse.

    source: a Hugging Face hub id ("org/name"), a local directory with config.json and
    *.safetensors (sharded with an index too), a .gguf file, or None for the embedded default
    model (SmolLM2-135M-Instruct, fetched once into the cache directory). A local directory that
    also holds a sparse checkpoint (sparse.json, as `export_model` writes one) loads sparse with
    it unless `sparse` names another checkpoint or `dense=True` asks for the weights alone.
    A sparse checkpoint made for other weights is refused; one of a fine-tuned (stage-2) model
    given with the model it was fine-tuned from is refused with a pointer to the fine-tuned one.
    buckets: see `SparseModel` (None: the default ladder, (): off).
    compilation_cache: turn on JAX's persistent compilation cache in <cache dir>/xla unless the
    program set one (`compiles.use_compilation_cache`): a new process then loads what an earlier
    one compiled for the same shapes instead of compiling it again. Off by default: it is a
    process-wide JAX setting.
    """
    check_backend(backend)
    if compilation_cache:
        use_compilation_cache()
    if dense and sparse is not None:
        raise ValueError("give sparse= or dense=True, not both")
    name = None
    if source is None:
        source, name = default_model_path(), DEFAULT_MODEL_NAME
    elif sparse is None and not dense and (Path(source).expanduser() / CONFIG_FILE).is_file():
        sparse = Path(source).expanduser()
    config, params, tokenizer, fingerprint = load_checkpoint(source, dtype, with_tokenizer, name)
    origin_file = Path(source).expanduser() / ORIGIN_FILE
    origin = json.loads(origin_file.read_text()) if origin_file.is_file() else None
    model = SparseModel(config, params, tokenizer, fingerprint, backend, origin=origin,
                        buckets=buckets)
    if sparse is None:
        return model
    sparse_config, indexer, base = load_sparse(sparse)
    check_base(sparse, base, fingerprint, config.name)
    return model.with_sparse(sparse_config, indexer)


# The name of a model built with random weights (source "random"): it has no tokenizer.
RANDOM_NAME = "random"

# ModelConfig fields that a config file's `model.arch` pins down, checked against the checkpoint.
_ARCH_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "head_dim", "rope_theta", "max_position_embeddings",
                "tie_word_embeddings")


def load_from_config(model_config: Any, *, backend: str = "auto") -> SparseModel:
    """Loads the model a config file's `model` section describes.

    model_config: source (hub id, directory, .gguf, None for the default model, or "random" for
    random weights of shape `arch`), dtype, arch (Hugging Face config keys), seed (for "random").
    A checkpoint whose architecture differs from `arch` is refused, naming the fields.
    """
    arch = ModelConfig.from_hf(dict(model_config.arch), name=RANDOM_NAME)
    dtype = jnp.dtype(model_config.dtype)
    if model_config.source == "random":
        params = init_params(arch, jax.random.key(model_config.get("seed", 0)), dtype)
        return SparseModel(arch, params, backend=backend)
    model = load(model_config.source, dtype=dtype, backend=backend)
    check_arch(arch, model.config)
    return model


def check_arch(expected: ModelConfig, loaded: ModelConfig) -> None:
    """Raises ConfigError naming every architecture field where the checkpoint differs."""
    diffs = [f"{f}: config {getattr(expected, f)!r}, checkpoint {getattr(loaded, f)!r}"
             for f in _ARCH_FIELDS if getattr(expected, f) != getattr(loaded, f)]
    if diffs:
        raise ConfigError(f"checkpoint {loaded.name} does not have the architecture its config "
                          "names:\n  " + "\n  ".join(diffs))

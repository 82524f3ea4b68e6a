"""The config files load, and their architectures are what they claim."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtpurbo_jax.api import check_arch, load_from_config
from rtpurbo_jax.config import ConfigError, ModelConfig

CONFIGS = ("tiny", "smollm2_135m", "smollm2_135m_paper", "llama_1m")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.name == name
    ModelConfig.from_hf(config.model.arch.to_dict())


def test_tiny_builds_a_random_model():
    config = importlib.import_module("configs.tiny").get_config()
    model = load_from_config(config.model)
    assert model.config.num_layers == config.model.arch.num_hidden_layers
    assert model([[1, 2, 3]]).shape == (1, 3, config.model.arch.vocab_size)


def test_default_config_matches_default_model(default_model):
    arch = importlib.import_module("configs.smollm2_135m").get_config().model.arch
    check_arch(ModelConfig.from_hf(arch.to_dict()), default_model.config)


def test_llama_1m_shapes():
    arch = ModelConfig.from_hf(importlib.import_module("configs.llama_1m").get_config()
                               .model.arch.to_dict())
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (32, 32, 8, 128)
    assert arch.max_position_embeddings == 1 << 20
    assert arch.rope_theta == 3580165449.0


def test_architecture_mismatch_is_refused(default_model):
    arch = importlib.import_module("configs.llama_1m").get_config().model.arch
    with pytest.raises(ConfigError, match="num_layers: config 32, checkpoint 30"):
        check_arch(ModelConfig.from_hf(arch.to_dict()), default_model.config)


def test_config_names_resolve_from_the_configs_directory(tmp_path):
    from rtpurbo_jax.cli import resolve_config_name

    configs = Path(__file__).resolve().parents[1] / "configs"
    argv = ["train.py", "--config=llama_1m.py", "--config.train.steps=3"]
    assert resolve_config_name(argv, configs) == [
        "train.py", f"--config={configs / 'llama_1m.py'}", "--config.train.steps=3"]
    assert resolve_config_name(["eval.py", "--config", "tiny.py:x"], configs) == [
        "eval.py", "--config", f"{configs / 'tiny.py'}:x"]
    # An existing path wins; an unknown name is left for the flag parser to refuse.
    mine = tmp_path / "own" / "tiny.py"
    mine.parent.mkdir()
    mine.write_text("")
    for arg in (f"--config={mine}", "--config=nope.py"):
        assert resolve_config_name(["t", arg], configs) == ["t", arg]
    # The programs resolve it: eval.py reaches its own check of the checkpoint.
    repo = configs.parent
    result = subprocess.run(
        [sys.executable, str(repo / "eval.py"), "--config=tiny.py",
         f"--config.eval.sparse={tmp_path / 'none'}"], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)})
    assert result.returncode != 0
    assert "no sparse checkpoint at" in result.stderr.strip().splitlines()[-1]


# llama_1m's recipe at random weights, its shapes shrunk to run in seconds on a CPU (the GPU run
# keeps the Llama-3-8B shapes; README, "Long context").
TINY_LLAMA = [
    "--config.model.source=random", "--config.model.arch.hidden_size=64",
    "--config.model.arch.intermediate_size=128", "--config.model.arch.num_hidden_layers=2",
    "--config.model.arch.num_attention_heads=4", "--config.model.arch.num_key_value_heads=2",
    "--config.model.arch.head_dim=16", "--config.model.arch.vocab_size=512",
    "--config.schedule=full", "--config.train.seq_len=512", "--config.train.steps=2",
    "--config.train.warmup_steps=1", "--config.heads.length=512", "--config.heads.rule=fraction",
    "--config.heads.rule_value=0.25", "--config.sparse.window=128"]


@pytest.mark.parametrize("design", ["indexer", "paper"])
def test_llama_1m_trains_end_to_end_at_random(tmp_path, design):
    """`python train.py --config=llama_1m.py` with random weights (no tokenizer: the tasks and
    text are bytes) profiles heads, trains the indexer and writes a sparse checkpoint of the
    design asked for."""
    from rtpurbo_jax.checkpoint import load_sparse

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(repo / "train.py"), "--config=llama_1m.py", *TINY_LLAMA,
         f"--config.sparse.design={design}", f"--config.run_dir={run}"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["retrieval_fraction"] == 0.25
    sparse, indexer, base = load_sparse(run / "sparse")
    assert sparse.design == design and sparse.num_layers == 2
    assert base["name"] == "random"


def test_a_tokenizerless_checkpoint_is_not_given_bytes():
    """Bytes stand in for the tokenizer of random weights only: a real checkpoint loaded
    without its tokenizer (vocabulary not 256) is refused, not fed meaningless ids."""
    from rtpurbo_jax.api import RANDOM_NAME
    from rtpurbo_jax.convert import task_tokenizer
    from rtpurbo_jax.tasks import ByteTokenizer

    config = importlib.import_module("configs.tiny").get_config()
    config.model.arch.vocab_size = 512
    model = load_from_config(config.model)
    assert model.config.name == RANDOM_NAME
    assert isinstance(task_tokenizer(model), ByteTokenizer)
    model.config = dataclasses.replace(model.config, name="SomeModel")
    with pytest.raises(ValueError, match="SomeModel has no tokenizer"):
        task_tokenizer(model)

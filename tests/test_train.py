"""Training: the loss falls, a killed run resumes exactly, a 4-device mesh matches one device,
and bad configs or data fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from rtpurbo_jax.api import SparseModel, load_from_config
from rtpurbo_jax.config import SparseConfig
from rtpurbo_jax.convert import (
    initial_indexer,
    retrieval_mask,
    run_conversion,
    stage1_recorded_minutes,
)
from rtpurbo_jax.data import DataError, make_example, read_documents, training_dataset
from rtpurbo_jax.sharding import make_mesh
from rtpurbo_jax.tasks import ByteTokenizer
from rtpurbo_jax.training import run_training

REPO = Path(__file__).resolve().parents[1]
MASK = ((True, False), (False, False))


def _setup(steps: int = 6):
    config = tiny.get_config()
    config.train.steps = steps
    model = load_from_config(config.model)
    # Larger weights than the default init, so attention is peaked and there is a lot to learn.
    model = SparseModel(model.config, jax.tree.map(lambda x: 4.0 * x, model.params))
    sparse = SparseConfig(MASK, **config.sparse.to_dict())
    dataset = training_dataset(ByteTokenizer(), config.data, seq_len=config.train.seq_len,
                               batch_size=config.train.batch_size, steps=steps, seed=0)
    indexer = initial_indexer(model, sparse, np.stack([b["tokens"][0] for b in dataset[:2]]))
    return config, model, sparse, dataset, indexer


def _train(config, model, sparse, dataset, indexer, run_dir):
    return run_training(config=model.config, sparse=sparse, params=model.params,
                        indexer=indexer, dataset=dataset, train=config.train, run_dir=run_dir,
                        mesh=make_mesh(-1, 1), backend="reference", progress=False)


def test_loss_falls_on_repeated_batch(tmp_path):
    config, model, sparse, dataset, indexer = _setup(steps=10)
    config.train.update(learning_rate=3e-2, warmup_steps=1, checkpoint_every=100)
    repeated = [dataset[0]] * config.train.steps
    # From small random weights (the SVD init of a random model is already near its optimum).
    keys = iter(jax.random.split(jax.random.key(0), 8))
    scrambled = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), indexer)
    _, history = _train(config, model, sparse, repeated, scrambled, tmp_path)
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.8 * losses[0]


def test_resume_after_kill_is_exact(tmp_path):
    config, model, sparse, dataset, indexer = _setup(steps=6)
    _, full = _train(config, model, sparse, dataset, indexer, tmp_path / "a")
    # "Killed" after step 4: the data ran out there, the checkpoint of step 4 is on disk.
    _train(config, model, sparse, dataset[:4], indexer, tmp_path / "b")
    steps = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps[-1] == 4
    # A save of step 6 that died half way: Orbax's temporary directory with junk in it.
    partial = tmp_path / "b" / "checkpoints" / "6.orbax-checkpoint-tmp-0"
    partial.mkdir()
    (partial / "junk").write_text("interrupted")
    final, resumed = _train(config, model, sparse, dataset, indexer, tmp_path / "b")
    assert [h["step"] for h in resumed] == [5, 6]
    for a, b in zip(full[4:], resumed, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]


def test_four_device_mesh_matches_one_device():
    script = textwrap.dedent("""
        import json, numpy as np, jax, jax.numpy as jnp
        from configs import tiny
        from rtpurbo_jax.api import load_from_config
        from rtpurbo_jax.config import SparseConfig
        from rtpurbo_jax.data import training_dataset
        from rtpurbo_jax.indexer import init_indexer
        from rtpurbo_jax.sharding import make_mesh
        from rtpurbo_jax.tasks import ByteTokenizer
        from rtpurbo_jax.training import make_optimizer, make_train_step
        config = tiny.get_config()
        config.train.batch_size = 4
        model = load_from_config(config.model)
        sparse = SparseConfig(((True, False), (False, False)), **config.sparse.to_dict())
        rng = np.random.default_rng(0)
        queries = [rng.normal(size=(64, 4, 16)) for _ in range(2)]
        indexer = init_indexer(queries, model.config, sparse)
        batch = training_dataset(ByteTokenizer(), config.data, seq_len=256, batch_size=4,
                                 steps=1, seed=0)[0]
        out = {}
        for name, (data, fsdp) in {"one": (1, 1), "four": (2, 2)}.items():
            devices = jax.devices()[: data * fsdp]
            mesh = jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))
            opt = make_optimizer(config.train)
            step = make_train_step(model.config, sparse, config.train, "reference", opt, mesh,
                                   model.params)
            idx = jax.tree.map(jnp.array, indexer)
            _, _, metrics = step(idx, opt.init(idx), model.params, jnp.asarray(batch["tokens"]),
                                 jnp.asarray(batch["length"]))
            out[name] = {k: float(v) for k, v in metrics.items()}
        print(json.dumps(out))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=REPO, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["one"]["loss"] == pytest.approx(out["four"]["loss"], rel=1e-5)
    assert out["one"]["grad_norm"] == pytest.approx(out["four"]["grad_norm"], rel=1e-4)


def test_whole_conversion_writes_its_files(tmp_path):
    config = tiny.get_config()
    config.train.steps = 2
    summary = run_conversion(config, tmp_path)
    for name in ("heads.json", "heads.png", "metrics.jsonl", "sparse/sparse.json",
                 "sparse_safetensors/indexer.safetensors"):
        assert (tmp_path / name).exists(), name
    assert summary["steps"] == 2 and summary["retrieval_fraction"] == 0.25


def test_paper_design_conversion(tmp_path):
    """The paper design end to end on the tiny model: needle calibration per query head, the
    pre-RoPE indexer of each retrieval head trained on the whole attention distribution, and a
    checkpoint that loads as the paper design and generates."""
    from rtpurbo_jax.checkpoint import load_sparse

    config = tiny.get_config()
    config.sparse.update(design="paper", window=64, sink_blocks=1, local_blocks=1)
    config.heads.update(method="needle", rule="fraction", rule_value=0.25, length=256,
                        needle_tokens=16)
    config.train.update(steps=2, loss_level="token", teacher_top_p=1.0)
    summary = run_conversion(config, tmp_path)
    sparse, indexer, _ = load_sparse(tmp_path / "sparse")
    assert sparse.design == "paper" and summary["retrieval_fraction"] == 0.25
    heads = json.loads((tmp_path / "heads.json").read_text())
    assert np.asarray(heads["score"]).shape == (2, 4)  # per query head
    assert heads["calibration_seconds"] > 0
    for name in ("heads.png", "heads_layers.png", "metrics.jsonl"):
        assert (tmp_path / name).exists(), name
    for layer in range(2):
        n = len(sparse.retrieval_heads(layer))
        assert (indexer["layers"][layer]["wq"].shape[:2] if n else (0, 1)) == (n, 1)
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses))
    model = load_from_config(config.model).with_sparse(sparse, indexer)
    assert model.generate([[5, 6, 7, 8] * 20], 3, eos_token_id=()).shape == (1, 3)


def test_bad_configs_and_data(tmp_path):
    config = tiny.get_config()
    model = load_from_config(config.model)
    config.heads.mask_file = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        retrieval_mask(model, config.heads, 0, tmp_path)
    config.heads.mask_file = ""
    config.heads.rule = "vibes"
    with pytest.raises(ValueError, match="heads.rule"):
        retrieval_mask(model, config.heads, 0, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_documents([str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_documents([str(bad)])
    config.data.tasks = ("juggling",)
    with pytest.raises(DataError, match="unknown tasks"):
        training_dataset(ByteTokenizer(), config.data, seq_len=256, batch_size=1, steps=1,
                         seed=0)
    with pytest.raises(ValueError, match="needs 8 devices"):
        make_mesh(8, 1)


def test_examples_are_deterministic_and_fit():
    tokens = np.arange(5000, dtype=np.int32) % 200
    a = make_example(3, tokens=tokens, tokenizer=ByteTokenizer(), seq_len=300, seed=1,
                     task_fraction=0.5, tasks=("passkey",))
    b = make_example(3, tokens=tokens, tokenizer=ByteTokenizer(), seq_len=300, seed=1,
                     task_fraction=0.5, tasks=("passkey",))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert a["tokens"].shape == (300,) and 0 < a["length"] <= 300


@pytest.mark.parametrize("min_task_len", [0, 300])
def test_answer_span_marks_the_positions_that_predict_the_answer(min_task_len):
    tokens = np.arange(5000, dtype=np.int32) % 90 + 32
    tokenizer = ByteTokenizer()
    kinds = set()
    for index in range(12):
        example = make_example(index, tokens=tokens, tokenizer=tokenizer, seq_len=600, seed=1,
                               task_fraction=0.5, tasks=("passkey",), min_task_len=min_task_len)
        start, end = example["answer_span"]
        kinds.add(bool(end))
        if not end:  # text: no answer
            assert start == 0
            continue
        text = tokenizer.decode(example["tokens"][start + 1:end + 1])
        prompt = tokenizer.decode(example["tokens"][:start + 1])
        key = prompt.split("The pass key is ")[1][:5]  # the first needle holds the answer
        assert text == " " + key and prompt.endswith("The pass key is")
    assert kinds == {True, False}


def test_task_samples_of_many_lengths_are_followed_by_text():
    tokens = np.arange(5000, dtype=np.int32) % 90 + 32
    tokenizer = ByteTokenizer()
    ends = []
    for index in range(40):
        example = make_example(index, tokens=tokens, tokenizer=tokenizer, seq_len=2400, seed=1,
                               task_fraction=1.0, tasks=("passkey",), min_task_len=300)
        assert example["length"] == 2400  # text fills what the task leaves
        text = tokenizer.decode(example["tokens"].tolist())
        question = "What is the pass key? The pass key is "
        end = text.index(question) + len(question) + 5  # the answer's 5 digits
        assert text[end - 5:end].isdigit()
        ends.append(end)
    # Log-uniform over 300..2400: about a third of the samples in each doubling of length.
    ends = np.asarray(ends)
    assert ends.min() >= 300 - 16 and ends.max() <= 2400
    for low, high in ((300, 600), (600, 1200), (1200, 2400)):
        assert 5 <= np.sum((ends >= low) & (ends < high)) <= 25


@pytest.mark.parametrize("min_task_len", [1, 40, 257])
def test_a_task_length_that_cannot_be_made_is_refused(min_task_len):
    config = tiny.get_config()  # seq_len 256: 1 is too short for the room, 40 for a sample
    with pytest.raises(DataError, match="min_task_len"):
        training_dataset(ByteTokenizer(), config.data, seq_len=config.train.seq_len,
                         batch_size=1, steps=1, seed=0, min_task_len=min_task_len)


def test_stage1_minutes_count_every_process(tmp_path):
    """A resumed stage 1's minutes are the calibration's plus every step's, whichever process
    ran them."""
    (tmp_path / "heads.json").write_text(json.dumps({"calibration_seconds": 30.0}))
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": 1.0, "seconds": s}) + "\n"
                for i, s in enumerate((10.0, 5.0, 15.0))))
    assert stage1_recorded_minutes(tmp_path) == pytest.approx(1.0)
    (tmp_path / "heads.json").unlink()  # a mask from heads.mask_file: no calibration here
    assert stage1_recorded_minutes(tmp_path) == pytest.approx(0.5)

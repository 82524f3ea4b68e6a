"""Stage 2 (self-distillation of the weights in sparse mode): zero loss when nothing is sparse,
the loss falls (full fine-tune and LoRA), fresh adapters change nothing, the cached teacher
equals the live one, a killed run resumes identically, a 4-device mesh matches one device, and
bad configs fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rtpurbo_jax import stage2
from rtpurbo_jax.config import ConfigError, SparseConfig
from rtpurbo_jax.convert import check_stages
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.lora import init_lora
from rtpurbo_jax.sharding import make_mesh
from tests.tiny import TINY, tiny_model

REPO = Path(__file__).resolve().parents[1]
SEQ = 96
# The tiny model's paper design: 4 query heads in 2 KV groups per layer.
SPARSE_HEADS = ((True, True, False, False), (False,) * 4)
ALL_HEADS = ((True,) * 4, (True,) * 4)


def _paper(mask, **kw) -> SparseConfig:
    return SparseConfig(mask, design="paper", group_size=TINY.group_size, rank=4, block_q=16,
                        block_k=16, sink_tokens=4, window=16, local_blocks=1, **kw)


def _indexer(sparse: SparseConfig):
    rng = np.random.default_rng(0)
    return init_indexer([rng.normal(size=(64, TINY.num_heads, TINY.head_dim))
                         for _ in range(TINY.num_layers)], TINY, sparse)


def _batch(rows: int = 2):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, TINY.vocab_size, (rows, SEQ)).astype(np.int32)
    lengths = np.asarray([SEQ, 70, 50, 96][:rows], np.int32)
    return tokens, lengths


def _distill(**overrides):
    distill = tiny.get_config().distill
    distill.update({**dict(steps=6, seq_len=SEQ, batch_size=2, learning_rate=3e-3,
                           warmup_steps=1, compute_dtype="float32", checkpoint_every=2),
                    **overrides})
    return distill


def _spec(**overrides) -> stage2.Stage2Spec:
    return stage2.Stage2Spec(**{"compute_dtype": "float32", "backend": "reference",
                                **overrides})


def _loss(trainable, teacher, sparse, spec, cached=None):
    tokens, lengths = _batch()
    loss = jax.jit(stage2.stage2_loss, static_argnames=("config", "sparse", "spec"))
    spans = jnp.zeros((len(lengths), 2), jnp.int32)
    return loss(trainable, teacher, jnp.asarray(tokens), jnp.asarray(lengths), spans, cached,
                config=TINY, sparse=sparse, indexer=_indexer(sparse), spec=spec)


@pytest.mark.parametrize("loss", ["top_k", "full"])
def test_loss_is_zero_when_every_head_is_retrieval_at_p_1(loss):
    teacher = tiny_model().params
    dense = _paper(ALL_HEADS, top_p=1.0)
    assert float(_loss(teacher, teacher, dense, _spec(loss=loss))) < 1e-6
    assert float(_loss(teacher, teacher, _paper(SPARSE_HEADS, top_p=0.5), _spec(loss=loss))) > 1e-3


def test_fresh_adapters_change_nothing():
    teacher = tiny_model().params
    adapters = init_lora(TINY, 4, ("wq", "wv", "w_down"), jax.random.key(0))
    spec = _spec(lora_rank=4)
    merged = stage2.student_params(adapters, teacher, spec)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(teacher), strict=True):
        np.testing.assert_array_equal(a, b)
    sparse = _paper(SPARSE_HEADS, top_p=0.5)
    # Two programs (one adds the zero deltas), so equal up to float rounding.
    assert float(_loss(adapters, teacher, sparse, spec)) == pytest.approx(
        float(_loss(teacher, teacher, sparse, _spec())), rel=1e-6)


@pytest.mark.parametrize("loss", ["top_k", "full"])
def test_dense_anchor_adds_the_dense_students_kl(loss):
    teacher = tiny_model().params
    # Moved weights, so that the dense student differs from the teacher.
    leaves, tree = jax.tree.flatten(teacher)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    moved = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys, strict=True)])
    sparse = _paper(SPARSE_HEADS, top_p=0.5)
    plain = float(_loss(moved, teacher, sparse, _spec(loss=loss)))
    anchored = float(_loss(moved, teacher, sparse, _spec(loss=loss, dense_anchor=0.5)))
    # The dense student's KL alone: every head a retrieval head at p = 1 is dense attention.
    dense = float(_loss(moved, teacher, _paper(ALL_HEADS, top_p=1.0), _spec(loss=loss)))
    assert dense > 1e-3
    assert anchored == pytest.approx(plain + 0.5 * dense, rel=1e-4)
    # At the teacher's weights the anchor adds nothing.
    assert float(_loss(teacher, teacher, sparse, _spec(loss=loss, dense_anchor=0.5))) == (
        pytest.approx(float(_loss(teacher, teacher, sparse, _spec(loss=loss))), rel=1e-6))


def test_cached_teacher_equals_live_and_is_reused(tmp_path):
    teacher = tiny_model().params
    sparse, spec = _paper(SPARSE_HEADS, top_p=0.5), _spec()
    tokens, lengths = _batch()
    cache = stage2.TeacherCache(tmp_path, teacher, TINY, spec)
    values, ids = cache(3, tokens, lengths)
    assert values.shape == ids.shape == (2, SEQ, spec.top_k) and (tmp_path / "3.npz").exists()
    live = _loss(teacher, teacher, sparse, spec)
    assert float(_loss(teacher, teacher, sparse, spec, (values, ids))) == pytest.approx(
        float(live), rel=1e-6)
    cache.fn = None  # a second read must come from disk, not from the teacher
    np.testing.assert_array_equal(cache(3, tokens, lengths)[1], ids)


def _run(tmp_path, dataset, distill, sparse, params=None):
    params = tiny_model().params if params is None else params
    return stage2.run_stage2(config=TINY, params=params, sparse=sparse,
                             indexer=_indexer(sparse), dataset=dataset, distill=distill,
                             run_dir=tmp_path, mesh=make_mesh(-1, 1), backend="reference",
                             progress=False)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_loss_falls_in_a_few_steps(tmp_path, lora_rank):
    tokens, lengths = _batch()
    dataset = [{"tokens": tokens, "length": lengths}] * 6
    distill = _distill(lora_rank=lora_rank, learning_rate=3e-3)
    _, history = _run(tmp_path, dataset, distill, _paper(SPARSE_HEADS, top_p=0.5))
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.7 * losses[0], losses
    metrics = (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, 7))


def test_resume_after_kill_is_identical(tmp_path):
    rng = np.random.default_rng(1)
    dataset = [{"tokens": rng.integers(2, TINY.vocab_size, (2, SEQ)).astype(np.int32),
                "length": np.asarray([SEQ, 60], np.int32)} for _ in range(6)]
    distill = _distill(learning_rate=1e-3)
    sparse = _paper(SPARSE_HEADS, top_p=0.5)
    final, whole = _run(tmp_path / "a", dataset, distill, sparse)
    # "Killed" after step 4: the data ran out there; the checkpoint of step 4 is on disk.
    _run(tmp_path / "b", dataset[:4], distill, sparse)
    # A save of step 6 that died half way: Orbax's temporary directory with junk in it.
    partial = tmp_path / "b" / "distill" / "checkpoints" / "6.orbax-checkpoint-tmp-0"
    partial.mkdir()
    (partial / "junk").write_text("interrupted")
    resumed_final, resumed = _run(tmp_path / "b", dataset, distill, sparse)
    assert [h["step"] for h in resumed] == [5, 6]
    for a, b in zip(whole[4:], resumed, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(resumed_final), strict=True):
        np.testing.assert_array_equal(a, b)


def test_four_device_mesh_matches_one_device():
    script = textwrap.dedent("""
        import json, numpy as np, jax, jax.numpy as jnp
        from rtpurbo_jax import stage2
        from rtpurbo_jax.model import param_axes
        from tests.test_stage2 import TINY, _batch, _distill, _indexer, _paper, SPARSE_HEADS
        from tests.tiny import tiny_model
        params = tiny_model().params
        sparse = _paper(SPARSE_HEADS, top_p=0.5)
        tokens, lengths = _batch(4)
        out = {}
        for name, (data, fsdp) in {"one": (1, 1), "four": (2, 2)}.items():
            mesh = jax.sharding.Mesh(np.asarray(jax.devices()[: data * fsdp]).reshape(
                data, fsdp), ("data", "fsdp"))
            for lora in (0, 4):
                distill = _distill(lora_rank=lora, batch_size=4, answer_weight=0.5)
                spec = stage2.Stage2Spec.from_config(distill, "reference")
                teacher = jax.device_put(params, stage2.tree_shardings(
                    mesh, param_axes(TINY), params))
                opt = stage2.make_optimizer(distill)
                state = stage2.place_trainable(stage2.initial_trainable(params, TINY, distill, 0),
                                               TINY, distill, opt, mesh)
                step = stage2.make_step(TINY, sparse, _indexer(sparse), spec, opt)
                t = jax.device_put(tokens, stage2.batch_sharding(mesh, 4, 2))
                n = jax.device_put(lengths, stage2.batch_sharding(mesh, 4, 1))
                a = jax.device_put(np.asarray([[40, 48], [0, 0], [10, 30], [0, 0]], np.int32),
                                   stage2.batch_sharding(mesh, 4, 2))
                compiled, _ = stage2.compile_step(step, mesh, state, teacher, t, n, a, None)
                for _ in range(2):  # the second step sees the first one's update
                    state, metrics = compiled(state, teacher, t, n, a, None)
                out[f"{name}{lora}"] = {k: float(v) for k, v in metrics.items()}
        print(json.dumps(out))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for lora in (0, 4):
        one, four = out[f"one{lora}"], out[f"four{lora}"]
        assert one["loss"] == pytest.approx(four["loss"], rel=1e-5)
        assert one["grad_norm"] == pytest.approx(four["grad_norm"], rel=1e-4)


def test_bad_configs_give_one_clear_error_each():
    cases = [
        (dict(lora_rank=-1), "lora_rank must be >= 0"),
        (dict(top_k=TINY.vocab_size + 1), "top_k must be in"),
        (dict(loss="reverse"), "distill.loss must be one of"),
        (dict(schedule="linear"), "distill.schedule must be one of"),
        (dict(teacher="cached", loss="full"), "the 'full' loss needs the live teacher"),
        (dict(lora_rank=4, lora_targets=("wq", "lm_head")), "are not adaptable weights"),
        (dict(compute_dtype="float12"), "is not a dtype"),
        (dict(answer_weight=1.5), "answer_weight must be in"),
        (dict(dense_anchor=-0.5), "dense_anchor must be >= 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            stage2.check_distill(_distill(**overrides), TINY)
    from rtpurbo_jax.convert import run_conversion

    config = tiny.get_config()
    config.train.stages = ("distill",)
    config.data.task_fraction = 0.0
    config.distill.answer_weight = 0.5
    with pytest.raises(ConfigError, match="the data has no task samples"):
        run_conversion(config, Path("unused"))
    for stages, message in [(("indexer", "finetune"), "must be one or both"),
                            (("distill", "indexer"), "in the order"), ((), "must be one or both")]:
        with pytest.raises(ConfigError, match=message):
            check_stages(stages)


def test_both_stages_end_to_end(tmp_path):
    """train.stages = (indexer, distill) on the tiny config: stage 1's checkpoint, stage 2's
    metrics and checkpoints, and the exported model, which loads with its sparse design and
    records its origin; then stage 2 alone from that checkpoint in a new directory."""
    from rtpurbo_jax.api import load, load_from_config
    from rtpurbo_jax.convert import run_conversion

    config = tiny.get_config()
    config.sparse.update(design="paper", window=64, sink_blocks=1, local_blocks=1)
    config.heads.update(method="needle", rule="fraction", rule_value=0.25, length=256,
                        needle_tokens=16)
    config.train.update(steps=2, loss_level="token", teacher_top_p=1.0,
                        stages=("indexer", "distill"))
    config.distill.update(steps=2, seq_len=256, batch_size=1, warmup_steps=1,
                          compute_dtype="float32", export_dtype="float32", answer_weight=0.5)
    summary = run_conversion(config, tmp_path / "run")
    assert summary["stages"] == ["indexer", "distill"] and summary["distill"]["steps"] == 2
    for name in ("sparse/sparse.json", "distill/metrics.jsonl", "model/config.json",
                 "model/rtpurbo.json", "model/sparse.json"):
        assert (tmp_path / "run" / name).exists(), name
    model = load(tmp_path / "run" / "model", with_tokenizer=False)
    assert model.sparse is not None and model.sparse.design == "paper"
    origin = json.loads((tmp_path / "run" / "model" / "rtpurbo.json").read_text())
    assert origin["stages"] == ["indexer", "distill"]
    assert origin["steps"] == {"indexer": 2, "distill": 2}
    base = load_from_config(config.model)
    assert origin["base"]["fingerprint"] == base.fingerprint
    # Exported aside and renamed: the sparse checkpoint names the final directory.
    sparse_meta = json.loads((tmp_path / "run" / "model" / "sparse.json").read_text())
    assert sparse_meta["base"]["name"] == "model"
    # The evaluation runs mode full on the original weights, the sparse modes on stage 2's.
    from rtpurbo_jax import evaluation as ev_lib

    tuned = ev_lib.load_eval_model(config.model, tmp_path / "run" / "model",
                                   backend="reference")
    original = ev_lib.load_original(config.model, tuned, backend="reference")
    assert set(origin["minutes"]) == {"indexer", "distill"}
    # Stage 2's minutes are its steps' seconds (so a resumed run counts every process's).
    records = [json.loads(line) for line in
               (tmp_path / "run" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert origin["minutes"]["distill"] == pytest.approx(sum(r["seconds"] for r in records) / 60)
    meta = ev_lib.origin_metadata(tuned.origin, config.eval)
    assert meta["steps"] == 4 and meta["stages"] == ["indexer", "distill"]
    full = ev_lib.mode_model("full", tuned, {}, None, original)
    assert full.sparse is None and ev_lib.mode_model("rtpurbo", tuned, {}).sparse == model.sparse
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(base.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
        jax.tree.leaves(tuned.params), jax.tree.leaves(base.params), strict=True))
    # Stage 2 alone, from the checkpoint of a stage-1 run (train.py writes its summary): the
    # new model's origin still lists both stages.
    (tmp_path / "run" / "train_summary.json").write_text(json.dumps(summary))
    config.train.stages = ("distill",)
    config.distill.sparse = str(tmp_path / "run" / "sparse")
    again = run_conversion(config, tmp_path / "second")
    assert again["distill"]["steps"] == 2 and "first_loss" not in again
    origin = json.loads((tmp_path / "second" / "model" / "rtpurbo.json").read_text())
    assert origin["stages"] == ["indexer", "distill"]
    assert origin["steps"] == {"indexer": 2, "distill": 2}
    assert origin["minutes"]["indexer"] == summary["stage1_minutes"]


def test_stage1_record_of_a_sparse_checkpoint(tmp_path):
    from rtpurbo_jax.convert import stage1_record

    checkpoint = tmp_path / "run" / "sparse_safetensors"
    checkpoint.mkdir(parents=True)
    assert stage1_record(checkpoint) is None  # copied away from its run
    summary = tmp_path / "run" / "train_summary.json"
    summary.write_text(json.dumps({"steps": 400, "train_minutes": 7.0}))  # before train.stages
    assert stage1_record(checkpoint) == {"steps": 400, "minutes": 7.0}
    summary.write_text(json.dumps({"stages": ["indexer", "distill"], "steps": 400,
                                   "stage1_minutes": 6.5, "train_minutes": 20.0}))
    assert stage1_record(checkpoint) == {"steps": 400, "minutes": 6.5}
    summary.write_text(json.dumps({"stages": ["distill"], "train_minutes": 14.0}))
    assert stage1_record(checkpoint) is None


@pytest.mark.parametrize("design", ["indexer", "paper"])
def test_training_forward_equals_inference(design):
    """The student's forward (memory-bounded training attention) equals the inference forward
    where they must agree: the indexer design's prefill selection, and the paper design with
    every head retrieval at p = 1 (dense)."""
    from rtpurbo_jax.generate import hidden_states, training_hidden

    params = tiny_model().params
    if design == "indexer":
        sparse = SparseConfig(((True, False), (False, False)), rank=4, block_q=16, block_k=16,
                              top_p=0.5)
    else:
        sparse = _paper(ALL_HEADS, top_p=1.0)
    indexer = _indexer(sparse)
    tokens, lengths = (jnp.asarray(x) for x in _batch())
    train = training_hidden(params, tokens, lengths, TINY, sparse, indexer)
    infer = hidden_states(params, tokens, lengths, TINY, "reference", sparse, indexer)
    for row, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(train[row, :n], infer[row, :n], rtol=2e-4, atol=2e-4)

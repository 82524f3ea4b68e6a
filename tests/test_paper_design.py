"""The paper design: local heads on sinks + a window (ring-buffer cache for all-local groups),
retrieval heads dense in prefill and top-p sparse in decode through a pre-RoPE indexer."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer_topp import select_blocks_reference
from rtpurbo_jax import generate as gen
from rtpurbo_jax.api import SparseModel, right_pad
from rtpurbo_jax.cache import empty_cache, kv_cache_bytes, ring_from_prefill, ring_slots
from rtpurbo_jax.checkpoint import load_sparse
from rtpurbo_jax.config import ConfigError, SparseConfig
from rtpurbo_jax.dense import dense_attention_reference
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.model import QKV
from rtpurbo_jax.paper_attention import (
    blocks_to_mask,
    head_kv_layout,
    mask_to_blocks,
    sink_window_keys,
)
from rtpurbo_jax.selection import select_decode
from tests.tiny import TINY, tiny_model

TOL = 1e-5  # float32, relative to max |logit|
# Long enough that the ring (4 sinks + 32 window) wraps several times.
ROWS = [list(np.random.default_rng(5).integers(2, 96, 130)),
        list(np.random.default_rng(6).integers(2, 96, 61))]
# Query-head masks [layers][heads] of TINY (4 heads, 2 KV groups of 2).
KV_ROUTED = ((True, True, False, False), (False, False, False, False))
HEAD_ROUTED = ((True, False, False, True), (False, True, False, False))
ALL_RETRIEVAL = ((True,) * 4, (True,) * 4)
STEPS = [[11, 12, 13], [21, 22, 23]]


def _paper(mask, **kw) -> SparseConfig:
    return SparseConfig(mask, **{"design": "paper", "group_size": TINY.group_size, "rank": 4,
                                 "block_q": 16, "block_k": 16, "sink_tokens": 4, "window": 32,
                                 "local_blocks": 1, **kw})


def _err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _indexer(sparse: SparseConfig, seed: int = 0, config=TINY):
    rng = np.random.default_rng(seed)
    queries = [rng.normal(size=(64, config.num_heads, config.head_dim)) for _ in range(2)]
    return init_indexer(queries, config, sparse)


def _assert_decode_matches_forward(model, sparse: SparseConfig, indexer) -> None:
    """Prefill of ROWS then decode of STEPS give the last logits of one forward pass."""
    tokens, lengths = right_pad(ROWS)
    logits, cache, _ = gen.prefill(model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                   model.config, 200, "reference", sparse, indexer)
    for s in range(len(STEPS[0])):
        logits, cache, _ = gen.decode_step(model.params, cache, jnp.asarray([r[s] for r in STEPS]),
                                           model.config, "reference", sparse, indexer)
    sparse_model = model.with_sparse(sparse, indexer)
    for b, row in enumerate(ROWS):
        expected = np.asarray(sparse_model([row + STEPS[b]]))[0, -1]
        assert _err(expected, logits[b]) <= TOL


def _naive_local_mask(t: int, lengths: np.ndarray, sink: int, window: int) -> np.ndarray:
    """[batch, t, t] bool, written out from the definition."""
    mask = np.zeros((len(lengths), t, t), bool)
    for b, n in enumerate(lengths):
        for i in range(min(t, n)):
            for j in range(i + 1):
                mask[b, i, j] = j < sink or j > i - window
    return mask


def test_sinks_and_window_equal_masked_dense_attention():
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 90, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))
    lengths = np.array([90, 47])
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    out = dense_attention_reference(q, k, v, positions, jnp.asarray(lengths), sliding_window=20,
                                    sink_tokens=3)
    mask = _naive_local_mask(t, lengths, 3, 20)
    kk, vv = np.repeat(np.asarray(k), 2, axis=2), np.repeat(np.asarray(v), 2, axis=2)
    scores = np.einsum("bthd,bshd->bhts", np.asarray(q), kk) / np.sqrt(d)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True, initial=-1e30))
    probs = np.where(mask[:, None], probs, 0.0)
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-30)
    expected = np.einsum("bhts,bshd->bthd", probs, vv)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_ring_from_prefill_equals_sequential_writes():
    sparse = _paper(KV_ROUTED)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 100, 1, 2)), jnp.float32)
    lengths = jnp.asarray([100, 35, 7])
    size = sparse.sink_tokens + sparse.window
    ring = np.asarray(ring_from_prefill(x, lengths, sparse, size))
    for b, n in enumerate(np.asarray(lengths)):
        expected = np.zeros((size, 1, 2), np.float32)
        for p in range(n):  # write every position in turn at its slot
            expected[int(ring_slots(jnp.asarray(p), sparse, size))] = np.asarray(x[b, p])
        np.testing.assert_array_equal(ring[b], expected)


@pytest.mark.parametrize("mask", [KV_ROUTED, HEAD_ROUTED])
def test_windowed_cache_holds_sinks_and_window(model, mask):
    sparse = _paper(mask)
    cache = empty_cache(TINY, 2, 500, jnp.float32, sparse)
    size = sparse.sink_tokens + sparse.window
    for layer, parts in enumerate(cache["layers"]):
        window = sparse.window_groups(layer)
        if window:
            assert parts["kw"].shape == (2, size, len(window), TINY.head_dim)
        full = sparse.full_groups(layer)
        assert ("k" in parts) == bool(full)
        assert ("ki" in parts) == bool(sparse.retrieval_heads(layer))
    nbytes = sum(x.nbytes for parts in cache["layers"] for x in parts.values())
    assert kv_cache_bytes(TINY, sparse, 2, 500, jnp.float32)["total"] == nbytes
    dense = kv_cache_bytes(TINY, None, 2, 500, jnp.float32)["total"]
    assert nbytes < dense


@pytest.mark.parametrize("mask", [KV_ROUTED, HEAD_ROUTED, ((False,) * 4, (False,) * 4)])
def test_decode_over_the_ring_equals_the_masked_forward(model, mask):
    """Prefill + decode steps (ring buffers, top-p 1 for the retrieval heads) give the logits of
    one forward pass over the whole sequence with the same masks."""
    sparse = _paper(mask, top_p=1.0)
    _assert_decode_matches_forward(model, sparse, _indexer(sparse))


@pytest.mark.parametrize("sink_tokens", [4, 0])
def test_sink_window_keys_attend_as_the_whole_cache(sink_tokens):
    """A local head of a full group decodes over a prefix of the sinks and window cut from the
    cache as over the whole cache masked: rows shorter than the sinks and the window, at its
    edge, and far past it."""
    sparse = _paper(HEAD_ROUTED, sink_tokens=sink_tokens)  # window 32
    rng = np.random.default_rng(3)
    lengths = jnp.asarray([1, 3, 30, 36, 37, 90, 150], jnp.int32)
    b, max_len = lengths.shape[0], 150
    q = jnp.asarray(rng.normal(size=(b, 1, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, max_len, 2, 8)), jnp.float32) for _ in range(2))
    cut_k, cut_v, visible = sink_window_keys(k, v, lengths, sparse)
    assert cut_k.shape[1] == sink_tokens + 32
    got = dense_attention_reference(q, cut_k, cut_v, (visible - 1)[:, None], visible)
    want = dense_attention_reference(q, k, v, (lengths - 1)[:, None], lengths,
                                     sliding_window=32, sink_tokens=sink_tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_every_head_retrieval_at_p_one_is_dense(model):
    sparse = _paper(ALL_RETRIEVAL, top_p=1.0)
    sparse_model = model.with_sparse(sparse, _indexer(sparse))
    assert _err(model(ROWS), sparse_model(ROWS)) <= TOL
    np.testing.assert_array_equal(sparse_model.generate(ROWS, 6, eos_token_id=()),
                                  model.generate(ROWS, 6, eos_token_id=()))


def test_pre_rope_indexer_selection_is_top_p_of_its_scores(model):
    """Each retrieval head's decode selection is the top-p set of its own pre-RoPE scores,
    computed here directly from the definition."""
    sparse = _paper(HEAD_ROUTED, top_p=0.7)
    indexer = _indexer(sparse, seed=3)
    layer = 0
    heads = sparse.retrieval_heads(layer)
    rng = np.random.default_rng(4)
    b, n, d = 2, 100, TINY.head_dim
    q_pre = rng.normal(size=(b, 1, len(heads), d)).astype(np.float32)
    k_pre = rng.normal(size=(b, n, TINY.num_kv_heads, d)).astype(np.float32)
    lengths = np.array([100, 58])
    wq, wk = (np.asarray(indexer["layers"][layer][w]) for w in ("wq", "wk"))
    own_kv = k_pre[:, :, [h // TINY.group_size for h in heads]]
    ki = np.einsum("bthd,hdr->bthr", own_kv, wk)
    indices, counts = select_decode(jnp.asarray(q_pre), None, jnp.asarray(ki),
                                    jnp.asarray(lengths), sparse, indexer["layers"][layer])
    nk = -(-n // sparse.block_k)
    for r in range(len(heads)):
        qi = q_pre[:, 0, r] @ wq[r, 0]  # [b, rank]
        scores = np.einsum("br,bsr->bs", qi, ki[:, :, r])
        for row in range(b):
            logits = np.full(nk, -np.inf)
            for j in range(nk):
                keys = scores[row, j * 16: min((j + 1) * 16, lengths[row])]
                if len(keys):
                    logits[j] = np.log(np.sum(np.exp(keys - keys.max()))) + keys.max()
            want_idx, want_cnt = select_blocks_reference(
                jnp.asarray(logits)[None, None, None], jnp.asarray([[(lengths[row] - 1) // 16]]),
                top_p=0.7, sink_blocks=1, local_blocks=1)
            got = np.asarray(indices[row, r, 0, :int(counts[row, r, 0])])
            want = np.asarray(want_idx[0, 0, 0, :int(want_cnt[0, 0, 0])])
            np.testing.assert_array_equal(got, want)


def test_block_lists_and_masks_round_trip():
    rng = np.random.default_rng(7)
    mask = jnp.asarray(rng.random((3, 2, 9)) < 0.4)
    indices, counts = mask_to_blocks(mask)
    np.testing.assert_array_equal(np.asarray(blocks_to_mask(indices, counts, 9)),
                                  np.asarray(mask))
    idx, cnt = np.asarray(indices), np.asarray(counts)
    for row, c in zip(idx.reshape(-1, 9), cnt.reshape(-1), strict=True):
        assert (np.diff(row[:c]) > 0).all()
        assert (row[c:] == (row[c - 1] if c else 0)).all()


def test_blocks_to_mask_is_the_listed_set():
    """Only entries before a row's count are members (a count of 0 lists nothing, though its
    padding repeats block 0); repeated entries are one member."""
    rng = np.random.default_rng(11)
    indices = rng.integers(0, 40, size=(2, 3, 5, 12)).astype(np.int32)
    counts = rng.integers(0, 13, size=(2, 3, 5)).astype(np.int32)
    counts[0, 0, 0], counts[1, 2, 4] = 0, 12
    want = np.zeros((2, 3, 5, 40), bool)
    for pos in np.ndindex(counts.shape):
        want[pos][indices[pos][:counts[pos]]] = True
    np.testing.assert_array_equal(
        np.asarray(blocks_to_mask(jnp.asarray(indices), jnp.asarray(counts), 40)), want)


@pytest.mark.parametrize("mask", [KV_ROUTED, HEAD_ROUTED])
def test_paper_pallas_path_matches_reference(model, mask):
    """The Pallas kernels (interpreted here) give the reference's logits and generations."""
    sparse = _paper(mask, top_p=0.8)
    indexer = _indexer(sparse)
    ref = model.with_sparse(sparse, indexer)
    fast = SparseModel(TINY, model.params, backend="pallas", sparse=sparse, indexer=indexer)
    assert _err(ref(ROWS), fast(ROWS)) <= TOL
    np.testing.assert_array_equal(fast.generate(ROWS, 4, eos_token_id=()),
                                  ref.generate(ROWS, 4, eos_token_id=()))


# Three query heads per KV group: local (or retrieval) heads that fill the groups they touch
# equally, but not wholly, go through GQA shapes (head_kv_layout); uneven ones one KV head each.
TINY_GS3 = dataclasses.replace(TINY, num_heads=6)
GS3_MASKS = {
    "1_retrieval_per_group": ((True, False, False, False, True, False), (False,) * 6),
    "2_retrieval_per_group": ((True, True, False, True, False, True), (False, True, False) * 2),
    "uneven": ((True, True, False, False, False, True), (True, False, False) + (False,) * 3),
}


@pytest.mark.parametrize("name", sorted(GS3_MASKS))
def test_partly_routed_groups_decode_as_the_masked_forward(name):
    """Prefill + decode steps give the forward pass's logits when a group holds both kinds of
    heads in every mix, at three query heads per group (top-p 1 for the retrieval heads)."""
    sparse = _paper(GS3_MASKS[name], group_size=3, top_p=1.0)
    _assert_decode_matches_forward(tiny_model(config=TINY_GS3), sparse,
                                   _indexer(sparse, seed=1, config=TINY_GS3))


def test_partly_routed_groups_through_the_kernels_match_the_reference():
    """Two retrieval and one local head per group: the Pallas kernels (interpreted) take them
    as GQA with two query heads per KV head, and give the reference's logits."""
    gs3 = tiny_model(config=TINY_GS3)
    sparse = _paper(GS3_MASKS["2_retrieval_per_group"], group_size=3, top_p=0.8)
    indexer = _indexer(sparse, seed=2, config=TINY_GS3)
    ref = gs3.with_sparse(sparse, indexer)
    fast = SparseModel(TINY_GS3, gs3.params, backend="pallas", sparse=sparse, indexer=indexer)
    assert _err(ref(ROWS), fast(ROWS)) <= TOL
    np.testing.assert_array_equal(fast.generate(ROWS, 3, eos_token_id=()),
                                  ref.generate(ROWS, 3, eos_token_id=()))


def test_head_kv_layout_is_gqa_for_equal_shares_of_groups():
    assert head_kv_layout((0, 1, 2, 3, 4, 5), 3, (0, 1)).tolist() == [0, 1]  # whole groups
    assert head_kv_layout((1, 2, 4, 5), 3, (0, 1)).tolist() == [0, 1]  # two of each group
    assert head_kv_layout((4, 5), 3, (0, 1)).tolist() == [1]  # one group of two
    assert head_kv_layout((0, 1, 5), 3, (0, 1)).tolist() == [0, 0, 1]  # 2 + 1: one per head


def test_checkpoints_of_both_designs_round_trip(model, tmp_path):
    for name, sparse in (("paper", _paper(HEAD_ROUTED)),
                         ("indexer", SparseConfig(((True, False), (False, False)), rank=4,
                                                  block_q=16, block_k=16))):
        indexer = _indexer(sparse)
        model.with_sparse(sparse, indexer).save_sparse(tmp_path / name, safetensors=True)
        loaded, weights, _ = load_sparse(tmp_path / name)
        assert loaded == sparse
        for a, b in zip(jax.tree.leaves(indexer), jax.tree.leaves(weights), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_old_checkpoint_loads_as_indexer_design(model, tmp_path):
    sparse = SparseConfig(((True, False), (False, False)), rank=4, block_q=16, block_k=16)
    model.with_sparse(sparse, _indexer(sparse)).save_sparse(tmp_path / "old", safetensors=True)
    meta = json.loads((tmp_path / "old" / "sparse.json").read_text())
    for field in ("design", "group_size", "sink_tokens", "window"):
        del meta["sparse_config"][field]  # written before the paper design existed
    (tmp_path / "old" / "sparse.json").write_text(json.dumps(meta))
    loaded, _, _ = load_sparse(tmp_path / "old")
    assert loaded.design == "indexer" and loaded == sparse


@pytest.mark.parametrize("changes,message", [
    ({"window": 8}, "smaller than a block"),
    ({"sink_tokens": 40}, r"sink_tokens \(40\) must be in \[0, window"),
    ({"design": "streaming"}, "design must be one of"),
    ({"group_size": 3}, "group_size"),
])
def test_bad_paper_configs_fail_clearly(changes, message):
    with pytest.raises(ConfigError, match=message):
        _paper(KV_ROUTED, **changes)


def test_paper_mask_must_fit_the_model(model):
    wrong = SparseConfig(((True, False), (False, False)), design="paper", group_size=2,
                         block_k=16, window=32)
    with pytest.raises(ConfigError, match="query heads"):
        model.with_sparse(wrong, _indexer(_paper(KV_ROUTED)))


def test_fractions_report_query_heads_and_kv_groups():
    sparse = _paper(HEAD_ROUTED)
    assert sparse.query_head_fraction == 3 / 8
    assert sparse.kv_group_fraction == 3 / 4  # layer 0 both groups, layer 1 one of two
    assert _paper(KV_ROUTED).kv_group_fraction == 1 / 4


def test_generate_reports_prefill_and_decode_density(model):
    sparse = _paper(KV_ROUTED, top_p=0.5)
    tokens, lengths = right_pad(ROWS)
    _, stats = gen.generate(model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                            jax.random.key(0), config=TINY, max_new_tokens=3,
                            sampling=gen.SamplingConfig(), eos_ids=(), pad_id=0,
                            backend="reference", sparse=sparse, indexer=_indexer(sparse))
    stats = np.asarray(stats)
    assert stats.shape == (2, 2)
    assert 0 < stats[0, 0] < stats[0, 1] and 0 < stats[1, 0] < stats[1, 1]


def test_qkv_carries_pre_rope_projections(model):
    from rtpurbo_jax.model import project_qkv
    from rtpurbo_jax.rope import apply_rope, rope_tables

    layer = model.params["layers"][0]
    h = jnp.asarray(np.random.default_rng(8).normal(size=(1, 5, TINY.hidden_size)), jnp.float32)
    cos, sin = rope_tables(jnp.arange(5)[None], TINY)
    qkv = project_qkv(layer, h, cos, sin, TINY)
    assert isinstance(qkv, QKV)
    np.testing.assert_allclose(np.asarray(apply_rope(qkv.q_pre, cos, sin)), np.asarray(qkv.q))
    np.testing.assert_allclose(np.asarray(apply_rope(qkv.k_pre, cos, sin)), np.asarray(qkv.k))


def _random_qkv(seed: int, b: int, t: int) -> QKV:
    rng = np.random.default_rng(seed)
    h, kv, d = TINY.num_heads, TINY.num_kv_heads, TINY.head_dim
    shapes = ((b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d), (b, t, kv, d))
    return QKV(*(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes))


@pytest.mark.parametrize("mask", [KV_ROUTED, HEAD_ROUTED])
def test_training_mode_attends_as_decode_does_at_every_position(mask, monkeypatch):
    """Stage 2's student: position t of the training-mode retrieval attention equals the decode
    step at t over a cache holding positions 0..t (own top-p sets, unioned per KV group)."""
    from rtpurbo_jax import paper_attention
    from rtpurbo_jax.indexer import indexer_keys

    monkeypatch.setattr(paper_attention, "TRAIN_Q_CHUNK", 16)  # several chunks, a ragged one
    sparse = _paper(mask, top_p=0.6)
    indexer = _indexer(sparse, seed=2)
    layer, t = 0, 75
    lengths = jnp.asarray([75, 41])
    qkv = _random_qkv(9, 2, t)
    out = paper_attention.retrieval_train(qkv, lengths, layer, TINY, sparse,
                                          indexer["layers"][layer])
    full = np.asarray(sparse.full_groups(layer), np.int32)
    heads = sparse.retrieval_heads(layer)
    cache = {"k": qkv.k[:, :, full], "v": qkv.v[:, :, full],
             "ki": indexer_keys(paper_attention.head_keys(qkv.k_pre, heads, TINY.group_size),
                                indexer["layers"][layer]["wk"])}
    for pos in (0, 15, 16, 40, 63, 74):
        step = QKV(*(x[:, pos:pos + 1] for x in qkv))
        new_lengths = jnp.minimum(jnp.asarray([pos + 1] * 2), lengths)
        want, _ = paper_attention.retrieval_decode(step, cache, new_lengths, layer, TINY,
                                                   sparse, indexer["layers"][layer],
                                                   "reference")
        for row in range(2):
            if pos < int(lengths[row]):
                np.testing.assert_allclose(np.asarray(out[row, pos]),
                                           np.asarray(want[row, 0]), atol=2e-5)


def test_training_mode_every_head_retrieval_at_p_one_is_dense(model):
    tokens, lengths = right_pad(ROWS)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    sparse = _paper(ALL_RETRIEVAL, top_p=1.0)
    student = gen.training_hidden(model.params, tokens, lengths, TINY, sparse, _indexer(sparse))
    teacher = gen.training_hidden(model.params, tokens, lengths, TINY)
    for row, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(np.asarray(student[row, :n]), np.asarray(teacher[row, :n]),
                                   atol=2e-5)


def test_training_mode_of_the_indexer_design_is_its_prefill(model):
    from rtpurbo_jax.model import lm_logits

    sparse = SparseConfig(((True, False), (False, False)), rank=4, block_q=16, block_k=16,
                          top_p=0.7)
    indexer = _indexer(sparse)
    tokens, lengths = (jnp.asarray(x) for x in right_pad(ROWS))
    hidden = gen.training_hidden(model.params, tokens, lengths, TINY, sparse, indexer)
    logits, _ = gen.forward(model.params, tokens, lengths, TINY, "reference", sparse, indexer)
    assert _err(logits, lm_logits(model.params, hidden, TINY)) <= TOL


def test_training_mode_gradients_reach_the_weights(model):
    sparse = _paper(HEAD_ROUTED, top_p=0.7)
    indexer = _indexer(sparse)
    tokens, lengths = (jnp.asarray(x) for x in right_pad(ROWS))

    def loss(params):
        return jnp.sum(gen.training_hidden(params, tokens, lengths, TINY, sparse, indexer) ** 2)

    grads = jax.grad(loss)(model.params)
    for layer in grads["layers"]:
        for name in ("wq", "wk", "wv"):
            g = np.asarray(layer[name])
            assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    with pytest.raises(ValueError, match="'indexer' scorer"):
        gen.training_hidden(model.params, tokens, lengths, TINY, sparse.replace(scorer="oracle"),
                            indexer)

"""Defaults every model config shares: sparsity, head selection, training, data, mesh.

A model config calls `base_config()` and sets `model` (and whatever it changes). Any field can
be overridden on the command line: `--config.train.steps=300`.
"""

import ml_collections

from rtpurbo_jax.evaluation import default_eval_config
from rtpurbo_jax.tasks import TASKS
from rtpurbo_jax.tuning import default_tune_config


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = ""
    config.run_dir = ""  # empty: runs/<name>
    config.seed = 0
    # "auto": on a machine without an accelerator use `cpu_schedule`; "full" or "cpu" force one.
    config.schedule = "auto"
    config.distributed = False  # multi-host: call jax.distributed.initialize() first

    config.sparse = ml_collections.ConfigDict(dict(
        # "indexer": sparse KV groups select blocks in prefill and decode (our first design);
        # "paper": retrieval query heads dense in prefill, top-p in decode; the rest on sinks +
        # a window (configs/*_paper.py).
        design="indexer",
        rank=16, top_p=0.9, block_q=64, block_k=64, sink_blocks=1, local_blocks=2,
        min_blocks=0, max_blocks=None, temperature=1.0,
        sink_tokens=4, window=8192,  # the paper's local heads (design "paper")
    ))
    config.heads = ml_collections.ConfigDict(dict(
        mask_file="",  # a JSON with "retrieval_mask" (e.g. a heads.json): skips calibration
        # "tasks": needle mass of retrieval-task answers, per KV head; "needle": the paper's
        # Eq. 3 on a real document with a repeated span, per query head; "gates": per query
        # head, learnt gates between causal and window attention under the rule's budget;
        # "ablation": KV groups ("query" granularity: query heads) ranked by backward
        # elimination of what their window costs the output (rtpurbo_jax/head_gates.py).
        method="tasks",
        # Design "paper": single query heads, whole "kv" groups, or "both" (indexers for either
        # choice, so tune.py compares the two routings without retraining).
        granularity="query",
        tasks=("passkey", "niah_multikey"), length=4096, samples=8, batch_size=4,
        needle_tokens=64, documents=1,  # method "needle": span length, documents averaged
        # Methods "gates" and "ablation" (design "paper"): batches of `length` tokens
        # (batch_size each) of text and tasks, task samples gate_min_task_len..length long;
        # the KL's share on answers. Gates: gate_steps Adam steps. Ablation: the KL averaged
        # over ablation_batches fixed batches; each round moves ablation_round_share of the
        # units left.
        gate_steps=100, gate_learning_rate=0.02, gate_answer_weight=0.5,
        gate_min_task_len=1024, gate_dtype="bfloat16",
        ablation_batches=2, ablation_round_share=0.15,
        rule="threshold",  # "threshold" | "fraction" | "count"
        rule_value=0.1,
    ))
    config.train = ml_collections.ConfigDict(dict(
        steps=400, seq_len=8192, batch_size=2, learning_rate=1e-3, warmup_steps=50,
        final_lr_fraction=0.0, weight_decay=0.01, grad_clip=1.0,
        loss_level="block",  # "block" (what selection ranks by) | "token"
        teacher_top_p=0.9, checkpoint_every=100, keep_checkpoints=2,
        calibration_windows=4,  # text windows of seq_len for the SVD initialisation
        # "indexer" (stage 1: the indexer distils attention), "distill" (stage 2: the model's
        # weights distil the dense teacher in sparse mode), or both, in order.
        stages=("indexer",),
    ))
    # Stage 2 (rtpurbo_jax/stage2.py). The paper: lr 3e-6 constant, 200 warm-up steps, weight
    # decay 0.01, global batch 8, ~600 steps, top-10 KL.
    config.distill = ml_collections.ConfigDict(dict(
        steps=600, seq_len=8192, batch_size=2, learning_rate=3e-6, warmup_steps=200,
        schedule="constant",  # "constant" | "cosine" (to final_lr_fraction)
        final_lr_fraction=0.1, weight_decay=0.01, grad_clip=1.0,
        loss="top_k", top_k=10,  # "top_k": KL over the teacher's top-k ids | "full": vocab
        lora_rank=0,  # 0: full fine-tune (float32 master weights); > 0: LoRA adapters
        lora_alpha=16.0, lora_targets=("wq", "wk", "wv", "wo"),
        teacher="live",  # "live": the dense teacher runs every step | "cached": top-k on disk
        compute_dtype="bfloat16",
        # 0: task samples fill seq_len; > 0: log-uniform lengths from it to seq_len, text after.
        min_task_len=0,
        # The loss's share on the positions that predict task answers (the rest: the mean over
        # every position). The paper's loss is on each dialogue's response tokens only (1.0).
        answer_weight=0.0,
        # > 0: adds this weight times the KL of the student run densely (anchors the weights).
        dense_anchor=0.0,
        checkpoint_every=100, keep_checkpoints=2,
        # Without stage 1 in train.stages: the sparse checkpoint to start from (default: the
        # run directory's sparse/).
        sparse="",
        export_dtype="bfloat16",  # the exported model's weights
    ))
    config.data = ml_collections.ConfigDict(dict(
        files=(),  # .txt / .jsonl ("text" field); empty: the stdlib sources
        task_fraction=0.5, tasks=TASKS,
    ))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    # Overrides for a machine without an accelerator: short sequences, few steps.
    config.cpu_schedule = ml_collections.ConfigDict(dict(
        train=dict(steps=12, seq_len=1024, batch_size=1, warmup_steps=3, checkpoint_every=4,
                   calibration_windows=2),
        heads=dict(length=1024, samples=2, batch_size=2, needle_tokens=32, gate_steps=3,
                   gate_min_task_len=256, gate_dtype="float32", ablation_batches=1),
        distill=dict(steps=4, seq_len=512, batch_size=1, warmup_steps=1, checkpoint_every=2,
                     compute_dtype="float32"),
    ))
    config.eval = default_eval_config()
    config.tune = default_tune_config()
    return config

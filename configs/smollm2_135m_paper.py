"""The default model converted in the paper's design: the best query heads by the needle-copy
score (ranked globally) dense in prefill and top-p sparse in decode through a pre-RoPE indexer;
the others on 4 sinks + a 2048-token window. Stage 1 as the paper trains it: token-level forward
KL to the whole attention distribution; stage 2 anchored to the dense model.

The paper's window (8192) equals this model's whole context, so the window is scaled with the
context: 2048 tokens, a quarter of 8K. The retrieval heads are every head stage 1 trains an
indexer for (the best 20% of query heads singly and as whole KV groups: 25% of query heads,
29 of 90 KV groups). On the validation seed (README, "Results") the 1024-token window with 15%
of heads lost 3-5 points at 2K and 4K after stage 2; the 2048 window with 25% and the dense
anchor at weight 2 came within 1 point at every length. tune.py can still narrow the heads and
top-p.
"""

import ml_collections

from configs.smollm2_135m import get_config as default_model_config


def get_config() -> ml_collections.ConfigDict:
    config = default_model_config()
    config.name = "smollm2_135m_paper"
    config.sparse.update(design="paper", window=2048, top_p=0.95, sink_blocks=1, local_blocks=1)
    # Indexers for the best 20% of query heads chosen singly and as whole KV groups: tune.py
    # then compares the two routings, and narrower fractions, without retraining.
    config.heads.update(method="needle", granularity="both", length=8192, rule="fraction",
                        rule_value=0.2)
    config.train.update(loss_level="token", teacher_top_p=1.0)
    config.tune.update(retrieval_fraction=(0.1, 0.15, 0.2), granularity=("query", "kv"),
                       max_density=1.0)
    # Stage 2 (train.stages "distill"): on the validation seed, 300 steps at lr 1e-4 closed more
    # of the gap than 2e-5; the paper's 3e-6 is for a 30B model with 4x the tokens per step. The
    # full-vocabulary KL kept perplexity within 1% where top-10 lost 3%, at equal accuracy. The
    # dense anchor (the student's dense-mode KL) keeps stage 2 from costing accuracy where the
    # window holds the whole prompt: weight 1 halved the 2K loss, weight 2 removed it on the
    # validation seed (README, the eleventh and twelfth attempts).
    config.distill.update(steps=300, learning_rate=1e-4, warmup_steps=30, checkpoint_every=25,
                          loss="full", dense_anchor=2.0)
    return config

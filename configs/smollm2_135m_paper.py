"""The default model converted in the paper's design: the best query heads by the needle-copy
score (ranked globally) dense in prefill and top-p sparse in decode through a pre-RoPE indexer;
the others on 4 sinks + a 1024-token window. Stage 1 as the paper trains it: token-level forward
KL to the whole attention distribution. tune.py then picks top-p and the retrieval fraction
(15% in the paper) on the validation seed.

The paper's window (8192) equals this model's whole context, so the window is scaled with the
context: 1024 tokens is an eighth of 8K, the paper's ratio at 64K.
"""

import ml_collections

from configs.smollm2_135m import get_config as default_model_config


def get_config() -> ml_collections.ConfigDict:
    config = default_model_config()
    config.name = "smollm2_135m_paper"
    config.sparse.update(design="paper", window=1024, sink_blocks=1, local_blocks=1)
    # Indexers for the best 20% of query heads chosen singly and as whole KV groups: tune.py
    # then compares the two routings, and narrower fractions, without retraining.
    config.heads.update(method="needle", granularity="both", length=8192, rule="fraction",
                        rule_value=0.2)
    config.train.update(loss_level="token", teacher_top_p=1.0)
    config.tune.update(retrieval_fraction=(0.1, 0.15, 0.2), granularity=("query", "kv"),
                       max_density=1.0)
    # Stage 2 (train.stages "distill", from the tuned checkpoint): on the validation seed, 300
    # steps at lr 1e-4 closed more of the gap than 2e-5 (README, "Stage 2"); the paper's 3e-6
    # is for a 30B model with 4x the tokens per step. The full-vocabulary KL kept perplexity
    # within 1% where top-10 lost 3%, at equal accuracy (README, "The converted model").
    config.distill.update(steps=300, learning_rate=1e-4, warmup_steps=30, checkpoint_every=25,
                          loss="full")
    return config

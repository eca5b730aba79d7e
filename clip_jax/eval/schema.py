"""The ``eval`` group of the training config: every key, its type and its default.

A leaf module (it imports only ml_collections), so ``clip_jax.config`` builds its schema from
it without importing the evaluators. Per-kind settings live in ``eval.<kind>``.
"""

import ml_collections

# The allowed values of every numeric key (of each element, for a sequence), checked by
# `clip_jax.config.validate`: '> 0', '>= 1', or an interval such as '(0, 1)' or '[0, 1]'.
RANGES = {
    "every_steps": ">= 0",
    "batch_size": "> 0",
    "zeroshot.ks": ">= 1",
    "retrieval.ks": ">= 1",
    "retrieval.query_block": ">= 1",
    "retrieval.key_block": ">= 1",
    "linear_probe.val_fraction": "(0, 1)",
    "linear_probe.c_values": "> 0",
    "linear_probe.refine_steps": ">= 0",
    "linear_probe.max_iter": ">= 1",
    "linear_probe.max_train_examples": ">= 0",
    "tip_adapter.shots": ">= 1",
    "tip_adapter.val_per_class": ">= 1",
    "tip_adapter.search_scale": "> 0",
    "tip_adapter.search_step": ">= 1",
    "tip_adapter.max_train_examples": ">= 0",
}


def config_schema() -> ml_collections.ConfigDict:
    """The ``eval`` group of the training config: every key, its type and default."""
    c = ml_collections.ConfigDict()
    c.every_steps = 0  # 0 = only at the end of training
    c.batch_size = 256  # global feature-extraction batch (all devices, all hosts)
    c.tasks = ""  # 'KIND:DATASET[@SPLIT],...'
    c.data_dir = ""  # '' = data.data_dir

    c.zeroshot = ml_collections.ConfigDict()
    c.zeroshot.templates = ""  # set name or file; '' = the CLIP paper's set for the dataset
    c.zeroshot.class_names = ""  # file, or 'DATASET=FILE;DATASET=FILE'; '' = built-in/metadata
    c.zeroshot.ks = (1, 5)

    c.retrieval = ml_collections.ConfigDict()
    c.retrieval.ks = (1, 5, 10)
    c.retrieval.query_block = 1024
    c.retrieval.key_block = 4096

    c.linear_probe = ml_collections.ConfigDict()
    c.linear_probe.train_split = "train"
    c.linear_probe.val_fraction = 0.2
    c.linear_probe.c_values = tuple(10.0**e for e in range(-6, 7))  # = metrics.DEFAULT_C_VALUES
    c.linear_probe.refine_steps = 2
    c.linear_probe.max_iter = 1000
    c.linear_probe.max_train_examples = 0  # 0 = the whole train split
    c.linear_probe.seed = 0

    # Tip-Adapter builds its zero-shot classifier with the eval.zeroshot templates and names.
    c.tip_adapter = ml_collections.ConfigDict()
    c.tip_adapter.train_split = "train"
    c.tip_adapter.shots = (1, 2, 4, 8, 16)
    c.tip_adapter.val_per_class = 4  # search split, drawn from train outside the cache
    c.tip_adapter.search_scale = (7.0, 3.0)  # (beta max, alpha max), as the paper
    c.tip_adapter.search_step = (200, 20)  # (beta steps, alpha steps)
    c.tip_adapter.linear_probe = True  # also a K-shot linear probe, for comparison
    c.tip_adapter.max_train_examples = 0
    c.tip_adapter.seed = 0
    return c

"""Evaluation metrics on features: pure functions, no model, no data loading.

Conventions: embeddings are ``[N, D]`` float arrays (numpy or jax); labels are int arrays;
accuracies and recalls are fractions in ``[0, 1]`` (the console table shows percent).

* ``neighbours``: blockwise top-k similarity search (``ranked_neighbours``), shared by
  zero-shot classification and retrieval, and ``pad_rows``.
* ``classification``: prompt ensembling and top-k / per-class recall.
* ``retrieval``: image->text and text->image recall@K, several captions per image.
* ``tip_adapter``: the Tip-Adapter cache, logits and its (alpha, beta) search.
* ``linear_probe``: the CLIP paper's logistic-regression probe.
"""

from clip_jax.eval.metrics.classification import (
    classification_metrics,
    classification_metrics_from_topk,
    rank_classes,
    zero_shot_classifier,
    zero_shot_logits,
)
from clip_jax.eval.metrics.linear_probe import (
    DEFAULT_C_VALUES,
    fit_logistic_regression,
    linear_probe,
    split_train_val,
)
from clip_jax.eval.metrics.neighbours import pad_rows, ranked_neighbours, topk_over_keys
from clip_jax.eval.metrics.retrieval import retrieval_recall
from clip_jax.eval.metrics.tip_adapter import (
    build_cache,
    default_tip_grid,
    sample_k_shot,
    tip_adapter_logits,
    tip_adapter_predict,
    tip_adapter_search,
)

__all__ = [
    "DEFAULT_C_VALUES",
    "build_cache",
    "classification_metrics",
    "classification_metrics_from_topk",
    "default_tip_grid",
    "fit_logistic_regression",
    "linear_probe",
    "pad_rows",
    "rank_classes",
    "ranked_neighbours",
    "retrieval_recall",
    "sample_k_shot",
    "split_train_val",
    "tip_adapter_logits",
    "tip_adapter_predict",
    "tip_adapter_search",
    "topk_over_keys",
    "zero_shot_classifier",
    "zero_shot_logits",
]

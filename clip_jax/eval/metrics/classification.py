"""Zero-shot classification: prompt ensembling, class ranking, top-k and per-class recall."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.eval.metrics.neighbours import ranked_neighbours
from clip_jax.models.clip import l2_normalize


def zero_shot_classifier(text_emb_per_template) -> jax.Array:
    """Prompt ensembling: ``[C, T, D]`` text embeddings -> ``[C, D]`` class weights.

    Each template's embedding is L2-normalised, the T of a class are averaged, and the mean is
    L2-normalised again (the CLIP notebook's recipe).
    """
    x = jnp.asarray(text_emb_per_template, jnp.float32)
    if x.ndim != 3:
        raise ValueError(
            f"text_emb_per_template must be [classes, templates, dim], got shape {x.shape}"
        )
    return l2_normalize(jnp.mean(l2_normalize(x), axis=1))


def zero_shot_logits(image_emb, classifier, logit_scale: float = 100.0) -> jax.Array:
    """``logit_scale * normalise(image_emb) @ classifier.T`` -> ``[N, C]``."""
    return logit_scale * jnp.matmul(
        l2_normalize(image_emb),
        jnp.asarray(classifier, jnp.float32).T,
        precision=jax.lax.Precision.HIGHEST,
    )


def rank_classes(image_emb, classifier, k: int, *, query_block: int = 8192) -> np.ndarray:
    """``[N, min(k, C)]`` classes by similarity of ``image_emb`` to the ``[C, D]`` classifier,
    best first (ties: lower class). Blockwise: the ``[N, C]`` logits are never held at once."""
    k = min(int(k), np.shape(classifier)[0])
    return ranked_neighbours(image_emb, classifier, k, query_block=query_block)


def classification_metrics_from_topk(
    topk: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    ks: Sequence[int] = (1, 5),
    mask: np.ndarray | None = None,
) -> dict:
    """Top-k accuracies and mean per-class recall from ranked predictions ``[N, >=max(ks) or C]``.

    ``mask`` (bool ``[N]``) drops padded rows. Labels must lie in ``[0, num_classes)``. Mean
    per-class recall averages top-1 recall over the classes that occur in ``labels``.
    """
    topk = np.asarray(topk)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if topk.ndim != 2 or topk.shape[0] != labels.shape[0]:
        raise ValueError(
            f"topk must be [N, k] with N = len(labels) = {labels.shape[0]}, got {topk.shape}"
        )
    if mask is not None:
        mask = np.asarray(mask, bool).reshape(-1)
        topk, labels = topk[mask], labels[mask]
    if labels.size == 0:
        raise ValueError("no examples to score (empty labels, or the mask removes every row)")
    bad = (labels < 0) | (labels >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"label {int(labels[bad][0])} is outside 0..{num_classes - 1}; expected one label per "
            f"example among the {num_classes} classes of the classifier"
        )
    need = min(max(ks), num_classes)
    if topk.shape[1] < need:
        raise ValueError(f"topk has {topk.shape[1]} columns; top-{max(ks)} needs {need}")
    correct = topk == labels[:, None]
    out = {}
    for k in ks:
        out[f"top{k}"] = float(np.mean(np.any(correct[:, : min(k, num_classes)], axis=1)))
    hit1 = correct[:, 0]
    support = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=hit1.astype(np.float64), minlength=num_classes)
    present = support > 0
    out["mean_per_class_recall"] = float(np.mean(hits[present] / support[present]))
    out["num_examples"] = int(labels.size)
    return out


def classification_metrics(logits, labels, k: Sequence[int] = (1, 5), mask=None) -> dict:
    """``{'top1', 'top5', 'mean_per_class_recall', 'num_examples'}`` from ``[N, C]`` logits."""
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    num_classes = logits.shape[1]
    topk = np.asarray(jax.lax.top_k(logits, min(max(k), num_classes))[1])
    return classification_metrics_from_topk(topk, labels, num_classes, ks=k, mask=mask)

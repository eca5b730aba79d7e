"""Tip-Adapter (Zhang et al., 2022): a training-free cache of K-shot features beside the
zero-shot classifier, ``logits = clip + alpha * exp(-beta * (1 - f @ keys.T)) @ values``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.clip import l2_normalize


def sample_k_shot(
    labels, k: int, seed: int = 0, num_classes: int | None = None, classes=None
) -> np.ndarray:
    """Indices of k examples per class (sorted), drawn without replacement with ``seed``.

    ``classes``: the classes to sample (default ``0..num_classes-1``, with ``num_classes``
    defaulting to ``max(labels) + 1``). Raises ValueError naming a class with fewer than k.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if classes is None:
        num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        classes = range(num_classes)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if idx.size < k:
            raise ValueError(
                f"class {c} has {idx.size} training examples; {k}-shot needs at least {k}"
            )
        chosen.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


def build_cache(features, labels, num_classes: int):
    """Tip-Adapter cache: normalised keys ``[NK, D]`` and one-hot values ``[NK, C]``."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    keys = l2_normalize(features)
    values = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)
    return keys, values


@jax.jit
def _tip_parts(features, cache_keys, cache_values, clip_weights, logit_scale):
    hp = jax.lax.Precision.HIGHEST
    f = l2_normalize(features)
    clip_logits = logit_scale * jnp.matmul(
        f, jnp.asarray(clip_weights, jnp.float32).T, precision=hp
    )
    affinity = jnp.matmul(f, l2_normalize(cache_keys).T, precision=hp)
    return clip_logits, affinity


def tip_adapter_logits(
    features, cache_keys, cache_labels_onehot, clip_weights, alpha, beta, logit_scale: float = 100.0
) -> jax.Array:
    """Tip-Adapter: ``clip + alpha * exp(-beta * (1 - f @ keys.T)) @ values``.

    features ``[N, D]`` and cache_keys ``[NK, D]`` are L2-normalised here; clip_weights is the
    ``[C, D]`` zero-shot classifier; ``clip = logit_scale * f @ clip_weights.T``.
    """
    clip_logits, affinity = _tip_parts(
        features, cache_keys, cache_labels_onehot, clip_weights, jnp.float32(logit_scale)
    )
    cache_logits = jnp.matmul(
        jnp.exp(-beta * (1.0 - affinity)),
        jnp.asarray(cache_labels_onehot, jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return clip_logits + alpha * cache_logits


def tip_adapter_predict(
    features, cache_keys, cache_labels_onehot, clip_weights, alpha, beta, chunk: int = 4096
) -> np.ndarray:
    """``[N]`` argmax of ``tip_adapter_logits``, ``chunk`` rows at a time."""
    out = []
    for s in range(0, features.shape[0], chunk):
        logits = tip_adapter_logits(
            features[s : s + chunk], cache_keys, cache_labels_onehot, clip_weights, alpha, beta
        )
        out.append(np.asarray(jnp.argmax(logits, axis=-1)))
    return np.concatenate(out)


@jax.jit
def _tip_grid_accuracy(clip_logits, affinity, cache_values, labels, alphas, betas):
    """Top-1 accuracy for every (beta, alpha): ``[len(betas), len(alphas)]``."""

    def per_beta(beta):
        cache_logits = jnp.matmul(
            jnp.exp(-beta * (1.0 - affinity)), cache_values, precision=jax.lax.Precision.HIGHEST
        )

        def per_alpha(alpha):
            pred = jnp.argmax(clip_logits + alpha * cache_logits, axis=-1)
            return jnp.mean((pred == labels).astype(jnp.float32))

        return jax.lax.map(per_alpha, alphas)

    return jax.lax.map(per_beta, betas)


def default_tip_grid(search_scale=(7.0, 3.0), search_step=(200, 20)):
    """The Tip-Adapter paper's search grid: ``(alphas, betas)``, starting at 0.1."""
    beta_max, alpha_max = search_scale
    n_beta, n_alpha = search_step
    betas = np.array([i * (beta_max - 0.1) / n_beta + 0.1 for i in range(n_beta)], np.float32)
    alphas = np.array([i * (alpha_max - 0.1) / n_alpha + 0.1 for i in range(n_alpha)], np.float32)
    return alphas, betas


def tip_adapter_search(
    val_features,
    val_labels,
    cache_keys,
    cache_labels_onehot,
    clip_weights,
    alphas=None,
    betas=None,
    logit_scale: float = 100.0,
) -> dict:
    """Grid search of (alpha, beta) by validation top-1. Ties go to the first in the grid."""
    if alphas is None or betas is None:
        da, db = default_tip_grid()
        alphas = da if alphas is None else alphas
        betas = db if betas is None else betas
    alphas = jnp.asarray(alphas, jnp.float32).reshape(-1)
    betas = jnp.asarray(betas, jnp.float32).reshape(-1)
    labels = jnp.asarray(np.asarray(val_labels).astype(np.int32).reshape(-1))
    if labels.size == 0 or alphas.size == 0 or betas.size == 0:
        raise ValueError(
            f"Tip-Adapter search needs validation examples and a grid; got {labels.size} "
            f"examples, {alphas.size} alphas, {betas.size} betas"
        )
    clip_logits, affinity = _tip_parts(
        val_features, cache_keys, cache_labels_onehot, clip_weights, jnp.float32(logit_scale)
    )
    acc = np.asarray(
        _tip_grid_accuracy(
            clip_logits,
            affinity,
            jnp.asarray(cache_labels_onehot, jnp.float32),
            labels,
            alphas,
            betas,
        )
    )
    bi, ai = np.unravel_index(int(np.argmax(acc)), acc.shape)
    return {
        "alpha": float(alphas[ai]),
        "beta": float(betas[bi]),
        "val_top1": float(acc[bi, ai]),
        "zero_shot_val_top1": float(
            np.mean(np.asarray(jnp.argmax(clip_logits, -1)) == np.asarray(labels))
        ),
    }

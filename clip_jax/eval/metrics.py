"""Evaluation metrics on features: pure functions, no model, no data loading.

Conventions: embeddings are ``[N, D]`` float arrays (numpy or jax); labels are int arrays;
accuracies and recalls are fractions in ``[0, 1]`` (the console table shows percent).

* zero-shot: ``zero_shot_classifier`` (prompt ensembling), ``zero_shot_logits``,
  ``classification_metrics`` / ``classification_metrics_from_topk`` (top-1, top-5, mean
  per-class recall).
* retrieval: ``retrieval_recall`` (image->text and text->image recall@K, several captions per
  image), computed block by block: the similarity matrix is never built; memory is
  ``O(query_block x key_block + query_block x K)`` besides the embeddings themselves.
* Tip-Adapter: ``build_cache``, ``tip_adapter_logits``, ``tip_adapter_search``,
  ``sample_k_shot``.
* linear probe: ``fit_logistic_regression`` (multinomial, L2, L-BFGS from scipy on a JAX
  loss/gradient) and ``linear_probe`` (regularisation sweep on a validation split, refit on
  train+val, test top-1), as in the CLIP paper.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

_EPS = 1e-12


def l2_normalize(x, axis: int = -1):
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), _EPS)


# --------------------------------------------------------------------------- zero-shot


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


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_indices(logits, k: int):
    return jax.lax.top_k(logits, k)[1]


def topk_predictions(logits, k: int) -> np.ndarray:
    """Indices of the ``min(k, C)`` largest logits per row, best first (ties: lower index)."""
    logits = jnp.asarray(logits)
    return np.asarray(_top_k_indices(logits, k=min(int(k), logits.shape[-1])))


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
    topk = topk_predictions(logits, max(k))
    return classification_metrics_from_topk(topk, labels, num_classes, ks=k, mask=mask)


# --------------------------------------------------------------------------- retrieval


@functools.partial(jax.jit, static_argnames=("k", "key_block", "precision"))
def topk_over_keys(queries, keys, num_keys, *, k: int, key_block: int, precision: str = "highest"):
    """Running top-k of ``queries @ keys.T`` over key blocks, never holding more than one block.

    queries: ``[B, D]``; keys: ``[nb * key_block, D]`` (zero-padded rows past ``num_keys`` are
    ignored). Returns ``(values [B, k], indices [B, k])``, best first; slots that found no key
    hold ``-inf`` / ``-1``. Ties go to the lower key index. Temporary memory is
    ``O(B * (key_block + k))`` whatever the number of keys.
    """
    b, d = queries.shape
    if keys.shape[0] % key_block:
        raise ValueError(
            f"keys rows ({keys.shape[0]}) must be a multiple of key_block ({key_block})"
        )
    nb = keys.shape[0] // key_block
    blocks = keys.reshape(nb, key_block, d)
    prec = jax.lax.Precision[precision.upper()] if isinstance(precision, str) else precision

    def body(carry, inputs):
        vals, idx = carry
        block, start = inputs
        sims = jnp.matmul(queries, block.T, precision=prec).astype(jnp.float32)
        cols = start + jnp.arange(key_block, dtype=jnp.int32)
        sims = jnp.where(cols[None, :] < num_keys, sims, -jnp.inf)
        all_vals = jnp.concatenate([vals, sims], axis=1)
        all_idx = jnp.concatenate([idx, jnp.broadcast_to(cols, (b, key_block))], axis=1)
        new_vals, pos = jax.lax.top_k(all_vals, k)
        return (new_vals, jnp.take_along_axis(all_idx, pos, axis=1)), None

    init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32))
    starts = jnp.arange(nb, dtype=jnp.int32) * key_block
    (vals, idx), _ = jax.lax.scan(body, init, (blocks, starts))
    idx = jnp.where(jnp.isfinite(vals), idx, -1)
    return vals, idx


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    n = x.shape[0]
    target = max(multiple, int(math.ceil(n / multiple)) * multiple)
    if target == n:
        return x
    return np.concatenate([x, np.zeros((target - n,) + x.shape[1:], x.dtype)], axis=0)


@functools.lru_cache(maxsize=32)
def _sharded_topk(mesh, k: int, key_block: int, precision: str):
    """topk_over_keys with queries split over every device of ``mesh`` and a replicated result."""
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    fn = functools.partial(topk_over_keys, k=k, key_block=key_block, precision=precision)
    return jax.jit(fn, in_shardings=(rows, rep, rep), out_shardings=(rep, rep)), rows, rep


def _global_from_host(x: np.ndarray, sharding) -> jax.Array:
    """A global array from a copy that every process holds in full (multi-host safe)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def ranked_neighbours(
    queries,
    keys,
    k: int,
    *,
    query_block: int = 1024,
    key_block: int = 4096,
    mesh: jax.sharding.Mesh | None = None,
    precision: str = "highest",
) -> np.ndarray:
    """``[Nq, k]`` indices of each query's k most similar keys (dot product), best first.

    Queries are processed ``query_block`` rows at a time; within a block, keys are scanned
    ``key_block`` rows at a time (``topk_over_keys``). With a ``mesh``, each query block is
    split over all its devices (keys replicated) and every process gets the full answer; each
    process must then pass the same ``queries`` and ``keys``. ``-1`` fills the slots when there
    are fewer than k keys.
    """
    queries = np.asarray(queries, np.float32)
    keys = np.asarray(keys, np.float32)
    nq, nk = queries.shape[0], keys.shape[0]
    k = int(k)
    key_block = int(min(key_block, max(nk, 1)))
    keys_p = _pad_rows(keys, key_block)
    if mesh is None:
        query_block = int(min(query_block, max(nq, 1)))
        keys_dev = jnp.asarray(keys_p)
        run = functools.partial(topk_over_keys, k=k, key_block=key_block, precision=precision)
        put = jnp.asarray
    else:
        nd = mesh.devices.size
        query_block = int(math.ceil(min(query_block, max(nq, 1)) / nd)) * nd
        run, rows, rep = _sharded_topk(mesh, k, key_block, precision)
        keys_dev = _global_from_host(keys_p, rep)
        put = functools.partial(_global_from_host, sharding=rows)
    out = np.empty((nq, k), np.int64)
    for start in range(0, nq, query_block):
        q = queries[start : start + query_block]
        n = q.shape[0]
        _, idx = run(put(_pad_rows(q, query_block)), keys_dev, np.int32(nk))
        out[start : start + n] = np.asarray(idx.addressable_data(0))[:n]
    return out


def retrieval_recall(
    image_emb,
    text_emb,
    text_to_image,
    ks: Sequence[int] = (1, 5, 10),
    *,
    query_block: int = 1024,
    key_block: int = 4096,
    mesh: jax.sharding.Mesh | None = None,
    normalize: bool = True,
    precision: str = "highest",
) -> dict:
    """Image->text and text->image recall@K with several captions per image.

    image_emb ``[N, D]``; text_emb ``[M, D]``; ``text_to_image[j]`` is the image of caption j.
    i2t_R@K: fraction of images (with at least one caption) having any of their captions among
    their K most similar captions. t2i_R@K: fraction of captions whose image is among their K
    most similar images. Computed block-wise (``ranked_neighbours``); no ``N x M`` matrix.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    t2i = np.asarray(text_to_image).astype(np.int64).reshape(-1)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb {image_emb.shape} and text_emb {text_emb.shape} must be [N, D] and "
            "[M, D] with the same D"
        )
    n, m = image_emb.shape[0], text_emb.shape[0]
    if t2i.shape[0] != m:
        raise ValueError(
            f"text_to_image has {t2i.shape[0]} entries; expected one per caption ({m})"
        )
    if n == 0 or m == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {n} and {m}")
    bad = (t2i < 0) | (t2i >= n)
    if np.any(bad):
        raise ValueError(
            f"text_to_image holds {int(t2i[bad][0])}; expected image indices in 0..{n - 1}"
        )
    if normalize:
        image_emb = np.asarray(l2_normalize(image_emb))
        text_emb = np.asarray(l2_normalize(text_emb))
    kmax = max(ks)
    kw = dict(query_block=query_block, key_block=key_block, mesh=mesh, precision=precision)

    out = {}
    # image -> text
    nn_text = ranked_neighbours(image_emb, text_emb, kmax, **kw)  # [N, K]
    owner = np.where(nn_text >= 0, t2i[np.maximum(nn_text, 0)], -1)  # image of each hit
    own = owner == np.arange(n)[:, None]
    has_caption = np.bincount(t2i, minlength=n) > 0
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(np.any(own[has_caption, :k], axis=1)))
    # text -> image
    nn_image = ranked_neighbours(text_emb, image_emb, kmax, **kw)  # [M, K]
    hit = nn_image == t2i[:, None]
    for k in ks:
        out[f"t2i_R@{k}"] = float(np.mean(np.any(hit[:, :k], axis=1)))
    out["num_images"] = int(has_caption.sum())
    out["num_texts"] = int(m)
    return out


# --------------------------------------------------------------------------- Tip-Adapter


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


# --------------------------------------------------------------------------- linear probe


@jax.jit
def _lr_loss_grad(params, x_chunks, y_chunks, w_chunks, l2):
    """Mean softmax cross-entropy + l2/2 * ||W||^2 (bias unpenalised), and its gradient.

    The rows come in chunks ``[n_chunks, chunk, D]`` (padding rows have weight 0) and the
    gradient is accumulated chunk by chunk in closed form (``X^T (softmax - onehot)``), so
    memory is ``O(chunk x classes)`` however many training examples there are.
    """
    w, b = params
    num_classes = w.shape[1]
    n = jnp.sum(w_chunks)
    hp = jax.lax.Precision.HIGHEST

    def body(carry, inputs):
        loss, gw, gb = carry
        xc, yc, wc = inputs
        logp = jax.nn.log_softmax(jnp.matmul(xc, w, precision=hp) + b)
        onehot = jax.nn.one_hot(yc, num_classes, dtype=logp.dtype)
        loss = loss - jnp.sum(wc * jnp.sum(onehot * logp, axis=-1))
        diff = (jnp.exp(logp) - onehot) * wc[:, None]
        return (loss, gw + jnp.matmul(xc.T, diff, precision=hp), gb + jnp.sum(diff, axis=0)), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros_like(w), jnp.zeros_like(b))
    (loss, gw, gb), _ = jax.lax.scan(body, init, (x_chunks, y_chunks, w_chunks))
    value = loss / n + 0.5 * l2 * jnp.sum(w * w)
    return value, (gw / n + l2 * w, gb / n)


def fit_logistic_regression(
    x,
    y,
    num_classes: int,
    c: float,
    *,
    init=None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    chunk: int = 16384,
):
    """Multinomial logistic regression with L2 penalty, minimised by L-BFGS (scipy).

    Same objective as ``sklearn.linear_model.LogisticRegression(C=c)`` (lbfgs, multinomial):
    ``0.5 * ||W||^2 + c * sum_i CE_i``, intercept unpenalised; here divided by ``c * N`` for
    conditioning, which leaves the minimiser unchanged. Loss and gradient run in JAX (jit, so
    on the accelerator for large feature sets, ``chunk`` rows at a time); the optimiser runs
    on the host. Returns ``(W [D, C], b [C])`` as float64 numpy arrays.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    n, d = x.shape
    if y.shape[0] != n:
        raise ValueError(f"{n} feature rows but {y.shape[0]} labels")
    if c <= 0:
        raise ValueError(f"C must be > 0, got {c}")
    if n == 0:
        raise ValueError("no training examples for the logistic regression")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"label {int(y.min() if y.min() < 0 else y.max())} is outside 0..{num_classes - 1}"
        )
    chunk = int(min(chunk, n))
    n_chunks = int(math.ceil(n / chunk))
    pad = n_chunks * chunk - n
    xs = jnp.asarray(
        np.concatenate([x, np.zeros((pad, d), np.float32)]).reshape(n_chunks, chunk, d)
    )
    ys = jnp.asarray(
        np.concatenate([y, np.zeros(pad, np.int64)]).astype(np.int32).reshape(n_chunks, chunk)
    )
    ws = jnp.asarray(
        np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]).reshape(n_chunks, chunk)
    )
    l2 = jnp.float32(1.0 / (c * n))
    size_w = d * num_classes

    def fun(theta):
        params = (
            jnp.asarray(theta[:size_w].reshape(d, num_classes), jnp.float32),
            jnp.asarray(theta[size_w:], jnp.float32),
        )
        value, (gw, gb) = _lr_loss_grad(params, xs, ys, ws, l2)
        grad = np.concatenate([np.asarray(gw, np.float64).ravel(), np.asarray(gb, np.float64)])
        return float(value), grad

    if init is None:
        theta0 = np.zeros(size_w + num_classes, np.float64)
    else:
        theta0 = np.concatenate(
            [np.asarray(init[0], np.float64).ravel(), np.asarray(init[1], np.float64)]
        )
    res = scipy.optimize.minimize(
        fun,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": int(max_iter), "gtol": tol, "ftol": 1e-12},
    )
    theta = res.x
    return theta[:size_w].reshape(d, num_classes), theta[size_w:]


def _accuracy(x, y, params) -> float:
    w, b = params
    pred = np.argmax(np.asarray(x, np.float64) @ w + b, axis=-1)
    return float(np.mean(pred == np.asarray(y).reshape(-1)))


def split_train_val(n: int, val_fraction: float = 0.2, seed: int = 0):
    """Random disjoint sorted (train_idx, val_idx) of ``range(n)``; val has round(f * n) >= 1."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise ValueError(f"cannot carve a validation split of {n_val} from {n} examples")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


DEFAULT_C_VALUES = tuple(float(c) for c in np.logspace(-6, 6, 13))


def linear_probe(
    train_x,
    train_y,
    val_x,
    val_y,
    test_x,
    test_y,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
    *,
    refine_steps: int = 0,
    num_classes: int | None = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> dict:
    """The CLIP paper's linear probe on frozen features.

    Fits on train for every C in ``c_values`` (ascending, each warm-started from the previous),
    picks the best validation top-1 (ties: the smaller C, i.e. the stronger penalty), then
    optionally refines ``refine_steps`` times by trying the geometric midpoints between the
    best C and its neighbours; refits on train+val with the chosen C and reports test top-1.
    Pass ``val_x=None`` to carve 20% of train as validation (``split_train_val``).
    """
    train_x = np.asarray(train_x, np.float32)
    train_y = np.asarray(train_y).astype(np.int64).reshape(-1)
    if val_x is None:
        tr, va = split_train_val(train_x.shape[0])
        train_x, val_x, train_y, val_y = train_x[tr], train_x[va], train_y[tr], train_y[va]
    val_x = np.asarray(val_x, np.float32)
    val_y = np.asarray(val_y).astype(np.int64).reshape(-1)
    test_x = np.asarray(test_x, np.float32)
    test_y = np.asarray(test_y).astype(np.int64).reshape(-1)
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max(), test_y.max())) + 1
    cs = sorted(float(c) for c in c_values)
    if not cs:
        raise ValueError("c_values is empty; expected at least one regularisation value C > 0")

    fits, scores = {}, {}
    prev = None
    for c in cs:
        fits[c] = fit_logistic_regression(
            train_x, train_y, num_classes, c, init=prev, max_iter=max_iter, tol=tol
        )
        prev = fits[c]
        scores[c] = _accuracy(val_x, val_y, fits[c])

    def best_c():
        return max(sorted(scores), key=lambda c: (scores[c], -c))

    for _ in range(int(refine_steps)):
        grid = sorted(scores)
        b = best_c()
        i = grid.index(b)
        for j in (i - 1, i + 1):
            if 0 <= j < len(grid):
                mid = float(math.sqrt(grid[j] * b))
                if mid not in scores:
                    fits[mid] = fit_logistic_regression(
                        train_x, train_y, num_classes, mid, init=fits[b], max_iter=max_iter, tol=tol
                    )
                    scores[mid] = _accuracy(val_x, val_y, fits[mid])
    c_best = best_c()
    all_x = np.concatenate([train_x, val_x])
    all_y = np.concatenate([train_y, val_y])
    final = fit_logistic_regression(
        all_x, all_y, num_classes, c_best, init=fits[c_best], max_iter=max_iter, tol=tol
    )
    return {
        "top1": _accuracy(test_x, test_y, final),
        "best_C": c_best,
        "val_top1": scores[c_best],
        "val_top1_by_C": {f"{c:.6g}": scores[c] for c in sorted(scores)},
        "num_train": int(train_x.shape[0]),
        "num_val": int(val_x.shape[0]),
        "num_test": int(test_x.shape[0]),
    }

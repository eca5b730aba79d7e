"""The CLIP paper's linear probe: multinomial logistic regression on frozen features.

``fit_logistic_regression`` minimises scikit-learn's objective with scipy's L-BFGS on a JAX
loss/gradient; ``linear_probe`` sweeps the regularisation on a validation split, refits on
train+val and reports test top-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from clip_jax.eval.metrics.neighbours import pad_rows

DEFAULT_C_VALUES = tuple(10.0**e for e in range(-6, 7))  # the paper's sweep, 1e-6 .. 1e6


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
    xs = pad_rows(x, chunk)
    n_chunks = xs.shape[0] // chunk
    xs = jnp.asarray(xs.reshape(n_chunks, chunk, d))
    ys = jnp.asarray(pad_rows(y.astype(np.int32), chunk).reshape(n_chunks, chunk))
    ws = jnp.asarray(pad_rows(np.ones(n, np.float32), chunk).reshape(n_chunks, chunk))
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

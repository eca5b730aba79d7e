"""Contrastive losses on embeddings: dense forms and their sharded forms.

Every function here is a pure function of

- ``image_emb``, ``text_emb``: ``[B, D]``, already L2-normalised (any float dtype),
- ``logit_scale``: the already-exponentiated temperature, a scalar,
- ``logit_bias``: an optional scalar (required by the sigmoid loss),

and returns ``(loss, metrics)`` with ``metrics = {'i2t_acc', 't2i_acc'}`` (in-batch top-1
accuracy, ties going to the lowest index as ``argmax`` does). Logits are always computed in
float32 (``preferred_element_type``), whatever the embedding dtype.

``make_loss`` returns the same signature over GLOBAL arrays sharded on the batch dimension over
``batch_axes`` of a mesh. The sharded forms never build the global ``B x B`` matrix:

- ``impl='gather'``: the embeddings are all-gathered over the batch axes and each device builds
  its ``b x B`` block of local rows against global columns (``b = B / n``, ``n`` devices over the
  batch axes). The transpose of ``all_gather`` is a ``psum_scatter``, so every shard receives
  the gradient contributed by all other shards.
- ``impl='ring'``: only ``b x b`` tiles. The text blocks travel around a ring of the ``n``
  devices by ``ppermute``; each device meets every text block once. Row statistics (the
  image->text log-sum-exp, the running arg-max) stay on the device, column statistics (the
  text->image log-sum-exp) travel with the text block and return to its owner after the
  last step, so one ``b x b`` matmul per step serves both directions. The backward pass is a
  second ring (``jax.custom_vjp``) that recomputes each tile and sends the text block's
  gradient accumulator along with it, so per-device loss memory is ``O(b^2 + b*D)`` in both
  passes (no residual grows with the number of devices).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

__all__ = ["softmax_loss", "sigmoid_loss", "make_loss", "KINDS", "IMPLS"]

KINDS = ("softmax", "sigmoid")
IMPLS = ("dense", "gather", "ring")

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

_F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Validation and small helpers.
# --------------------------------------------------------------------------------------------


def _check_inputs(kind: str, image_emb, text_emb, logit_scale, logit_bias):
    """Trace-time checks shared by every form. Returns the scale / bias as f32 scalars."""
    for name, x in (("image_emb", image_emb), ("text_emb", text_emb)):
        if jnp.ndim(x) != 2:
            raise ValueError(f"{name} must be 2-D [batch, width]; got shape {tuple(jnp.shape(x))}.")
    if jnp.shape(image_emb) != jnp.shape(text_emb):
        raise ValueError(
            "image_emb and text_emb must have the same [batch, width]; got image_emb shape "
            f"{tuple(jnp.shape(image_emb))} and text_emb shape {tuple(jnp.shape(text_emb))}."
        )
    if jnp.shape(image_emb)[0] == 0:
        raise ValueError(f"the batch is empty (image_emb shape {tuple(jnp.shape(image_emb))}).")
    if math.prod(jnp.shape(logit_scale)) != 1:
        raise ValueError(
            f"logit_scale must be a scalar; got shape {tuple(jnp.shape(logit_scale))}."
        )
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError(
            "the sigmoid loss needs logit_bias (a scalar); got None. Build the model with "
            "logit_bias_init set (SigLIP uses -10)."
        )
    if logit_bias is not None and math.prod(jnp.shape(logit_bias)) != 1:
        raise ValueError(
            f"logit_bias must be a scalar or None; got shape {tuple(jnp.shape(logit_bias))}."
        )
    scale = jnp.reshape(logit_scale, ()).astype(_F32)
    bias = None if logit_bias is None else jnp.reshape(logit_bias, ()).astype(_F32)
    return scale, bias


def _check_kind(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}.")


def _sim(q, k):
    """``q @ k.T`` with float32 accumulation and output."""
    dtype = jnp.result_type(q, k)
    return jnp.einsum("id,jd->ij", q.astype(dtype), k.astype(dtype), preferred_element_type=_F32)


def _row_dot(a, b):
    """Row-wise dot products (the diagonal of ``a @ b.T``) in float32."""
    return jnp.sum(a.astype(_F32) * b.astype(_F32), axis=-1)


# --------------------------------------------------------------------------------------------
# Dense forms.
# --------------------------------------------------------------------------------------------


def _dense_logits(image_emb, text_emb, scale, bias):
    logits = scale * _sim(image_emb, text_emb)
    return logits if bias is None else logits + bias


def _dense_acc(logits):
    logits = lax.stop_gradient(logits)
    ids = jnp.arange(logits.shape[0])
    return {
        "i2t_acc": jnp.mean((jnp.argmax(logits, axis=1) == ids).astype(_F32)),
        "t2i_acc": jnp.mean((jnp.argmax(logits, axis=0) == ids).astype(_F32)),
    }


def softmax_loss(image_emb, text_emb, logit_scale, logit_bias=None):
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropies.

    ``logits = logit_scale * image_emb @ text_emb.T (+ logit_bias)`` in float32; the matching
    pair of row ``i`` is column ``i``. A bias is allowed but cancels in the softmax.
    """
    scale, bias = _check_inputs("softmax", image_emb, text_emb, logit_scale, logit_bias)
    logits = _dense_logits(image_emb, text_emb, scale, bias)
    diag = jnp.diagonal(logits)
    i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
    return 0.5 * (i2t + t2i), _dense_acc(logits)


def sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias):
    """SigLIP: every pair is a binary problem, +1 on the diagonal and -1 elsewhere.

    ``loss = -sum_ij log_sigmoid(label_ij * (logit_scale * sim_ij + logit_bias)) / B``.
    """
    scale, bias = _check_inputs("sigmoid", image_emb, text_emb, logit_scale, logit_bias)
    logits = _dense_logits(image_emb, text_emb, scale, bias)
    n = logits.shape[0]
    labels = 2.0 * jnp.eye(n, dtype=_F32) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
    return loss, _dense_acc(logits)


# --------------------------------------------------------------------------------------------
# Sharded form 1: all-gather (local rows x global columns).
# --------------------------------------------------------------------------------------------


def _gather_body(kind, axes, n, image, text, scale, bias):
    """Runs per device on its ``[b, D]`` shards; returns replicated loss and metrics."""
    b = image.shape[0]
    big_b = b * n
    me = lax.axis_index(axes)
    rows = me * b + jnp.arange(b)  # global index of the local rows (matches P(axes) layout)
    all_text = lax.all_gather(text, axes, axis=0, tiled=True)  # [B, D]
    i2t = scale * _sim(image, all_text) + bias  # [b, B]
    diag = scale * _row_dot(image, text) + bias  # == i2t[r, rows[r]]
    col = jnp.arange(big_b)
    i2t_hits = jnp.sum(jnp.argmax(lax.stop_gradient(i2t), axis=1) == rows)

    if kind == "softmax":
        all_image = lax.all_gather(image, axes, axis=0, tiled=True)
        t2i = scale * _sim(text, all_image) + bias  # [b, B]
        local = jnp.sum(jax.nn.logsumexp(i2t, axis=1) - diag) + jnp.sum(
            jax.nn.logsumexp(t2i, axis=1) - diag
        )
        loss = lax.psum(local, axes) / (2 * big_b)
        t2i_hits = jnp.sum(jnp.argmax(lax.stop_gradient(t2i), axis=1) == rows)
        t2i_hits = lax.psum(t2i_hits, axes)
    else:
        labels = jnp.where(col[None, :] == rows[:, None], 1.0, -1.0)
        local = -jnp.sum(jax.nn.log_sigmoid(labels * i2t))
        loss = lax.psum(local, axes) / big_b
        # text->image top-1 from the column statistics of the local blocks: no second matmul.
        blk = lax.stop_gradient(i2t)
        cmax = jnp.max(blk, axis=0)  # [B]
        carg = me * b + jnp.argmax(blk, axis=0)
        gmax = lax.pmax(cmax, axes)
        garg = lax.pmin(jnp.where(cmax == gmax, carg, big_b), axes)
        t2i_hits = jnp.sum(garg == col)
        # garg is already the same on every device: count once, not n times.
    i2t_hits = lax.psum(i2t_hits, axes)
    metrics = {
        "i2t_acc": i2t_hits.astype(_F32) / big_b,
        "t2i_acc": t2i_hits.astype(_F32) / big_b,
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Sharded form 2: ring (b x b tiles, blocks travel by ppermute, custom backward ring).
# --------------------------------------------------------------------------------------------


def _argmax_merge(best, arg, cand_val, cand_arg):
    """Merge running (max, first arg-max) with a candidate; ties go to the smaller index."""
    take = (cand_val > best) | ((cand_val == best) & (cand_arg < arg))
    return jnp.where(take, cand_val, best), jnp.where(take, cand_arg, arg)


def _ring_shift(axes, n):
    perm = [(i, (i + 1) % n) for i in range(n)]
    return lambda x: lax.ppermute(x, axes, perm)


def _ring_forward(kind, axes, n, image, text, scale, bias):
    """Forward ring. Returns per-device outputs and the row/col statistics for the backward.

    At step ``s`` the device holds the text block of device ``(me - s) mod n``; the block and
    its column statistics move to device ``me + 1`` after each step. After the last step the
    column statistics are one hop away from the block's owner; a final shift brings them home.
    """
    b = image.shape[0]
    me = lax.axis_index(axes)
    local_ids = jnp.arange(b)
    rows = me * b + local_ids
    shift = _ring_shift(axes, n)

    def tile(s, txt_blk):
        owner = (me - s) % n
        logits = scale * _sim(image, txt_blk) + bias
        return logits, owner * b + local_ids  # logits [b, b], global ids of the columns

    def first(txt_blk):
        """Step 0: own block. Initialises every statistic (no -inf sentinels needed)."""
        logits, cols = tile(0, txt_blk)
        row = {"m": jnp.max(logits, 1), "arg": cols[jnp.argmax(logits, 1)]}
        colst = {"m": jnp.max(logits, 0), "arg": rows[jnp.argmax(logits, 0)]}
        if kind == "softmax":
            row["s"] = jnp.sum(jnp.exp(logits - row["m"][:, None]), 1)
            colst["s"] = jnp.sum(jnp.exp(logits - colst["m"][None, :]), 0)
            acc = None
        else:
            labels = 2.0 * jnp.eye(b, dtype=_F32) - 1.0
            acc = -jnp.sum(jax.nn.log_sigmoid(labels * logits))
        return row, colst, acc

    def later(s, txt_blk, row, colst, acc):
        logits, cols = tile(s, txt_blk)
        bm, cm = jnp.max(logits, 1), jnp.max(logits, 0)
        new_row_m, row_arg = _argmax_merge(row["m"], row["arg"], bm, cols[jnp.argmax(logits, 1)])
        new_col_m, col_arg = _argmax_merge(
            colst["m"], colst["arg"], cm, rows[jnp.argmax(logits, 0)]
        )
        new_row, new_col = {"m": new_row_m, "arg": row_arg}, {"m": new_col_m, "arg": col_arg}
        if kind == "softmax":
            new_row["s"] = row["s"] * jnp.exp(row["m"] - new_row_m) + jnp.sum(
                jnp.exp(logits - new_row_m[:, None]), 1
            )
            new_col["s"] = colst["s"] * jnp.exp(colst["m"] - new_col_m) + jnp.sum(
                jnp.exp(logits - new_col_m[None, :]), 0
            )
        else:
            acc = acc + jnp.sum(jax.nn.softplus(logits))  # -log_sigmoid(-z): all negatives
        return new_row, new_col, acc

    row, colst, acc = first(text)
    if n > 1:

        def body(s, carry):
            txt_blk, row, colst, acc = carry
            txt_blk = shift(txt_blk)
            colst = shift(colst)
            row, colst, acc = later(s, txt_blk, row, colst, acc)
            return txt_blk, row, colst, acc

        _, row, colst, acc = lax.fori_loop(1, n, body, (text, row, colst, acc))
        colst = shift(colst)  # home: column statistics of this device's own text block

    i2t_hits = jnp.sum(row["arg"] == rows).astype(_F32)
    t2i_hits = jnp.sum(colst["arg"] == rows).astype(_F32)
    if kind == "softmax":
        row_lse = row["m"] + jnp.log(row["s"])
        col_lse = colst["m"] + jnp.log(colst["s"])
        return (row_lse, col_lse, i2t_hits, t2i_hits), (row_lse, col_lse)
    return (acc, i2t_hits, t2i_hits), ()


def _ring_backward(kind, axes, n, image, text, scale, bias, stats, cts):
    """Backward ring: recompute each tile, form d(loss)/d(logits), accumulate gradients.

    The text block travels as in the forward pass together with its gradient accumulator (and,
    for softmax, its column log-sum-exp and the cotangent of it); after ``n`` hops the
    accumulator is back with the block's owner, holding contributions from every image.
    """
    b = image.shape[0]
    shift = _ring_shift(axes, n)
    eye = jnp.eye(b, dtype=_F32)
    img32 = image.astype(_F32)

    if kind == "softmax":
        row_lse, col_lse = stats
        g_row, g_col = cts[0].astype(_F32), cts[1].astype(_F32)
        travel = {"txt": text, "lse": col_lse, "g": g_col}
    else:
        g_loss = cts[0].astype(_F32)
        travel = {"txt": text}

    def step(is_first, travel, dtxt, dimg, dscale, dbias):
        sim = _sim(image, travel["txt"])
        logits = scale * sim + bias
        if kind == "softmax":
            g = g_row[:, None] * jnp.exp(logits - row_lse[:, None]) + travel["g"][
                None, :
            ] * jnp.exp(logits - travel["lse"][None, :])
        else:
            # d/dz -log_sigmoid(y z) = sigmoid(z) - [y == +1]; positives only in step 0.
            pos = eye if is_first else 0.0
            g = g_loss * (jax.nn.sigmoid(logits) - pos)
        txt32 = travel["txt"].astype(_F32)
        dimg = dimg + scale * (g @ txt32)
        dtxt = dtxt + scale * (g.T @ img32)
        dscale = dscale + jnp.sum(g * sim)
        dbias = dbias + jnp.sum(g)
        return dtxt, dimg, dscale, dbias

    zero_like = lambda x: jnp.zeros(x.shape, _F32)  # noqa: E731
    dtxt, dimg, dscale, dbias = step(
        True, travel, zero_like(text), zero_like(image), jnp.zeros((), _F32), jnp.zeros((), _F32)
    )
    if n > 1:

        def body(s, carry):
            travel, dtxt, dimg, dscale, dbias = carry
            travel, dtxt = shift(travel), shift(dtxt)
            dtxt, dimg, dscale, dbias = step(False, travel, dtxt, dimg, dscale, dbias)
            return travel, dtxt, dimg, dscale, dbias

        _, dtxt, dimg, dscale, dbias = lax.fori_loop(
            1, n, body, (travel, dtxt, dimg, dscale, dbias)
        )
        dtxt = shift(dtxt)  # home
    return dimg.astype(image.dtype), dtxt.astype(text.dtype), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring_core(kind, axes, n, image, text, scale, bias):
    return _ring_forward(kind, axes, n, image, text, scale, bias)[0]


def _ring_core_fwd(kind, axes, n, image, text, scale, bias):
    out, stats = _ring_forward(kind, axes, n, image, text, scale, bias)
    return out, (image, text, scale, bias, stats)


def _ring_core_bwd(kind, axes, n, res, cts):
    image, text, scale, bias, stats = res
    dimg, dtxt, dscale, dbias = _ring_backward(kind, axes, n, image, text, scale, bias, stats, cts)
    return dimg, dtxt, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def _ring_body(kind, axes, n, image, text, scale, bias):
    b = image.shape[0]
    big_b = b * n
    # Per-device partial gradients of scale/bias come out of the custom backward; marking them
    # varying here makes their transpose a psum over the batch axes.
    scale_v = lax.pcast(scale, axes, to="varying")
    bias_v = lax.pcast(bias, axes, to="varying")
    out = _ring_core(kind, axes, n, image, text, scale_v, bias_v)
    if kind == "softmax":
        row_lse, col_lse, i2t_hits, t2i_hits = out
        diag = scale_v * _row_dot(image, text) + bias_v
        local = jnp.sum(row_lse - diag) + jnp.sum(col_lse - diag)
        loss = lax.psum(local, axes) / (2 * big_b)
    else:
        local, i2t_hits, t2i_hits = out
        loss = lax.psum(local, axes) / big_b
    hits = lax.psum(lax.stop_gradient(jnp.stack([i2t_hits, t2i_hits])), axes)
    return loss, {"i2t_acc": hits[0] / big_b, "t2i_acc": hits[1] / big_b}


# --------------------------------------------------------------------------------------------
# Factory.
# --------------------------------------------------------------------------------------------


def make_loss(
    kind: str,
    mesh: jax.sharding.Mesh | None = None,
    impl: str = "gather",
    batch_axes: Sequence[str] | str = ("data", "fsdp"),
) -> LossFn:
    """Returns ``loss_fn(image_emb, text_emb, logit_scale, logit_bias=None) -> (loss, metrics)``.

    Args:
      kind: ``'softmax'`` (CLIP) or ``'sigmoid'`` (SigLIP).
      mesh: the device mesh. ``None`` gives the dense forms.
      impl: ``'dense'`` (the dense form, left to the partitioner), ``'gather'`` (``b x B`` per
        device) or ``'ring'`` (``b x b`` per device).
      batch_axes: mesh axes the batch dimension is sharded over (row-major, as in
        ``P(batch_axes)``).

    The returned function takes GLOBAL arrays (sharded over ``batch_axes`` on dim 0 when a mesh
    is given; they are resharded if not) and returns a replicated scalar loss and metrics.
    """
    _check_kind(kind)
    if impl not in IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}; expected one of {IMPLS}.")
    dense = softmax_loss if kind == "softmax" else sigmoid_loss
    if mesh is None or impl == "dense":
        return dense

    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if not axes or missing:
        raise ValueError(
            f"batch_axes {axes} must be a non-empty subset of the mesh axes "
            f"{tuple(mesh.axis_names)}; not in the mesh: {missing}."
        )
    n = math.prod(mesh.shape[a] for a in axes)
    body = _gather_body if impl == "gather" else _ring_body
    sharded = jax.shard_map(
        functools.partial(body, kind, axes, n),
        mesh=mesh,
        in_specs=(P(axes, None), P(axes, None), P(), P()),
        out_specs=(P(), {"i2t_acc": P(), "t2i_acc": P()}),
        check_vma=True,
    )

    def loss_fn(image_emb, text_emb, logit_scale, logit_bias=None):
        scale, bias = _check_inputs(kind, image_emb, text_emb, logit_scale, logit_bias)
        batch = jnp.shape(image_emb)[0]
        if batch % n:
            raise ValueError(
                f"global batch {batch} is not divisible by the {n} devices over batch axes "
                f"{axes} (mesh {dict(mesh.shape)}); use a global batch that is a multiple "
                f"of {n}."
            )
        if bias is None:  # softmax without bias: a constant zero (its gradient is dropped)
            bias = jnp.zeros((), _F32)
        return sharded(image_emb, text_emb, scale, bias)

    loss_fn.__name__ = f"{kind}_{impl}_loss"
    loss_fn.__doc__ = make_loss.__doc__
    return loss_fn

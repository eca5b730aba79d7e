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
- ``impl='ring'``: two levels of tiling, so per-device loss memory is ``O(b*D + c^2)``.

  1. Across devices, a ring of ``b x b`` tiles: the text blocks travel around the ``n``
     devices by ``ppermute`` and each device meets every text block once. Row statistics (the
     image->text log-sum-exp, the running arg-max) stay on the device, column statistics (the
     text->image log-sum-exp and arg-max) travel with the text block and return to its owner
     after the last step, so one pass over a tile serves both directions.
  2. Within a device, each ``b x b`` tile is folded in ``c x c`` chunks (``chunk_size``) by two
     nested ``fori_loop`` s (row chunks, then column chunks): an online log-sum-exp and arg-max
     merge the chunk into the row and column statistics, so only one chunk of logits is alive.

  The backward pass is a second ring (``jax.custom_vjp``) that recomputes each chunk from the
  saved row/column log-sum-exps and sends the text block's gradient accumulator along with the
  block. Nothing is saved per tile or chunk (autodiff through the loops would store every
  chunk: ``b x B`` per device). ``chunk_size=0`` (or any size ``>= b``: the chunk is clamped
  to the tile) is one chunk per tile, the plain ring with ``O(b^2)`` memory; a smaller size
  must divide ``b``. Training configs set ``loss.chunk_size`` (default 1024, see
  ``benchmarks/loss_memory.py``); the other forms ignore it. The sigmoid loss is folded as
  ``softplus`` over every pair minus the matching pairs' logits (``-log_sigmoid(z) =
  softplus(z) - z``), so no chunk needs a diagonal mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

__all__ = ["softmax_loss", "sigmoid_loss", "make_loss", "chunk_size_error", "KINDS", "IMPLS"]

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
# Sharded form 2: ring of b x b tiles (text blocks travel by ppermute), each tile folded in
# c x c chunks; a custom backward ring recomputes the chunks.
# --------------------------------------------------------------------------------------------


def _nearest_divisors(n: int, k: int) -> tuple[int, int]:
    """The largest divisor of ``n`` below ``k`` and the smallest above it."""
    below = max(d for d in range(1, k) if n % d == 0)
    above = min(d for d in range(k + 1, n + 1) if n % d == 0)
    return below, above


def chunk_size_error(chunk_size: int, tile: int) -> str | None:
    """Why ``chunk_size`` cannot split a ``tile x tile`` ring tile, or ``None`` if it can.

    ``0`` and any size ``>= tile`` mean one chunk (the size is clamped to the tile); a smaller
    size must divide the tile.
    """
    if chunk_size < 0:
        return f"chunk_size={chunk_size} must be >= 0 (0 = one chunk per tile)"
    if chunk_size == 0 or chunk_size >= tile or tile % chunk_size == 0:
        return None
    below, above = _nearest_divisors(tile, chunk_size)
    return (
        f"chunk_size={chunk_size} does not divide the per-device batch {tile}: use {below} "
        f"or {above} (or 0 for one chunk per tile)"
    )


def _chunk(chunk_size: int, tile: int) -> int:
    return tile if chunk_size == 0 or chunk_size >= tile else chunk_size


def _argmax_merge(best, arg, cand_val, cand_arg):
    """Merge running (max, first arg-max) with a candidate; ties go to the smaller index."""
    take = (cand_val > best) | ((cand_val == best) & (cand_arg < arg))
    return jnp.where(take, cand_val, best), jnp.where(take, cand_arg, arg)


def _ring_shift(axes, n):
    perm = [(i, (i + 1) % n) for i in range(n)]
    return lambda x: lax.ppermute(x, axes, perm)


def _varying(axes, tree):
    """Marks fresh (device-invariant) loop-carry initial values as per-device values."""
    return jax.tree.map(lambda x: lax.pcast(x, axes, to="varying"), tree)


def _loop(count, body, carry):
    """``fori_loop(0, count)``; a single trip is inlined (one chunk = the plain ring)."""
    return body(0, carry) if count == 1 else lax.fori_loop(0, count, body, carry)


def _get(tree, i, c):
    """Chunk ``i`` (``c`` rows) of every leaf of ``tree``."""
    return jax.tree.map(
        lambda x: x if x.shape[0] == c else lax.dynamic_slice_in_dim(x, i * c, c), tree
    )


def _put(tree, part, i, c):
    """``tree`` with chunk ``i`` of every leaf replaced by ``part``."""
    return jax.tree.map(
        lambda x, p: p if x.shape[0] == c else lax.dynamic_update_slice_in_dim(x, p, i * c, 0),
        tree,
        part,
    )


def _fold(kind, stats, logits, axis, ids):
    """Folds a chunk of logits into running per-row (axis=1) or per-column (axis=0) statistics:
    the max and its first arg-max, and for softmax the online sum ``sum exp(logit - max)``."""
    cand = jnp.max(logits, axis)
    m, arg = _argmax_merge(stats["m"], stats["arg"], cand, ids[jnp.argmax(logits, axis)])
    out = {"m": m, "arg": arg}
    if kind == "softmax":
        shifted = logits - (m[:, None] if axis == 1 else m[None, :])
        out["s"] = stats["s"] * jnp.exp(stats["m"] - m) + jnp.sum(jnp.exp(shifted), axis)
    return out


def _ring_forward(kind, axes, n, c, image, text, scale, bias):
    """Forward ring. Returns per-device outputs and the row/col log-sum-exps for the backward.

    At ring step ``s`` the device holds the text block of device ``(me - s) mod n``; the block
    and its column statistics move to device ``me + 1`` after each step. After the last step
    the column statistics are one hop away from the block's owner; a final shift brings them
    home. Within a step the ``b x b`` tile is visited in ``c x c`` chunks, row chunk by row
    chunk, so only one chunk of logits is alive at a time.
    """
    b = image.shape[0]
    nc = b // c
    me = lax.axis_index(axes)
    chunk_ids = jnp.arange(c)
    shift = _ring_shift(axes, n)

    def init():
        stats = {"m": jnp.full((b,), -jnp.inf, _F32), "arg": jnp.full((b,), n * b, jnp.int32)}
        if kind == "softmax":
            stats["s"] = jnp.zeros((b,), _F32)
        return _varying(axes, stats)

    def visit(s, txt_blk, row, col, acc):
        """Folds the tile (own images x text block of device ``me - s``) into the stats."""
        col_base = ((me - s) % n) * b

        def row_chunk(i, carry):
            row, col, acc = carry
            img_i, row_i = _get(image, i, c), _get(row, i, c)
            row_ids = me * b + i * c + chunk_ids

            def col_chunk(j, carry):
                row_i, col, acc = carry
                logits = scale * _sim(img_i, _get(txt_blk, j, c)) + bias
                row_i = _fold(kind, row_i, logits, 1, col_base + j * c + chunk_ids)
                col = _put(col, _fold(kind, _get(col, j, c), logits, 0, row_ids), j, c)
                if kind == "sigmoid":  # every pair as a negative; the diagonal is fixed outside
                    acc = acc + jnp.sum(jax.nn.softplus(logits))
                return row_i, col, acc

            row_i, col, acc = _loop(nc, col_chunk, (row_i, col, acc))
            return _put(row, row_i, i, c), col, acc

        return _loop(nc, row_chunk, (row, col, acc))

    acc = _varying(axes, jnp.zeros((), _F32))
    row, col, acc = visit(0, text, init(), init(), acc)
    if n > 1:

        def body(s, carry):
            txt_blk, row, col, acc = carry
            txt_blk, col = shift(txt_blk), shift(col)
            row, col, acc = visit(s, txt_blk, row, col, acc)
            return txt_blk, row, col, acc

        _, row, col, acc = lax.fori_loop(1, n, body, (text, row, col, acc))
        col = shift(col)  # home: column statistics of this device's own text block

    rows = me * b + jnp.arange(b)
    i2t_hits = jnp.sum(row["arg"] == rows).astype(_F32)
    t2i_hits = jnp.sum(col["arg"] == rows).astype(_F32)
    if kind == "softmax":
        row_lse = row["m"] + jnp.log(row["s"])
        col_lse = col["m"] + jnp.log(col["s"])
        return (row_lse, col_lse, i2t_hits, t2i_hits), (row_lse, col_lse)
    return (acc, i2t_hits, t2i_hits), ()


def _ring_backward(kind, axes, n, c, image, text, scale, bias, stats, cts):
    """Backward ring: recompute each chunk, form d(loss)/d(logits), accumulate gradients.

    The text block travels as in the forward pass together with its gradient accumulator (and,
    for softmax, its column log-sum-exp and the cotangent of it); after ``n`` hops the
    accumulator is back with the block's owner, holding contributions from every image.
    """
    b = image.shape[0]
    nc = b // c
    shift = _ring_shift(axes, n)

    if kind == "softmax":
        row_lse, col_lse = stats
        rows = {"lse": row_lse, "g": cts[0].astype(_F32)}
        travel = {"txt": text, "lse": col_lse, "g": cts[1].astype(_F32)}
    else:
        g_loss = cts[0].astype(_F32)
        rows, travel = {}, {"txt": text}

    def visit(travel, dtxt, dimg, dscale, dbias):
        def row_chunk(i, carry):
            dtxt, dimg, dscale, dbias = carry
            img_i, row_i, dimg_i = _get(image, i, c), _get(rows, i, c), _get(dimg, i, c)

            def col_chunk(j, carry):
                dtxt, dimg_i, dscale, dbias = carry
                col_j = _get(travel, j, c)
                sim = _sim(img_i, col_j["txt"])
                logits = scale * sim + bias
                if kind == "softmax":
                    g = row_i["g"][:, None] * jnp.exp(logits - row_i["lse"][:, None]) + col_j["g"][
                        None, :
                    ] * jnp.exp(logits - col_j["lse"][None, :])
                else:
                    g = g_loss * jax.nn.sigmoid(logits)  # d softplus(z) / dz
                dimg_i = dimg_i + scale * (g @ col_j["txt"].astype(_F32))
                dtxt_j = _get(dtxt, j, c) + scale * (g.T @ img_i.astype(_F32))
                dscale = dscale + jnp.sum(g * sim)
                dbias = dbias + jnp.sum(g)
                return _put(dtxt, dtxt_j, j, c), dimg_i, dscale, dbias

            dtxt, dimg_i, dscale, dbias = _loop(nc, col_chunk, (dtxt, dimg_i, dscale, dbias))
            return dtxt, _put(dimg, dimg_i, i, c), dscale, dbias

        return _loop(nc, row_chunk, (dtxt, dimg, dscale, dbias))

    zeros = lambda x: jnp.zeros(x.shape, _F32)  # noqa: E731
    carry = _varying(axes, (zeros(text), zeros(image), jnp.zeros((), _F32), jnp.zeros((), _F32)))
    dtxt, dimg, dscale, dbias = visit(travel, *carry)
    if n > 1:

        def body(s, carry):
            travel, dtxt, dimg, dscale, dbias = carry
            travel, dtxt = shift(travel), shift(dtxt)
            return travel, *visit(travel, dtxt, dimg, dscale, dbias)

        _, dtxt, dimg, dscale, dbias = lax.fori_loop(
            1, n, body, (travel, dtxt, dimg, dscale, dbias)
        )
        dtxt = shift(dtxt)  # home
    return dimg.astype(image.dtype), dtxt.astype(text.dtype), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ring_core(kind, axes, n, c, image, text, scale, bias):
    return _ring_forward(kind, axes, n, c, image, text, scale, bias)[0]


def _ring_core_fwd(kind, axes, n, c, image, text, scale, bias):
    out, stats = _ring_forward(kind, axes, n, c, image, text, scale, bias)
    return out, (image, text, scale, bias, stats)


def _ring_core_bwd(kind, axes, n, c, res, cts):
    image, text, scale, bias, stats = res
    dimg, dtxt, dscale, dbias = _ring_backward(
        kind, axes, n, c, image, text, scale, bias, stats, cts
    )
    return dimg, dtxt, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def _ring_body(kind, axes, n, chunk_size, image, text, scale, bias):
    b = image.shape[0]
    big_b = b * n
    # Per-device partial gradients of scale/bias come out of the custom backward; marking them
    # varying here makes their transpose a psum over the batch axes.
    scale_v = lax.pcast(scale, axes, to="varying")
    bias_v = lax.pcast(bias, axes, to="varying")
    out = _ring_core(kind, axes, n, _chunk(chunk_size, b), image, text, scale_v, bias_v)
    diag = scale_v * _row_dot(image, text) + bias_v  # the matching pairs' logits
    if kind == "softmax":
        row_lse, col_lse, i2t_hits, t2i_hits = out
        local = jnp.sum(row_lse - diag) + jnp.sum(col_lse - diag)
        loss = lax.psum(local, axes) / (2 * big_b)
    else:
        # -log_sigmoid(z) = softplus(z) - z: the core summed softplus over every pair.
        negatives, i2t_hits, t2i_hits = out
        loss = lax.psum(negatives - jnp.sum(diag), axes) / big_b
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
    chunk_size: int = 0,
) -> LossFn:
    """Returns ``loss_fn(image_emb, text_emb, logit_scale, logit_bias=None) -> (loss, metrics)``.

    Args:
      kind: ``'softmax'`` (CLIP) or ``'sigmoid'`` (SigLIP).
      mesh: the device mesh. ``None`` gives the dense forms.
      impl: ``'dense'`` (the dense form, left to the partitioner), ``'gather'`` (``b x B`` per
        device) or ``'ring'`` (``b x b`` per device).
      batch_axes: mesh axes the batch dimension is sharded over (row-major, as in
        ``P(batch_axes)``).
      chunk_size: ``impl='ring'`` only (the other forms ignore it): each device folds its
        ``b x b`` tile in ``chunk_size x chunk_size`` chunks. ``0`` or a size ``>= b`` is one
        chunk per tile; a smaller size must divide ``b`` (``ValueError`` otherwise, naming the
        nearest valid sizes).

    The returned function takes GLOBAL arrays (sharded over ``batch_axes`` on dim 0 when a mesh
    is given; they are resharded if not) and returns a replicated scalar loss and metrics.
    """
    _check_kind(kind)
    if impl not in IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}; expected one of {IMPLS}.")
    if chunk_size < 0:
        raise ValueError(f"{chunk_size_error(chunk_size, 1)}.")
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
    body = (
        functools.partial(_gather_body, kind, axes, n)
        if impl == "gather"
        else functools.partial(_ring_body, kind, axes, n, chunk_size)
    )
    sharded = jax.shard_map(
        body,
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
        if impl == "ring" and (problem := chunk_size_error(chunk_size, batch // n)):
            raise ValueError(f"{problem}; global batch {batch} over {n} devices.")
        if bias is None:  # softmax without bias: a constant zero (its gradient is dropped)
            bias = jnp.zeros((), _F32)
        return sharded(image_emb, text_emb, scale, bias)

    loss_fn.__name__ = f"{kind}_{impl}_loss"
    loss_fn.__doc__ = make_loss.__doc__
    return loss_fn

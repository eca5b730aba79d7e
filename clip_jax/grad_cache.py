"""Exact gradient caching: a contrastive batch as large as wanted in bounded device memory.

The contrastive loss couples every example with every other one, so plain gradient
accumulation over micro-batches changes the loss (fewer negatives). GradCache (Gao et al.
2021) and BASIC (Pham et al. 2021) keep the whole-batch loss and its exact gradient:

1. embed the whole global batch micro-batch by micro-batch, keeping no activations;
2. evaluate the loss once on all embeddings and take its gradient w.r.t. the embeddings,
   the logit scale and the logit bias;
3. recompute each micro-batch's forward pass and pull its slice of the embedding gradient
   back to the tower parameters (`jax.vjp`), summing over micro-batches;
4. pull the scale/bias gradient of step 2 back to their parameters once, through the
   model's own apply on an empty batch (the towers do no work on zero rows).

The steps are `lax.scan`s inside the caller's jit, so compile time does not grow with the
number of micro-batches. Memory: the activations of one micro-batch, plus the embeddings
and their gradients (`O(B * D)` per device), plus the loss's own temporaries. Compute: one
extra forward pass of every trained tower.

Micro-batch `k` is rows `[k*m, (k+1)*m)` of every device's shard, so no example moves
between devices. A locked tower (`optim.freeze`) is embedded in step 1 only: step 3 pulls
back through the trained tower alone and the locked tower's gradient is exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import optim, sharding

# What the model returns for each tower (`CLIP.__call__`).
_EMBEDDING = {"image": "image_emb", "text": "text_emb"}
_LOGIT_PARAMS = ("logit_scale", "logit_bias")


def _split_by_tower(params: dict) -> dict[str, dict]:
    """{'image': {...}, 'text': {...}, 'shared': {...}} from the top-level parameter names."""
    groups: dict[str, dict] = {"image": {}, "text": {}, "shared": {}}
    for name, value in params.items():
        groups[optim.tower_of((name,))][name] = value
    return groups


def make_value_and_grad(
    model,
    objective: Callable[[dict[str, jax.Array]], tuple[jax.Array, dict]],
    mesh,
    micro_batch_size: int,
    frozen: str = "",
    param_shardings: Any = None,
) -> Callable:
    """A drop-in for `jax.value_and_grad(compute, has_aux=True)` of the plain step.

    `objective(model_output) -> (loss, metrics)` maps `CLIP.__call__`'s output dict to the
    loss. `micro_batch_size`: rows of each device's shard in one micro-batch (it must
    divide the per-device batch). `frozen`: '' or the locked tower ('image' or 'text').
    `param_shardings`: the parameters' shardings, kept by the gradient accumulator. Returns
    `fn(params, model_state, batch) -> ((loss, metrics), grads)` for a global batch sharded
    on dim 0 over `sharding.BATCH_AXES` (call it inside a jit).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1; got {micro_batch_size}")
    if frozen not in ("", *_EMBEDDING):
        raise ValueError(f"frozen must be '', 'image' or 'text'; got {frozen!r}")
    trained = tuple(t for t in _EMBEDDING if t != frozen)
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))

    def micro(x, k, size):
        """Rows [k*size, (k+1)*size) of every device's shard of x, as one global array."""
        x = lax.with_sharding_constraint(x.reshape(shards, -1, *x.shape[1:]), rows)
        x = lax.dynamic_slice_in_dim(x, k * size, size, axis=1)
        return lax.with_sharding_constraint(x.reshape(shards * size, *x.shape[2:]), rows)

    def value_and_grad(params, model_state, batch):
        global_batch = batch["text"].shape[0]
        per_device, size = global_batch // shards, micro_batch_size
        if global_batch % shards or per_device % size:
            raise ValueError(
                f"micro_batch_size {size} does not divide the per-device batch "
                f"{global_batch} / {shards} devices"
            )
        micro_batches = per_device // size
        groups = _split_by_tower(params)
        images, tokens = batch["image"], batch["text"]

        def apply(p, images, tokens):
            return model.apply({"params": p, **model_state}, images, tokens)

        # 1. Embeddings of the whole batch, one micro-batch at a time. Nothing is
        # differentiated here, so no activation outlives its micro-batch.
        def embed(_, k):
            out = apply(params, micro(images, k, size), micro(tokens, k, size))
            return None, {key: out[key] for key in _EMBEDDING.values()}

        _, stacked = lax.scan(embed, None, jnp.arange(micro_batches))

        def whole(x):  # [micro, shards * size, D] -> [B, D] in the batch's row order
            x = x.reshape(micro_batches, shards, size, x.shape[-1]).transpose(1, 0, 2, 3)
            return lax.with_sharding_constraint(x.reshape(global_batch, -1), rows)

        # The scale and bias as the model computes them, from their own parameters only:
        # on an empty batch the towers do no work.
        def logit_params(shared):
            out = apply({**params, **shared}, images[:0], tokens[:0])
            return {k: out[k] for k in _LOGIT_PARAMS if k in out}

        logits, logit_vjp = jax.vjp(logit_params, groups["shared"])

        # 2. The loss, once, on all embeddings, and its gradient w.r.t. each of its inputs.
        inputs = {key: whole(x) for key, x in stacked.items()} | logits
        loss, loss_vjp, metrics = jax.vjp(objective, inputs, has_aux=True)
        (cotangents,) = loss_vjp(jnp.ones_like(loss))

        # 3. Each micro-batch's forward again, its embedding gradient pulled back to the
        # trained towers and summed (in float32). A locked tower gets an empty batch.
        trainable = {name: v for t in trained for name, v in groups[t].items()}
        layout = (
            None if param_shardings is None else {name: param_shardings[name] for name in trainable}
        )

        def pull_back(acc, k):
            def towers(p):
                out = apply(
                    {**params, **p},
                    micro(images, k, size) if "image" in trained else images[:0],
                    micro(tokens, k, size) if "text" in trained else tokens[:0],
                )
                return {t: out[_EMBEDDING[t]] for t in trained}

            _, towers_vjp = jax.vjp(towers, trainable)
            (grads,) = towers_vjp({t: micro(cotangents[_EMBEDDING[t]], k, size) for t in trained})
            if layout is not None:  # reduce-scattered into the parameters' own layout
                grads = lax.with_sharding_constraint(grads, layout)
            return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        summed, _ = lax.scan(pull_back, zeros, jnp.arange(micro_batches))

        # 4. The scale/bias gradient, exactly once.
        (shared_grads,) = logit_vjp({k: cotangents[k] for k in logits})
        grads = {
            **jax.tree.map(jnp.zeros_like, params),
            **jax.tree.map(lambda g, p: g.astype(p.dtype), summed, trainable),
            **shared_grads,
        }
        return (loss, metrics), grads

    return value_and_grad

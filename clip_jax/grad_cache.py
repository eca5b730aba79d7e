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

`make_value_and_grad` runs steps 1 and 3 as `lax.scan`s over slices of a global batch that
is already on the devices, inside the caller's jit, so compile time does not grow with the
number of micro-batches. `StreamedGradients` takes the micro-batches one at a time from the
host instead (each one twice: once to embed, once to pull back), so the global batch never
has to be on the devices, or in host memory, at once.

Memory: the activations of one micro-batch, plus the embeddings and their gradients
(`O(B * D)` per device), plus the loss's own temporaries. Compute: one extra forward pass
of every trained tower.

Micro-batch `k` is rows `[k*m, (k+1)*m)` of every device's shard, so no example moves
between devices. The loss sees the embeddings device-major (each device's rows together):
a permutation of the batch, which changes neither the loss nor its gradient. A locked
tower (`optim.freeze`) is embedded in step 1 only: step 3 pulls back through the trained
tower alone and the locked tower's gradient is exactly zero.
"""

from __future__ import annotations

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


class _Phases:
    """The four phases above as functions of global arrays (each to be called under a jit)."""

    def __init__(self, model, objective, mesh, micro_batch_size, frozen, param_shardings):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1; got {micro_batch_size}")
        if frozen not in ("", *_EMBEDDING):
            raise ValueError(f"frozen must be '', 'image' or 'text'; got {frozen!r}")
        self.model, self.objective, self.size = model, objective, micro_batch_size
        self.trained = tuple(t for t in _EMBEDDING if t != frozen)
        self.shards = sharding.batch_shards(mesh)
        self.rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
        self.param_shardings = param_shardings

    def _apply(self, params, model_state, images, tokens):
        return self.model.apply({"params": params, **model_state}, images, tokens)

    def micro(self, x, k):
        """Rows [k*m, (k+1)*m) of every device's shard of x, as one global array."""
        x = lax.with_sharding_constraint(x.reshape(self.shards, -1, *x.shape[1:]), self.rows)
        x = lax.dynamic_slice_in_dim(x, k * self.size, self.size, axis=1)
        return lax.with_sharding_constraint(x.reshape(-1, *x.shape[2:]), self.rows)

    def embed(self, params, model_state, images, tokens) -> dict:
        """1. Both embeddings of one micro-batch; nothing is differentiated."""
        out = self._apply(params, model_state, images, tokens)
        return {key: out[key] for key in _EMBEDDING.values()}

    def loss(self, params, model_state, stacked, images, tokens):
        """2. The loss on `stacked` ({key: [micro-batches, shards * m, D]}) and its gradient:
        ((loss, metrics), embedding cotangents in the device-major order of `micro`, the
        gradient of the scale/bias parameters). `images`, `tokens`: any arrays of the
        batch's trailing shapes and dtypes (only their zero-row slices are used)."""
        micro_batches = next(iter(stacked.values())).shape[0]

        def whole(x):  # [micro, shards * m, D] -> [shards * micro * m, D], device-major
            x = x.reshape(micro_batches, self.shards, self.size, x.shape[-1])
            x = x.transpose(1, 0, 2, 3).reshape(-1, x.shape[-1])
            return lax.with_sharding_constraint(x, self.rows)

        shared = _split_by_tower(params)["shared"]

        # The scale and bias as the model computes them, from their own parameters only:
        # on an empty batch the towers do no work.
        def logit_params(shared):
            out = self._apply({**params, **shared}, model_state, images[:0], tokens[:0])
            return {k: out[k] for k in _LOGIT_PARAMS if k in out}

        logits, logit_vjp = jax.vjp(logit_params, shared)
        inputs = {key: whole(x) for key, x in stacked.items()} | logits
        loss, loss_vjp, metrics = jax.vjp(self.objective, inputs, has_aux=True)
        (cotangents,) = loss_vjp(jnp.ones_like(loss))
        # 4. The scale/bias gradient, exactly once.
        (shared_grads,) = logit_vjp({k: cotangents[k] for k in logits})
        embedding_cotangents = {key: cotangents[key] for key in _EMBEDDING.values()}
        return (loss, metrics), embedding_cotangents, shared_grads

    def trainable(self, params) -> dict:
        groups = _split_by_tower(params)
        return {name: v for t in self.trained for name, v in groups[t].items()}

    def zeros(self, params) -> dict:
        """The float32 accumulator of the trained towers' gradients, in the parameters'
        layout (left to XLA, a fresh array would be replicated: 4 bytes per parameter on
        every device instead of its FSDP shard)."""
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), self.trainable(params))
        if self.param_shardings is not None:
            zeros = lax.with_sharding_constraint(zeros, self.trainable(self.param_shardings))
        return zeros

    def pull_back(self, acc, params, model_state, images, tokens, cotangents, k):
        """3. Micro-batch k's forward again, its slice of the embedding cotangents pulled
        back to the trained towers and added to `acc`. A locked tower gets an empty batch."""
        trainable = self.trainable(params)

        def towers(p):
            out = self._apply(
                {**params, **p},
                model_state,
                images if "image" in self.trained else images[:0],
                tokens if "text" in self.trained else tokens[:0],
            )
            return {t: out[_EMBEDDING[t]] for t in self.trained}

        _, towers_vjp = jax.vjp(towers, trainable)
        (grads,) = towers_vjp({t: self.micro(cotangents[_EMBEDDING[t]], k) for t in self.trained})
        if self.param_shardings is not None:  # reduce-scattered into the parameters' layout
            grads = lax.with_sharding_constraint(grads, self.trainable(self.param_shardings))
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)

    def combine(self, params, summed, shared_grads) -> dict:
        """The gradient of every parameter: zeros for a locked tower."""
        return {
            **jax.tree.map(jnp.zeros_like, params),
            **jax.tree.map(lambda g, p: g.astype(p.dtype), summed, self.trainable(params)),
            **shared_grads,
        }


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
    phases = _Phases(model, objective, mesh, micro_batch_size, frozen, param_shardings)

    def value_and_grad(params, model_state, batch):
        images, tokens = batch["image"], batch["text"]
        global_batch, shards, size = tokens.shape[0], phases.shards, micro_batch_size
        if global_batch % shards or (global_batch // shards) % size:
            raise ValueError(
                f"micro_batch_size {size} does not divide the per-device batch "
                f"{global_batch} / {shards} devices"
            )
        ks = jnp.arange(global_batch // shards // size)

        def embed(_, k):
            micro = phases.micro(images, k), phases.micro(tokens, k)
            return None, phases.embed(params, model_state, *micro)

        _, stacked = lax.scan(embed, None, ks)
        out, cotangents, shared_grads = phases.loss(params, model_state, stacked, images, tokens)

        def pull_back(acc, k):
            micro = phases.micro(images, k), phases.micro(tokens, k)
            return phases.pull_back(acc, params, model_state, *micro, cotangents, k), None

        summed, _ = lax.scan(pull_back, phases.zeros(params), ks)
        return out, phases.combine(params, summed, shared_grads)

    return value_and_grad


class StreamedGradients:
    """The gradient-cached value and gradient of a global batch fed as micro-batches.

    `__call__(params, model_state, first_pass, second_pass, micro_batches)` reads
    `micro_batches` global micro-batches (`{'image', 'text'}`, `shards * m` rows sharded on
    dim 0) from each iterator: the first pass embeds them, the second (the same batches
    again, in the same order) pulls the loss gradient back through them. Returns
    `((loss, metrics), grads)`, the same values as `make_value_and_grad` on their
    concatenation (up to the order of float sums). Each phase is its own small jit, called
    from Python once per micro-batch: compile time does not grow with their number, and only
    the micro-batches in flight are on the devices.
    """

    def __init__(self, model, objective, mesh, micro_batch_size, frozen="", param_shardings=None):
        phases = _Phases(model, objective, mesh, micro_batch_size, frozen, param_shardings)
        self._phases = phases
        self._embed = jax.jit(phases.embed)
        self._loss = jax.jit(phases.loss)
        self._zeros = jax.jit(phases.zeros)
        self._pull_back = jax.jit(phases.pull_back, donate_argnums=(0,))
        self._combine = jax.jit(phases.combine)
        # For a caller that folds it into its own jit (the train step's update does: one
        # parameter-sized gradient array fewer than a jit of its own).
        self.combine = phases.combine

    def __call__(self, params, model_state, first_pass, second_pass, micro_batches: int):
        out, summed, shared_grads = self.accumulate(
            params, model_state, first_pass, second_pass, micro_batches
        )
        return out, self._combine(params, summed, shared_grads)

    def accumulate(self, params, model_state, first_pass, second_pass, micro_batches: int):
        """`__call__` before its last phase: ((loss, metrics), the trained towers' summed
        float32 gradients, the scale/bias gradients); `combine(params, summed, shared)`
        makes them the gradient of every parameter."""
        embedded = []
        for _ in range(micro_batches):
            micro = next(first_pass)
            embedded.append(self._embed(params, model_state, micro["image"], micro["text"]))
        stacked = {key: jnp.stack([e[key] for e in embedded]) for key in embedded[0]}
        del embedded
        # The last micro-batch stands in for the batch's shapes (only zero rows are used).
        out, cotangents, shared_grads = self._loss(
            params, model_state, stacked, micro["image"], micro["text"]
        )
        del stacked
        acc = self._zeros(params)
        for k in range(micro_batches):
            micro = next(second_pass)
            acc = self._pull_back(
                acc, params, model_state, micro["image"], micro["text"], cotangents, k
            )
        return out, acc, shared_grads

    def lower(self, params, model_state, micro: dict, micro_batches: int) -> dict:
        """{'embed', 'loss', 'zeros', 'pull_back': jax.stages.Lowered} for abstract (or
        concrete) arguments: what each phase compiles to, for sizing without running."""
        images, tokens = micro["image"], micro["text"]
        embedded = jax.eval_shape(self._phases.embed, params, model_state, images, tokens)
        stacked_sharding = NamedSharding(self._phases.rows.mesh, P(None, sharding.BATCH_AXES))
        stacked = {
            k: jax.ShapeDtypeStruct((micro_batches, *v.shape), v.dtype, sharding=stacked_sharding)
            for k, v in embedded.items()
        }
        _, cotangents, _ = jax.eval_shape(
            self._phases.loss, params, model_state, stacked, images, tokens
        )
        cotangents = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._phases.rows)
            for k, v in cotangents.items()
        }
        acc = jax.tree.map(  # float32, in the parameters' layout
            lambda a, p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=p.sharding),
            jax.eval_shape(self._phases.zeros, params),
            self._phases.trainable(params),
        )
        return {
            "embed": self._embed.lower(params, model_state, images, tokens),
            "loss": self._loss.lower(params, model_state, stacked, images, tokens),
            "zeros": self._zeros.lower(params),
            "pull_back": self._pull_back.lower(
                acc, params, model_state, images, tokens, cotangents, 0
            ),
        }

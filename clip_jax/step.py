"""The train state, its sharded creation, and the jit-compiled train and eval steps.

Kept apart from the loop in `train.py` so that tests and benchmarks compile exactly the
step that training runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clip_jax import sharding
from clip_jax.models import CLIP, create_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # Variable collections other than params (e.g. frozen BatchNorm statistics of the
    # ResNet tower): passed to the model unchanged.
    model_state: Any
    rng: jax.Array
    bad_steps: jax.Array  # non-finite steps in a row


def build_model(config: ml_collections.ConfigDict, vocab_size: int, eot_id: int) -> CLIP:
    m = config.model
    return create_model(
        m.name,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat_policy=m.remat_policy,
        logit_scale_init=m.logit_scale_init,
        logit_bias_init=m.logit_bias_init if m.use_logit_bias else None,
        text=dict(
            vocab_size=vocab_size,
            context_length=config.tokenizer.context_length,
            eot_token_id=eot_id,
        ),
    )


def dummy_batch(model: CLIP, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    v, t = model.config.vision, model.config.text
    return {
        "image": jax.ShapeDtypeStruct((batch_size, v.image_size, v.image_size, 3), jnp.uint8),
        "text": jax.ShapeDtypeStruct((batch_size, t.context_length), jnp.int32),
    }


def _init_fn(model: CLIP, tx: optax.GradientTransformation, seed: int, unbox: bool):
    def init(rng):
        batch = dummy_batch(model)
        variables = model.init(
            rng,
            jnp.zeros(batch["image"].shape, jnp.uint8),
            jnp.zeros(batch["text"].shape, jnp.int32),
        )
        variables = flax.core.unfreeze(variables)
        params = variables.pop("params")
        if unbox:
            params, variables = nn.meta.unbox(params), nn.meta.unbox(variables)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=variables,
            rng=jax.random.key_data(jax.random.key(seed)),
            bad_steps=jnp.zeros((), jnp.int32),
        )

    return init


def state_shardings(model: CLIP, tx: optax.GradientTransformation, mesh, seed: int = 0):
    """NamedShardings for every leaf of the TrainState, from the parameters' logical axes.

    The optimizer moments are created from the boxed parameters, so they inherit the same
    logical names and land sharded exactly like the parameter they belong to.
    """
    boxed = jax.eval_shape(_init_fn(model, tx, seed, unbox=False), jax.random.key(0))
    return sharding.param_shardings(boxed, mesh, sharding.logical_rules("fsdp"))


def abstract_train_state(model: CLIP, tx: optax.GradientTransformation, mesh, seed: int):
    """The state's shapes, dtypes and shardings, without allocating it (a restore target)."""
    shardings = state_shardings(model, tx, mesh, seed)
    shapes = jax.eval_shape(_init_fn(model, tx, seed, unbox=True), jax.random.key(seed))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def create_train_state(model: CLIP, tx: optax.GradientTransformation, mesh, seed: int):
    """Initialises the state directly in its sharded layout (no full copy on one device)."""
    shardings = state_shardings(model, tx, mesh, seed)
    init = jax.jit(_init_fn(model, tx, seed, unbox=True), out_shardings=shardings)
    return init(jax.random.key(seed)), shardings


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_loss_and_metrics(model: CLIP, loss_fn: Callable) -> Callable:
    def compute(params, model_state, batch):
        out = model.apply({"params": params, **model_state}, batch["image"], batch["text"])
        loss, metrics = loss_fn(
            out["image_emb"], out["text_emb"], out["logit_scale"], out.get("logit_bias")
        )
        metrics = {**metrics, "temperature": out["logit_scale"]}
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"]
        return loss, metrics

    return compute


def make_train_step(
    model: CLIP,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    schedule: optax.Schedule,
    shardings: TrainState,
    mesh,
):
    """One jit-compiled optimisation step with explicit shardings and a donated state."""
    compute = make_loss_and_metrics(model, loss_fn)

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(
            state.params, state.model_state, batch
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A step with a non-finite loss or gradient changes nothing but the counters.
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": _tree_norm(new_state.params),
            "lr": schedule(state.step),
            "finite": finite.astype(jnp.float32),
            "bad_steps": new_state.bad_steps,
        }
        return new_state, metrics

    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(model: CLIP, loss_fn: Callable, shardings: TrainState, mesh):
    """Contrastive loss and in-batch accuracies on a validation batch (no update)."""
    compute = make_loss_and_metrics(model, loss_fn)

    def eval_fn(params, model_state, batch):
        loss, metrics = compute(params, model_state, batch)
        return {**metrics, "loss": loss}

    return jax.jit(
        eval_fn,
        in_shardings=(shardings.params, shardings.model_state, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

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
import optax

from clip_jax import grad_cache, optim, sharding
from clip_jax.models import CLIP, create_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # Variable collections other than params (e.g. frozen BatchNorm statistics of the
    # ResNet tower): passed to the model unchanged.
    model_state: Any
    bad_steps: jax.Array  # non-finite steps in a row


def build_model(config: ml_collections.ConfigDict, vocab_size: int, eot_id: int) -> CLIP:
    m = config.model
    activation = {"activation": m.activation} if m.activation else {}
    return create_model(
        m.name,
        **activation,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat_policy=m.remat_policy,
        attention=m.attention,
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


def _init_fn(model: CLIP, tx: optax.GradientTransformation, unbox: bool):
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
            bad_steps=jnp.zeros((), jnp.int32),
        )

    return init


def abstract_train_state(
    model: CLIP, tx: optax.GradientTransformation, mesh, rules: str = "fsdp"
) -> TrainState:
    """The state's shapes, dtypes and shardings, without allocating it: the target of a
    restore and the layout `create_train_state` initialises into.

    Shardings come from the parameters' logical axes under `sharding.logical_rules(rules)`.
    The optimizer moments are created from the boxed parameters, so they inherit the same
    logical names and land sharded exactly like the parameter they belong to.
    """
    boxed = jax.eval_shape(_init_fn(model, tx, unbox=False), jax.random.key(0))
    shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules(rules))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )


def state_shardings(abstract_state: TrainState) -> TrainState:
    """The NamedSharding of every leaf of an `abstract_train_state`."""
    return jax.tree.map(lambda x: x.sharding, abstract_state)


def create_train_state(
    model: CLIP, tx: optax.GradientTransformation, abstract_state: TrainState, seed: int
) -> TrainState:
    """Initialises the state directly in `abstract_state`'s layout (no full copy on one device)."""
    init = jax.jit(_init_fn(model, tx, unbox=True), out_shardings=state_shardings(abstract_state))
    return init(jax.random.key(seed))


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_objective(loss_fn: Callable) -> Callable:
    """`objective(model_output) -> (loss, metrics)` on the output dict of `CLIP.__call__`."""

    def objective(out):
        loss, metrics = loss_fn(
            out["image_emb"], out["text_emb"], out["logit_scale"], out.get("logit_bias")
        )
        metrics = {**metrics, "logit_scale": out["logit_scale"]}
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"]
        return loss, metrics

    return objective


def make_loss_and_metrics(model: CLIP, loss_fn: Callable, frozen_tower: str = "") -> Callable:
    """`compute(params, model_state, batch) -> (loss, metrics)`. A `frozen_tower` ('image' or
    'text') enters the loss through `stop_gradient`: its embeddings are constants."""
    objective = make_objective(loss_fn)

    def compute(params, model_state, batch):
        out = model.apply({"params": params, **model_state}, batch["image"], batch["text"])
        if frozen_tower:
            key = f"{frozen_tower}_emb"
            out = {**out, key: jax.lax.stop_gradient(out[key])}
        return objective(out)

    return compute


def locked_value_and_grad(compute: Callable, frozen_tower: str) -> Callable:
    """`jax.value_and_grad(compute, has_aux=True)` taken w.r.t. the trained parameters only.

    The locked tower's parameters are closed over rather than differentiated, so autodiff
    keeps none of its activations and computes none of its backward; its gradient is zeros
    (the optimizer's `frozen` group discards it and holds no moments for it).
    """

    def value_and_grad(params, model_state, batch):
        locked = {k: v for k, v in params.items() if optim.tower_of((k,)) == frozen_tower}
        trained = {k: v for k, v in params.items() if k not in locked}
        out, grads = jax.value_and_grad(
            lambda t: compute({**t, **locked}, model_state, batch), has_aux=True
        )(trained)
        return out, {**grads, **jax.tree.map(jnp.zeros_like, locked)}

    return value_and_grad


def _apply_gradients(tx, schedule, state: TrainState, loss, metrics, grads):
    """(new state, metrics): one optimizer update, skipped (only the counters move) when
    the loss or the gradient is not finite."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
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


def make_train_step(
    model: CLIP,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    schedule: optax.Schedule,
    shardings: TrainState,
    mesh,
    micro_batch_size: int = 0,
    frozen_tower: str = "",
):
    """One jit-compiled optimisation step with explicit shardings and a donated state.

    `micro_batch_size` > 0 (rows per device): the same gradient by gradient caching
    (`clip_jax.grad_cache`); `frozen_tower` ('image'/'text') then skips that tower's backward.
    """
    if micro_batch_size:
        value_and_grad = grad_cache.make_value_and_grad(
            model, make_objective(loss_fn), mesh, micro_batch_size, frozen_tower, shardings.params
        )
    else:
        compute = make_loss_and_metrics(model, loss_fn, frozen_tower)
        value_and_grad = (
            locked_value_and_grad(compute, frozen_tower)
            if frozen_tower
            else jax.value_and_grad(compute, has_aux=True)
        )

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        (loss, metrics), grads = value_and_grad(state.params, state.model_state, batch)
        return _apply_gradients(tx, schedule, state, loss, metrics, grads)

    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_streamed_train_step(
    model: CLIP,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    schedule: optax.Schedule,
    shardings: TrainState,
    mesh,
    micro_batch_size: int,
    frozen_tower: str = "",
):
    """The gradient-cached step of `make_train_step`, fed micro-batch by micro-batch.

    Returns `step(state, first_pass, second_pass, micro_batches) -> (state, metrics)`: it
    reads `micro_batches` global micro-batches from each iterator (the same batches, in the
    same order: `clip_jax.grad_cache.StreamedGradients`) and donates `state`.
    """
    gradients = grad_cache.StreamedGradients(
        model, make_objective(loss_fn), mesh, micro_batch_size, frozen_tower, shardings.params
    )

    def update_fn(state, loss, metrics, summed, shared_grads):
        grads = gradients.combine(state.params, summed, shared_grads)
        return _apply_gradients(tx, schedule, state, loss, metrics, grads)

    update = jax.jit(
        update_fn,
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )

    def step(state: TrainState, first_pass, second_pass, micro_batches: int):
        (loss, metrics), summed, shared_grads = gradients.accumulate(
            state.params, state.model_state, first_pass, second_pass, micro_batches
        )
        return update(state, loss, metrics, summed, shared_grads)

    return step


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

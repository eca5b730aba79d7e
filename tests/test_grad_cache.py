"""Gradient caching gives the plain step's gradients (8 simulated CPU devices).

The reference is the plain step: `jax.value_and_grad` through the whole batch at once.
"""

import functools
import os
import re
import subprocess
import sys

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import grad_cache, losses, optim, sharding
from clip_jax import step as step_lib
from clip_jax.models import create_model

PER_DEVICE = 8  # rows per device: micro-batches of 8, 4 and 1 rows are 1, 2 and 8 of them
VOCAB, CONTEXT = 64, 8
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _model(name, kind):
    return create_model(
        name,
        logit_bias_init=-10.0 if kind == "sigmoid" else None,
        text=dict(vocab_size=VOCAB, context_length=CONTEXT, eot_token_id=VOCAB - 1),
    )


def _mesh(fsdp=2):
    return sharding.make_mesh(data=-1, fsdp=fsdp)


def _batches(mesh, count):
    rng = np.random.default_rng(0)
    size = PER_DEVICE * mesh.devices.size
    out = []
    for _ in range(count):
        text = rng.integers(1, VOCAB - 1, (size, CONTEXT), np.int32)
        text[np.arange(size), rng.integers(2, CONTEXT, size)] = VOCAB - 1  # EOT somewhere
        batch = {"image": rng.integers(0, 256, (size, 32, 32, 3), np.uint8), "text": text}
        out.append(jax.device_put(batch, sharding.batch_sharding(mesh)))
    return out


def _optim_config(freeze):
    cfg = config_lib.defaults().optim
    # Adam moves every parameter by about lr per step whatever its gradient's size, so
    # rounding noise in a near-zero gradient moves it by up to lr * noise / eps: lr 1e-4
    # keeps that below the 1e-5 tolerance while 3 steps move parameters by ~3e-4.
    cfg.lr, cfg.warmup_steps, cfg.freeze = 1e-4, 1, freeze
    return cfg


@functools.cache
def _initial(name, kind, freeze):
    """Model, mesh, optimizer and initial state: initialising is as slow as a compile, so
    every micro-batch size of one (model, loss, freeze) starts from the same copy."""
    model, mesh = _model(name, kind), _mesh()
    cfg = _optim_config(freeze)
    tx = optim.make_optimizer(cfg, total_steps=10)
    abstract = step_lib.abstract_train_state(model, tx, mesh)
    return model, mesh, cfg, tx, abstract, step_lib.create_train_state(model, tx, abstract, 0)


def _step_args(name, kind, freeze):
    """(mesh, a copy of the initial state, the step factories' leading arguments)."""
    model, mesh, cfg, tx, abstract, initial = _initial(name, kind, freeze)
    state = jax.tree.map(jnp.copy, initial)  # the step donates its state
    loss_fn = losses.make_loss(kind, mesh, "ring")
    shardings = step_lib.state_shardings(abstract)
    return mesh, state, (model, tx, loss_fn, optim.schedule(cfg, 10), shardings, mesh)


@functools.cache
def _train(name, kind, micro_batch_size, freeze="", steps=3):
    """Parameters after `steps` optimizer steps of the real train step, and the losses."""
    mesh, state, args = _step_args(name, kind, freeze)
    if steps == 0:
        return jax.device_get(state.params), []
    train_step = step_lib.make_train_step(*args, micro_batch_size, freeze)
    seen = []
    for batch in _batches(mesh, steps):
        state, metrics = train_step(state, batch)
        seen.append(float(metrics["loss"]))
    return jax.device_get(state.params), seen


# One test per model and loss (they share one initialisation and one plain run); inside,
# micro-batches of 8, 4 and 1 rows: 1, 2 and 8 micro-batches per device. The ResNet (its
# step compiles 4x slower) runs one loss, whose code is the ViT's, at 2 and 8 micro-batches.
@pytest.mark.parametrize(
    "name,kind,micro_batch_sizes",
    [
        ("tiny-vit", "softmax", (8, 4, 1)),
        ("tiny-vit", "sigmoid", (8, 4, 1)),
        ("tiny-rn", "softmax", (4, 1)),
    ],
)
def test_three_cached_steps_match_the_plain_step(name, kind, micro_batch_sizes):
    plain, plain_losses = _train(name, kind, 0)
    # The steps moved the parameters by far more than the tolerance.
    initial, _ = _train(name, kind, 0, steps=0)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), plain, initial)
    assert max(jax.tree.leaves(moved)) > 2e-4
    for micro_batch_size in micro_batch_sizes:
        cached, cached_losses = _train(name, kind, micro_batch_size)
        np.testing.assert_allclose(
            cached_losses, plain_losses, rtol=1e-6, err_msg=f"micro_batch_size={micro_batch_size}"
        )
        chex.assert_trees_all_close(cached, plain, atol=1e-5, rtol=0)


def _variables(model):
    shapes = step_lib.dummy_batch(model)
    variables = model.init(
        jax.random.key(0),
        np.zeros(shapes["image"].shape, np.uint8),
        np.zeros(shapes["text"].shape, np.int32),
    )
    variables = jax.tree.map(np.asarray, flax.core.unfreeze(nn.meta.unbox(variables)))
    return variables.pop("params"), variables


def _softmax_log_scale_grad(image_emb, text_emb, scale):
    """d loss / d log_scale of the CLIP loss, in closed form (numpy, float64)."""
    sim = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
    logits = scale * sim

    def expected_sim(axis):  # E_softmax[sim] along `axis`, minus the matching pair's sim
        p = np.exp(logits - logits.max(axis=axis, keepdims=True))
        p /= p.sum(axis=axis, keepdims=True)
        return np.mean(np.sum(p * sim, axis=axis) - np.diag(sim))

    return scale * 0.5 * (expected_sim(1) + expected_sim(0))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_scale_and_bias_gradients_are_counted_once(kind):
    """8 micro-batches per device: a per-micro-batch scale/bias gradient would be 8x."""
    model, mesh = _model("tiny-vit", kind), _mesh()
    (batch,) = _batches(mesh, 1)
    params, model_state = _variables(model)
    loss_fn = losses.make_loss(kind, mesh, "ring")
    plain = jax.value_and_grad(step_lib.make_loss_and_metrics(model, loss_fn), has_aux=True)
    cached = grad_cache.make_value_and_grad(model, step_lib.make_objective(loss_fn), mesh, 1)
    (loss, metrics), grads = jax.jit(cached)(params, model_state, batch)
    (ref_loss, ref_metrics), ref_grads = jax.jit(plain)(params, model_state, batch)
    chex.assert_trees_all_close((loss, metrics), (ref_loss, ref_metrics), rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-4)
    shared = [k for k in ("log_scale", "logit_bias") if k in params]
    assert len(shared) == (2 if kind == "sigmoid" else 1)
    for k in shared:
        assert abs(float(ref_grads[k])) > 1e-2, (k, ref_grads[k])
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5)
    if kind == "softmax":
        out = model.apply({"params": params, **model_state}, batch["image"], batch["text"])
        closed = _softmax_log_scale_grad(
            out["image_emb"], out["text_emb"], float(out["logit_scale"])
        )
        np.testing.assert_allclose(grads["log_scale"], closed, rtol=1e-4)


def test_a_locked_tower_stays_bitwise_unchanged_and_the_other_matches_the_plain_step():
    """LiT-style: image tower (tiny-rn, with frozen BatchNorm statistics) locked."""
    initial, _ = _train("tiny-rn", "softmax", 0, steps=0)
    plain, _ = _train("tiny-rn", "softmax", 0, freeze="image", steps=2)
    cached, _ = _train("tiny-rn", "softmax", 4, freeze="image", steps=2)
    chex.assert_trees_all_equal(cached["visual"], initial["visual"])
    chex.assert_trees_all_close(cached, plain, atol=1e-5, rtol=0)


def _train_streamed(name, kind, micro_batch_size, freeze="", steps=3):
    """`_train` with the step fed micro-batch by micro-batch: micro-batch i of each global
    batch is its rows [i*M, (i+1)*M) for M = 8 devices x micro_batch_size, read twice."""
    mesh, state, args = _step_args(name, kind, freeze)
    step = step_lib.make_streamed_train_step(*args, micro_batch_size, freeze)
    rows, count = micro_batch_size * mesh.devices.size, PER_DEVICE // micro_batch_size

    def micro_batches(batch):
        host = jax.device_get(batch)
        for i in range(count):
            micro = {k: v[i * rows : (i + 1) * rows] for k, v in host.items()}
            yield jax.device_put(micro, sharding.batch_sharding(mesh))

    seen = []
    for batch in _batches(mesh, steps):
        state, metrics = step(state, micro_batches(batch), micro_batches(batch), count)
        seen.append(float(metrics["loss"]))
    return jax.device_get(state.params), seen


@pytest.mark.parametrize(
    "name,kind,freeze,micro_batch_size",
    [("tiny-vit", "sigmoid", "", 4), ("tiny-rn", "softmax", "image", 1)],
)
def test_three_streamed_steps_match_the_plain_step(name, kind, freeze, micro_batch_size):
    """2 and 8 micro-batches per device, each a separate device array fed from the host."""
    plain, plain_losses = _train(name, kind, 0, freeze=freeze)
    streamed, streamed_losses = _train_streamed(name, kind, micro_batch_size, freeze)
    np.testing.assert_allclose(streamed_losses, plain_losses, rtol=1e-6)
    chex.assert_trees_all_close(streamed, plain, atol=1e-5, rtol=0)
    if freeze:
        initial, _ = _train(name, kind, 0, steps=0)
        chex.assert_trees_all_equal(streamed["visual"], initial["visual"])


def test_the_streamed_accumulator_is_sharded_like_the_parameters():
    """FSDP: each device holds its shard of the float32 gradient sum, never the whole."""
    model, mesh = _model("tiny-vit", "softmax"), _mesh(fsdp=4)
    tx = optim.make_optimizer(_optim_config(""), total_steps=10)
    abstract = step_lib.abstract_train_state(model, tx, mesh)
    layout = step_lib.state_shardings(abstract).params
    loss_fn = losses.make_loss("softmax", mesh, "ring")
    streamed = grad_cache.StreamedGradients(
        model, step_lib.make_objective(loss_fn), mesh, 2, param_shardings=layout
    )
    (batch,) = _batches(mesh, 1)
    micro = {  # 2 rows per device
        k: jax.ShapeDtypeStruct((16, *v.shape[1:]), v.dtype, sharding=v.sharding)
        for k, v in batch.items()
    }
    lowered = streamed.lower(abstract.params, abstract.model_state, micro, 4)
    for phase in ("zeros", "pull_back"):  # the sum as it starts, and after each micro-batch
        accumulated = lowered[phase].compile().output_shardings
        sharded = 0
        for name in accumulated:
            for got, want in zip(
                jax.tree.leaves(accumulated[name]), jax.tree.leaves(layout[name]), strict=True
            ):
                assert got.spec == want.spec, (phase, name)
                sharded += not want.is_fully_replicated
        assert sharded > 10


def test_micro_batches_take_rows_from_every_device_without_moving_them():
    """Pure data parallelism: the cached step has no all-gather and no all-to-all at all."""
    model, mesh = _model("tiny-vit", "softmax"), _mesh(fsdp=1)
    (batch,) = _batches(mesh, 1)
    params, model_state = _variables(model)
    loss_fn = losses.make_loss("softmax", mesh, "ring")
    cached = grad_cache.make_value_and_grad(model, step_lib.make_objective(loss_fn), mesh, 2)
    hlo = jax.jit(cached).lower(params, model_state, batch).compile().as_text()
    assert "while" in hlo  # the micro-batch loop is there
    assert not re.findall(r"(all-gather|all-to-all)(-start)?\(", hlo)


@pytest.mark.parametrize(
    "batch_size,micro,shown",
    [
        (16, 3, ("micro_batch_size=3", "per-device batch 2", "use 2")),
        (64, 3, ("micro_batch_size=3", "per-device batch 8", "use 2 or 4")),
    ],
)
def test_a_micro_batch_that_does_not_divide_the_device_batch_is_a_one_line_error(
    batch_size, micro, shown, tmp_path
):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.train",
            "--config=experiments/demo.py:smoke",
            f"--workdir={tmp_path}",
            f"--config.batch_size={batch_size}",
            f"--config.micro_batch_size={micro}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for text in shown:
        assert text in errors[0], errors[0]

"""The analytic FLOP counts of `clip_jax.flops` against XLA's own count of the same program
(HLO cost analysis of the lowered, uncompiled computation: no compile, no run)."""

import jax
import jax.numpy as jnp
import pytest

from clip_jax import flops
from clip_jax.models import CLIP, get_config
from clip_jax.step import dummy_batch


def _abstract(name, batch=2):
    model = CLIP(get_config(name))
    shapes = dummy_batch(model, batch)
    params = jax.eval_shape(model.init, jax.random.key(0), shapes["image"], shapes["text"])
    return model, params, shapes["image"], shapes["text"]


def _xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


# XLA also counts elementwise work (a little more than the matrix products), and counts a
# padded convolution's taps only where they meet the image (a little less than the usual
# convention, which the analytic count follows): hence per-tower tolerances.
@pytest.mark.parametrize(
    "name,tower,low,high",
    [
        ("ViT-B/32", "image", 1.0, 1.02),
        ("ViT-B/32", "text", 1.0, 1.02),
        ("RN50", "image", 0.95, 1.0),
    ],
)
def test_forward_flops_per_tower_match_xla(name, tower, low, high):
    model, params, images, tokens = _abstract(name)
    c = model.config
    if tower == "image":
        v = c.vision
        analytic = (
            flops.vit_forward(v.image_size, v.patch_size, v.width, v.layers, c.embed_dim)
            if v.kind == "vit"
            else flops.resnet_forward(v.image_size, v.layers, v.width, v.heads, c.embed_dim)
        )
        xla = _xla_flops(lambda p, x: model.apply(p, x, method="encode_image"), params, images)
    else:
        t = c.text
        analytic = (
            flops.transformer_forward(t.context_length, t.width, t.layers)
            + 2 * t.width * c.embed_dim
        )
        xla = _xla_flops(lambda p, x: model.apply(p, x, method="encode_text"), params, tokens)
    assert low <= xla / (2 * analytic) <= high  # batch of 2


def test_train_step_flops_match_xla_forward_and_backward():
    batch = 4
    model, params, images, tokens = _abstract("ViT-B/32", batch)

    def loss(p, x, t):
        out = model.apply(p, x, t)
        logits = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits)))

    xla = _xla_flops(jax.grad(loss), params, images, tokens)
    ratio = xla / flops.train_step_flops(model.config, batch)
    assert 0.98 <= ratio <= 1.05, ratio


def test_locked_tower_counts_one_forward_pass():
    """LiT: no gradient flows into the locked image tower, so XLA runs it forward only."""
    batch = 4
    model, params, images, tokens = _abstract("ViT-B/32", batch)
    params = params["params"]
    locked = {"visual": params["visual"]}
    trained = {k: v for k, v in params.items() if k != "visual"}

    def loss(t, frozen, x, tok):
        out = model.apply({"params": {**t, **frozen}}, x, tok)
        image_emb = jax.lax.stop_gradient(out["image_emb"])
        logits = out["logit_scale"] * image_emb @ out["text_emb"].T
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits)))

    xla = _xla_flops(jax.grad(loss), trained, locked, images, tokens)
    ratio = xla / flops.train_step_flops(model.config, batch, frozen_tower="image")
    assert 0.98 <= ratio <= 1.05, ratio

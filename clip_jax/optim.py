"""The optimizer: warm-up + cosine schedule, AdamW with a decay mask, clipping, per-tower
learning rates and freezing, as one optax transformation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Leaves with these names are gains, biases or the temperature/bias of the loss: never decayed.
_NO_DECAY_NAMES = ("bias", "scale", "log_scale", "logit_bias", "mean", "var")


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def tower_of(path) -> str:
    """'image', 'text' or 'shared' (the logit scale/bias), from a parameter's tree path."""
    top = _path_names(path)[0].lower()
    if "vis" in top or "image" in top:
        return "image"
    if "text" in top:
        return "text"
    return "shared"


def decay_mask(params):
    """True where weight decay applies: matrices and convolution kernels, nothing else."""

    def keep(path, leaf):
        return leaf.ndim >= 2 and _path_names(path)[-1] not in _NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(keep, params)


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine decay to `lr * end_lr_ratio`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.end_lr_ratio,
    )


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW (decoupled decay, masked) per tower, global-norm clipping over all of them."""
    lr = schedule(cfg, total_steps)
    mu_dtype = jnp.bfloat16 if cfg.mu_dtype == "bfloat16" else jnp.float32

    def adamw(mult: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=mu_dtype),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(lambda step: lr(step) * mult),
        )

    transforms = {
        "image": adamw(cfg.image_lr_mult),
        "text": adamw(cfg.text_lr_mult),
        "shared": adamw(1.0),
        # A locked tower (LiT): stateless, and `multi_transform` masks it out of the AdamW
        # groups, so the optimizer state holds no moments for it.
        "frozen": optax.set_to_zero(),
    }

    def labels(params):
        def label(path, _):
            tower = tower_of(path)
            return "frozen" if tower == cfg.freeze else tower

        return jax.tree_util.tree_map_with_path(label, params)

    clip = (
        optax.clip_by_global_norm(cfg.grad_clip_norm)
        if cfg.grad_clip_norm > 0
        else optax.identity()
    )
    return optax.chain(clip, optax.multi_transform(transforms, labels))

"""Activation memory per example kept for the backward pass, per remat policy.

    python benchmarks/activation_memory.py                       # ViT-B/32, bfloat16
    python benchmarks/activation_memory.py --model=ViT-L/14 --dtype=float32

Counts the residuals that autodiff keeps between the forward and backward pass of both
towers (`jax.vjp`'s closure, traced with `jax.eval_shape`: nothing is allocated or run),
at two batch sizes; the difference divided by the batch difference is the memory per
example, with the parameters cancelled out. This is what a remat policy controls and what
bounds the per-device batch; it is independent of the backend's scheduler (XLA:CPU's own
buffer assignment does not shrink with remat, so `train_step.py --compile_only` on a CPU
is not a guide to accelerator memory).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models import CLIP, get_config
from clip_jax.models.layers import REMAT_POLICIES
from clip_jax.step import dummy_batch


def residual_bytes(model: CLIP, params, batch: int) -> int:
    shapes = dummy_batch(model, batch)

    def residuals(params, images, tokens):
        def loss(params):
            out = model.apply(params, images, tokens)
            return jnp.sum(out["image_emb"] @ out["text_emb"].T)

        return jax.tree.leaves(jax.vjp(loss, params)[1])

    leaves = jax.eval_shape(residuals, params, shapes["image"], shapes["text"])
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--policies", default=",".join(REMAT_POLICIES))
    parser.add_argument(
        "--per_device_batch", type=int, default=256, help="batch at which to project the total"
    )
    args = parser.parse_args()

    print(f"{args.model}, compute dtype {args.dtype}: activations kept for the backward pass")
    print(
        f"{'remat policy':<14} {'MiB per example':>16} "
        f"{'GiB at batch ' + str(args.per_device_batch):>18}"
    )
    for policy in args.policies.split(","):
        model = CLIP(get_config(args.model, dtype=args.dtype, remat_policy=policy))
        shapes = dummy_batch(model)
        params = jax.eval_shape(model.init, jax.random.key(0), shapes["image"], shapes["text"])
        small, large = residual_bytes(model, params, 8), residual_bytes(model, params, 16)
        per_example = (large - small) / 8
        print(
            f"{policy:<14} {per_example / 2**20:>16.2f} "
            f"{per_example * args.per_device_batch / 2**30:>18.2f}"
        )


if __name__ == "__main__":
    main()

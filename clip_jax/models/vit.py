"""The CLIP Vision Transformer image tower."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import Conv, LayerNorm, Transformer, check_images, normal, param

Dtype = Any


class VisionTransformer(nn.Module):
    """Patch conv (no bias) -> [class] + patches + position -> ln_pre -> blocks -> ln_post
    on the class token -> linear projection (no bias) to ``embed_dim``.

    Input: float NHWC ``[B, image_size, image_size, 3]`` (already normalised).
    Output: ``[B, embed_dim]`` in ``dtype``.
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    activation: str = "quick_gelu"
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        check_images(images, self.image_size)
        p, w = self.patch_size, self.width
        grid = self.image_size // p
        scale = w**-0.5

        x = Conv(
            w,
            p,
            stride=p,
            padding="VALID",
            out_axis="embed",
            kernel_init=nn.initializers.lecun_normal(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )(images)
        b = x.shape[0]
        x = x.reshape(b, grid * grid, w)

        cls = param(self, "class_embedding", normal(scale), (w,), ("embed",), self.param_dtype)
        pos = param(
            self,
            "positional_embedding",
            normal(scale),
            (grid * grid + 1, w),
            ("position", "embed"),
            self.param_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, w))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)

        x = LayerNorm(self.dtype, self.param_dtype, name="ln_pre")(x)
        x = Transformer(
            self.layers,
            self.heads,
            self.activation,
            causal=False,
            remat_policy=self.remat_policy,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention=self.attention,
            name="transformer",
        )(x)
        x = LayerNorm(self.dtype, self.param_dtype, name="ln_post")(x[:, 0])

        proj = param(
            self, "proj", normal(scale), (w, self.embed_dim), ("embed", "proj"), self.param_dtype
        )
        return jnp.einsum("bd,de->be", x, proj.astype(self.dtype))

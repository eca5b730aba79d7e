"""The CLIP ModifiedResNet image tower (RN50, RN101, RN50x4, ...).

Differences from a torchvision ResNet, as in the CLIP paper: a 3-conv stem with an average
pool instead of a max pool; anti-aliased strides (an average pool before the last 1x1 conv
of a bottleneck, and before the 1x1 conv of the downsample branch); a final attention
pooling layer (the spatial mean is the query) instead of global average pooling.

BatchNorm here is :class:`FrozenBatchNorm`: an affine map using stored statistics. Its scale
and bias are trainable parameters (collection ``'params'``); its mean and variance live in
the collection ``'batch_stats'`` (initialised to 0 and 1, filled by checkpoint conversion)
and are only ever read, never updated, so ``apply`` needs no mutable collections.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import (
    Conv,
    MultiHeadAttention,
    check_images,
    maybe_remat,
    normal,
    param,
    variable,
)

Dtype = Any

BN_EPS = 1e-5
EXPANSION = 4


class FrozenBatchNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the channel (last) axis.

    ``scale``/``bias`` are in ``'params'``; ``mean``/``var`` in ``'batch_stats'`` (read only).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    zero_init: bool = False  # zero-init the scale (last BN of a residual branch)
    epsilon: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale_init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
        scale = param(self, "scale", scale_init, (c,), ("norm",), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (c,), ("norm",), self.param_dtype)
        mean = variable(
            self, "batch_stats", "mean", nn.initializers.zeros, (c,), ("norm",), jnp.float32
        )
        var = variable(
            self, "batch_stats", "var", nn.initializers.ones, (c,), ("norm",), jnp.float32
        )
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.epsilon)
        add = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mul
        return x * mul.astype(self.dtype) + add.astype(self.dtype)


def conv(
    module: nn.Module,
    name: str,
    x: jax.Array,
    features: int,
    kernel_size: int,
    stride: int,
    dtype: Dtype,
    param_dtype: Dtype,
) -> jax.Array:
    """Conv without bias, PyTorch-style symmetric padding ``kernel_size // 2``; its kernel is
    ``<name>/kernel``."""
    return Conv(
        features,
        kernel_size,
        stride,
        dtype=dtype,
        param_dtype=param_dtype,
        parent=module,
        name=name,
    )(x)


def avg_pool(x: jax.Array, size: int) -> jax.Array:
    """Non-overlapping ``size x size`` average pool (``nn.AvgPool2d(size)``)."""
    if size == 1:
        return x
    return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avgpool(stride)] -> 1x1 (x4), each conv + BN (+ ReLU but the last);
    the shortcut is ``avgpool(stride) -> 1x1 conv -> BN`` when the shape changes."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        out_ch = self.planes * EXPANSION
        h = conv(self, "conv1", x, self.planes, 1, 1, dt, pdt)
        h = nn.relu(FrozenBatchNorm(dt, pdt, name="bn1")(h))
        h = conv(self, "conv2", h, self.planes, 3, 1, dt, pdt)
        h = nn.relu(FrozenBatchNorm(dt, pdt, name="bn2")(h))
        h = avg_pool(h, self.stride)
        h = conv(self, "conv3", h, out_ch, 1, 1, dt, pdt)
        h = FrozenBatchNorm(dt, pdt, zero_init=True, name="bn3")(h)

        identity = x.astype(dt)
        if self.stride > 1 or x.shape[-1] != out_ch:
            identity = conv(
                self, "downsample_conv", avg_pool(identity, self.stride), out_ch, 1, 1, dt, pdt
            )
            identity = FrozenBatchNorm(dt, pdt, name="downsample_bn")(identity)
        return nn.relu(h + identity)


class AttentionPool2d(nn.Module):
    """Flatten the ``[B, H, W, C]`` map, prepend its mean, add a learned position embedding
    ``[HW + 1, C]``, and let the mean token attend to all tokens (one multi-head attention,
    biased q/k/v/out projections, output projected to ``output_dim``)."""

    num_heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c).astype(self.dtype)
        mean = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(self.dtype)
        x = jnp.concatenate([mean, x], axis=1)
        std = c**-0.5
        pos = param(
            self,
            "positional_embedding",
            normal(std),
            (h * w + 1, c),
            ("position", "embed"),
            self.param_dtype,
        )
        x = x + pos.astype(self.dtype)
        y = MultiHeadAttention(
            self.num_heads,
            self.dtype,
            self.param_dtype,
            out_features=self.output_dim,
            out_axis="proj",
            qkv_std=std,
            out_std=std,
            attention=self.attention,
            name="attn",
        )(x[:, :1], x)
        return y[:, 0]


class ModifiedResNet(nn.Module):
    """Stem (3 convs, avgpool 2) -> 4 stages of bottlenecks (strides 1, 2, 2, 2) ->
    attention pooling to ``embed_dim``.

    Input: float NHWC ``[B, image_size, image_size, 3]`` (already normalised),
    ``image_size`` divisible by 32. Output: ``[B, embed_dim]`` in ``dtype``.
    """

    image_size: int
    layers: Sequence[int]
    width: int
    heads: int
    embed_dim: int
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if self.image_size % 32:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 32 for a "
                f"ModifiedResNet (total stride 32)"
            )
        if len(tuple(self.layers)) != 4:
            raise ValueError(f"layers must be 4 stage depths; got {self.layers!r}")
        check_images(images, self.image_size)
        dt, pdt, w = self.dtype, self.param_dtype, self.width

        x = images
        for i, (features, stride) in enumerate([(w // 2, 2), (w // 2, 1), (w, 1)], start=1):
            x = conv(self, f"conv{i}", x, features, 3, stride, dt, pdt)
            x = nn.relu(FrozenBatchNorm(dt, pdt, name=f"bn{i}")(x))
        x = avg_pool(x, 2)

        block_cls = maybe_remat(Bottleneck, self.remat_policy)
        for stage, depth in enumerate(self.layers):
            planes = w * 2**stage
            for j in range(depth):
                stride = 2 if (stage > 0 and j == 0) else 1
                x = block_cls(
                    planes=planes,
                    stride=stride,
                    dtype=dt,
                    param_dtype=pdt,
                    name=f"layer{stage + 1}_{j}",
                )(x)

        pool = AttentionPool2d(self.heads, self.embed_dim, dt, pdt, self.attention, name="attnpool")
        return pool(x)

"""The two-tower CLIP model and its configuration.

Variables returned by ``CLIP(config).init(rng, images, tokens)``:

* ``'params'``: every trainable array, each boxed in ``nn.LogicallyPartitioned`` with logical
  axis names (``nn.get_partition_spec`` reads them; ``nn.meta.unbox`` strips them). Top level:
  ``visual`` (image tower), ``text`` (text tower), ``log_scale`` (scalar, log of the logit
  scale) and, only when ``config.logit_bias_init`` is not None, ``logit_bias`` (scalar).
  Leaf names: ``kernel`` (dense/conv weights, e.g. ``.../attn/query/kernel``,
  ``.../mlp/fc/kernel``, ``visual/conv1/kernel``), ``bias``, ``scale`` (LayerNorm/BatchNorm
  gains), ``class_embedding``, ``positional_embedding``, ``token_embedding``, ``proj`` /
  ``text_projection`` (bias-free output projections), ``log_scale``, ``logit_bias``.
* ``'batch_stats'``: only for ResNet image towers: BatchNorm ``mean``/``var`` under
  ``visual``. Read-only (frozen statistics): ``apply`` never mutates it, so the trainer
  passes it unchanged, ``model.apply({'params': p, 'batch_stats': s}, images, tokens)``,
  and does not optimise it. ViT models have no other collection.

``encode_image`` / ``encode_text`` can be called alone with
``model.apply(variables, x, method=CLIP.encode_image)`` (resp. ``encode_text``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import (
    ACTIVATIONS,
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    check_images,
    dtype_name,
    param,
    to_dtype,
)
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = 100.0


# ---------------------------------------------------------------- configuration


def _int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}.{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}; got {value}")
    return int(value)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Image tower. ``kind='vit'``: ``patch_size`` required, ``layers`` an int, heads divide
    width. ``kind='resnet'``: ``patch_size=None``, ``layers`` 4 stage depths, ``width`` the
    stem width, ``heads`` the attention-pool heads (OpenAI: ``width * 32 // 64``)."""

    kind: str = "vit"
    image_size: int = 224
    patch_size: int | None = 32
    width: int = 768
    layers: int | tuple[int, ...] = 12
    heads: int = 12

    def __post_init__(self):
        o = "vision"
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision.kind {self.kind!r} is unknown; allowed: 'vit', 'resnet'")
        _set(self, "image_size", _int(o, "image_size", self.image_size))
        _set(self, "width", _int(o, "width", self.width))
        _set(self, "heads", _int(o, "heads", self.heads))
        if self.kind == "vit":
            _set(self, "patch_size", _int(o, "patch_size", self.patch_size))
            _set(self, "layers", _int(o, "layers", self.layers))
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"vision.image_size {self.image_size} is not divisible by "
                    f"vision.patch_size {self.patch_size}"
                )
            if self.width % self.heads:
                raise ValueError(
                    f"vision.width {self.width} is not divisible by vision.heads {self.heads}"
                )
        else:
            if self.patch_size is not None:
                raise ValueError(
                    f"vision.patch_size must be None for kind 'resnet'; got {self.patch_size!r}"
                )
            if (
                isinstance(self.layers, (str, bytes))
                or not hasattr(self.layers, "__len__")
                or len(self.layers) != 4
            ):
                raise ValueError(
                    f"vision.layers must be 4 stage depths for kind 'resnet'; got {self.layers!r}"
                )
            _set(self, "layers", tuple(_int(o, "layers[]", d) for d in self.layers))
            if self.image_size % 32:
                raise ValueError(
                    f"vision.image_size {self.image_size} must be divisible by 32 for kind 'resnet'"
                )
            if (self.width * 32) % self.heads:
                raise ValueError(
                    f"vision.heads {self.heads} must divide the attention-pool "
                    f"width {self.width * 32} (= 32 * vision.width)"
                )


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Text tower. Tokens are ``[B, L]`` with ``L <= context_length``; the feature is read at
    the first ``eot_token_id``."""

    vocab_size: int = 49408
    context_length: int = 77
    eot_token_id: int = 49407
    width: int = 512
    layers: int = 12
    heads: int = 8

    def __post_init__(self):
        o = "text"
        for name in ("vocab_size", "context_length", "width", "layers", "heads"):
            _set(self, name, _int(o, name, getattr(self, name)))
        _set(self, "eot_token_id", _int(o, "eot_token_id", self.eot_token_id, minimum=0))
        if self.eot_token_id >= self.vocab_size:
            raise ValueError(
                f"text.eot_token_id {self.eot_token_id} must be in "
                f"[0, {self.vocab_size - 1}] (vocab_size {self.vocab_size})"
            )
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")


def _sub_config(cls: type, name: str, value: Any) -> Any:
    if isinstance(value, cls):
        return value
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"unknown {name} config keys {unknown}; allowed: {sorted(fields)}")
        return cls(**value)
    raise ValueError(f"{name} must be a {cls.__name__} or a mapping; got {value!r}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Whole model. ``dtype``: computation dtype; ``param_dtype``: storage dtype (strings
    'float32' / 'bfloat16' / 'float16'; jnp dtypes are accepted and stored as strings).
    ``remat_policy``: 'none' | 'full' | 'dots' | 'dots_no_batch', applied per residual block.
    ``attention``: 'auto' | 'xla' | 'cudnn', how every attention core is computed
    (``layers.attention``).
    ``logit_scale_init`` is the scale itself (log is taken); ``logit_bias_init=None`` means the
    model has no logit bias (softmax loss); set e.g. -10 for the sigmoid loss."""

    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    activation: str = "quick_gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention: str = "auto"
    logit_scale_init: float = 1 / 0.07
    logit_bias_init: float | None = None

    def __post_init__(self):
        _set(self, "embed_dim", _int("config", "embed_dim", self.embed_dim))
        _set(self, "vision", _sub_config(VisionConfig, "vision", self.vision))
        _set(self, "text", _sub_config(TextConfig, "text", self.text))
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is unknown; allowed: {sorted(ACTIVATIONS)}"
            )
        _set(self, "dtype", dtype_name(self.dtype))
        _set(self, "param_dtype", dtype_name(self.param_dtype))
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy {self.remat_policy!r} is unknown; allowed: {sorted(REMAT_POLICIES)}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention {self.attention!r} is unknown; allowed: {list(ATTENTION_IMPLS)}"
            )
        s = self.logit_scale_init
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (0 < s < math.inf):
            raise ValueError(f"logit_scale_init must be a finite number > 0; got {s!r}")
        _set(self, "logit_scale_init", float(s))
        b = self.logit_bias_init
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, numbers.Real) or not math.isfinite(b):
                raise ValueError(f"logit_bias_init must be None or a finite number; got {b!r}")
            _set(self, "logit_bias_init", float(b))

    def replace(self, **changes) -> CLIPConfig:
        return dataclasses.replace(self, **changes)


# ((query length, key length), head dim) of one attention.
AttentionShape = tuple[tuple[int, int], int]


def attention_shapes(config: CLIPConfig) -> tuple[AttentionShape, AttentionShape]:
    """((query length, key length), head dim) of the image tower's attention (a ViT's blocks
    over the patches and the class token; a ResNet's attention pool: its mean token over the
    32x-reduced grid and itself, 32 x width channels) and of the text tower's (the full
    context, both ways)."""
    v, t = config.vision, config.text
    if v.kind == "vit":
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        image = ((tokens, tokens), v.width // v.heads)
    else:
        image = ((1, (v.image_size // 32) ** 2 + 1), 32 * v.width // v.heads)
    return image, ((t.context_length, t.context_length), t.width // t.heads)


# ---------------------------------------------------------------- the model


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 NHWC -> ``(x / 255 - CLIP_MEAN) / CLIP_STD`` in ``dtype`` (computed in float32);
    floating input is taken as already normalised and only cast."""
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
        x = (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
        return x.astype(dtype)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(dtype)
    raise ValueError(
        f"images must be uint8 (raw pixels) or floating (normalised); got dtype {images.dtype}"
    )


def l2_normalize(x) -> jax.Array:
    """``x / ||x||`` along the last axis, in float32 (the model's and the evaluators' one)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIP(nn.Module):
    """Image and text towers mapped into one ``embed_dim`` space."""

    config: CLIPConfig

    def setup(self):
        c = self.config
        dt, pdt = to_dtype(c.dtype), to_dtype(c.param_dtype)
        v, t = c.vision, c.text
        if v.kind == "vit":
            self.visual = VisionTransformer(
                image_size=v.image_size,
                patch_size=v.patch_size,
                width=v.width,
                layers=v.layers,
                heads=v.heads,
                embed_dim=c.embed_dim,
                activation=c.activation,
                remat_policy=c.remat_policy,
                dtype=dt,
                param_dtype=pdt,
                attention=c.attention,
            )
        else:
            self.visual = ModifiedResNet(
                image_size=v.image_size,
                layers=v.layers,
                width=v.width,
                heads=v.heads,
                embed_dim=c.embed_dim,
                remat_policy=c.remat_policy,
                dtype=dt,
                param_dtype=pdt,
                attention=c.attention,
            )
        self.text = TextTransformer(
            vocab_size=t.vocab_size,
            context_length=t.context_length,
            eot_token_id=t.eot_token_id,
            width=t.width,
            layers=t.layers,
            heads=t.heads,
            embed_dim=c.embed_dim,
            activation=c.activation,
            remat_policy=c.remat_policy,
            dtype=dt,
            param_dtype=pdt,
            attention=c.attention,
        )
        self.log_scale = param(
            self, "log_scale", nn.initializers.constant(math.log(c.logit_scale_init)), (), (), pdt
        )
        if c.logit_bias_init is not None:
            self.logit_bias = param(
                self, "logit_bias", nn.initializers.constant(c.logit_bias_init), (), (), pdt
            )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """NHWC uint8 (normalised here) or float (already normalised) -> ``[B, embed_dim]``
        in the compute dtype, not normalised."""
        check_images(images, self.config.vision.image_size)
        return self.visual(normalize_images(images, to_dtype(self.config.dtype)))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """int tokens ``[B, L]``, ``L <= context_length`` -> ``[B, embed_dim]`` in the compute
        dtype, not normalised."""
        return self.text(tokens)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        out = {
            "image_emb": l2_normalize(self.encode_image(images)),
            "text_emb": l2_normalize(self.encode_text(tokens)),
            "logit_scale": jnp.minimum(
                jnp.exp(self.log_scale.astype(jnp.float32)), MAX_LOGIT_SCALE
            ),
        }
        if self.config.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias.astype(jnp.float32)
        return out

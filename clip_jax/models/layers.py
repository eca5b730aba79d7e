"""Building blocks shared by the CLIP towers.

Conventions used throughout ``clip_jax.models``:

* Parameters are stored in ``param_dtype``; computation runs in ``dtype`` (parameters are
  cast at use). LayerNorm statistics and the attention softmax are computed in float32.
* Every variable is created through :func:`param` / :func:`variable`, which box it in
  ``nn.LogicallyPartitioned`` with names from :data:`LOGICAL_AXES`, so
  ``nn.get_partition_spec(variables)`` gives a spec for every leaf.
* Attention kernels keep heads as their own axis: q/k/v ``[embed, heads, head_dim]`` and the
  output ``[heads, head_dim, out]``; FSDP can shard ``embed`` and tensor parallelism
  ``heads`` / ``mlp``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.errors import UserError

Dtype = Any

# The only logical axis names a parameter may carry (see docs/architecture.md).
LOGICAL_AXES = (
    "embed",
    "mlp",
    "heads",
    "head_dim",
    "vocab",
    "position",
    "proj",
    "conv_in",
    "conv_out",
    "conv_h",
    "conv_w",
    "norm",
)

LN_EPS = 1e-5

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(value: Any) -> str:
    """Canonical string for a floating dtype given as a string or a numpy/jax dtype."""
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not supported; allowed: {sorted(_DTYPES)}")
    return name


def to_dtype(value: Any) -> Dtype:
    """The jnp dtype for a string such as 'bfloat16' (or a dtype, passed through)."""
    return _DTYPES[dtype_name(value)]


# ---------------------------------------------------------------- activations and remat


def quick_gelu(x: jax.Array) -> jax.Array:
    """The sigmoid approximation of GELU used by the OpenAI CLIP release."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


# Each activation saves only its input for the backward pass and recomputes the rest: left
# to autodiff, quick_gelu would keep four [B, L, 4 * width] tensors per block, the largest
# share of a block's activation memory.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": jax.checkpoint(quick_gelu),
    "gelu": jax.checkpoint(_gelu),
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is unknown; allowed: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _dots_outside_attention_core(prim, *args, **params) -> bool:
    """Every matmul and convolution output except batched matmuls (the attention core's).

    A block's policy also governs the nested `_xla_attention` checkpoint: plain
    `checkpoint_dots` there saved the float32 [B, H, L, L] scores, and ViT-L/14 (bf16) kept
    235 MiB per example, more than without remat (215); this keeps 121.
    """
    if prim.name == "dot_general":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
    return jax.checkpoint_policies.checkpoint_dots(prim, *args, **params)


# name -> policy for jax.checkpoint; 'none' means no rematerialisation at all.
REMAT_POLICIES = {
    "none": None,
    "full": None,  # nothing saveable: everything inside a block is recomputed
    "dots": _dots_outside_attention_core,  # for ViTs the same as 'dots_no_batch'
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(module_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """``module_cls`` wrapped in ``nn.remat`` with the named policy ('none': unchanged)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {policy!r} is unknown; allowed: {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=True)


# ---------------------------------------------------------------- variables with axis names


def _check_axes(shape: Sequence[int], axes: Sequence[str]) -> None:
    if len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    bad = [a for a in axes if a not in LOGICAL_AXES]
    if bad:
        raise ValueError(f"logical axis names {bad} are not in {LOGICAL_AXES}")


def param(
    module: nn.Module,
    name: str,
    init: Callable,
    shape: Sequence[int],
    axes: Sequence[str],
    dtype: Dtype,
) -> jax.Array:
    """``module.param`` boxed with logical axis names (returned unboxed)."""
    _check_axes(shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def variable(
    module: nn.Module,
    collection: str,
    name: str,
    init: Callable,
    shape: Sequence[int],
    axes: Sequence[str],
    dtype: Dtype,
) -> jax.Array:
    """A non-trainable variable boxed with logical axis names; returns its value."""
    _check_axes(shape, axes)
    boxed_init = nn.with_logical_partitioning(lambda: init(None, tuple(shape), dtype), tuple(axes))
    return module.variable(collection, name, boxed_init).value


def normal(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


# ---------------------------------------------------------------- input checks


def check_images(images: jax.Array, image_size: int) -> None:
    """Trace-time check that ``images`` is NHWC ``[B, image_size, image_size, 3]``."""
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be rank 4 NHWC [B, H, W, 3]; got shape {shape}")
    if shape[3] != 3:
        raise ValueError(f"images must have 3 channels (NHWC); got {shape[3]} in shape {shape}")
    if shape[1] != image_size or shape[2] != image_size:
        raise ValueError(
            f"images are {shape[1]}x{shape[2]} but the model is configured for "
            f"image_size {image_size} (shape must be "
            f"[B, {image_size}, {image_size}, 3])"
        )


# ---------------------------------------------------------------- layers


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32, output cast to ``dtype``."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    epsilon: float = LN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (features,), ("norm",), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (features,), ("norm",), self.param_dtype)
        return _layer_norm(x, scale, bias, self.epsilon, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _layer_norm(x, scale, bias, epsilon: float, dtype) -> jax.Array:
    # Checkpointed: the backward pass keeps only x and recomputes the statistics, instead
    # of the centred, normalised and scaled copies autodiff would save.
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dtype)


class Dense(nn.Module):
    """``y = x . kernel + bias`` contracting the last ``len(in_axes)`` axes of ``x``.

    ``kernel`` has shape ``x.shape[-len(in_axes):] + features`` and logical names
    ``in_axes + out_axes``; ``bias`` has shape ``features`` and names ``out_axes``.
    """

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    kernel_std: float
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_axes)
        shape = tuple(x.shape[x.ndim - n_in :]) + tuple(self.features)
        kernel = param(
            self,
            "kernel",
            normal(self.kernel_std),
            shape,
            self.in_axes + self.out_axes,
            self.param_dtype,
        )
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
        if self.use_bias:
            bias = param(
                self,
                "bias",
                nn.initializers.zeros,
                tuple(self.features),
                self.out_axes,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class Conv(nn.Module):
    """2-D convolution without bias on NHWC input; kernel ``[k, k, in, features]`` named
    ``(conv_h, conv_w, conv_in, out_axis)``. ``padding``: 'SAME_TORCH' (symmetric ``k // 2``,
    as PyTorch ``padding=k//2``) or 'VALID'."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: str = "SAME_TORCH"
    out_axis: str = "conv_out"
    kernel_init: Callable = nn.initializers.he_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = param(
            self,
            "kernel",
            self.kernel_init,
            (k, k, x.shape[-1], self.features),
            ("conv_h", "conv_w", "conv_in", self.out_axis),
            self.param_dtype,
        )
        if self.padding == "SAME_TORCH":
            padding = ((k // 2, k // 2), (k // 2, k // 2))
        elif self.padding == "VALID":
            padding = "VALID"
        else:
            raise ValueError(f"padding {self.padding!r} is unknown; allowed: 'SAME_TORCH', 'VALID'")
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (self.stride, self.stride),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


# How the attention core is computed: 'auto' is cuDNN's fused kernel where it applies (see
# cudnn_attention_problem) at an even sequence length, XLA elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_MAX_HEAD_DIM = 128  # 256 from Hopper on; 128 holds on every GPU cuDNN's kernel runs on


def cudnn_attention_problem(dtype: Any, head_dim: int, device: Any = None) -> str:
    """Why ``jax.nn.dot_product_attention(implementation='cudnn')`` cannot train here ('' when
    it can): it needs an NVIDIA GPU of compute capability 8.0 or newer (``device``, default the
    first device), 16-bit compute and a head dim that is a multiple of 8, at most 128. Odd
    sequence lengths are padded (``even_length_attention``)."""
    device = jax.devices()[0] if device is None else device
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    try:
        major = int(str(capability).split(".")[0])
    except ValueError:  # not a CUDA device (CPU, TPU, ROCm)
        return f"cuDNN attention needs an NVIDIA GPU, not {device.platform} ({device.device_kind})"
    if major < 8:
        return (
            f"cuDNN attention needs compute capability >= 8.0; {device.device_kind} has "
            f"{capability}"
        )
    if dtype_name(dtype) not in _CUDNN_DTYPES:
        return f"cuDNN attention needs bfloat16 or float16 compute, not {dtype_name(dtype)}"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return (
            f"cuDNN attention needs a head dim that is a multiple of 8 and at most "
            f"{_CUDNN_MAX_HEAD_DIM}, not {head_dim}"
        )
    return ""


def chosen_attention(
    implementation: str, dtype: Any, lengths: tuple[int, int], head_dim: int, device: Any = None
) -> str:
    """'xla' or 'cudnn': what ``implementation`` computes for (query, key) ``lengths``. 'auto'
    takes cuDNN only where no padding is needed: the padded kernel has not yet been run on a
    GPU here."""
    if implementation != "auto":
        return implementation
    even = all(length % 2 == 0 for length in lengths)
    usable = even and not cudnn_attention_problem(dtype, head_dim, device)
    return "cudnn" if usable else "xla"


def even_length_attention(q, k, v, causal: bool, implementation: str) -> jax.Array:
    """``jax.nn.dot_product_attention`` with odd sequence lengths padded by one zero token:
    jax 0.11.2 refused cuDNN's kernel in training at odd lengths on an H200 ("Unsupported
    sequence length Q 77, KV 77": CLIP's text, ViT-B/16's 197, L/14's 257). The padded key is
    masked through ``key_value_seq_lengths``; the padded query's row is dropped. Under the
    causal mask no real query sees the trailing key anyway."""
    length_q, length_kv = q.shape[1], k.shape[1]
    if length_q % 2 == 0 and length_kv % 2 == 0:
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length % 2), (0, 0), (0, 0)))

    out = jax.nn.dot_product_attention(
        pad(q, length_q),
        pad(k, length_kv),
        pad(v, length_kv),
        key_value_seq_lengths=jnp.full((q.shape[0],), length_kv, jnp.int32),
        is_causal=causal,
        implementation=implementation,
    )
    return out[:, :length_q]


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _xla_attention(q, k, v, causal: bool) -> jax.Array:
    # Checkpointed: keeps q, k, v and recomputes the [heads, L, L] scores and probabilities
    # (and the causal mask) in the backward pass, about 2% more FLOPs at CLIP's lengths.
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


class AttentionError(UserError):
    """jax refused cuDNN's kernel for these shapes (it checks them while tracing the step)."""


def _cudnn_attention(q, k, v, causal: bool) -> jax.Array:
    # Not checkpointed: the fused kernel never materialises the scores; its backward needs
    # only the output and the per-row log-sum-exp.
    try:
        return even_length_attention(q, k, v, causal, implementation="cudnn")
    except NotImplementedError as e:  # jax's own shape checks, e.g. a length it refuses
        shape, reason = "x".join(map(str, q.shape)), str(e).strip().splitlines()[0]
        raise AttentionError(
            f"jax refused cuDNN's fused attention for queries {shape} ({reason}); set "
            "model.attention='xla' (or 'auto', which keeps cuDNN to even lengths)"
        ) from e


def attention(q, k, v, causal: bool, implementation: str = "auto") -> jax.Array:
    """``softmax(q k^T / sqrt(head_dim)) v`` over ``[B, L, heads, head_dim]``; logits and
    softmax in float32. ``implementation``: one of ``ATTENTION_IMPLS``."""
    lengths = (q.shape[1], k.shape[1])
    if chosen_attention(implementation, q.dtype, lengths, q.shape[-1]) == "cudnn":
        return _cudnn_attention(q, k, v, causal)
    return _xla_attention(q, k, v, causal)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections, heads as their own axis.

    ``inputs_q`` ``[B, T, D]`` attends to ``inputs_kv`` ``[B, S, D]``. Submodules ``query``,
    ``key``, ``value`` (kernel ``[embed, heads, head_dim]``) and ``out`` (kernel
    ``[heads, head_dim, out_features]``, default ``out_features = D`` named ``out_axis``).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    out_features: int | None = None
    out_axis: str = "embed"
    qkv_std: float | None = None  # default D**-0.5
    out_std: float | None = None  # default D**-0.5
    attention: str = "auto"  # one of ATTENTION_IMPLS

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, causal: bool = False):
        d = inputs_q.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by heads {self.num_heads}")
        head_dim = d // self.num_heads
        qkv_std = self.qkv_std if self.qkv_std is not None else d**-0.5
        out_std = self.out_std if self.out_std is not None else d**-0.5

        def project(name, x):
            return Dense(
                (self.num_heads, head_dim),
                ("embed",),
                ("heads", "head_dim"),
                qkv_std,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x)

        q = project("query", inputs_q)
        k = project("key", inputs_kv)
        v = project("value", inputs_kv)
        y = attention(q, k, v, causal, self.attention)
        return Dense(
            (self.out_features or d,),
            ("heads", "head_dim"),
            (self.out_axis,),
            out_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(y)


class MLP(nn.Module):
    """``fc`` (bias) -> activation -> ``proj`` (bias), hidden width ``hidden``."""

    hidden: int
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fc_std: float | None = None  # default (2 D)**-0.5
    proj_std: float | None = None  # default hidden**-0.5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        act = get_activation(self.activation)
        fc_std = self.fc_std if self.fc_std is not None else (2 * d) ** -0.5
        proj_std = self.proj_std if self.proj_std is not None else self.hidden**-0.5
        h = Dense(
            (self.hidden,),
            ("embed",),
            ("mlp",),
            fc_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc",
        )(x)
        return Dense(
            (d,),
            ("mlp",),
            ("embed",),
            proj_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(act(h))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (MLP 4x width)."""

    num_heads: int
    num_layers: int = 1  # depth of the stack, for the residual-branch init scale
    activation: str = "quick_gelu"
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    mlp_ratio: int = 4
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        # OpenAI CLIP init: attn std D^-0.5, residual outputs D^-0.5 (2 L)^-0.5, fc (2 D)^-0.5.
        proj_std = d**-0.5 * (2 * self.num_layers) ** -0.5
        h = LayerNorm(self.dtype, self.param_dtype, name="ln_1")(x)
        h = MultiHeadAttention(
            self.num_heads,
            self.dtype,
            self.param_dtype,
            out_std=proj_std,
            attention=self.attention,
            name="attn",
        )(h, h, causal=self.causal)
        x = x + h
        h = LayerNorm(self.dtype, self.param_dtype, name="ln_2")(x)
        h = MLP(
            self.mlp_ratio * d,
            self.activation,
            self.dtype,
            self.param_dtype,
            proj_std=proj_std,
            name="mlp",
        )(h)
        return x + h


class Transformer(nn.Module):
    """``layers`` residual attention blocks; each one rematerialised per ``remat_policy``."""

    layers: int
    heads: int
    activation: str = "quick_gelu"
    causal: bool = False
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block_cls = maybe_remat(ResidualAttentionBlock, self.remat_policy)
        for i in range(self.layers):
            x = block_cls(
                num_heads=self.heads,
                num_layers=self.layers,
                activation=self.activation,
                causal=self.causal,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention=self.attention,
                name=f"resblocks_{i}",
            )(x)
        return x

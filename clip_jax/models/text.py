"""The CLIP text tower: a causal Transformer pooled at the end-of-text token."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import LayerNorm, Transformer, normal, param

Dtype = Any


def check_tokens(tokens: jax.Array, context_length: int) -> None:
    """Trace-time check: ``tokens`` is an integer ``[B, L]``, ``1 <= L <= context_length``."""
    shape = tuple(tokens.shape)
    if len(shape) != 2:
        raise ValueError(f"tokens must be rank 2 [B, L]; got shape {shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers (int32); got dtype {tokens.dtype}")
    if not 1 <= shape[1] <= context_length:
        raise ValueError(
            f"tokens have length {shape[1]}; allowed 1..{context_length} (context_length)"
        )


def eot_positions(tokens: jax.Array, eot_token_id: int) -> jax.Array:
    """Index of the first ``eot_token_id`` in each row; the last position where there is none."""
    is_eot = tokens == eot_token_id
    first = jnp.argmax(is_eot, axis=-1)
    return jnp.where(jnp.any(is_eot, axis=-1), first, tokens.shape[-1] - 1)


class TextTransformer(nn.Module):
    """Token + position embedding -> causal pre-LN blocks -> ln_final -> the feature at the
    first end-of-text token -> linear projection (no bias) to ``embed_dim``.

    Input: integer tokens ``[B, L]``, ``L <= context_length`` (shorter inputs use the first L
    position embeddings; a row without an end-of-text token is read at its last position).
    Output: ``[B, embed_dim]`` in ``dtype``.
    """

    vocab_size: int
    context_length: int
    eot_token_id: int
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
    def __call__(self, tokens: jax.Array) -> jax.Array:
        check_tokens(tokens, self.context_length)
        w, length = self.width, tokens.shape[1]

        emb = param(
            self,
            "token_embedding",
            normal(0.02),
            (self.vocab_size, w),
            ("vocab", "embed"),
            self.param_dtype,
        )
        pos = param(
            self,
            "positional_embedding",
            normal(0.01),
            (self.context_length, w),
            ("position", "embed"),
            self.param_dtype,
        )
        x = jnp.take(emb, tokens, axis=0).astype(self.dtype)
        x = x + pos[:length].astype(self.dtype)

        x = Transformer(
            self.layers,
            self.heads,
            self.activation,
            causal=True,
            remat_policy=self.remat_policy,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention=self.attention,
            name="transformer",
        )(x)
        # LayerNorm acts per position, so gathering first and normalising one row is the same.
        idx = eot_positions(tokens, self.eot_token_id)
        x = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        x = LayerNorm(self.dtype, self.param_dtype, name="ln_final")(x)

        proj = param(
            self,
            "text_projection",
            normal(w**-0.5),
            (w, self.embed_dim),
            ("embed", "proj"),
            self.param_dtype,
        )
        return jnp.einsum("bd,de->be", x, proj.astype(self.dtype))

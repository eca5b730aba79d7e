"""clip_jax: CLIP and SigLIP training in JAX/Flax.

``model, variables, tokenizer, preprocess = clip_jax.load(DIR)`` opens a pretrained
directory written by ``python -m clip_jax.convert``. Names are resolved on first use, so
``import clip_jax`` stays light.
"""


def __getattr__(name):
    if name == "load":
        from clip_jax.pretrained import load_model  # noqa: PLC0415 (lazy: jax, flax, orbax)

        return load_model
    raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")


__all__ = ["load"]

"""Named model sizes.

``get_config(name, **overrides)`` starts from the named :class:`CLIPConfig` and applies
overrides, one way only:

* a top-level field is a keyword: ``get_config('ViT-B/32', dtype='bfloat16',
  remat_policy='dots')``;
* a tower field is a mapping under ``vision`` or ``text`` that is merged into the named
  tower (other fields keep their named values): ``get_config('ViT-B/32',
  text={'vocab_size': 32000, 'eot_token_id': 2})``. A ``VisionConfig`` / ``TextConfig``
  instance instead replaces the tower whole. ``ml_collections.ConfigDict`` values are
  accepted as mappings.

Unknown names and unknown keys are a ``ValueError`` listing what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from clip_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

_TEXT_512 = TextConfig(width=512, layers=12, heads=8)
_TINY_TEXT = TextConfig(
    vocab_size=1000, context_length=16, eot_token_id=999, width=64, layers=2, heads=2
)

_MODELS: dict[str, CLIPConfig] = {
    "ViT-B/32": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig("vit", image_size=224, patch_size=32, width=768, layers=12, heads=12),
        text=_TEXT_512,
    ),
    "ViT-B/16": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig("vit", image_size=224, patch_size=16, width=768, layers=12, heads=12),
        text=_TEXT_512,
    ),
    "ViT-L/14": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig("vit", image_size=224, patch_size=14, width=1024, layers=24, heads=16),
        text=TextConfig(width=768, layers=12, heads=12),
    ),
    "ViT-L/14@336": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig("vit", image_size=336, patch_size=14, width=1024, layers=24, heads=16),
        text=TextConfig(width=768, layers=12, heads=12),
    ),
    "RN50": CLIPConfig(
        embed_dim=1024,
        vision=VisionConfig(
            "resnet", image_size=224, patch_size=None, width=64, layers=(3, 4, 6, 3), heads=32
        ),
        text=_TEXT_512,
    ),
    "RN101": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig(
            "resnet", image_size=224, patch_size=None, width=64, layers=(3, 4, 23, 3), heads=32
        ),
        text=_TEXT_512,
    ),
    "RN50x4": CLIPConfig(
        embed_dim=640,
        vision=VisionConfig(
            "resnet", image_size=288, patch_size=None, width=80, layers=(4, 6, 10, 6), heads=40
        ),
        text=TextConfig(width=640, layers=12, heads=10),
    ),
    # Tiny sizes for tests and smoke runs.
    "tiny-vit": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig("vit", image_size=32, patch_size=8, width=64, layers=2, heads=2),
        text=_TINY_TEXT,
    ),
    "tiny-rn": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(
            "resnet", image_size=32, patch_size=None, width=8, layers=(1, 1, 1, 1), heads=4
        ),
        text=_TINY_TEXT,
    ),
}


def list_models() -> list[str]:
    """The registered model names."""
    return list(_MODELS)


def _merge(base: Any, name: str, value: Any) -> Any:
    if isinstance(value, (VisionConfig, TextConfig)):
        return value
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ValueError(
            f"override {name}= must be a mapping of {name} fields or a "
            f"{type(base).__name__}; got {value!r}"
        )
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"unknown {name} override keys {unknown}; allowed: {sorted(fields)}")
    return dataclasses.replace(base, **value)


def get_config(name: str, **overrides: Any) -> CLIPConfig:
    """The named :class:`CLIPConfig` with ``overrides`` applied (see the module docstring)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {list_models()}")
    config = _MODELS[name]
    fields = {f.name for f in dataclasses.fields(CLIPConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown config override keys {unknown}; allowed: {sorted(fields)} "
            f"(tower fields go in a mapping, e.g. text={{'vocab_size': ...}})"
        )
    changes = dict(overrides)
    for tower in ("vision", "text"):
        if tower in changes:
            changes[tower] = _merge(getattr(config, tower), tower, changes[tower])
    return dataclasses.replace(config, **changes)


def create_model(name: str, **overrides: Any) -> CLIP:
    """``CLIP(get_config(name, **overrides))``."""
    return CLIP(get_config(name, **overrides))

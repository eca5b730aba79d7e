"""CLIP model zoo: Flax linen towers, the two-tower model, and named sizes."""

from clip_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from clip_jax.models.registry import create_model, get_config, list_models

__all__ = [
    "CLIP",
    "CLIPConfig",
    "VisionConfig",
    "TextConfig",
    "get_config",
    "create_model",
    "list_models",
]

"""CLIP RN50 with the paper's recipe.

Variants: `experiments/rn50.py:smoke` (tiny, seconds on CPU).
"""

from clip_jax.config import apply_variant, clip_paper_recipe


def get_config(variant: str = ""):
    config = clip_paper_recipe("RN50", lr=5e-4, remat_policy="none")
    return apply_variant(config, variant, "tiny-rn")

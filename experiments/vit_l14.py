"""CLIP ViT-L/14 with the paper's recipe.

Variants: `experiments/vit_l14.py:smoke` (tiny, seconds on CPU).
"""

from clip_jax.config import apply_variant, clip_paper_recipe


def get_config(variant: str = ""):
    config = clip_paper_recipe("ViT-L/14", lr=4e-4, remat_policy="dots")
    return apply_variant(config, variant, "tiny-vit")

"""SigLIP ViT-B/16: the sigmoid loss recipe (Zhai et al. 2023).

Temperature initialised at 10 and bias at -10; text blocks travel a ring of devices, so
no device ever holds the global similarity matrix nor an all-gathered text batch.
Variants: `experiments/siglip_b16.py:smoke`.
"""

from clip_jax.config import apply_variant, clip_paper_recipe


def get_config(variant: str = ""):
    config = clip_paper_recipe("ViT-B/16", lr=1e-3)
    config.loss.kind = "sigmoid"
    config.loss.impl = "ring"
    config.model.logit_scale_init = 10.0
    config.model.use_logit_bias = True
    config.model.logit_bias_init = -10.0
    config.optim.weight_decay = 1e-4
    config.optim.b2 = 0.95
    config.optim.warmup_steps = 5000
    return apply_variant(config, variant, "tiny-vit")

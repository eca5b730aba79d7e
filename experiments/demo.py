"""The first run: a tiny CLIP on the built-in demo dataset, minutes on one CPU, offline.

    python -m clip_jax.train --config=experiments/demo.py --workdir=/tmp/clip_demo

The demo dataset (procedural shapes and captions) is generated on first use. At the end
the run reports zero-shot accuracy on shape-colour combinations it never saw in training.
Variants: `experiments/demo.py:smoke` (a few steps, for tests).
"""

from clip_jax.config import apply_variant, defaults


def get_config(variant: str = ""):
    c = defaults()
    c.model.name = "tiny-vit"
    c.data.name = "clip_demo"
    c.data.eval_split = "validation"
    c.data.crop_scale_min = 0.8
    c.tokenizer.path = ""  # trained from the demo captions on first use
    c.tokenizer.context_length = 16
    c.batch_size = 128
    c.total_steps = 1500
    c.log_every = 50
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.1
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 500
    c.eval.batch_size = 256
    c.eval.tasks = "zeroshot:clip_demo@test"
    return apply_variant(c, variant, "tiny-vit")

"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning") with ViT-B/32.

The image tower comes from a pretrained CLIP ViT-B/32 and is locked: no gradient is
computed for it and the optimizer keeps no state for it (`optim.freeze='image'`). Only the
text tower (and the temperature) learns to read the locked image embeddings.

First convert the pretrained model (the default `model.init_from`,
`~/clip_jax/pretrained/ViT-B-32`, is where this writes)::

    python -m clip_jax.convert --source=ViT-B-32.pt --format=openai \\
        --output=$HOME/clip_jax/pretrained/ViT-B-32

Variants (`experiments/lit_b32.py:VARIANT`, several joined by commas, e.g. `finetune,smoke`):

* `''`: locked image tower; the text tower trains from scratch with a sentencepiece
  tokenizer trained on your captions (`tokenizer.path`);
* `clip_text`: locked image tower; the text tower starts from the pretrained one too, with
  its CLIP BPE tokenizer (taken from the pretrained directory);
* `finetune`: both towers start from the pretrained model and both train, the image tower
  at a tenth of the learning rate (`optim.image_lr_mult`);
* `smoke`: tiny model and demo data, seconds on CPU. `model.init_from` is cleared (the
  locked tower is then random); pass `--config.model.init_from=DIR` with a tiny-vit
  pretrained directory or a `vit_b32.py:smoke` workdir to exercise the warm start.
"""

from clip_jax.config import ConfigError, clip_paper_recipe, smoke_variant

VARIANTS = ("clip_text", "finetune", "smoke")


def get_config(variant: str = ""):
    chosen = [v for v in variant.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"unknown config variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    c = clip_paper_recipe("ViT-B/32", lr=1e-3, remat_policy="none")
    c.model.init_from = "~/clip_jax/pretrained/ViT-B-32"
    c.model.init_towers = "image"
    c.optim.freeze = "image"
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 10_000
    c.total_steps = 50_000
    if "clip_text" in chosen:
        c.model.init_towers = "both"
        c.tokenizer.kind = "clip_bpe"  # the pretrained text tower's vocabulary
    if "finetune" in chosen:
        c.model.init_towers = "both"
        c.tokenizer.kind = "clip_bpe"
        c.optim.freeze = ""
        c.optim.lr = 1e-5
        c.optim.image_lr_mult = 0.1
        c.optim.warmup_steps = 500
        c.optim.weight_decay = 0.1
    if "smoke" in chosen:
        c = smoke_variant(c, "tiny-vit")
        c.model.init_from = ""
        c.tokenizer.kind = "sentencepiece"  # the demo tokenizer
    return c

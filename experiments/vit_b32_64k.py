"""CLIP ViT-B/32 at a global batch of 65,536 (twice the paper's), by gradient caching.

Each device embeds and back-propagates `micro_batch_size` examples at a time while the loss
sees all 65,536 (`clip_jax/grad_cache.py`): the gradient is the full-batch one, at the cost of
one extra forward pass of both towers. Sized for 8 x 80 GB (8,192 examples per device):

    parameters + gradients + Adam moments, float32      151.3M x 16 B      2.3 GiB
    bfloat16 copies of the parameters for compute       151.3M x 2 B       0.3 GiB
    activations of one micro-batch, no remat            1,024 x 28.9 MiB  28.9 GiB
    embeddings and their gradients (the cache)          4 x 8,192 x 512 x 4 B  0.1 GiB
    ring loss + gradient, 1,024 x 1,024 chunks          O(b D + c^2)       0.06 GiB
    the input batch (uint8 pixels, int32 tokens)        8,192 x 150,836 B  1.2 GiB
                                                                           ~33 GiB of 74.5
Measured: activations by `benchmarks/activation_memory.py` (ViT-B/32, bf16, remat 'none'),
the loss by `benchmarks/loss_memory.py --batches=65536 --impls=ring --no_time`; the rest
of the 80 GB is room for XLA's transient buffers. `micro_batch_size=2048` (~61 GiB) also
fits on paper. The learning rate is the paper's 32k one (not rescaled).
Variants: `experiments/vit_b32_64k.py:smoke` (tiny, seconds on CPU, 2 micro-batches).
"""

from clip_jax.config import apply_variant, clip_paper_recipe


def get_config(variant: str = ""):
    config = clip_paper_recipe("ViT-B/32", lr=5e-4, remat_policy="none")
    config.batch_size = 65_536
    config.micro_batch_size = 1024  # per device
    config.total_steps = 195_313  # the paper's 12.8B examples seen
    # The ring loss never holds a b x B block of logits (2 GiB per device at this batch).
    config.loss.impl = "ring"
    return apply_variant(config, variant, "tiny-vit")

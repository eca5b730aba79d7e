"""CLIP ViT-B/32 at a global batch of 1,048,576 (32x the paper's), streamed micro-batches.

Gradient caching (`clip_jax/grad_cache.py`) bounds the activations; with
`stream_micro_batches` the loader also feeds each step one micro-batch at a time, twice
(embed, then back-propagate), so the 158 GB of pixels of one global batch never sit on the
devices or in a host's memory. Sized for 8 x 80 GB (131,072 examples per device), by the
formula of `benchmarks/batch_fit.py`:

    parameters + gradients + Adam moments, float32    151.3M x 16 B                2.4 GB
    bfloat16 copies of the parameters for compute     151.3M x 2 B                 0.3 GB
    activations of one micro-batch, no remat          1,024 x 28.9 MiB            31.0 GB
    embeddings, their gradients, the ring loss        28 x 131,072 x 512 B         1.9 GB
    micro-batches in flight, 2 passes x (1 + 2 ahead)  6 x 1,024 x 150,836 B       0.9 GB
                                                                                 ~36.5 GB of 80
Without streaming, each device would also hold its 131,072 inputs (19.8 GB) and each 8-GPU
host about three global batches' share of pixels in flight (475 GB). Cost: one extra
forward pass, and every image decoded twice. The learning rate is the paper's 32k one and
the warm-up the paper's 65M examples: neither is tuned for this batch.
Variants: `experiments/vit_b32_1m.py:smoke` (tiny, seconds on CPU, 2 micro-batches).
"""

from clip_jax.config import apply_variant, clip_paper_recipe


def get_config(variant: str = ""):
    config = clip_paper_recipe("ViT-B/32", lr=5e-4, remat_policy="none")
    config.batch_size = 1_048_576
    config.micro_batch_size = 1024  # per device
    config.stream_micro_batches = True
    config.total_steps = 12_207  # the paper's 12.8B examples seen
    config.optim.warmup_steps = 63  # the paper's 2,000 steps x 32,768 examples
    config.loss.impl = "ring"  # never a b x B block of logits
    return apply_variant(config, variant, "tiny-vit")

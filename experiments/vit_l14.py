"""CLIP ViT-L/14 with the paper's recipe, sized so that its 32k batch fits 8 x 80 GB.

Per device (4,096 examples of the global 32,768), with gradient caching
(`clip_jax/grad_cache.py`) in micro-batches of 256 and the 'dots' remat policy:

    parameters + gradients + Adam moments, float32    427.6M x 16 B          6.4 GiB
    bfloat16 copies of the parameters for compute     427.6M x 2 B           0.8 GiB
    activations of one micro-batch, remat 'dots'      256 x 121.4 MiB       30.4 GiB
    embeddings and their gradients (the cache)        4 x 4,096 x 768 x 4 B  0.05 GiB
    loss + gradient, 'gather' (4,096 x 32,768 logits)                        3.3 GiB
    the input batch (uint8 pixels, int32 tokens)      4,096 x 150,836 B      0.6 GiB
                                                                           ~42 GiB of 74.5

Measured: activations by `benchmarks/activation_memory.py --model=ViT-L/14` (bf16; 215 MiB
per example without remat, 121 with 'dots', 14.2 with 'full'), the loss by
`benchmarks/loss_memory.py --width=768 --batches=32768 --impls=gather --no_time`. Without
caching, 4,096 examples would need 485 GiB of activations ('dots') or 57 GiB ('full', which
also recomputes the forward pass); micro-batches of 512 (61 GiB, 71 in all) would leave too
little room for XLA's transient buffers. Caching costs one extra forward pass.
Variants: `experiments/vit_l14.py:smoke` (tiny, seconds on CPU, 2 micro-batches).
"""

from clip_jax.config import apply_variant, clip_paper_recipe


def get_config(variant: str = ""):
    config = clip_paper_recipe("ViT-L/14", lr=4e-4, remat_policy="dots")
    config.micro_batch_size = 256  # per device
    return apply_variant(config, variant, "tiny-vit")

"""Full-size conversion parity against open_clip: random weights in the real shapes of
ViT-B/32, ViT-B/16, ViT-L/14 and RN50, converted with clip_jax.convert, embeddings compared
on 4 images and 4 captions (float32). Also checks the BPE token ids of the captions.

Needs torch and open_clip_torch next to clip_jax (not part of the project's dependencies)::

    pip install -e '.[torch]' open_clip_torch
    python benchmarks/openclip_parity.py [--models=ViT-B-32,ViT-B-16,ViT-L-14,RN50]

Prints, per model, the max abs difference of the L2-normalised image and text embeddings
and of the logits; exits 1 if an embedding differs by more than --tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import jax
import numpy as np
import open_clip
import torch

from clip_jax.convert import from_tensors
from clip_jax.data.bpe import ClipBPETokenizer
from clip_jax.models.clip import CLIP, CLIP_MEAN, CLIP_STD

CAPTIONS = [
    "a photo of a dog.",
    "Two cats sleeping on a red sofa, 2 pillows & a blanket!",
    "東京タワーの夜景 🗼",
    "an extremely long caption " + "that keeps going " * 30,
]


def randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm parameters and BatchNorm statistics away from their identity initialisation."""
    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            n = m.weight.shape[0]
            m.weight.data = 1 + 0.2 * torch.randn(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.data = 0.1 * torch.randn(n, generator=gen)
            m.running_var.data = 0.5 + torch.rand(n, generator=gen)


def compare(name: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    randomize_norms(model, gen)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    ref_tokens = open_clip.get_tokenizer(name)(CAPTIONS).numpy()
    tokens = ClipBPETokenizer().encode(CAPTIONS)
    pixels = (images.astype(np.float32) / 255 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    with torch.no_grad():
        img_ref = model.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        txt_ref = model.encode_text(torch.from_numpy(ref_tokens))
        img_ref = torch.nn.functional.normalize(img_ref, dim=-1).numpy()
        txt_ref = torch.nn.functional.normalize(txt_ref, dim=-1).numpy()
        scale = float(model.logit_scale.exp())
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    del model
    gc.collect()

    start = time.perf_counter()
    registry_name, config, variables = from_tensors(state, "open_clip", name, path=name)
    convert_s = time.perf_counter() - start
    del state
    out = jax.jit(CLIP(config).apply)(variables, images, tokens.astype(np.int32))
    img, txt = np.asarray(out["image_emb"]), np.asarray(out["text_emb"])
    return {
        "model": name,
        "clip_jax": registry_name,
        "activation": config.activation,
        "tokens_equal": bool(np.array_equal(ref_tokens, tokens)),
        "image_emb": float(np.abs(img - img_ref).max()),
        "text_emb": float(np.abs(txt - txt_ref).max()),
        "logits": float(
            np.abs(float(out["logit_scale"]) * img @ txt.T - scale * img_ref @ txt_ref.T).max()
        ),
        "convert_s": convert_s,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="ViT-B-32,ViT-B-16,ViT-L-14,RN50")
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args()
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, jax {jax.__version__} "
        f"({jax.devices()[0].platform})"
    )
    print(
        f"{'model':<18} {'clip_jax':<9} {'act':<10} {'ids':<5} {'image_emb':>10} "
        f"{'text_emb':>10} {'logits':>10} {'convert':>8}"
    )
    ok = True
    for name in args.models.split(","):
        r = compare(name)
        ok &= r["tokens_equal"] and max(r["image_emb"], r["text_emb"]) < args.tolerance
        print(
            f"{r['model']:<18} {r['clip_jax']:<9} {r['activation']:<10} "
            f"{'same' if r['tokens_equal'] else 'DIFF':<5} {r['image_emb']:>10.2e} "
            f"{r['text_emb']:>10.2e} {r['logits']:>10.2e} {r['convert_s']:>7.1f}s",
            flush=True,
        )
        gc.collect()
    print("all within tolerance" if ok else f"FAILED: a difference >= {args.tolerance}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

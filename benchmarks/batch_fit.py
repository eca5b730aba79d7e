"""The largest global batch that fits, derived from measured per-example memory.

    python benchmarks/batch_fit.py                      # the README's table
    python benchmarks/batch_fit.py --models=ViT-B/32 --headroom=0.2

Per device, in bytes, for P parameters, F FSDP shards, b examples per device, m examples
back-propagated at a time (m = b without gradient caching), a the activation bytes per
example of the remat policy, D the embedding width, and x the input bytes per example
(uint8 image 3 S^2 + int32 tokens 4 L):

    memory ~ 16 P / F + 2 P + m a + 28 b D + b x

(float32 parameters, gradients and two Adam moments; bfloat16 compute copies; one
micro-batch's activations; the embeddings, their gradients and the chunked ring loss; the
input batch, which `stream_micro_batches=True` replaces by one micro-batch's). Measured
here: P (the model's parameter shapes) and a (`activation_memory.residual_bytes`: the
residuals autodiff keeps, bf16). Derived: everything else. A fraction `--headroom` of each
chip is left for XLA's transient buffers.
"""

import argparse

import jax
import numpy as np
from activation_memory import residual_bytes

from clip_jax.models import CLIP, get_config
from clip_jax.step import dummy_batch

GB = 1e9
CHIPS = {  # name: (chips, bytes per chip, FSDP shards)
    "8 x 80 GB": (8, 80 * GB, 1),
    "TPU v5e-256": (256, 16 * GB, 16),
}
MICRO = {  # model: (micro-batch per device, remat policy) for the gradient-caching columns
    ("ViT-B/32", "8 x 80 GB"): (1024, "none"),
    ("ViT-B/16", "8 x 80 GB"): (512, "dots"),
    ("ViT-L/14", "8 x 80 GB"): (256, "dots"),
    ("ViT-B/32", "TPU v5e-256"): (128, "none"),
    ("ViT-B/16", "TPU v5e-256"): (128, "dots"),
    ("ViT-L/14", "TPU v5e-256"): (32, "dots"),
}
POLICIES = ("none", "dots", "full")
# memory_stats() peaks of benchmarks/train_step.py on one H200 (jax 0.11.2, bfloat16), each
# against this formula: (model, per-device batch, micro-batch or 0, remat, GiB measured).
MEASURED_H200 = [
    ("ViT-B/32", 1024, 0, "none", 31.1),
    ("ViT-B/16", 256, 0, "none", 20.04),
    ("ViT-B/32", 32768, 1024, "none", 36.71),
    ("ViT-L/14", 4096, 256, "dots", 38.9),
]


def measure(name: str) -> dict:
    """P, D, x and a (per remat policy) of one model in bfloat16."""
    out = {"activations": {}}
    for policy in POLICIES:
        model = CLIP(get_config(name, dtype="bfloat16", remat_policy=policy))
        shapes = dummy_batch(model)
        params = jax.eval_shape(model.init, jax.random.key(0), shapes["image"], shapes["text"])
        small, large = residual_bytes(model, params, 8), residual_bytes(model, params, 16)
        out["activations"][policy] = (large - small) / 8
    c = model.config
    out["params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    out["width"] = c.embed_dim
    out["input"] = 3 * c.vision.image_size**2 + 4 * c.text.context_length
    return out


def predicted(m: dict, per_device: int, micro: int, policy: str, fsdp: int = 1) -> float:
    """Bytes per device by the formula, the whole batch on the device."""
    back_propagated = micro or per_device
    return (
        16 * m["params"] / fsdp
        + 2 * m["params"]
        + back_propagated * m["activations"][policy]
        + per_device * (28 * m["width"] + m["input"])
    )


def largest(m: dict, chip: str, headroom: float, policy: str, micro: int = 0, stream=False):
    """Largest global batch (examples) on `chip`: per device, then times the chips."""
    chips, memory, fsdp = CHIPS[chip]
    free = memory * (1 - headroom) - 16 * m["params"] / fsdp - 2 * m["params"]
    a = m["activations"][policy]
    per_example = 28 * m["width"] + (0 if stream else m["input"])
    if micro:
        free -= micro * (a + (m["input"] if stream else 0))
        per_device = free / per_example
    else:
        per_device = free / (a + per_example)
    return max(0, int(per_device)) * chips


def short(n: int) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B/32,ViT-B/16,ViT-L/14")
    parser.add_argument("--headroom", type=float, default=0.1)
    args = parser.parse_args()
    measured = {name: measure(name) for name in args.models.split(",")}
    for name, m in measured.items():
        acts = " / ".join(f"{m['activations'][p] / 2**20:.1f}" for p in POLICIES)
        print(
            f"{name}: P {m['params'] / 1e6:.1f}M, D {m['width']}, input {m['input']:,} B, "
            f"activations {acts} MiB per example (none / dots / full)"
        )
    print()
    print("One H200, memory_stats() peak against the formula (GiB):")
    for name, per_device, micro, policy, gib in MEASURED_H200:
        m = measured.get(name) or measure(name)
        formula = predicted(m, per_device, micro, policy) / 2**30
        print(
            f"  {name}, {per_device:,} per device, micro-batch {micro or 'off'}, remat {policy}: "
            f"measured {gib:.2f}, formula {formula:.2f} ({formula / gib - 1:+.1%})"
        )
    print()
    print(
        "| model | chips | no caching (remat none / dots / full) "
        "| gradient caching, whole batch on the devices | streamed micro-batches |"
    )
    print("|---|---|---|---|---|")
    for chip in CHIPS:
        for name, m in measured.items():
            plain = " / ".join(short(largest(m, chip, args.headroom, p)) for p in POLICIES)
            micro, policy = MICRO[(name, chip)]
            cached = short(largest(m, chip, args.headroom, policy, micro))
            streamed = short(largest(m, chip, args.headroom, policy, micro, stream=True))
            print(
                f"| {name} | {chip} | {plain} | micro-batch {micro}, {policy}: {cached} "
                f"| {streamed} |"
            )


if __name__ == "__main__":
    main()

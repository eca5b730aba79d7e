"""Analytic FLOP counts of a CLIP train step (matrix multiplications and convolutions).

One multiply-add counts as 2 FLOPs. The backward pass costs twice the forward pass, so a
train step is 3x the forward FLOPs (rematerialisation adds recomputation that is not
counted: MFU measures useful model work, as in the PaLM paper's definition).
"""

from __future__ import annotations

from clip_jax.models import CLIPConfig


def transformer_forward(tokens: int, width: int, layers: int) -> float:
    """Per example: QKV and output projections, attention scores and mixing, a 4x MLP."""
    per_layer = (
        2 * tokens * (4 * width * width + 8 * width * width) + 2 * 2 * tokens * tokens * width
    )
    return layers * per_layer


def vit_forward(image_size: int, patch: int, width: int, layers: int, embed_dim: int) -> float:
    patches = (image_size // patch) ** 2
    embed = 2 * patches * patch * patch * 3 * width
    return embed + transformer_forward(patches + 1, width, layers) + 2 * width * embed_dim


def _conv(h: int, w: int, k: int, cin: int, cout: int) -> float:
    return 2.0 * h * w * k * k * cin * cout


def resnet_forward(image_size: int, stage_blocks, width: int, heads: int, embed_dim: int) -> float:
    """ModifiedResNet: 3-conv stem, anti-aliased bottlenecks (stride by average pooling),
    attention pooling over the final grid with the mean as the query token."""
    s = image_size // 2
    flops = _conv(s, s, 3, 3, width // 2) + _conv(s, s, 3, width // 2, width // 2)
    flops += _conv(s, s, 3, width // 2, width)
    s //= 2  # average pool after the stem
    cin = width
    for stage, blocks in enumerate(stage_blocks):
        planes = width * 2**stage
        stride = 1 if stage == 0 else 2
        for b in range(blocks):
            st = stride if b == 0 else 1
            out = s // st
            flops += _conv(s, s, 1, cin, planes) + _conv(s, s, 3, planes, planes)
            flops += _conv(out, out, 1, planes, planes * 4)
            if b == 0 and (st != 1 or cin != planes * 4):
                flops += _conv(out, out, 1, cin, planes * 4)
            s, cin = out, planes * 4
    tokens = s * s + 1
    # K and V for every token, Q and the output projection for the pooled token only.
    flops += 2 * tokens * cin * cin * 2 + 2 * cin * cin + 2 * cin * embed_dim
    flops += 2 * 2 * tokens * cin
    return flops


def tower_forward(config: CLIPConfig) -> dict[str, float]:
    """Forward FLOPs per example of each tower (without the loss)."""
    v, t = config.vision, config.text
    if v.kind == "vit":
        image = vit_forward(v.image_size, v.patch_size, v.width, v.layers, config.embed_dim)
    else:
        image = resnet_forward(v.image_size, v.layers, v.width, v.heads, config.embed_dim)
    text = transformer_forward(t.context_length, t.width, t.layers) + 2 * t.width * config.embed_dim
    return {"image": image, "text": text}


def train_step_flops(config: CLIPConfig, global_batch: int, frozen_tower: str = "") -> float:
    """Forward + backward FLOPs of one global step, the B x B similarity included.

    A trained tower counts three passes (forward, and a backward twice as costly); a locked
    tower (`frozen_tower`) runs forward only, since no gradient is taken through it.
    """
    loss = 2 * 2 * global_batch * global_batch * config.embed_dim  # logits, both directions
    towers = tower_forward(config)
    per_example = sum(f if name == frozen_tower else 3 * f for name, f in towers.items())
    return global_batch * per_example + 3 * loss


# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {
    "TPU v4": 275,
    "TPU v5 lite": 197,
    "TPU v5e": 197,
    "TPU v5p": 459,
    "TPU v6 lite": 918,
    "TPU v6e": 918,
    "A100": 312,
    "H100": 989,
    "H200": 989,
}


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return float(peak)
    return None

"""OpenAI's state-dict layout (OpenCLIP shares it): the tensor map tables and the architecture
read from the tensor shapes."""

from __future__ import annotations

import re

import numpy as np

from clip_jax import pretrained
from clip_jax.convert.errors import ConvertError
from clip_jax.convert.layout import Entry, bn_rows, entries, flatten, linear_rows, ln_rows
from clip_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

# One residual attention block, OpenAI / OpenCLIP names (q/k/v fused in in_proj).
_OPENAI_BLOCK = [
    *ln_rows("ln_1", "ln_1"),
    *[
        ("attn.in_proj_weight", f"attn/{n}/kernel", "linear", i)
        for i, n in enumerate(("query", "key", "value"))
    ],
    *[
        ("attn.in_proj_bias", f"attn/{n}/bias", "heads_bias", i)
        for i, n in enumerate(("query", "key", "value"))
    ],
    *linear_rows("attn.out_proj", "attn/out", "linear_out"),
    *ln_rows("ln_2", "ln_2"),
    *linear_rows("mlp.c_fc", "mlp/fc"),
    *linear_rows("mlp.c_proj", "mlp/proj"),
]
_OPENAI_VIT = [
    ("visual.conv1.weight", "visual/conv1/kernel", "conv"),
    ("visual.class_embedding", "visual/class_embedding", "copy"),
    ("visual.positional_embedding", "visual/positional_embedding", "copy"),
    *ln_rows("visual.ln_pre", "visual/ln_pre"),
    *ln_rows("visual.ln_post", "visual/ln_post"),
    ("visual.proj", "visual/proj", "copy"),
]
_OPENAI_RN_STEM = [
    entry
    for i in (1, 2, 3)
    for entry in [
        (f"visual.conv{i}.weight", f"visual/conv{i}/kernel", "conv"),
        *bn_rows(f"visual.bn{i}", f"visual/bn{i}"),
    ]
]
_OPENAI_BOTTLENECK = [
    entry
    for i in (1, 2, 3)
    for entry in [(f"conv{i}.weight", f"conv{i}/kernel", "conv"), *bn_rows(f"bn{i}", f"bn{i}")]
]
_OPENAI_DOWNSAMPLE = [
    ("downsample.0.weight", "downsample_conv/kernel", "conv"),
    *bn_rows("downsample.1", "downsample_bn"),
]
_OPENAI_ATTNPOOL = [
    ("visual.attnpool.positional_embedding", "visual/attnpool/positional_embedding", "copy"),
    *[
        entry
        for src, dst in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
        for entry in linear_rows(
            f"visual.attnpool.{src}", f"visual/attnpool/attn/{dst}", bias_kind="heads_bias"
        )
    ],
    *linear_rows("visual.attnpool.c_proj", "visual/attnpool/attn/out", "linear_out"),
]
_OPENAI_TEXT = [
    ("token_embedding.weight", "text/token_embedding", "copy"),
    ("positional_embedding", "text/positional_embedding", "copy"),
    *ln_rows("ln_final", "text/ln_final"),
    ("text_projection", "text/text_projection", "copy"),
    ("logit_scale", "log_scale", "copy"),
]
# Present in the files, not parameters: OpenAI's three integers, BN's counters, masks.
IGNORED = re.compile(
    r"^(input_resolution|context_length|vocab_size|attn_mask|.*\.num_batches_tracked)$"
)


def tensor_map(config: CLIPConfig) -> list[Entry]:
    """Every (source tensor -> variable) entry of ``config`` in OpenAI's layout."""
    v, t = config.vision, config.text
    out = entries(_OPENAI_TEXT)
    for i in range(t.layers):
        out += entries(
            _OPENAI_BLOCK, f"transformer.resblocks.{i}.", f"text/transformer/resblocks_{i}/"
        )
    if v.kind == "vit":
        out += entries(_OPENAI_VIT)
        for i in range(v.layers):
            out += entries(
                _OPENAI_BLOCK,
                f"visual.transformer.resblocks.{i}.",
                f"visual/transformer/resblocks_{i}/",
            )
    else:
        out += entries(_OPENAI_RN_STEM) + entries(_OPENAI_ATTNPOOL)
        # A block has a downsample branch where the model has one (stride or width change).
        variables = flatten(pretrained.abstract_variables(config))
        for stage, depth in enumerate(v.layers):
            for j in range(depth):
                src, dst = f"visual.layer{stage + 1}.{j}.", f"visual/layer{stage + 1}_{j}/"
                out += entries(_OPENAI_BOTTLENECK, src, dst)
                if f"params/{dst}downsample_conv/kernel" in variables:
                    out += entries(_OPENAI_DOWNSAMPLE, src, dst)
    return out


def _count(tensors: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in tensors if (m := regex.match(k))})


def openai_config(tensors: dict, path: str) -> CLIPConfig:
    """The architecture of an OpenAI CLIP state dict, from its shapes (as OpenAI's
    ``build_model`` reads them); activation quick_gelu."""
    sd = {k: np.shape(v) for k, v in tensors.items()}
    try:
        vocab, width = sd["token_embedding.weight"]
        if "visual.proj" in sd:
            vw = sd["visual.conv1.weight"][0]
            patch = sd["visual.conv1.weight"][-1]
            grid = round((sd["visual.positional_embedding"][0] - 1) ** 0.5)
            vision = VisionConfig(
                "vit",
                image_size=patch * grid,
                patch_size=patch,
                width=vw,
                layers=_count(tensors, r"visual\.transformer\.resblocks\.(\d+)\."),
                heads=vw // 64,
            )
        else:
            vw = sd["visual.layer1.0.conv1.weight"][0]
            grid = round((sd["visual.attnpool.positional_embedding"][0] - 1) ** 0.5)
            vision = VisionConfig(
                "resnet",
                image_size=grid * 32,
                patch_size=None,
                width=vw,
                layers=tuple(_count(tensors, rf"visual\.layer{i}\.(\d+)\.") for i in (1, 2, 3, 4)),
                heads=vw * 32 // 64,
            )
        text = TextConfig(
            vocab_size=vocab,
            context_length=sd["positional_embedding"][0],
            eot_token_id=vocab - 1,
            width=width,
            layers=_count(tensors, r"transformer\.resblocks\.(\d+)\."),
            heads=width // 64,
        )
        return CLIPConfig(
            embed_dim=sd["text_projection"][1], vision=vision, text=text, activation="quick_gelu"
        )
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ConvertError(
            f"{path}: not an OpenAI CLIP state dict (cannot read the architecture: {e!r} "
            "missing or malformed)"
        ) from None

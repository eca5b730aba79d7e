"""OpenCLIP model names and model-config JSON files -> a clip_jax `CLIPConfig` (the tensors
are in OpenAI's layout, `clip_jax.convert.openai`)."""

from __future__ import annotations

import json
import os

from clip_jax.convert.errors import ConvertError
from clip_jax.models.clip import CLIPConfig, TextConfig, VisionConfig
from clip_jax.models.registry import get_config

# OpenCLIP model names -> our registry names; '-quickgelu' selects quick_gelu, else exact GELU.
OPENCLIP_NAMES = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "ViT-B-32": "ViT-B/32",
    "ViT-B-16": "ViT-B/16",
    "ViT-L-14": "ViT-L/14",
    "ViT-L-14-336": "ViT-L/14@336",
}
# OpenCLIP config keys this converter reads, and the others it accepts only at these values.
_OPENCLIP_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size"}
_OPENCLIP_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers"}
_OPENCLIP_FIXED = {
    "mlp_ratio": 4.0,
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "timm_model_name": None,
    "hf_model_name": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "proj_bias": False,
    "proj_type": "linear",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
}
_OPENCLIP_FREE = {
    "patch_dropout",
    "output_tokens",
    "hf_tokenizer_name",
    "tokenizer_kwargs",
    "tokenizer_mode",
    "pad_id",
    "eos_id",
    "timm_model_pretrained",
    "hf_model_pretrained",
    "attn_pooler_queries",
    "attn_pooler_heads",
}


def openclip_config(model: str) -> tuple[str, CLIPConfig]:
    """(name, config) for an OpenCLIP model name or an OpenCLIP model-config JSON file."""
    if model and os.path.isfile(model):
        return "custom", _openclip_config_file(model)
    base = (model or "").removesuffix("-quickgelu")
    if base not in OPENCLIP_NAMES:
        raise ConvertError(
            f"--model {model!r} is not an OpenCLIP model name this converter knows; known: "
            f"{sorted(OPENCLIP_NAMES)} (each also with -quickgelu), or give the path of an "
            "OpenCLIP model-config JSON"
        )
    activation = "quick_gelu" if model.endswith("-quickgelu") else "gelu"
    name = OPENCLIP_NAMES[base]
    return name, get_config(name, activation=activation)


def _openclip_config_file(path: str) -> CLIPConfig:
    try:
        with open(path) as f:
            cfg = json.load(f)
        vcfg, tcfg = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
        embed_dim = cfg["embed_dim"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(
            f"{path}: not an OpenCLIP model config (expected JSON with embed_dim, vision_cfg, "
            f"text_cfg: {e})"
        ) from None
    for tower, values, keys, pool in (
        ("vision_cfg", vcfg, _OPENCLIP_VISION_KEYS, "tok"),
        ("text_cfg", tcfg, _OPENCLIP_TEXT_KEYS, "argmax"),
    ):
        for key, value in values.items():
            if key in keys or key in _OPENCLIP_FREE:
                continue
            fixed = {**_OPENCLIP_FIXED, "pool_type": pool}
            if key not in fixed or value != fixed[key]:
                raise ConvertError(f"{path}: {tower}.{key} = {value!r} is not supported")
    unknown = set(cfg) - {
        "embed_dim",
        "vision_cfg",
        "text_cfg",
        "quick_gelu",
        "custom_text",
        "init_logit_scale",
        "init_logit_bias",
    }
    if unknown or cfg.get("custom_text"):
        raise ConvertError(
            f"{path}: OpenCLIP options {sorted(unknown) or ['custom_text']} are not supported"
        )
    layers = vcfg.get("layers", 12)
    head_width = vcfg.get("head_width", 64)
    width = vcfg.get("width", 768)
    resnet = isinstance(layers, (list, tuple))
    vocab = tcfg.get("vocab_size", 49408)
    try:
        return CLIPConfig(
            embed_dim=embed_dim,
            vision=VisionConfig(
                kind="resnet" if resnet else "vit",
                image_size=vcfg.get("image_size", 224),
                patch_size=None if resnet else vcfg.get("patch_size", 16),
                width=width,
                layers=tuple(layers) if resnet else layers,
                heads=(width * 32 if resnet else width) // head_width,
            ),
            text=TextConfig(
                vocab_size=vocab,
                context_length=tcfg.get("context_length", 77),
                eot_token_id=vocab - 1,
                width=tcfg.get("width", 512),
                layers=tcfg.get("layers", 12),
                heads=tcfg.get("heads", 8),
            ),
            activation="quick_gelu" if cfg.get("quick_gelu") else "gelu",
            logit_bias_init=cfg.get("init_logit_bias"),
        )
    except ValueError as e:
        raise ConvertError(f"{path}: {e}") from None

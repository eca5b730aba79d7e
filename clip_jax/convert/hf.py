"""Hugging Face ``CLIPModel``'s layout: the tensor map tables and the architecture read from
its ``config.json``."""

from __future__ import annotations

import json
import re

from clip_jax.convert.errors import ConvertError
from clip_jax.convert.layout import Entry, entries, linear_rows, ln_rows
from clip_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

_HF_BLOCK = [
    *ln_rows("layer_norm1", "ln_1"),
    *[
        entry
        for n in "qkv"
        for entry in linear_rows(
            f"self_attn.{n}_proj",
            f"attn/{dict(q='query', k='key', v='value')[n]}",
            bias_kind="heads_bias",
        )
    ],
    *linear_rows("self_attn.out_proj", "attn/out", "linear_out"),
    *ln_rows("layer_norm2", "ln_2"),
    *linear_rows("mlp.fc1", "mlp/fc"),
    *linear_rows("mlp.fc2", "mlp/proj"),
]
_HF_VISION = [
    ("vision_model.embeddings.class_embedding", "visual/class_embedding", "copy"),
    ("vision_model.embeddings.patch_embedding.weight", "visual/conv1/kernel", "conv"),
    (
        "vision_model.embeddings.position_embedding.weight",
        "visual/positional_embedding",
        "copy",
    ),
    *ln_rows("vision_model.pre_layrnorm", "visual/ln_pre"),  # sic: HF's spelling
    *ln_rows("vision_model.post_layernorm", "visual/ln_post"),
    ("visual_projection.weight", "visual/proj", "linear"),
]
_HF_TEXT = [
    ("text_model.embeddings.token_embedding.weight", "text/token_embedding", "copy"),
    (
        "text_model.embeddings.position_embedding.weight",
        "text/positional_embedding",
        "copy",
    ),
    *ln_rows("text_model.final_layer_norm", "text/ln_final"),
    ("text_projection.weight", "text/text_projection", "linear"),
    ("logit_scale", "log_scale", "copy"),
]
IGNORED = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")


def tensor_map(config: CLIPConfig) -> list[Entry]:
    """Every (source tensor -> variable) entry of ``config`` in Hugging Face's layout."""
    v, t = config.vision, config.text
    if v.kind != "vit":
        raise ConvertError("a Hugging Face CLIPModel has a ViT image tower; this is a ResNet")
    out = entries(_HF_VISION) + entries(_HF_TEXT)
    for tower, src, n in (
        ("visual", "vision_model", v.layers),
        ("text", "text_model", t.layers),
    ):
        for i in range(n):
            out += entries(
                _HF_BLOCK,
                f"{src}.encoder.layers.{i}.",
                f"{tower}/transformer/resblocks_{i}/",
            )
    return out


_HF_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_attention_heads=8,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
_HF_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    image_size=224,
    patch_size=32,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # HF 'gelu' is the exact erf


def hf_config(path: str) -> CLIPConfig:
    """The architecture in a Hugging Face ``CLIPModel`` ``config.json``."""
    try:
        with open(path) as f:
            cfg = json.load(f)
        text = {
            **_HF_TEXT_DEFAULTS,
            **(cfg.get("text_config") or cfg.get("text_config_dict") or {}),
        }
        vision = {
            **_HF_VISION_DEFAULTS,
            **(cfg.get("vision_config") or cfg.get("vision_config_dict") or {}),
        }
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ConvertError(f"{path}: not a Hugging Face CLIPModel config.json ({e})") from None
    if cfg.get("model_type", "clip") != "clip":
        raise ConvertError(f"{path}: model_type {cfg.get('model_type')!r}; expected 'clip'")
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= set(_HF_ACTIVATIONS):
        raise ConvertError(
            f"{path}: hidden_act text={text['hidden_act']!r} vision={vision['hidden_act']!r}; "
            f"expected one of {sorted(_HF_ACTIVATIONS)} for both towers"
        )
    for tower, c in (("text_config", text), ("vision_config", vision)):
        if c["intermediate_size"] != 4 * c["hidden_size"] or c["layer_norm_eps"] != 1e-5:
            raise ConvertError(
                f"{path}: {tower} has intermediate_size {c['intermediate_size']} and "
                f"layer_norm_eps {c['layer_norm_eps']}; expected 4 x hidden_size and 1e-05"
            )
    if vision["num_channels"] != 3:
        raise ConvertError(
            f"{path}: vision_config.num_channels {vision['num_channels']}; expected 3"
        )
    eos = text["eos_token_id"]
    # eos_token_id 2 marks old configs whose model pools at the largest id (the CLIP EOT).
    eot = text["vocab_size"] - 1 if eos == 2 else eos
    try:
        return CLIPConfig(
            embed_dim=cfg.get("projection_dim", 512),
            vision=VisionConfig(
                "vit",
                image_size=vision["image_size"],
                patch_size=vision["patch_size"],
                width=vision["hidden_size"],
                layers=vision["num_hidden_layers"],
                heads=vision["num_attention_heads"],
            ),
            text=TextConfig(
                vocab_size=text["vocab_size"],
                context_length=text["max_position_embeddings"],
                eot_token_id=eot,
                width=text["hidden_size"],
                layers=text["num_hidden_layers"],
                heads=text["num_attention_heads"],
            ),
            activation=_HF_ACTIVATIONS[acts.pop()],
        )
    except ValueError as e:
        raise ConvertError(f"{path}: {e}") from None

"""A clip_jax pretrained directory out as a Hugging Face ``CLIPModel`` folder (config.json +
model.safetensors): the HF tensor map run backwards."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save_file

from clip_jax import pretrained, storage
from clip_jax.convert.errors import ConvertError
from clip_jax.convert.layout import INVERSE, flatten
from clip_jax.convert.mapping import tensor_map


def export_hf(checkpoint: str, output: str) -> str:
    """Writes a Hugging Face ``CLIPModel`` folder (config.json + model.safetensors) for a
    clip_jax pretrained directory with a ViT image tower; ``output`` may be in a bucket."""
    try:
        ckpt = pretrained.load(checkpoint)
    except pretrained.PretrainedError as e:
        raise ConvertError(str(e)) from None
    config = ckpt.config
    if config.vision.kind != "vit":
        raise ConvertError(
            f"{checkpoint}: a Hugging Face CLIPModel needs a ViT image tower; this model "
            f"('{ckpt.name}') has a ResNet one"
        )
    if config.logit_bias_init is not None:
        raise ConvertError(f"{checkpoint}: a Hugging Face CLIPModel has no logit bias")
    flat = flatten(ckpt.variables)
    tensors = {
        e.source: np.asarray(INVERSE[e.kind](np.asarray(flat[e.target])))
        for e in tensor_map("hf", config)
    }
    if not storage.new_dir(output):
        raise ConvertError(f"{output}: output directory is not empty")
    with storage.local_file(storage.join(output, "model.safetensors")) as local:
        save_file(
            {k: np.array(v, np.float32, order="C") for k, v in tensors.items()},
            local,
            metadata={"format": "pt"},
        )
    v, t = config.vision, config.text
    act = config.activation
    text_cfg = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        intermediate_size=4 * t.width,
        num_attention_heads=t.heads,
        num_hidden_layers=t.layers,
        max_position_embeddings=t.context_length,
        hidden_act=act,
        layer_norm_eps=1e-5,
        eos_token_id=t.eot_token_id,
        projection_dim=config.embed_dim,
    )
    if ckpt.tokenizer and ckpt.tokenizer["kind"] == "clip_bpe":
        text_cfg.update(bos_token_id=49406, pad_token_id=1)
    hf = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": float(np.asarray(flat["params/log_scale"])),
        "dtype": "float32",
        "text_config": text_cfg,
        "vision_config": dict(
            hidden_size=v.width,
            intermediate_size=4 * v.width,
            num_attention_heads=v.heads,
            num_hidden_layers=v.layers,
            image_size=v.image_size,
            patch_size=v.patch_size,
            num_channels=3,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=config.embed_dim,
        ),
    }
    storage.write_text(storage.join(output, "config.json"), json.dumps(hf, indent=1))
    return storage.resolve(output)

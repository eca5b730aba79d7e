"""Source checkpoints in: a state dict or a checkpoint file / HF folder -> (name, config,
variables), and `convert`, which writes them as a clip_jax pretrained directory."""

from __future__ import annotations

import os

import numpy as np

from clip_jax import pretrained
from clip_jax.convert import hf, openai
from clip_jax.convert.errors import ConvertError
from clip_jax.convert.layout import entries
from clip_jax.convert.mapping import map_tensors, tensor_map
from clip_jax.convert.open_clip import openclip_config
from clip_jax.convert.read import read_tensors
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.registry import get_config, list_models

FORMATS = ("openai", "open_clip", "hf")


def registry_name(config: CLIPConfig) -> str:
    """The registry name whose architecture is ``config``'s (activation aside), else 'custom'."""
    for name in list_models():
        if get_config(name, activation=config.activation) == config.replace(logit_bias_init=None):
            return name
    return "custom"


def from_tensors(
    tensors: dict[str, np.ndarray],
    fmt: str,
    model: str | None = None,
    *,
    path: str = "<tensors>",
    config: CLIPConfig | None = None,
) -> tuple[str, CLIPConfig, dict]:
    """(registry name or 'custom', config, variables) of a state dict in ``fmt``'s layout.
    ``config``: the architecture where the tensors do not carry it (hf: from config.json)."""
    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt!r} is unknown; expected one of {FORMATS}")
    if fmt == "hf":
        if "visual.conv1.weight" in tensors:
            raise ConvertError(
                f"{path}: holds OpenAI/OpenCLIP names; use --format=openai or open_clip"
            )
        layout, ignored = "hf", hf.IGNORED
    else:
        layout, ignored = "openai", openai.IGNORED
        if "visual.conv1.weight" not in tensors or "token_embedding.weight" not in tensors:
            hint = (
                " (it looks like a Hugging Face CLIPModel: use --format=hf)"
                if any(k.startswith("text_model.") for k in tensors)
                else ""
            )
            raise ConvertError(
                f"{path}: unknown layout for --format={fmt}: no 'visual.conv1.weight' / "
                f"'token_embedding.weight' tensors{hint}"
            )
        if fmt == "openai":
            config = openai.openai_config(tensors, path)
        else:
            _, config = openclip_config(model)
            if "logit_bias" in tensors and config.logit_bias_init is None:
                config = config.replace(logit_bias_init=float(np.ravel(tensors["logit_bias"])[0]))
    name = registry_name(config)
    tensor_entries = tensor_map(layout, config)
    if config.logit_bias_init is not None:
        tensor_entries += entries([("logit_bias", "logit_bias", "copy")])
    label = name if name != "custom" else (model or "inferred from the file")
    variables = map_tensors(
        tensors, tensor_entries, config, path=path, model_name=label, ignored=ignored
    )
    return name, config, variables


def load_source(source: str, fmt: str, model: str | None = None):
    """(name, config, variables, source info) of a checkpoint file or HF folder in ``fmt``."""
    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt!r} is unknown; expected one of {FORMATS}")
    source = os.fspath(source)
    config = None
    if fmt == "hf":
        folder = source if os.path.isdir(source) else os.path.dirname(source)
        cfg_path = os.path.join(folder, "config.json")
        path = os.path.join(folder, "model.safetensors")
        for p in (cfg_path, path):
            if not os.path.isfile(p):
                raise ConvertError(
                    f"{p}: not found; a Hugging Face CLIPModel folder holds config.json and "
                    "model.safetensors"
                )
        config = hf.hf_config(cfg_path)
    else:
        path = source
    name, config, variables = from_tensors(read_tensors(path), fmt, model, path=path, config=config)
    info = {"format": fmt, "path": os.path.abspath(source)}
    if model:
        info["model"] = model
    return name, config, variables, info


def convert(source: str, fmt: str, output: str, model: str | None = None) -> str:
    """Converts a checkpoint; writes the clip_jax pretrained directory ``output``."""
    name, config, variables, info = load_source(source, fmt, model)
    tokenizer = None
    if config.text.vocab_size == 49408:
        tokenizer = {"kind": "clip_bpe", "context_length": config.text.context_length}
    try:
        return pretrained.save(
            output, config, variables, name=name, tokenizer=tokenizer, source=info
        )
    except pretrained.PretrainedError as e:
        raise ConvertError(str(e)) from None

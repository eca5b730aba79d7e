"""Pretrained CLIP weights in and out: OpenAI, OpenCLIP and Hugging Face checkpoints to a
clip_jax pretrained directory (see `clip_jax.pretrained`), and back out as a Hugging Face
``CLIPModel`` folder.

Command line::

    python -m clip_jax.convert --source=ViT-B-32.pt --format=openai --output=/ckpt/b32
    python -m clip_jax.convert --source=open_clip_model.safetensors --format=open_clip \\
        --model=ViT-B-32-quickgelu --output=/ckpt/b32
    python -m clip_jax.convert --source=hf_folder/ --format=hf --output=/ckpt/b32
    python -m clip_jax.convert --to=hf --source=/ckpt/b32 --output=hf_folder/

Architecture and activation come from the source: OpenAI's from the tensor shapes
(activation quick_gelu), OpenCLIP's from ``--model`` (an OpenCLIP model name such as
``ViT-B-32`` (exact GELU) or ``ViT-B-32-quickgelu``, or the path of an OpenCLIP model-config
JSON), Hugging Face's from ``config.json`` (``hidden_act``). Every tensor is mapped by the
tables below; a tensor left over, a tensor missing, a shape that does not fit the model, or
an unreadable file is a one-line `ConvertError` naming the file and the tensor (exit 2).

Reading ``.safetensors`` needs only the ``safetensors`` package; ``.pt`` / ``.bin`` need
torch (``pip install -e '.[torch]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import zipfile
from collections.abc import Iterable

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from clip_jax import cli, pretrained
from clip_jax.errors import UserError
from clip_jax.models.clip import CLIPConfig, TextConfig, VisionConfig
from clip_jax.models.registry import get_config, list_models

FORMATS = ("openai", "open_clip", "hf")


class ConvertError(UserError):
    """Bad input to the converter; the message is one line naming the file and the tensor."""


# ---------------------------------------------------------------- tensor maps (data)

# How a source tensor becomes a clip_jax variable (t = the variable's shape):
#   copy        same array;
#   heads_bias  [H*Dh] -> [H, Dh];
#   linear      torch Linear weight [out, in] -> kernel [in, *out] (transpose, split heads);
#   linear_out  attention output weight [out, H*Dh] -> kernel [H, Dh, out];
#   conv        OIHW -> HWIO.
_FORWARD = {
    "copy": lambda x, t: x.reshape(t),
    "heads_bias": lambda x, t: x.reshape(t),
    "linear": lambda x, t: x.T.reshape(t),
    "linear_out": lambda x, t: x.T.reshape(t),
    "conv": lambda x, t: x.transpose(2, 3, 1, 0),
}
_INVERSE = {
    "copy": lambda y: y,
    "heads_bias": lambda y: y.reshape(-1),
    "linear": lambda y: y.reshape(y.shape[0], -1).T,
    "linear_out": lambda y: y.reshape(-1, y.shape[-1]).T,
    "conv": lambda y: y.transpose(3, 2, 0, 1),
}
_SOURCE_SHAPE = {
    "copy": lambda t: t,
    "heads_bias": lambda t: (math.prod(t),),
    "linear": lambda t: (math.prod(t[1:]), t[0]),
    "linear_out": lambda t: (t[-1], math.prod(t[:-1])),
    "conv": lambda t: (t[3], t[2], t[0], t[1]),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """``source`` tensor (or its ``chunk``-th third along axis 0, for fused q/k/v) ->
    variable ``target`` ('params/...' or 'batch_stats/...'), converted as ``kind``."""

    source: str
    target: str
    kind: str
    chunk: int | None = None


def _ln(src: str, dst: str) -> list[tuple]:
    return [(f"{src}.weight", f"{dst}/scale", "copy"), (f"{src}.bias", f"{dst}/bias", "copy")]


def _bn(src: str, dst: str) -> list[tuple]:
    return _ln(src, dst) + [
        (f"{src}.running_mean", f"{dst}/mean", "copy"),
        (f"{src}.running_var", f"{dst}/var", "copy"),
    ]


def _linear(src: str, dst: str, kind: str = "linear", bias_kind: str = "copy") -> list[tuple]:
    return [(f"{src}.weight", f"{dst}/kernel", kind), (f"{src}.bias", f"{dst}/bias", bias_kind)]


# One residual attention block, OpenAI / OpenCLIP names (q/k/v fused in in_proj).
_OPENAI_BLOCK = [
    *_ln("ln_1", "ln_1"),
    *[
        ("attn.in_proj_weight", f"attn/{n}/kernel", "linear", i)
        for i, n in enumerate(("query", "key", "value"))
    ],
    *[
        ("attn.in_proj_bias", f"attn/{n}/bias", "heads_bias", i)
        for i, n in enumerate(("query", "key", "value"))
    ],
    *_linear("attn.out_proj", "attn/out", "linear_out"),
    *_ln("ln_2", "ln_2"),
    *_linear("mlp.c_fc", "mlp/fc"),
    *_linear("mlp.c_proj", "mlp/proj"),
]
_OPENAI_VIT = [
    ("visual.conv1.weight", "visual/conv1/kernel", "conv"),
    ("visual.class_embedding", "visual/class_embedding", "copy"),
    ("visual.positional_embedding", "visual/positional_embedding", "copy"),
    *_ln("visual.ln_pre", "visual/ln_pre"),
    *_ln("visual.ln_post", "visual/ln_post"),
    ("visual.proj", "visual/proj", "copy"),
]
_OPENAI_RN_STEM = [
    entry
    for i in (1, 2, 3)
    for entry in [
        (f"visual.conv{i}.weight", f"visual/conv{i}/kernel", "conv"),
        *_bn(f"visual.bn{i}", f"visual/bn{i}"),
    ]
]
_OPENAI_BOTTLENECK = [
    entry
    for i in (1, 2, 3)
    for entry in [(f"conv{i}.weight", f"conv{i}/kernel", "conv"), *_bn(f"bn{i}", f"bn{i}")]
]
_OPENAI_DOWNSAMPLE = [
    ("downsample.0.weight", "downsample_conv/kernel", "conv"),
    *_bn("downsample.1", "downsample_bn"),
]
_OPENAI_ATTNPOOL = [
    ("visual.attnpool.positional_embedding", "visual/attnpool/positional_embedding", "copy"),
    *[
        entry
        for src, dst in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
        for entry in _linear(
            f"visual.attnpool.{src}", f"visual/attnpool/attn/{dst}", bias_kind="heads_bias"
        )
    ],
    *_linear("visual.attnpool.c_proj", "visual/attnpool/attn/out", "linear_out"),
]
_OPENAI_TEXT = [
    ("token_embedding.weight", "text/token_embedding", "copy"),
    ("positional_embedding", "text/positional_embedding", "copy"),
    *_ln("ln_final", "text/ln_final"),
    ("text_projection", "text/text_projection", "copy"),
    ("logit_scale", "log_scale", "copy"),
]
# Present in the files, not parameters: OpenAI's three integers, BN's counters, masks.
_OPENAI_IGNORED = re.compile(
    r"^(input_resolution|context_length|vocab_size|attn_mask|.*\.num_batches_tracked)$"
)

_HF_BLOCK = [
    *_ln("layer_norm1", "ln_1"),
    *[
        entry
        for n in "qkv"
        for entry in _linear(
            f"self_attn.{n}_proj",
            f"attn/{dict(q='query', k='key', v='value')[n]}",
            bias_kind="heads_bias",
        )
    ],
    *_linear("self_attn.out_proj", "attn/out", "linear_out"),
    *_ln("layer_norm2", "ln_2"),
    *_linear("mlp.fc1", "mlp/fc"),
    *_linear("mlp.fc2", "mlp/proj"),
]
_HF_VISION = [
    ("vision_model.embeddings.class_embedding", "visual/class_embedding", "copy"),
    ("vision_model.embeddings.patch_embedding.weight", "visual/conv1/kernel", "conv"),
    (
        "vision_model.embeddings.position_embedding.weight",
        "visual/positional_embedding",
        "copy",
    ),
    *_ln("vision_model.pre_layrnorm", "visual/ln_pre"),  # sic: HF's spelling
    *_ln("vision_model.post_layernorm", "visual/ln_post"),
    ("visual_projection.weight", "visual/proj", "linear"),
]
_HF_TEXT = [
    ("text_model.embeddings.token_embedding.weight", "text/token_embedding", "copy"),
    (
        "text_model.embeddings.position_embedding.weight",
        "text/positional_embedding",
        "copy",
    ),
    *_ln("text_model.final_layer_norm", "text/ln_final"),
    ("text_projection.weight", "text/text_projection", "linear"),
    ("logit_scale", "log_scale", "copy"),
]
_HF_IGNORED = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")


def _entries(rows: Iterable[tuple], src_prefix: str = "", dst_prefix: str = "") -> list[Entry]:
    """Rows ``(source, target, kind[, chunk])`` with prefixes; BatchNorm statistics (leaves
    ``mean``/``var``) go to the ``batch_stats`` collection, everything else to ``params``."""
    out = []
    for source, target, kind, *chunk in rows:
        target = dst_prefix + target
        collection = "batch_stats" if target.rsplit("/", 1)[-1] in ("mean", "var") else "params"
        out.append(Entry(src_prefix + source, f"{collection}/{target}", kind, *chunk))
    return out


def tensor_map(layout: str, config: CLIPConfig) -> list[Entry]:
    """Every (source tensor -> variable) entry of ``config`` in ``layout`` ('openai', which
    OpenCLIP shares, or 'hf')."""
    v, t = config.vision, config.text
    if layout == "hf":
        if v.kind != "vit":
            raise ConvertError("a Hugging Face CLIPModel has a ViT image tower; this is a ResNet")
        out = _entries(_HF_VISION) + _entries(_HF_TEXT)
        for tower, src, n in (
            ("visual", "vision_model", v.layers),
            ("text", "text_model", t.layers),
        ):
            for i in range(n):
                out += _entries(
                    _HF_BLOCK,
                    f"{src}.encoder.layers.{i}.",
                    f"{tower}/transformer/resblocks_{i}/",
                )
    else:
        out = _entries(_OPENAI_TEXT)
        for i in range(t.layers):
            out += _entries(
                _OPENAI_BLOCK, f"transformer.resblocks.{i}.", f"text/transformer/resblocks_{i}/"
            )
        if v.kind == "vit":
            out += _entries(_OPENAI_VIT)
            for i in range(v.layers):
                out += _entries(
                    _OPENAI_BLOCK,
                    f"visual.transformer.resblocks.{i}.",
                    f"visual/transformer/resblocks_{i}/",
                )
        else:
            out += _entries(_OPENAI_RN_STEM) + _entries(_OPENAI_ATTNPOOL)
            # A block has a downsample branch where the model has one (stride or width change).
            variables = _flatten(pretrained.abstract_variables(config))
            for stage, depth in enumerate(v.layers):
                for j in range(depth):
                    src, dst = f"visual.layer{stage + 1}.{j}.", f"visual/layer{stage + 1}_{j}/"
                    out += _entries(_OPENAI_BOTTLENECK, src, dst)
                    if f"params/{dst}downsample_conv/kernel" in variables:
                        out += _entries(_OPENAI_DOWNSAMPLE, src, dst)
    return out


# ---------------------------------------------------------------- reading files


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(
            f"{path}: not a readable safetensors file ({msg}); expected a complete .safetensors "
            "file (header + every tensor's bytes)"
        ) from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415 (optional heavy dependency: only for .pt/.bin files)
    except ImportError:
        raise ConvertError(
            f"{path}: reading .pt/.bin checkpoints needs torch, which is not installed: "
            "pip install -e '.[torch]' (or convert a .safetensors file)"
        ) from None
    try:
        with zipfile.ZipFile(path) as z:
            scripted = any(n.endswith("constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        scripted = False
    try:
        if scripted:  # a TorchScript archive, as OpenAI released CLIP
            state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad archive
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"{path}: not a readable torch checkpoint ({msg})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # an OpenCLIP training checkpoint
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: holds a {type(state).__name__}, not a state dict")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConvertError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        out[key.removeprefix("module.")] = (
            value.float().numpy() if value.is_floating_point() else value.numpy()
        )
    return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint file, by name (floating ones as stored)."""
    if not os.path.exists(path):
        raise ConvertError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".pt", ".pth", ".bin")):
        return _read_torch(path)
    raise ConvertError(
        f"{path}: unknown checkpoint file type; expected .safetensors, .pt, .pth or .bin"
    )


# ---------------------------------------------------------------- model configurations

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


def registry_name(config: CLIPConfig) -> str:
    """The registry name whose architecture is ``config``'s (activation aside), else 'custom'."""
    for name in list_models():
        if get_config(name, activation=config.activation) == config.replace(logit_bias_init=None):
            return name
    return "custom"


# ---------------------------------------------------------------- applying a map


def _set(tree: dict, path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def map_tensors(
    tensors: dict[str, np.ndarray],
    entries: list[Entry],
    config: CLIPConfig,
    *,
    path: str,
    model_name: str,
    ignored: re.Pattern,
) -> dict:
    """Source tensors -> the variables of ``CLIP(config)`` (float32), every tensor checked."""
    targets = {
        k: tuple(v.shape) for k, v in _flatten(pretrained.abstract_variables(config)).items()
    }
    expected: dict[str, tuple] = {}
    for e in entries:
        if e.target not in targets:
            raise ConvertError(f"internal: map target {e.target} is not a variable of the model")
        shape = _SOURCE_SHAPE[e.kind](targets[e.target])
        if e.chunk is not None:
            shape = (3 * shape[0], *shape[1:])
        expected[e.source] = shape
    # Shapes first: against a named model, a wrong-sized tensor says more than a missing one.
    for key, shape in expected.items():
        if key not in tensors:
            continue
        actual = tuple(np.shape(tensors[key]))
        if actual != shape and not (shape == () and actual == (1,)):
            raise ConvertError(
                f"{path}: tensor '{key}' has shape {actual}; model '{model_name}' expects {shape}"
            )
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ConvertError(
            f"{path}: tensor '{missing[0]}' (expected shape {expected[missing[0]]}) is missing"
            + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
            + f"; model '{model_name}'"
        )
    unused = sorted(k for k in tensors if k not in expected and not ignored.match(k))
    if unused:
        raise ConvertError(
            f"{path}: tensor '{unused[0]}' {tuple(np.shape(tensors[unused[0]]))} is not used by "
            f"model '{model_name}'" + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else "")
        )
    variables: dict = {}
    for e in entries:
        x = np.asarray(tensors[e.source], dtype=np.float32)
        if e.chunk is not None:
            x = np.split(x, 3, axis=0)[e.chunk]
        _set(variables, e.target, np.array(_FORWARD[e.kind](x, targets[e.target]), order="C"))
    filled = set(_flatten(variables))
    left = sorted(set(targets) - filled)
    if left:
        raise ConvertError(f"internal: model variable {left[0]} has no source tensor in the map")
    return variables


# ---------------------------------------------------------------- the API


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
        layout, ignored = "hf", _HF_IGNORED
    else:
        layout, ignored = "openai", _OPENAI_IGNORED
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
            config = openai_config(tensors, path)
        else:
            _, config = openclip_config(model)
            if "logit_bias" in tensors and config.logit_bias_init is None:
                config = config.replace(logit_bias_init=float(np.ravel(tensors["logit_bias"])[0]))
    name = registry_name(config)
    entries = tensor_map(layout, config)
    if config.logit_bias_init is not None:
        entries += _entries([("logit_bias", "logit_bias", "copy")])
    label = name if name != "custom" else (model or "inferred from the file")
    variables = map_tensors(tensors, entries, config, path=path, model_name=label, ignored=ignored)
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
        config = hf_config(cfg_path)
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


def export_hf(checkpoint: str, output: str) -> str:
    """Writes a Hugging Face ``CLIPModel`` folder (config.json + model.safetensors) for a
    clip_jax pretrained directory with a ViT image tower."""
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
    flat = _flatten(ckpt.variables)
    tensors = {
        e.source: np.asarray(_INVERSE[e.kind](np.asarray(flat[e.target])))
        for e in tensor_map("hf", config)
    }
    if os.path.exists(output) and os.listdir(output):
        raise ConvertError(f"{output}: output directory is not empty")
    os.makedirs(output, exist_ok=True)
    save_file(
        {k: np.array(v, np.float32, order="C") for k, v in tensors.items()},
        os.path.join(output, "model.safetensors"),
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
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    return os.path.abspath(output)


# ---------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clip_jax.convert",
        description="Convert OpenAI / OpenCLIP / Hugging Face CLIP checkpoints to clip_jax "
        "(or a clip_jax checkpoint to a Hugging Face CLIPModel with --to=hf).",
    )
    p.add_argument("--source", required=True, help="checkpoint file or folder")
    p.add_argument("--format", choices=FORMATS, help="layout of --source (not with --to=hf)")
    p.add_argument("--model", default=None, help="OpenCLIP model name or model-config JSON")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--to", choices=("clip_jax", "hf"), default="clip_jax")
    args = p.parse_args(argv)
    if args.to != "hf" and not args.format:
        p.error("--format is required (openai, open_clip or hf)")
    if args.to != "hf" and args.format == "open_clip" and not args.model:
        p.error("--format=open_clip needs --model (e.g. ViT-B-32 or ViT-B-32-quickgelu)")

    def body():
        if args.to == "hf":
            out = export_hf(args.source, args.output)
        else:
            out = convert(args.source, args.format, args.output, args.model)
        print(f"wrote {out}")

    return cli.run(body, prefix="convert: error")


if __name__ == "__main__":
    sys.exit(main())

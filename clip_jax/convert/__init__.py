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
tables of ``openai`` and ``hf``; a tensor left over, a tensor missing, a shape that does not
fit the model, or an unreadable file is a one-line `ConvertError` naming the file and the
tensor (exit 2).

Reading ``.safetensors`` needs only the ``safetensors`` package; ``.pt`` / ``.bin`` need
torch (``pip install -e '.[torch]'``).

Modules: ``layout`` (the conversion kinds and a map's `Entry`), ``openai`` / ``open_clip`` /
``hf`` (each source's tables and architecture), ``read`` (checkpoint files), ``mapping``
(applying a map, every tensor checked), ``load`` (sources in), ``export_hf`` (HF out) and
``command_line``.
"""

from clip_jax.convert.command_line import main
from clip_jax.convert.errors import ConvertError
from clip_jax.convert.export_hf import export_hf
from clip_jax.convert.hf import hf_config
from clip_jax.convert.layout import SOURCE_SHAPE as _SOURCE_SHAPE
from clip_jax.convert.layout import Entry
from clip_jax.convert.layout import flatten as _flatten
from clip_jax.convert.load import FORMATS, convert, from_tensors, load_source, registry_name
from clip_jax.convert.mapping import map_tensors, tensor_map
from clip_jax.convert.open_clip import OPENCLIP_NAMES, openclip_config
from clip_jax.convert.openai import openai_config
from clip_jax.convert.read import read_tensors

# _flatten and _SOURCE_SHAPE: the private names tests/test_convert.py reads.
__all__ = [
    "FORMATS",
    "OPENCLIP_NAMES",
    "ConvertError",
    "Entry",
    "_SOURCE_SHAPE",
    "_flatten",
    "convert",
    "export_hf",
    "from_tensors",
    "hf_config",
    "load_source",
    "main",
    "map_tensors",
    "openai_config",
    "openclip_config",
    "read_tensors",
    "registry_name",
    "tensor_map",
]

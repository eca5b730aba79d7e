"""Reading checkpoint files: ``.safetensors`` with the ``safetensors`` package, ``.pt`` /
``.pth`` / ``.bin`` with torch (an optional dependency, imported only for those)."""

from __future__ import annotations

import os
import zipfile

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from clip_jax.convert.errors import ConvertError


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

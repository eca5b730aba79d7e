"""Applying a tensor map: every source tensor checked (shape, missing, unused) and converted
into the variables of the model."""

from __future__ import annotations

import re

import numpy as np

from clip_jax import pretrained
from clip_jax.convert import hf, openai
from clip_jax.convert.errors import ConvertError
from clip_jax.convert.layout import FORWARD, SOURCE_SHAPE, Entry, flatten
from clip_jax.models.clip import CLIPConfig


def tensor_map(layout: str, config: CLIPConfig) -> list[Entry]:
    """Every (source tensor -> variable) entry of ``config`` in ``layout`` ('openai', which
    OpenCLIP shares, or 'hf')."""
    return hf.tensor_map(config) if layout == "hf" else openai.tensor_map(config)


def _set(tree: dict, path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


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
    targets = {k: tuple(v.shape) for k, v in flatten(pretrained.abstract_variables(config)).items()}
    expected: dict[str, tuple] = {}
    for e in entries:
        if e.target not in targets:
            raise ConvertError(f"internal: map target {e.target} is not a variable of the model")
        shape = SOURCE_SHAPE[e.kind](targets[e.target])
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
        _set(variables, e.target, np.array(FORWARD[e.kind](x, targets[e.target]), order="C"))
    filled = set(flatten(variables))
    left = sorted(set(targets) - filled)
    if left:
        raise ConvertError(f"internal: model variable {left[0]} has no source tensor in the map")
    return variables

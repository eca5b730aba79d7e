"""The pretrained-model directory: what `clip_jax.convert` writes and `clip_jax.load`,
`clip_jax.predict` and training's `model.init_from` read.

Layout of ``DIR``:

* ``config.json``: ``{"format": "clip_jax.pretrained", "version": 1, "name": <registry name or
  'custom'>, "model": <every CLIPConfig field, towers as mappings>, "tokenizer": {"kind":
  "clip_bpe", "context_length": 77} or null (unknown, e.g. a test model with a small
  vocabulary), "source": {"format", "path", ...}}``;
* ``params/``: an Orbax item holding the variables, ``{'params': ..., 'batch_stats': ...}``
  (``batch_stats`` for ResNet image towers only), float32, without logical-axis boxes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from clip_jax import storage
from clip_jax.data import images as image_ops
from clip_jax.data.bpe import ClipBPETokenizer
from clip_jax.data.tokenizer import Tokenizer
from clip_jax.errors import UserError
from clip_jax.models.clip import CLIP, CLIPConfig

FORMAT = "clip_jax.pretrained"
VERSION = 1
TOKENIZER_KINDS = ("clip_bpe", "sentencepiece")


class PretrainedError(UserError):
    """A pretrained directory that is missing or malformed (one line naming the file)."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    name: str
    config: CLIPConfig
    variables: dict
    tokenizer: dict | None
    source: dict


def config_to_dict(config: CLIPConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> CLIPConfig:
    return CLIPConfig(**values)


def abstract_variables(config: CLIPConfig) -> dict:
    """Shapes and dtypes of ``CLIP(config)``'s variables, unboxed."""
    v, t = config.vision, config.text
    images = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.uint8)
    tokens = jnp.zeros((1, t.context_length), jnp.int32)
    boxed = jax.eval_shape(lambda: CLIP(config).init(jax.random.key(0), images, tokens))
    return dict(nn.meta.unbox(boxed))


def save(
    directory: str,
    config: CLIPConfig,
    variables: dict,
    *,
    name: str,
    tokenizer: dict | None,
    source: dict,
) -> str:
    """Writes ``directory`` (must not exist or be empty); returns its absolute path."""
    path = storage.path(directory)  # a bucket URL as it is, a local path made absolute
    if not storage.new_dir(directory):
        raise PretrainedError(f"{path}: output directory is not empty")
    arrays = jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", arrays)
    checkpointer.wait_until_finished()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "model": config_to_dict(config),
        "tokenizer": tokenizer,
        "source": source,
    }
    (path / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    return str(path)


def is_pretrained_dir(directory: str) -> bool:
    """Whether ``directory`` has the layout above (its ``config.json`` says so)."""
    path = storage.join(directory, "config.json")
    if not storage.is_file(path):
        return False
    try:
        meta = json.loads(storage.read_text(path))
    except ValueError:
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_meta(directory: str) -> dict:
    """``config.json`` of a pretrained directory (a folder or a bucket URL), checked."""
    path = storage.join(directory, "config.json")
    if not storage.is_file(path):
        raise PretrainedError(
            f"{path}: not found (expected a clip_jax pretrained directory written by "
            "python -m clip_jax.convert)"
        )
    try:
        meta = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PretrainedError(f"{path}: 'format' is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise PretrainedError(f"{path}: version {meta.get('version')!r}; expected {VERSION}")
    tok = meta.get("tokenizer")
    if tok is not None and tok.get("kind") not in TOKENIZER_KINDS:
        raise PretrainedError(
            f"{path}: tokenizer kind {tok.get('kind')!r} not in {TOKENIZER_KINDS}"
        )
    return meta


def load(directory: str) -> Pretrained:
    """The model configuration and variables (float32 arrays on the default device)."""
    meta = read_meta(directory)
    try:
        config = config_from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{directory}/config.json: bad 'model' entry ({e})") from None
    params_dir = storage.path(directory) / "params"
    if not storage.exists(params_dir):
        raise PretrainedError(f"{params_dir}: not found (the Orbax params item)")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        abstract_variables(config.replace(param_dtype="float32")),
    )
    try:
        variables = ocp.StandardCheckpointer().restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise PretrainedError(
            f"{params_dir}: does not hold the variables of the model in config.json ({e})"
        ) from None
    return Pretrained(
        name=meta.get("name", "custom"),
        config=config,
        variables=dict(variables),
        tokenizer=meta.get("tokenizer"),
        source=meta.get("source", {}),
    )


def make_tokenizer(spec: dict | None, directory: str = ""):
    """The tokenizer a pretrained directory names (None when it names none)."""
    if spec is None:
        return None
    if spec["kind"] == "clip_bpe":
        return ClipBPETokenizer(context_length=spec.get("context_length", 77))
    path = spec["path"]
    if not os.path.isabs(path) and not storage.is_remote(path):
        path = storage.join(directory, path)
    return Tokenizer(path, context_length=spec.get("context_length", 77))


def make_preprocess(image_size: int):
    """``preprocess(image) -> uint8 [image_size, image_size, 3]``: the evaluation transform
    (centre square, bicubic resize). ``image``: a path (or bucket URL), encoded bytes or a
    PIL image. Raises ``images.BadImage`` for data that is not a decodable image."""

    def preprocess(image) -> np.ndarray:
        if isinstance(image, (str, os.PathLike)):
            with storage.access(image, "read"):
                image = storage.path(image).read_bytes()
        if isinstance(image, (bytes, bytearray)):
            image = image_ops.decode_rgb(bytes(image))
        elif image.mode != "RGB":
            image = image.convert("RGB")
        return image_ops.center_crop(image, image_size)

    return preprocess


def load_model(directory: str):
    """``model, variables, tokenizer, preprocess`` of a pretrained directory (`clip_jax.load`).

    ``model.apply(variables, images, tokens)`` takes uint8 NHWC images and int32 tokens, as
    training does, and returns the L2-normalised ``image_emb``, ``text_emb`` and
    ``logit_scale``. ``tokenizer`` is None when the directory names none.
    """
    loaded = load(directory)
    tokenizer = make_tokenizer(loaded.tokenizer, os.fspath(directory))
    preprocess = make_preprocess(loaded.config.vision.image_size)
    return CLIP(loaded.config), loaded.variables, tokenizer, preprocess

"""Image and text features of one model state, computed on the whole mesh.

Each process reads its shard of a split (``eval_loader(..., shard_index, shard_count)``,
padded so every process runs the same number of batches); the batch is one global array
sharded over the batch axes; the embeddings come back replicated; padded rows are dropped by
``mask`` and the rest put in dataset order by ``index``. Every process therefore holds all
features and computes the same metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from clip_jax import sharding
from clip_jax.data import info, pipeline, truncation
from clip_jax.eval import metrics
from clip_jax.eval import templates as templates_lib
from clip_jax.models.clip import l2_normalize


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The three reads evaluation makes; the defaults read prepared tfds datasets.

    ``eval_loader(name, split, data_dir, *, batch_size, image_size, shard_index, shard_count)``
    yields padded batches of ``image``, ``mask``, ``index`` (and ``label``); ``read_captions``
    and ``dataset_info`` follow ``clip_jax.data``. Tests pass their own functions.
    """

    eval_loader: Callable[..., Iterable[dict]] = pipeline.eval_loader
    read_captions: Callable[..., list] = info.read_captions
    dataset_info: Callable[..., dict] = info.dataset_info


class Encoders:
    """Jitted, L2-normalised image and text encoders of one model state, on a mesh.

    ``images(global_uint8_batch)`` and ``texts(host_tokens)`` return float32 numpy arrays on
    every process (the embeddings are replicated by the jitted function).
    """

    def __init__(self, encode_image: Callable, encode_text: Callable, mesh, batch_size: int):
        self.mesh = mesh
        self.batch_size = int(batch_size)
        self._image = encode_image
        self._text = encode_text
        self._batch_sharding = sharding.batch_sharding(mesh)
        shards = sharding.batch_shards(mesh)
        if self.batch_size < 1 or self.batch_size % shards:
            raise ValueError(
                f"eval.batch_size={self.batch_size} must be a positive multiple of the "
                f"{shards} devices that split the batch (mesh data x fsdp)"
            )

    @classmethod
    def from_model(cls, model, params, model_state, mesh, batch_size: int) -> Encoders:
        variables = {"params": params, **(model_state or {})}
        encode_image, encode_text = _jitted_encoders(model, mesh)
        return cls(
            functools.partial(encode_image, variables),
            functools.partial(encode_text, variables),
            mesh,
            batch_size,
        )

    def images(self, global_images) -> np.ndarray:
        return _to_host(self._image(global_images))

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """Embeds ``[M, L]`` host tokens (the same on every process) in global batches."""
        tokens = np.asarray(tokens, np.int32)
        bs = self.batch_size
        out = []
        for start in range(0, tokens.shape[0], bs):
            chunk = tokens[start : start + bs]
            padded = metrics.pad_rows(chunk, bs)
            arr = jax.make_array_from_callback(
                padded.shape, self._batch_sharding, lambda i, c=padded: c[i]
            )
            out.append(_to_host(self._text(arr))[: chunk.shape[0]])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@functools.lru_cache(maxsize=8)
def _jitted_encoders(model, mesh):
    """Built once per (model, mesh), so evaluating every E steps of a run compiles once."""
    rep = sharding.replicated(mesh)

    @functools.partial(jax.jit, out_shardings=rep)
    def encode_image(variables, images):
        return l2_normalize(model.apply(variables, images, method="encode_image"))

    @functools.partial(jax.jit, out_shardings=rep)
    def encode_text(variables, tokens):
        return l2_normalize(model.apply(variables, tokens, method="encode_text"))

    return encode_image, encode_text


def _to_host(x) -> np.ndarray:
    """A replicated (or single-device) jax.Array as numpy, on any process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


@functools.lru_cache(maxsize=8)
def _replicator(mesh):
    return jax.jit(lambda tree: tree, out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass
class EvalContext:
    """What every evaluator needs; caches features and classifiers within one evaluation,
    so tasks on one dataset share them."""

    encoders: Encoders
    tokenizer: Any
    mesh: Any
    data_dir: str
    image_size: int
    data: DataSource = DataSource()
    cache: dict = dataclasses.field(default_factory=dict)

    def image_features(
        self, dataset: str, split: str, max_examples: int = 0
    ) -> dict[str, np.ndarray]:
        """``{'features' [N, D], 'index' [N], 'label' [N] (labelled sets)}`` in index order."""
        key = ("images", dataset, split, int(max_examples))
        if key not in self.cache:
            self.cache[key] = extract_image_features(self, dataset, split, max_examples)
        return self.cache[key]

    def classifier(self, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        key = ("classifier", tuple(names), tuple(templates))
        if key not in self.cache:
            self.cache[key] = zero_shot_weights(self.encoders, self.tokenizer, names, templates)
        return self.cache[key]


def extract_image_features(
    ctx: EvalContext, dataset: str, split: str, max_examples: int = 0
) -> dict:
    """Image embeddings of a split on the whole mesh, gathered to every process, index-ordered."""
    nproc, pid = jax.process_count(), jax.process_index()
    global_bs = ctx.encoders.batch_size
    if global_bs % nproc:
        raise ValueError(f"eval.batch_size={global_bs} is not divisible by the {nproc} processes")
    # batch_size is global: each process reads its 1/nproc of every batch.
    loader = ctx.data.eval_loader(
        dataset,
        split,
        ctx.data_dir,
        batch_size=global_bs,
        image_size=ctx.image_size,
        shard_index=pid,
        shard_count=nproc,
    )
    max_batches = math.ceil(max_examples / global_bs) if max_examples else None
    replicate = _replicator(ctx.mesh)
    feats, index, labels = [], [], []
    has_label = None
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break  # every process stops at the same batch: the loader pads them to equal length
        if has_label is None:
            has_label = "label" in batch
        side = {
            "mask": np.asarray(batch["mask"], bool),
            "index": np.asarray(batch["index"], np.int32),
        }
        if has_label:
            side["label"] = np.asarray(batch["label"], np.int32)
        # One global batch, so image and side fields stay row-aligned.
        glob = sharding.to_global({"image": batch["image"], **side}, ctx.mesh)
        emb = ctx.encoders.images(glob["image"])
        rest = {k: _to_host(v) for k, v in replicate({k: glob[k] for k in side}).items()}
        keep = rest["mask"].astype(bool)  # drops padding and images that failed to decode
        feats.append(emb[keep])
        index.append(rest["index"][keep].astype(np.int64))
        if has_label:
            labels.append(rest["label"][keep].astype(np.int64))
    if not feats:
        raise ValueError(f"split {split!r} of dataset {dataset!r} yielded no examples")
    index = np.concatenate(index)
    order = np.argsort(index, kind="stable")
    index = index[order]
    if index.size > 1 and np.any(index[1:] == index[:-1]):
        raise RuntimeError(f"example indices repeat in {dataset}/{split}: process shards overlap")
    out = {"features": np.concatenate(feats)[order], "index": index}
    if has_label:
        out["label"] = np.concatenate(labels)[order]
    if max_examples:
        out = {k: v[:max_examples] for k, v in out.items()}
    return out


def _warn_if_cut(tokenizer, prompts: Sequence[str]) -> None:
    """One warning when prompts are longer than the tokenizer's context: a cut prompt may lose
    the class name itself, and zero-shot falls towards chance for its template."""
    cut = truncation.truncated(tokenizer, prompts)
    if cut.any() and jax.process_index() == 0:
        example = prompts[int(np.argmax(cut))]
        kept = tokenizer.decode(tokenizer.encode([example]))[0]
        _warn_once(
            f"warning: {int(cut.sum())} of {len(prompts)} zero-shot prompts are longer than "
            f"tokenizer.context_length={tokenizer.context_length} and are cut, e.g. "
            f"{example!r} reads {kept!r}; raise the context length or use shorter templates"
        )


@functools.cache
def _warn_once(message: str) -> None:
    """Each message once per process: a run evaluates the same tasks every eval.every_steps."""
    print(message, file=sys.stderr, flush=True)


def zero_shot_weights(
    encoders: Encoders, tokenizer, names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """``[C, D]`` prompt-ensembled class embeddings (every class x every template)."""
    prompts = [templates_lib.fill(t, n) for n in names for t in templates]
    _warn_if_cut(tokenizer, prompts)
    emb = encoders.texts(tokenizer.encode(prompts))
    return np.asarray(metrics.zero_shot_classifier(emb.reshape(len(names), len(templates), -1)))

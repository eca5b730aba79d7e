"""Zero-shot predictions with a pretrained directory.

Command line::

    python -m clip_jax.predict --checkpoint=DIR --images=cat.jpg,photos/ \\
        --labels='a dog,a cat' [--templates=imagenet] [--top_k=5] [--json]
    python -m clip_jax.predict --checkpoint=DIR --images=cat.jpg --texts='a cat on a sofa,a car'

With ``--labels`` each image gets its ``top_k`` labels with probabilities (softmax over the
labels of ``logit_scale`` x cosine similarity; with ``--templates`` each label's text
embedding is the normalised mean over the filled templates, as in the CLIP paper). With
``--texts`` every image-text pair gets its cosine similarity and logit. ``--images`` takes
files and folders (their image files, sorted). An image that cannot be decoded is skipped
and reported, and the others are still predicted. Bad arguments (no labels, a missing
file, a directory that is not a pretrained model) are one-line errors, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from clip_jax import cli, pretrained, storage
from clip_jax.data.images import BadImage
from clip_jax.errors import UserError
from clip_jax.eval.metrics import zero_shot_classifier
from clip_jax.eval.templates import TEMPLATE_SETS, fill, load_templates

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class PredictError(UserError):
    """Bad arguments to predict; the message is one line."""


def split_list(value: str | None) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (empty entries dropped); a path (or bucket URL) to a text
    file -> its non-empty lines."""
    if not value:
        return []
    if storage.is_file(value):
        return [line.strip() for line in storage.read_text(value).splitlines() if line.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


def _image_files(folder: epath.Path) -> Iterator[str]:
    for child in folder.iterdir():  # full paths, bucket URLs included (walk drops gs://)
        if child.is_dir():
            yield from _image_files(child)
        elif child.name.lower().endswith(IMAGE_EXTENSIONS):
            yield str(child)


def image_paths(spec: str) -> list[str]:
    """Files and folders (their image files, sorted, recursively) of a comma-separated list;
    each may be a local path or a bucket URL."""
    paths = []
    for item in [v.strip() for v in (spec or "").split(",") if v.strip()]:
        with storage.access(item, "read"):
            entry = storage.path(item) if storage.is_remote(item) else epath.Path(item)
            is_dir, is_file = entry.is_dir(), entry.is_file()
            found = sorted(_image_files(entry)) if is_dir else []
        if is_dir:
            if not found:
                raise PredictError(f"{item}: folder holds no image files {IMAGE_EXTENSIONS}")
            paths += found
        elif is_file:
            paths.append(item)
        else:
            raise PredictError(f"{item}: no such image file or folder")
    if not paths:
        raise PredictError("--images is empty; give image files or folders, comma-separated")
    return paths


def read_images(paths: Sequence[str], preprocess) -> tuple[list[str], np.ndarray, dict]:
    """(decoded paths, uint8 [N, S, S, 3], {skipped path: reason})."""
    kept, arrays, skipped = [], [], {}
    for path in paths:
        try:
            arrays.append(preprocess(path))
            kept.append(path)
        except (BadImage, OSError) as e:
            skipped[path] = str(e)
    return kept, (np.stack(arrays) if arrays else np.zeros((0,), np.uint8)), skipped


class Predictor:
    """Embeds images and texts with a pretrained model, in fixed-size jitted batches."""

    def __init__(self, checkpoint: str, batch_size: int = 32):
        try:
            self.model, self.variables, self.tokenizer, self.preprocess = pretrained.load_model(
                checkpoint
            )
        except (pretrained.PretrainedError, OSError) as e:
            raise PredictError(str(e)) from None
        if self.tokenizer is None:
            raise PredictError(f"{checkpoint}/config.json: names no tokenizer")
        self.batch_size = batch_size
        self.logit_scale = float(np.exp(np.asarray(self.variables["params"]["log_scale"])))
        self.logit_scale = min(self.logit_scale, 100.0)
        model = self.model
        self._image = jax.jit(lambda v, x: model.apply(v, x, method=type(model).encode_image))
        self._text = jax.jit(lambda v, t: model.apply(v, t, method=type(model).encode_text))

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i : i + self.batch_size]
            pad = self.batch_size - len(chunk)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
            out.append(np.asarray(fn(self.variables, padded), np.float32)[: len(chunk)])
        emb = np.concatenate(out)
        return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> L2-normalised [N, D]."""
        return self._batched(self._image, images)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N strings -> L2-normalised [N, D]."""
        return self._batched(self._text, self.tokenizer.encode(list(texts)))

    def label_weights(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """[C, D] class embeddings: each label's filled templates, averaged (normalised)."""
        prompts = [fill(t, label) for label in labels for t in templates]
        emb = self.embed_texts(prompts).reshape(len(labels), len(templates), -1)
        return np.asarray(zero_shot_classifier(emb))


def classify(predictor: Predictor, images: np.ndarray, labels, templates) -> np.ndarray:
    """[N, C] label probabilities: softmax over labels of logit_scale x cosine."""
    weights = predictor.label_weights(labels, templates)
    logits = predictor.logit_scale * predictor.embed_images(images) @ weights.T
    return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def _templates(spec: str | None) -> list[str]:
    if not spec:
        return ["{}"]
    if spec in TEMPLATE_SETS or storage.is_file(spec):
        return load_templates(spec)
    return load_templates(split_list(spec))


def run(args) -> list[dict]:
    labels, texts = split_list(args.labels), split_list(args.texts)
    if args.labels is not None and not labels:
        raise PredictError("--labels is empty; give labels, comma-separated (e.g. 'a dog,a cat')")
    if not labels and not texts:
        raise PredictError("give --labels (classification) or --texts (image-text scores)")
    if args.top_k < 1:
        raise PredictError(f"--top_k must be >= 1; got {args.top_k}")
    try:
        templates = _templates(args.templates)
    except ValueError as e:
        raise PredictError(f"--templates: {e}") from None
    paths = image_paths(args.images)
    predictor = Predictor(args.checkpoint, args.batch_size)
    kept, images, skipped = read_images(paths, predictor.preprocess)
    results = [{"image": p, "error": reason} for p, reason in skipped.items()]
    if not kept:
        return results
    if labels:
        probs = classify(predictor, images, labels, templates)
        k = min(args.top_k, len(labels))
        for path, row in zip(kept, probs):
            top = np.argsort(-row, kind="stable")[:k]
            results.append(
                {
                    "image": path,
                    "labels": [{"label": labels[i], "prob": float(row[i])} for i in top],
                }
            )
    if texts:
        cos = predictor.embed_images(images) @ predictor.embed_texts(texts).T
        for path, row in zip(kept, cos):
            entry = next((r for r in results if r["image"] == path), None)
            if entry is None:
                entry = {"image": path}
                results.append(entry)
            entry["texts"] = [
                {"text": t, "cosine": float(c), "logit": float(predictor.logit_scale * c)}
                for t, c in zip(texts, row)
            ]
    order = {p: i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r["image"]])


def format_table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"])
        if "error" in r:
            lines.append(f"  skipped: {r['error']}")
        for item in r.get("labels", []):
            lines.append(f"  {100 * item['prob']:6.2f}%  {item['label']}")
        for item in r.get("texts", []):
            lines.append(f"  cos {item['cosine']:+.4f}  logit {item['logit']:7.3f}  {item['text']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clip_jax.predict",
        description="Zero-shot labels (or image-text scores) for images with a pretrained model.",
    )
    p.add_argument("--checkpoint", required=True, help="pretrained directory (clip_jax.convert)")
    p.add_argument("--images", required=True, help="image files and folders, comma-separated")
    p.add_argument("--labels", default=None, help="labels, comma-separated, or a file (one a line)")
    p.add_argument(
        "--templates",
        default=None,
        help="template set name (e.g. imagenet, simple), file, or comma-separated "
        "templates with {}; default: the labels as written",
    )
    p.add_argument("--texts", default=None, help="texts to score against every image")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)

    def body():
        results = run(args)
        for r in results:
            if "error" in r:
                print(f"predict: skipped {r['image']}: {r['error']}", file=sys.stderr)
        print(
            json.dumps(results, indent=1, ensure_ascii=False)
            if args.json
            else format_table(results)
        )
        if not any("error" not in r for r in results):
            raise PredictError("no image could be decoded")

    return cli.run(body, prefix="predict: error")


if __name__ == "__main__":
    sys.exit(main())

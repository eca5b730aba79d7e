"""What a prepared dataset holds: split sizes, features, label names, metadata, captions.

`dataset_info` reads the JSON files tfds writes beside the records (no TensorFlow);
`read_captions` reads every caption of a split through its `Source`.
"""

from __future__ import annotations

import json

from clip_jax import storage
from clip_jax.data.catalog import not_prepared_error, prepared_dir
from clip_jax.data.source import Source, record_captions


def dataset_info(name: str, data_dir: str | None = None) -> dict:
    """{'name', 'path', 'num_examples': {split: n}, 'class_names' (label names or None),
    'label_names': {feature: names} for every class-label feature, 'features': [...],
    'metadata': {...}} read from the prepared files (no TensorFlow)."""
    path = prepared_dir(name, data_dir)
    if path is None:
        raise not_prepared_error(name, data_dir)
    info = json.loads(storage.read_text(storage.join(path, "dataset_info.json")))
    num = {s["name"]: sum(int(x) for x in s.get("shardLengths", [])) for s in info["splits"]}
    feats = json.loads(storage.read_text(storage.join(path, "features.json")))
    feature_names = list(feats["featuresDict"]["features"].keys())
    label_names = {}
    for fname, spec in feats["featuresDict"]["features"].items():
        if "classLabel" in spec:
            txt = storage.join(path, f"{fname}.labels.txt")
            if storage.path(txt).is_file():
                lines = storage.read_text(txt).splitlines()
                label_names[fname] = [line for line in lines if line.strip()]
    metadata = {}
    meta_path = storage.join(path, "metadata.json")
    if storage.path(meta_path).is_file():
        metadata = json.loads(storage.read_text(meta_path))
    return {
        "name": name,
        "path": path,
        "num_examples": num,
        "class_names": label_names.get("label"),
        "label_names": label_names,
        "features": feature_names,
        "metadata": metadata,
    }


def read_captions(
    name: str, split: str, data_dir: str | None = None, chunk: int = 1024
) -> list[list[str]]:
    """Every example's captions, in index order (the eval loader's 'index'): a list of
    lists, so retrieval with several captions per image works."""
    src = Source(name, split, data_dir)
    out = []
    for start in range(0, len(src), chunk):
        out.extend(record_captions(r) for r in src.get(range(start, min(len(src), start + chunk))))
    return out

"""What a prepared dataset holds: split sizes, features, label names, metadata, captions.

`dataset_info` reads the JSON files tfds writes beside the records (no TensorFlow);
`read_captions` reads every caption of a split through its `Source`.
"""

from __future__ import annotations

import json
import os

from clip_jax.data.prepare import not_prepared_error, prepared_dir
from clip_jax.data.source import Source, record_captions


def dataset_info(name: str, data_dir: str | None = None) -> dict:
    """{'name', 'path', 'num_examples': {split: n}, 'class_names' (label names or None),
    'label_names': {feature: names} for every class-label feature, 'features': [...],
    'metadata': {...}} read from the prepared files (no TensorFlow)."""
    path = prepared_dir(name, data_dir)
    if path is None:
        raise not_prepared_error(name, data_dir)
    with open(os.path.join(path, "dataset_info.json")) as f:
        info = json.load(f)
    num = {s["name"]: sum(int(x) for x in s.get("shardLengths", [])) for s in info["splits"]}
    with open(os.path.join(path, "features.json")) as f:
        feats = json.load(f)
    feature_names = list(feats["featuresDict"]["features"].keys())
    label_names = {}
    for fname, spec in feats["featuresDict"]["features"].items():
        if "classLabel" in spec:
            txt = os.path.join(path, f"{fname}.labels.txt")
            if os.path.isfile(txt):
                with open(txt) as f:
                    label_names[fname] = [line.rstrip("\n") for line in f if line.strip()]
    metadata = {}
    meta_path = os.path.join(path, "metadata.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            metadata = json.load(f)
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

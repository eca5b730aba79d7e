"""Data: tfds import of image-text sources and the clip_demo set, a sentencepiece
tokenizer, and the grain loaders (see docs/architecture.md, `clip_jax/data/`).

Names are resolved lazily (so `python -m clip_jax.data.prepare` / `.tokenizer` run
cleanly and importing the package costs nothing); TensorFlow is never imported on the
reading path.
"""

import importlib

from clip_jax.data.errors import DataError, DatasetNotPreparedError

# name -> the module that defines it
_LAZY = {
    "Tokenizer": "clip_jax.data.tokenizer",
    "train_tokenizer": "clip_jax.data.tokenizer",
    "load_tokenizer": "clip_jax.data.tokenizer",
    "demo_tokenizer": "clip_jax.data.tokenizer",
    "demo_tokenizer_path": "clip_jax.data.tokenizer",
    "ensure_prepared": "clip_jax.data.prepare",
    "prepare": "clip_jax.data.prepare",
    "train_loader": "clip_jax.data.pipeline",
    "eval_loader": "clip_jax.data.pipeline",
    "read_captions": "clip_jax.data.info",
    "dataset_info": "clip_jax.data.info",
    "to_global": "clip_jax.sharding",  # moved there; kept here for old callers
    "default_data_dir": "clip_jax.data.paths",
    "resolve_data_dir": "clip_jax.data.paths",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clip_jax.data' has no attribute {name!r}")


__all__ = ["DataError", "DatasetNotPreparedError", *_LAZY]

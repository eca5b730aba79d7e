"""Data: tfds import of image-text sources and the clip_demo set, a sentencepiece
tokenizer, and the grain loaders (see docs/architecture.md, `clip_jax/data/`).

Names are resolved lazily (so `python -m clip_jax.data.prepare` / `.tokenizer` run
cleanly and importing the package costs nothing); TensorFlow is never imported on the
reading path.
"""

import importlib

from clip_jax.data.errors import DataError, DatasetNotPreparedError

_LAZY = {
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "ensure_prepared": "prepare",
    "prepare": "prepare",
    "train_loader": "pipeline",
    "eval_loader": "pipeline",
    "to_global": "pipeline",
    "read_captions": "pipeline",
    "dataset_info": "pipeline",
    "demo_tokenizer": "builders.clip_demo",
    "demo_tokenizer_path": "builders.clip_demo",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"clip_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'clip_jax.data' has no attribute {name!r}")


__all__ = ["DataError", "DatasetNotPreparedError", *_LAZY]

"""Where prepared datasets live: the one default for the tfds data directory.

Every entry point (trainer, evaluator, prepare, tokenizer, loaders) resolves a data
directory here, so an empty `data.data_dir` means the same folder everywhere, and that
folder is the one tfds itself would pick. A bucket URL (gs://, s3://) is kept as it is
(`clip_jax.storage`).
"""

from __future__ import annotations

import os

from clip_jax import storage


def default_data_dir() -> str:
    """$TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds's own rule), as an absolute path."""
    return storage.resolve(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """`data_dir` as an absolute path or a bucket URL; '' or None gives `default_data_dir()`."""
    if not data_dir:
        return default_data_dir()
    return storage.resolve(data_dir)

"""Where prepared datasets live: the one default for the tfds data directory.

Every entry point (trainer, evaluator, prepare, tokenizer, loaders) resolves a data
directory here, so an empty `data.data_dir` means the same folder everywhere, and that
folder is the one tfds itself would pick.
"""

from __future__ import annotations

import os


def default_data_dir() -> str:
    """$TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds's own rule), as an absolute path."""
    return os.path.abspath(
        os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    )


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """`data_dir` as an absolute path; '' or None gives `default_data_dir()`."""
    if not data_dir:
        return default_data_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))

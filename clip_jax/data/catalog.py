"""Which datasets are prepared where: a dataset's newest version folder, its splits, and
the error (naming the exact command that prepares it) when one is missing.

A version folder counts as prepared only once its `dataset_info.json` is there: tfds writes
that file last, and so does `prepare` when it publishes into a bucket.
"""

from __future__ import annotations

import json

from clip_jax import storage
from clip_jax.data import paths
from clip_jax.data.errors import DatasetNotPreparedError

DEMO_NAME = "clip_demo"
INFO_FILE = "dataset_info.json"


def prepared_dir(name: str, data_dir: str | None) -> str | None:
    """The newest prepared version folder of `name`, or None."""
    d = paths.resolve_data_dir(data_dir)
    root = storage.path(d) / name
    versions = []
    with storage.access(d, "list"):
        if not root.is_dir():
            return None
        for v in root.iterdir():
            parts = v.name.split(".")
            if len(parts) == 3 and all(p.isdigit() for p in parts) and (v / INFO_FILE).is_file():
                versions.append(tuple(int(p) for p in parts))
    if not versions:
        return None
    return storage.join(d, name, ".".join(map(str, max(versions))))


def prepare_command(name: str, data_dir: str | None) -> str:
    d = paths.resolve_data_dir(data_dir)
    if name == DEMO_NAME:
        return f"python -m clip_jax.data.prepare --name={DEMO_NAME} --data_dir={d}"
    return (
        f"python -m clip_jax.data.prepare --source=<your tars/jsonl/csv> --name={name} "
        f"--data_dir={d}"
    )


def not_prepared_error(
    name: str, data_dir: str | None, split: str | None = None, available=None
) -> DatasetNotPreparedError:
    d = paths.resolve_data_dir(data_dir)
    if split is not None and available is not None:
        return DatasetNotPreparedError(
            f"split {split!r} of dataset {name!r} is not prepared in {d} (available: "
            f"{', '.join(sorted(available))}); to prepare the dataset run: "
            f"{prepare_command(name, data_dir)}"
        )
    return DatasetNotPreparedError(
        f"dataset {name!r} is not prepared in {d}; prepare it with: "
        f"{prepare_command(name, data_dir)}"
    )


def split_names(path: str) -> list[str]:
    """The splits written in the version folder `path`."""
    info = json.loads(storage.read_text(storage.join(path, INFO_FILE)))
    return [s["name"] for s in info.get("splits", [])]

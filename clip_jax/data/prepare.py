"""Prepare datasets as tfds ArrayRecord: a user's image-text data, or the built-in demo.

    python -m clip_jax.data.prepare --source='shards/{00000..00099}.tar' --name=my_set \
        --data_dir=/data/tfds [--val_fraction=0.01] [--max_size=512]
    python -m clip_jax.data.prepare --source=captions.jsonl --name=my_set --data_dir=...
    python -m clip_jax.data.prepare --source=pets/ --name=my_pets --split=test  # class folders
    python -m clip_jax.data.prepare --name=clip_demo --data_dir=/data/tfds

Sources: webdataset tars as written by img2dataset (KEY.jpg|png|webp + KEY.txt, optional
KEY.json), as paths, brace patterns ("{000..099}"), globs or a folder; JSONL / CSV
files whose rows name an image (path relative to the file, inside its folder unless
--allow_outside_paths) and a caption (a string, or a list of strings in JSONL), and with
--label_field a class; or a folder of class sub-folders (FOLDER/CLASS/IMAGE, captions are
the class names). Labelled sources store a 'label' ClassLabel, so `evaluate
--tasks=zeroshot:NAME@SPLIT` works on them. --split=NAME writes every example to that
split, beside the splits the dataset already has. Examples that cannot be used (bad
image or caption, duplicate key, path outside the folder, text not valid in --encoding)
are skipped and counted by reason. Prints progress while writing and a summary at the end.

Tars and tables (with their images) may be bucket URLs, and --data_dir a gs:// bucket
(`build_into`); with --beam_runner=DataflowRunner both must be, since its workers share no
disk (README "Preparing a web-scale dataset").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence

from clip_jax import cli, storage
from clip_jax.data import paths
from clip_jax.data.builders import sources
from clip_jax.data.catalog import (
    DEMO_NAME,
    INFO_FILE,
    not_prepared_error,
    prepared_dir,
    split_names,
)
from clip_jax.data.errors import DataError

SUMMARY_FILE = "import_summary.json"
_SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_BUCKET_CHECKS = 32  # source files in a bucket checked at once


def ensure_prepared(
    name: str,
    data_dir: str | None = None,
    splits: Sequence[str] | str | None = None,
    **demo_options,
) -> str:
    """Returns the dataset's version folder. clip_demo is built on the spot if missing
    (`prepare_demo(data_dir, **demo_options)`; the default size takes well under a
    minute); any other missing dataset, or a missing split among `splits`, raises
    `DatasetNotPreparedError` with the exact command that prepares it.

    Multi-host: call it on one process and wait on a barrier before the others read."""
    path = prepared_dir(name, data_dir)
    if path is None:
        if name != DEMO_NAME:
            raise not_prepared_error(name, data_dir)
        prepare_demo(data_dir, **demo_options)
        path = prepared_dir(name, data_dir)
    if isinstance(splits, str):
        splits = [splits]
    if splits:
        available = split_names(path)
        for split in splits:
            if split not in available:
                raise not_prepared_error(name, data_dir, split, available)
    return path


def check_data_dir(data_dir: str) -> None:
    """A DataError (one line, with the fix) unless `data_dir` is, or can be, a writable folder."""
    if storage.is_remote(data_dir):
        storage.require(data_dir, "datasets", "--data_dir")
        storage.check_writable_dir(data_dir, "--data_dir")
        return
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} is a file; pass a folder for the datasets")
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create --data_dir {data_dir}: {e.strerror or e}; pass a folder you can write"
        ) from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataError(
            f"--data_dir {data_dir} is not writable (read-only file system or permissions); "
            "pass a folder you can write"
        )


def _download_config(overwrite: bool, beam: dict | None = None):
    """beam: `beam_runner` and `beam_options` (image_text_beam.pipeline_options)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy, only needed to write a dataset)

    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    return tfds.download.DownloadConfig(download_mode=mode, try_download_gcs=False, **(beam or {}))


def _split_summary(builder) -> dict:
    return {
        name: {"examples": int(s.num_examples), "bytes": int(s.num_bytes)}
        for name, s in builder.info.splits.items()
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_summary(summary: dict) -> str:
    lines = [f"dataset {summary['name']!r} in {summary['path']}"]
    for split, s in summary["splits"].items():
        extra = ""
        if split in summary.get("image_bytes", {}):
            extra = f", images {_human(summary['image_bytes'][split])}"
        lines.append(
            f"  {split}: {s['examples']} examples written, {_human(s['bytes'])} on disk{extra}"
        )
    if summary.get("kept_splits"):
        lines.append(f"  kept as they were: {', '.join(summary['kept_splits'])}")
    if summary.get("class_names") is not None:
        names = summary["class_names"]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} classes)" if len(names) > 8 else "")
        lines.append(f"  label: {len(names)} classes ({shown})")
    skipped = summary.get("skipped", {})
    if "skipped" in summary:
        lines.append(f"  skipped: {sum(skipped.values())}")
        for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]):
            eg = summary.get("skipped_examples", {}).get(reason, [])
            lines.append(f"    {n} x {reason}" + (f"   e.g. {'; '.join(eg[:3])}" if eg else ""))
    for note in summary.get("notes", []):
        lines.append(f"  note: {note}")
    if summary.get("reencoded"):
        lines.append(f"  re-encoded (downscaled to --max_size): {summary['reencoded']}")
    if summary.get("seconds") is not None:
        lines.append(f"  time: {summary['seconds']:.1f} s")
    return "\n".join(lines)


def prepare_demo(
    data_dir: str | None = None,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_train: int = 20000,
    num_validation: int = 2000,
    num_test: int = 2000,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Builds clip_demo (see builders/clip_demo.py); returns the summary dict."""
    from clip_jax.data.builders import clip_demo  # noqa: PLC0415 (imports tensorflow_datasets)

    t0 = time.time()
    if num_train < 1 or num_validation < 0 or num_test < 0:
        raise DataError(
            f"clip_demo needs --num_train >= 1 and --num_validation, --num_test >= 0; got "
            f"{num_train}, {num_validation}, {num_test}"
        )
    if image_size < 1:
        raise DataError(f"--image_size must be a positive number of pixels, got {image_size}")
    d = paths.resolve_data_dir(data_dir)
    check_data_dir(d)
    existing = prepared_dir(DEMO_NAME, d) if storage.is_remote(d) else None
    if existing and not overwrite:  # tfds itself skips a prepared local one
        return {"name": DEMO_NAME, "path": existing, "note": "already prepared"}

    def build(folder: str):
        builder = clip_demo.ClipDemo(
            data_dir=folder,
            seed=seed,
            image_size=image_size,
            num_train=num_train,
            num_validation=num_validation,
            num_test=num_test,
        )
        builder.download_and_prepare(download_config=_download_config(overwrite))
        return builder

    builder = build_into(DEMO_NAME, d, build)
    summary = {
        "name": DEMO_NAME,
        "path": prepared_dir(DEMO_NAME, d),
        "splits": _split_summary(builder),
        "seconds": time.time() - t0,
    }
    if verbose:
        print(format_summary(summary), flush=True)
    return summary


def prepare_image_text(
    name: str,
    source,
    data_dir: str | None = None,
    *,
    val_fraction: float = 0.01,
    max_size: int | None = None,
    image_field: str = "image",
    caption_field: str = "caption",
    key_field: str | None = None,
    label_field: str | None = None,
    split: str | None = None,
    encoding: str = "utf-8",
    allow_outside_paths: bool = False,
    num_threads: int = 4,
    beam_runner: str | None = None,
    beam_options: str = "",
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Imports a user's image-text (or labelled image) data as tfds dataset `name`; returns
    the summary dict (also written to <version folder>/import_summary.json, or
    import_summary_SPLIT.json for a split added to a prepared dataset).

    split: write every example to this split (no validation hold-out); a prepared dataset
    keeps its other splits and gets this one added (replaced with `overwrite`).
    beam_runner: import on Apache Beam (DirectRunner: local processes; DataflowRunner,
    SparkRunner, FlinkRunner...) with `beam_options` (command-line flags of that runner);
    the same dataset and summary as the single-process import.
    Raises DataError (one line) for a missing/empty/unreadable source or a missing field.
    """
    from clip_jax.data.builders import image_text  # noqa: PLC0415 (imports tensorflow_datasets)

    t0 = time.time()
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_size is not None and max_size < 1:
        raise DataError(f"max_size must be a positive number of pixels, got {max_size}")
    if split is not None and not _SPLIT_RE.match(split):
        raise DataError(f"invalid --split {split!r} (expected lower_snake_case, e.g. 'test')")
    d = paths.resolve_data_dir(data_dir)
    make_builder, beam = image_text.make_builder, None
    if beam_runner:
        from clip_jax.data.builders import image_text_beam  # noqa: PLC0415 (optional extra)

        make_builder = image_text_beam.make_builder
        given = [source] if isinstance(source, (str, os.PathLike)) else list(source or [])
        beam = image_text_beam.pipeline_options(
            beam_runner, beam_options, d, [os.fspath(s) for s in given]
        )
    elif beam_options:
        raise DataError("--beam_options needs --beam_runner (e.g. --beam_runner=DirectRunner)")
    read = sources.ReadOptions(
        image_field=image_field,
        caption_field=caption_field,
        key_field=key_field,
        label_field=label_field,
        encoding=sources.check_encoding(encoding),
        allow_outside_paths=allow_outside_paths,
    )
    files = sources.expand_sources(source)
    nonempty = [f for f, ok in zip(files, _check_sources(files, read)) if ok]
    if not nonempty:
        shown = files[0] if len(files) == 1 else f"{files[0]} ... ({len(files)} files)"
        raise DataError(f"source is empty: {shown} ({sources.EXPECTED})")
    empty = [f for f in files if f not in nonempty]
    check_data_dir(d)
    existing = prepared_dir(name, d)
    adding = bool(split and existing)
    if adding and storage.is_remote(d):
        raise DataError(
            f"--split={split}: adding a split to a dataset in a bucket ({d}) is not supported; "
            "prepare the dataset in a local folder, then copy it"
        )
    if existing and (split in split_names(existing) if adding else True) and not overwrite:
        builder = image_text.make_builder(name, d)
        what = f"split {split!r} " if adding else ""
        summary = {
            "name": name,
            "path": existing,
            "splits": _split_summary(builder),
            "note": f"{what}already prepared; pass --overwrite to import again",
        }
        if verbose:
            print(
                format_summary(summary) + f"\n  ({what}already prepared; --overwrite to re-import)"
            )
        return summary
    class_names = _class_names(name, nonempty, read, existing if adding else None)
    config = image_text.ImportConfig(
        sources=nonempty,
        read=read,
        val_fraction=val_fraction,
        max_size=max_size,
        class_names=class_names,
        split=split,
        num_threads=num_threads,
        progress=verbose,
    )
    if existing and not adding and not storage.is_remote(d):  # a bucket's goes once replaced
        shutil.rmtree(existing)
    # A split added to a prepared dataset is written on its own, then moved in.
    build_dir = tempfile.mkdtemp(prefix=f".{name}-{split}-", dir=d) if adding else d

    def build(folder: str):
        builder = make_builder(name, folder, config)
        builder.download_and_prepare(download_config=_download_config(overwrite, beam))
        return builder

    if verbose:
        into = f"split {split!r} of " if split else ""
        print(
            f"importing {len(nonempty)} source(s) into {into}{name!r} ({len(empty)} empty skipped)",
            flush=True,
        )
    try:
        if not adding:
            builder = build_into(name, d, build)
        else:
            builder = build(build_dir)
            built = os.path.join(build_dir, name, image_text.VERSION)
            image_text.merge_split(existing, built, name, split)
    except BaseException:
        root = os.path.join(d, name)
        if adding:
            shutil.rmtree(build_dir, ignore_errors=True)
        elif os.path.isdir(root) and not os.listdir(root):  # local (a bucket has no folders)
            os.rmdir(root)  # leave no trace of a failed import
        raise
    if adding:
        shutil.rmtree(build_dir, ignore_errors=True)
    stats = builder.stats
    skipped = dict(stats.skipped)
    if empty:
        skipped["empty source file"] = len(empty)
    path = prepared_dir(name, d)
    summary = {
        "name": name,
        "path": path,
        "sources": len(files),
        "splits": _split_summary(builder),
        "kept_splits": [s for s in split_names(path) if s != split] if adding else [],
        "class_names": class_names,
        "image_bytes": dict(stats.image_bytes),
        "skipped": skipped,
        "skipped_examples": stats.skipped_examples(),
        "reencoded": stats.reencoded,
        "notes": list(stats.notes) + _notes(skipped, read),
        "seconds": time.time() - t0,
    }
    if empty:
        summary["skipped_examples"]["empty source file"] = empty[:5]
    summary_file = f"import_summary_{split}.json" if adding else SUMMARY_FILE
    storage.write_text(storage.join(path, summary_file), json.dumps(summary, indent=1))
    if verbose:
        print(format_summary(summary), flush=True)
    return summary


def _class_names(
    name: str, files: list[str], read: sources.ReadOptions, existing: str | None
) -> list[str] | None:
    """The ClassLabel names of the import (None: unlabelled). A split added to a prepared
    dataset keeps that dataset's classes, and must not bring new ones."""
    from clip_jax.data.builders import image_text  # noqa: PLC0415 (imports tensorflow_datasets)

    labelled = bool(read.label_field) or any(os.path.isdir(f) for f in files)
    labels = set().union(*(sources.source_labels(f, read) for f in files))
    if labelled and not labels:
        raise DataError(
            f"no class found in {files[0]} (label field {read.label_field!r} is empty in every "
            "row); pass the right --label_field"
        )
    if existing is None:
        return sources.sort_class_names(labels) if labelled else None
    known = image_text.existing_class_names(existing)
    if known is None and labelled:
        raise DataError(
            f"dataset {name!r} has no labels, so a labelled split cannot join it; import the "
            "labelled data under another --name"
        )
    if known is not None and not labelled:
        raise DataError(
            f"dataset {name!r} is labelled ({len(known)} classes); pass --label_field=COLUMN, or "
            "a folder of class sub-folders"
        )
    unknown = sorted(labels - set(known or ()))
    if unknown:
        raise DataError(
            f"classes not in dataset {name!r}: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} (it has: {', '.join(known[:8])}"
            f"{' ...' if len(known) > 8 else ''}); re-import it with every class, or use "
            "another --name"
        )
    return known


def _notes(skipped: dict, read: sources.ReadOptions) -> list[str]:
    """Hints for the skip reasons a flag can fix."""
    if any("not valid UTF-8" in reason for reason in skipped) and read.encoding == "utf-8":
        return [
            "rows not valid UTF-8 were skipped; if a JSONL/CSV file is in another encoding, "
            "pass --encoding (e.g. --encoding=cp1252 or latin-1)"
        ]
    return []


def _check_sources(files: list[str], read: sources.ReadOptions) -> list[bool]:
    """`sources.check_source` of each file, in order; a bucket's in parallel: each check is a
    few requests, and 10,000 shards one after another would take many minutes."""
    if not any(storage.is_remote(f) for f in files):
        return [sources.check_source(f, read) for f in files]
    with concurrent.futures.ThreadPoolExecutor(_BUCKET_CHECKS) as pool:
        return list(pool.map(lambda f: sources.check_source(f, read), files))


def build_into(name: str, data_dir: str, build: Callable[[str], object]):
    """Returns `build(folder)`, which writes dataset `name` with tfds under `folder`, so that
    `name` ends up prepared in `data_dir`. A local `data_dir` is `folder`: tfds writes a
    temporary folder and renames it. A bucket has no rename (tfds' rename copies objects in
    no set order, so a failure part-way could leave dataset_info.json beside missing
    shards): the dataset is built in a staging folder of `data_dir`, then its version folder
    is moved into place with dataset_info.json last, once the version it replaces is
    deleted, dataset_info.json first. The staging folder is deleted either way."""
    if not storage.is_remote(data_dir):
        return build(data_dir)
    staging = storage.join(data_dir, f".{name}-staging-{uuid.uuid4().hex}")
    try:
        result = build(staging)
        built = prepared_dir(name, staging)
        target = storage.join(data_dir, name, built.rsplit("/", 1)[1])
        for old in {prepared_dir(name, data_dir), target} - {None}:
            storage.remove_tree(old, first=INFO_FILE)
        storage.move_tree(built, target, last=INFO_FILE)
    except BaseException:
        with contextlib.suppress(Exception):  # the first failure is the one to report
            storage.remove_tree(staging)
        raise
    storage.remove_tree(staging)
    return result


def prepare(name: str, data_dir: str | None = None, source=None, **kwargs) -> dict:
    """clip_demo when name == 'clip_demo' (no source), else an image-text import."""
    if name == DEMO_NAME:
        if source:
            raise DataError(f"{DEMO_NAME} is generated, it takes no --source")
        if kwargs.pop("beam_runner", None):
            raise DataError(f"{DEMO_NAME} is generated in one process; drop --beam_runner")
        return prepare_demo(data_dir, **kwargs)
    if not source:
        raise DataError(
            f"--source is required to import dataset {name!r} "
            "(webdataset tars, a JSONL or a CSV file)"
        )
    return prepare_image_text(name, source, data_dir, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clip_jax.data.prepare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--name", required=True, help="dataset name (lower_snake_case) or clip_demo")
    p.add_argument(
        "--source",
        nargs="+",
        default=None,
        help="tar shards / JSONL / CSV files: paths, brace patterns, globs, folders",
    )
    p.add_argument("--data_dir", default=None, help="tfds data dir (default $TFDS_DATA_DIR)")
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument(
        "--max_size",
        type=int,
        default=None,
        help="downscale images whose shorter side exceeds this (re-encodes them)",
    )
    p.add_argument("--image_field", default="image")
    p.add_argument("--caption_field", default="caption")
    p.add_argument("--key_field", default=None)
    p.add_argument(
        "--label_field",
        default=None,
        help="JSONL/CSV column holding each image's class: stores a 'label' ClassLabel "
        "(class sub-folders need no flag)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="write every example to this split (e.g. test), added to the dataset's splits",
    )
    p.add_argument("--encoding", default="utf-8", help="text encoding of JSONL/CSV files")
    p.add_argument(
        "--allow_outside_paths",
        action="store_true",
        help="read JSONL/CSV image paths that are absolute or climb out of the file's folder",
    )
    p.add_argument("--num_threads", type=int, default=4, help="image check threads")
    p.add_argument(
        "--beam_runner",
        default=None,
        help="import on Apache Beam: DirectRunner (local processes), DataflowRunner, "
        "SparkRunner, FlinkRunner... (pip install 'clip_jax[beam]')",
    )
    p.add_argument(
        "--beam_options",
        default="",
        help="the runner's pipeline flags, quoted as one string, e.g. "
        "'--direct_num_workers=8' or '--project=P --region=R --temp_location=gs://B/tmp'",
    )
    p.add_argument("--overwrite", action="store_true")
    demo = p.add_argument_group("clip_demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--image_size", type=int, default=64)
    demo.add_argument("--num_train", type=int, default=20000)
    demo.add_argument("--num_validation", type=int, default=2000)
    demo.add_argument("--num_test", type=int, default=2000)
    args = p.parse_args(argv)

    def body():
        try:
            if args.name == DEMO_NAME:
                prepare(
                    DEMO_NAME,
                    args.data_dir,
                    args.source,
                    seed=args.seed,
                    image_size=args.image_size,
                    num_train=args.num_train,
                    num_validation=args.num_validation,
                    num_test=args.num_test,
                    overwrite=args.overwrite,
                    beam_runner=args.beam_runner,
                )
            else:
                prepare(
                    args.name,
                    args.data_dir,
                    args.source,
                    val_fraction=args.val_fraction,
                    max_size=args.max_size,
                    image_field=args.image_field,
                    caption_field=args.caption_field,
                    key_field=args.key_field,
                    label_field=args.label_field,
                    split=args.split,
                    encoding=args.encoding,
                    allow_outside_paths=args.allow_outside_paths,
                    num_threads=args.num_threads,
                    beam_runner=args.beam_runner,
                    beam_options=args.beam_options,
                    overwrite=args.overwrite,
                )
        except DataError:
            raise  # DatasetNotPreparedError is an OSError too: its message stands
        except OSError as e:  # a file vanished or became unreadable while importing
            where = f" {e.filename}" if e.filename else ""
            raise DataError(f"cannot access{where}: {e.strerror or e}; check the path") from e

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())

"""Reading a user's image-text source: webdataset tar shards, JSONL or CSV files.

Nothing here depends on tfds; `ImageText` (image_text.py) turns the candidates into
examples. Every problem with the *input as a whole* (missing path, empty source,
unreadable tar, missing field) raises a one-line `DataError`; problems with one example
(bad image, empty caption...) are yielded as a `Candidate` with `problem` set, so the
builder counts them and carries on.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence

from clip_jax.data.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TABLE_EXTS = (".jsonl", ".csv")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
EXPECTED = (
    "expected webdataset .tar shards (KEY.jpg|png|webp + KEY.txt), "
    "a .jsonl/.csv file with image path and caption columns, or a folder of them"
)


@dataclasses.dataclass
class Candidate:
    """One would-be example. `load_image()` returns the encoded bytes (read lazily for
    table sources so the held-out split filter runs before any file is read)."""

    key: str
    origin: str  # where it came from, for messages: "shard.tar:0001" or "file.jsonl:12"
    captions: list[str] | None = None
    load_image: Callable[[], bytes] | None = None
    problem: str | None = None


# ---------------------------------------------------------------------------------------
# Source expansion
# ---------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """'a{00..02}.tar' -> a00.tar a01.tar a02.tar; 'x{a,b}' -> xa xb (nested, several)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.lstrip("-").startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a pattern: keep literally
        return [head + items[0] + t for t in expand_braces(tail)]
    return [head + i + t for i in items for t in expand_braces(tail)]


def _kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(TAR_EXTS):
        return "tar"
    if low.endswith(".jsonl") or low.endswith(".json"):
        return "jsonl"
    if low.endswith(".csv"):
        return "csv"
    return None


def expand_sources(sources: Sequence[str] | str) -> list[str]:
    """Brace patterns, globs and folders -> a sorted-within-pattern list of files."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [os.fspath(sources)]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise DataError(f"no source given ({EXPECTED})")
    files: list[str] = []
    for src in sources:
        for path in expand_braces(src):
            if any(c in path for c in "*?["):
                hits = sorted(glob.glob(path))
                if not hits:
                    raise DataError(f"source pattern matches no file: {path} ({EXPECTED})")
                files.extend(hits)
            elif os.path.isdir(path):
                inside = sorted(
                    os.path.join(path, f)
                    for f in os.listdir(path)
                    if _kind(f) and os.path.isfile(os.path.join(path, f))
                )
                tars = [f for f in inside if _kind(f) == "tar"]
                inside = tars or inside
                if not inside:
                    raise DataError(
                        f"source folder holds no .tar, .jsonl or .csv file: {path} ({EXPECTED})"
                    )
                files.extend(inside)
            elif os.path.exists(path):
                files.append(path)
            else:
                raise DataError(f"source not found: {path} ({EXPECTED})")
    for f in files:
        if _kind(f) is None:
            raise DataError(f"unsupported source file type: {f} ({EXPECTED})")
    seen, unique = set(), []
    for f in files:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique


# ---------------------------------------------------------------------------------------
# Up-front checks (before tfds starts writing anything)
# ---------------------------------------------------------------------------------------


def check_source(path: str, image_field: str, caption_field: str) -> bool:
    """Raises DataError for an unreadable file or a missing field; returns False if empty."""
    kind = _kind(path)
    if os.path.getsize(path) == 0:
        return False
    if kind == "tar":
        try:
            with tarfile.open(path, "r:*") as tf:
                first = tf.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"cannot read tar file {path}: {e} (expected a tar shard as written by img2dataset)"
            ) from None
        return first is not None
    rows = _table_rows(path)
    try:
        first = next(rows, None)
    finally:
        rows.close()
    if first is None:
        return False
    _, row = first
    if isinstance(row, str):  # an unparsable first line
        raise DataError(f"cannot parse {path}: first row is not a JSON object ({row})")
    for field, what in ((image_field, "image"), (caption_field, "caption")):
        if field not in row:
            raise DataError(
                f"{what} field {field!r} not found in {path} "
                f"(available: {', '.join(map(str, row)) or 'none'}); "
                f"pass --{what}_field=NAME"
            )
    return True


# ---------------------------------------------------------------------------------------
# Iteration
# ---------------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _caption_from_bytes(data: bytes) -> str:
    return data.decode("utf-8")


def iter_tar(path: str) -> Iterator[Candidate]:
    """Groups consecutive members sharing a key (KEY.jpg, KEY.txt, KEY.json...)."""
    short = os.path.basename(path)

    def emit(key, members):
        origin = f"{short}:{key}"
        img_ext = next(
            (e for e in members if e in IMAGE_EXTS or e.rsplit(".", 1)[-1] in IMAGE_EXTS), None
        )
        if img_ext is None:
            return Candidate(key, origin, problem="missing image")
        captions, problem = None, None
        try:
            if "txt" in members:
                captions = [_caption_from_bytes(members["txt"])]
            elif "json" in members:
                meta = json.loads(members["json"].decode("utf-8"))
                cap = meta.get("caption") if isinstance(meta, dict) else None
                if isinstance(cap, str):
                    captions = [cap]
        except UnicodeDecodeError:
            problem = "caption is not valid UTF-8"
        except json.JSONDecodeError:
            problem = "invalid JSON metadata"
        if problem is None and captions is None:
            problem = "missing caption"
        data = members[img_ext]
        return Candidate(key, origin, captions, (lambda: data), problem)

    try:
        with tarfile.open(path, "r|*") as tf:
            key, members = None, {}
            for info in tf:
                if not info.isfile():
                    continue
                k, ext = _split_name(info.name)
                if not ext or os.path.basename(info.name).startswith("._"):
                    continue
                if k != key:
                    if key is not None:
                        yield emit(key, members)
                    key, members = k, {}
                f = tf.extractfile(info)
                members[ext] = f.read() if f is not None else b""
            if key is not None:
                yield emit(key, members)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f"cannot read tar file {path}: {e} (expected a tar shard as written by img2dataset)"
        ) from None


def _table_rows(path: str) -> Iterator[tuple[int, dict | str]]:
    """(line number, row) for JSONL / CSV; an unparsable JSONL line gives a str reason."""
    if _kind(path) == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, f"invalid JSON: {e.msg}"
                continue
            yield n, (row if isinstance(row, dict) else "line is not a JSON object")


def _read_file(path: str) -> Callable[[], bytes]:
    def load():
        with open(path, "rb") as f:
            return f.read()

    return load


def iter_table(
    path: str, image_field: str, caption_field: str, key_field: str | None
) -> Iterator[Candidate]:
    """Rows of a JSONL/CSV file; consecutive rows naming the same image are merged into
    one example with several captions. Image paths are relative to the file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    short = os.path.basename(path)
    pending: Candidate | None = None
    for n, row in _table_rows(path):
        origin = f"{short}:{n}"
        if isinstance(row, dict) and isinstance(row.get(image_field), str):
            origin += f" {row[image_field]}"
        if isinstance(row, str):
            if pending:
                yield pending
                pending = None
            yield Candidate(f"{short}:{n}", origin, problem="unparsable row")
            continue
        img = row.get(image_field)
        cap = row.get(caption_field)
        if not isinstance(img, str) or not img:
            if pending:
                yield pending
                pending = None
            yield Candidate(f"{short}:{n}", origin, problem="missing image path")
            continue
        key = str(row[key_field]) if key_field and row.get(key_field) not in (None, "") else img
        if cap is None:
            captions, problem = None, "missing caption"
        elif isinstance(cap, str):
            captions, problem = [cap], None
        elif isinstance(cap, list) and all(isinstance(c, str) for c in cap):
            captions, problem = list(cap), None
        else:
            captions, problem = None, "caption is not a string or a list of strings"
        if (
            pending is not None
            and pending.key == key
            and problem is None
            and pending.problem is None
        ):
            pending.captions.extend(captions)
            continue
        if pending:
            yield pending
        full = img if os.path.isabs(img) else os.path.join(base, img)
        if problem is None and not os.path.isfile(full):
            problem = "missing image file"
        pending = Candidate(key, origin, captions, _read_file(full), problem)
    if pending:
        yield pending


def iter_source(
    path: str,
    image_field: str = "image",
    caption_field: str = "caption",
    key_field: str | None = None,
) -> Iterator[Candidate]:
    if _kind(path) == "tar":
        return iter_tar(path)
    return iter_table(path, image_field, caption_field, key_field)

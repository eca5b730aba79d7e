"""Reading a user's source: webdataset tar shards, JSONL or CSV files, or class folders.

Nothing here depends on tfds; `ImageText` (image_text.py) turns the candidates into
examples. Tar shards and JSONL/CSV files (and the images a table names) may be local paths or
bucket URLs (`clip_jax.storage`), so that Beam workers sharing no disk can read them; class
folders are read from local folders only.

Every problem with the *input as a whole* (missing path, empty source, unreadable tar,
missing field) raises a one-line `DataError`; problems with one example (bad image, empty
caption, duplicate key, a path outside the table's folder, text that is not valid in the
table's encoding...) are yielded as a `Candidate` with `problem` set, so the builder counts
them and carries on: every planted example is either written or counted as skipped with
its reason.

Labelled sources (for zero-shot evaluation on the user's classes):
  * a folder of class sub-folders (the ImageFolder layout, FOLDER/CLASS/**/IMAGE): the
    class is the sub-folder's name, the caption is that name with '_' read as a space;
  * JSONL/CSV rows with a label column (`ReadOptions.label_field`): the label value is the
    class name (a JSON integer is read as its decimal string); the caption column is then
    optional, a row without one gets the class name as its caption.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence

from clip_jax import storage
from clip_jax.data.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TABLE_EXTS = (".jsonl", ".csv")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
EXPECTED = (
    "expected webdataset .tar shards (KEY.jpg|png|webp + KEY.txt), "
    "a .jsonl/.csv file with image path and caption columns, a folder of them, "
    "or a folder of class sub-folders of images"
)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How rows of JSONL/CSV files are read (tars and class folders need none of it).

    encoding: of the whole table file; a row whose text is not valid in it is skipped.
    allow_outside_paths: read image paths that are absolute or climb out of the table's
    folder with '..' (refused by default: a shared table could name any readable file).
    """

    image_field: str = "image"
    caption_field: str = "caption"
    key_field: str | None = None
    label_field: str | None = None
    encoding: str = "utf-8"
    allow_outside_paths: bool = False


@dataclasses.dataclass
class Candidate:
    """One would-be example. `load_image()` returns the encoded bytes (read lazily for
    table sources so the held-out split filter runs before any file is read)."""

    key: str
    origin: str  # where it came from, for messages: "shard.tar:0001" or "file.jsonl:12"
    captions: list[str] | None = None
    load_image: Callable[[], bytes] | None = None
    problem: str | None = None
    label: str | None = None  # class name, for labelled sources


def check_encoding(encoding: str) -> str:
    """The codec's canonical name; a DataError for an unknown one."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise DataError(
            f"unknown --encoding {encoding!r} (expected a Python codec name such as utf-8, "
            "latin-1 or cp1252)"
        ) from None


def caption_of_class(name: str) -> str:
    """The caption of an example known only by its class: 'golden_retriever' -> 'golden
    retriever' (the evaluator reads class names the same way)."""
    return name.replace("_", " ").strip()


def sort_class_names(names: Iterable[str]) -> list[str]:
    """Sorted as text, or as numbers when every name is a decimal integer ('2' < '10')."""
    names = set(names)
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def printable(text: str) -> str:
    """`text` safe to print and to store as UTF-8: undecodable bytes as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_valid_text(text: str) -> bool:
    """False for text holding bytes the file's encoding could not decode (read with
    errors='surrogateescape') or lone surrogates from JSON escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    """'tar', 'jsonl', 'csv' from the file name; 'folder' for a directory (class folders)."""
    low = path.lower()
    if low.endswith(TAR_EXTS):
        return "tar"
    if low.endswith(".jsonl") or low.endswith(".json"):
        return "jsonl"
    if low.endswith(".csv"):
        return "csv"
    if os.path.isdir(path):
        return "folder"
    return None


def _open(path: str):
    """The file `path` (a local path or a bucket URL) opened for reading bytes."""
    return storage.path(path).open("rb") if storage.is_remote(path) else open(path, "rb")


def _visible(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def class_folders(path: str) -> list[str]:
    """The class names of an ImageFolder source: its visible sub-folders, sorted."""
    return _visible(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))


def expand_sources(sources: Sequence[str] | str) -> list[str]:
    """Brace patterns, globs and folders -> a sorted-within-pattern list of sources: files,
    or a folder itself when it holds no tar/table file but class sub-folders."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [os.fspath(sources)]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise DataError(f"no source given ({EXPECTED})")
    files: list[str] = []
    for src in sources:
        for path in expand_braces(src):
            if any(c in path for c in "*?["):
                hits = storage.glob(path)
                if not hits:
                    raise DataError(f"source pattern matches no file: {path} ({EXPECTED})")
                files.extend(hits)
            elif storage.is_dir(path):
                inside = [
                    storage.join(path, f)
                    for f in storage.list_files(path)
                    if _kind(f) in ("tar", "jsonl", "csv")
                ]
                tars = [f for f in inside if _kind(f) == "tar"]
                inside = tars or inside
                if inside:
                    files.extend(inside)
                elif storage.is_remote(path):
                    raise DataError(
                        f"source folder holds no .tar, .jsonl or .csv file: {path} (class "
                        "sub-folders are read from local folders only)"
                    )
                elif class_folders(path):
                    files.append(path)
                else:
                    raise DataError(
                        f"source folder holds no .tar, .jsonl or .csv file and no class "
                        f"sub-folder: {path} ({EXPECTED})"
                    )
            elif storage.exists(path):
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


def check_source(path: str, options: ReadOptions) -> bool:
    """Raises DataError for an unreadable file or a missing field; returns False if empty."""
    kind = _kind(path)
    try:
        if kind == "folder":
            bad = [printable(c) for c in class_folders(path) if not _is_valid_text(c)]
            if bad:
                raise DataError(
                    f"class folder name is not valid UTF-8: {os.path.join(path, bad[0])}; "
                    "rename it (class names are stored as text)"
                )
            first = next((f for c in class_folders(path) if (f := _class_files(path, c))), [])
            shards = [f for f in first if _kind(f) in ("tar", "jsonl", "csv")]
            if shards:
                raise DataError(
                    f"{path} has sub-folders of shards or tables ({shards[0]}), not of images; "
                    f"pass the files, e.g. --source='{path}/*/*.tar'"
                )
            return bool(first)
        if kind == "tar" and options.label_field:
            raise DataError(
                f"--label_field applies to JSONL/CSV sources; {path} is a tar shard "
                "(import labelled images as class sub-folders or a table)"
            )
        with _open(path) as f:
            if not f.read(1):
                return False
            f.seek(0)
            if kind == "tar":
                with tarfile.open(fileobj=f, mode="r:*") as tf:
                    return tf.next() is not None
        rows = _table_rows(path, options.encoding)
        try:
            first = next(rows, None)
        finally:
            rows.close()
    except (tarfile.TarError, EOFError) as e:
        raise DataError(
            f"cannot read tar file {path}: {e} (expected a tar shard as written by img2dataset)"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read source {path}: {e.strerror or e}") from None
    if first is None:
        return False
    _, row = first
    if isinstance(row, str):  # an unparsable first line
        raise DataError(f"cannot parse {path}: first row is not a JSON object ({row})")
    fields = [(options.image_field, "image"), (options.label_field, "label")]
    if not options.label_field:  # labelled rows may go without a caption
        fields.append((options.caption_field, "caption"))
    for field, what in fields:
        if field and field not in row:
            raise DataError(
                f"{what} field {field!r} not found in {path} "
                f"(available: {', '.join(map(str, row)) or 'none'}); "
                f"pass --{what}_field=NAME"
            )
    return True


def source_labels(path: str, options: ReadOptions) -> set[str]:
    """Every class name a labelled source holds (a pass over the rows, no image read)."""
    if _kind(path) == "folder":
        return set(class_folders(path))
    if not options.label_field or _kind(path) == "tar":
        return set()
    labels = set()
    for _, row in _table_rows(path, options.encoding):
        if isinstance(row, dict):
            label, problem = _label_of(row.get(options.label_field))
            if problem is None:
                labels.add(label)
    return labels


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
    """Groups consecutive members sharing a key (KEY.jpg, KEY.txt, KEY.json...).

    A key that comes back in the same shard (`k.jpg k.txt k.jpg k.txt`, or later on) is
    a second example under a key already used: it is skipped as 'duplicate key' (the first
    is kept), as webdataset itself refuses a sample holding one suffix twice."""
    short = printable(os.path.basename(path))

    def emit(key, members, duplicate):
        key = printable(key)  # a member name that is not UTF-8 still gets a storable key
        origin = f"{short}:{key}"
        if duplicate:
            return Candidate(key, origin, problem="duplicate key: already used in this shard")
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
        with _open(path) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            key, members, seen = None, {}, set()
            for info in tf:
                if not info.isfile():
                    continue
                k, ext = _split_name(info.name)
                if not ext or os.path.basename(info.name).startswith("._"):
                    continue
                if k != key or ext in members:
                    if key is not None:
                        yield emit(key, members, key in seen)
                        seen.add(key)
                    key, members = k, {}
                f = tf.extractfile(info)
                members[ext] = f.read() if f is not None else b""
            if key is not None:
                yield emit(key, members, key in seen)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f"cannot read tar file {path}: {e} (expected a tar shard as written by img2dataset)"
        ) from None


def _table_rows(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, dict | str]]:
    """(line number, row) for JSONL / CSV; an unparsable JSONL line gives a str reason.
    Bytes not valid in `encoding` reach the row as surrogates (see `_is_valid_text`)."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # a byte-order mark (as spreadsheets write) is not data
    csv_file = _kind(path) == "csv"
    with io.TextIOWrapper(
        _open(path), encoding=encoding, errors="surrogateescape", newline="" if csv_file else None
    ) as f:
        if csv_file:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
            return
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
        with _open(path) as f:
            return f.read()

    return load


def _label_of(value) -> tuple[str | None, str | None]:
    """(class name, None) or (None, skip reason) for a row's label value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if value is not None and not isinstance(value, str):
        return None, "label is not a string or integer"
    if not (value or "").strip():
        return None, "missing label"
    if not _is_valid_text(value):
        return None, "label is not valid text in the file's encoding"
    return value.strip(), None


def _image_path(base: str, img: str, allow_outside: bool) -> tuple[str, str | None]:
    """(full path, None) or (full path, skip reason) for a row's image path. Checked on the
    path as written (absolute, a bucket URL, or '..' climbing out), so a symlink the folder's
    owner put inside the folder is followed. `base` may be a bucket URL."""
    if storage.is_remote(img):
        full = img
    elif storage.is_remote(base):
        scheme, rest = base.split("://", 1)
        full = f"{scheme}://{posixpath.normpath(posixpath.join(rest, img))}"
    else:
        full = os.path.normpath(os.path.join(base, img))
    if allow_outside:
        return full, None
    inside = full == base or full.startswith(base.rstrip("/") + "/")
    if os.path.isabs(img) or storage.is_remote(img) or not inside:
        return full, "image path outside the table's folder (pass --allow_outside_paths to read it)"
    return full, None


def _table_caption(row: dict, options: ReadOptions, label: str | None) -> tuple:
    """(captions, problem) of one row."""
    cap = row.get(options.caption_field)
    if cap is None and label is not None:
        return [caption_of_class(label)], None
    if cap is None:
        return None, "missing caption"
    if isinstance(cap, str):
        captions = [cap]
    elif isinstance(cap, list) and all(isinstance(c, str) for c in cap):
        captions = list(cap)
    else:
        return None, "caption is not a string or a list of strings"
    if not all(_is_valid_text(c) for c in captions):
        return None, f"caption is not valid {_encoding_label(options.encoding)}"
    return captions, None


def _encoding_label(encoding: str) -> str:
    name = codecs.lookup(encoding).name
    return "UTF-8" if name == "utf-8" else name


def iter_table(path: str, options: ReadOptions) -> Iterator[Candidate]:
    """Rows of a JSONL/CSV file; consecutive rows naming the same image (same key and
    label) are merged into one example with several captions. Image paths are relative
    to the file's folder. Consecutive rows with the same key but another image or label
    are skipped as 'duplicate key' (the first is kept)."""
    remote = storage.is_remote(path)
    base = path.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(path))
    short = printable(os.path.basename(path))
    pending: Candidate | None = None
    pending_image = None
    for n, row in _table_rows(path, options.encoding):
        origin = f"{short}:{n}"
        if isinstance(row, dict) and isinstance(row.get(options.image_field), str):
            origin += f" {printable(row[options.image_field])}"
        if isinstance(row, str):
            if pending:
                yield pending
                pending = None
            yield Candidate(f"{short}:{n}", origin, problem="unparsable row")
            continue
        img = row.get(options.image_field)
        if not isinstance(img, str) or not img:
            if pending:
                yield pending
                pending = None
            yield Candidate(f"{short}:{n}", origin, problem="missing image path")
            continue
        key_value = row.get(options.key_field) if options.key_field else None
        key = str(key_value) if key_value not in (None, "") else img
        label, problem = None, None
        if options.label_field:
            label, problem = _label_of(row.get(options.label_field))
        if not (_is_valid_text(img) and _is_valid_text(key)):
            problem = (
                problem or f"image path or key is not valid {_encoding_label(options.encoding)}"
            )
            key = printable(key)
        captions = None
        if problem is None:
            captions, problem = _table_caption(row, options, label)
        if pending is not None and pending.key == key and problem is None and not pending.problem:
            if pending_image == img and pending.label == label:
                pending.captions.extend(captions)
            else:
                yield Candidate(key, origin, problem="duplicate key: the row above has it")
            continue
        if pending:
            yield pending
        full, outside = _image_path(base, img, options.allow_outside_paths)
        problem = problem or outside
        # A missing object in a bucket is found when it is read (Checker): one request
        # per row here would be slower than reading the images.
        if problem is None and not storage.is_remote(full) and not os.path.isfile(full):
            problem = "missing image file"
        pending = Candidate(key, origin, captions, _read_file(full), problem, label)
        pending_image = img
    if pending:
        yield pending


def _class_files(root: str, cls: str) -> list[str]:
    """Visible files under root/cls (any depth), as paths relative to root, sorted."""
    out = []
    for d, subdirs, names in os.walk(os.path.join(root, cls)):
        subdirs[:] = _visible(subdirs)
        out.extend(os.path.relpath(os.path.join(d, n), root) for n in _visible(names))
    return sorted(out)


def iter_image_folder(path: str) -> Iterator[Candidate]:
    """FOLDER/CLASS/**/IMAGE: key = the path relative to FOLDER ('cat/001.jpg'), label =
    CLASS, caption = CLASS with '_' as a space. Files directly in FOLDER are skipped."""
    short = os.path.basename(os.path.normpath(path))
    loose = [n for n in _visible(os.listdir(path)) if os.path.isfile(os.path.join(path, n))]
    for name in loose:
        yield Candidate(
            printable(name), printable(f"{short}/{name}"), problem="file outside a class sub-folder"
        )
    for cls in class_folders(path):
        for rel in _class_files(path, cls):
            key = rel.replace(os.sep, "/")
            origin = printable(f"{short}/{key}")
            if not _is_valid_text(key):
                yield Candidate(printable(key), origin, problem="file name is not valid UTF-8")
                continue
            full = os.path.join(path, rel)
            yield Candidate(key, origin, [caption_of_class(cls)], _read_file(full), label=cls)


def iter_source(path: str, options: ReadOptions) -> Iterator[Candidate]:
    kind = _kind(path)
    if kind == "tar":
        return iter_tar(path)
    if kind == "folder":
        return iter_image_folder(path)
    return iter_table(path, options)

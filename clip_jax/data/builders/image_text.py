"""`image_text`: a user's image-caption data imported as a tfds dataset in ArrayRecord.

Each example stores
  image    the original encoded bytes, unchanged (a tfds Tensor of dtype object, so the
           loader decodes with PIL and never imports TensorFlow); re-encoded only when
           `max_size` asks for downscaling (JPEG q95, or PNG for images with alpha);
  caption  a list of one or more UTF-8 strings, exactly as in the source;
  key      the source key (webdataset key, the JSONL/CSV key field / image path, or the
           path inside a class folder);
  label    (labelled sources only: class folders, or tables with a label column) a
           ClassLabel whose names are the classes, sorted (see sources.sort_class_names).

Splits: 'train' and, with val_fraction > 0, 'validation' chosen by a stable hash of the
key (sha256), so re-importing, adding shards or reordering them never moves an example
between splits; or, with `ImportConfig.split`, every example in that one split (which
`merge_split` can add to a prepared dataset). Examples are written in source order (no
tfds shuffling; the loader shuffles). The builder is a subclass created per dataset name
by `make_builder`, so `tfds.data_source(name, data_dir=...)` finds it as `name` without
any registration.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
import types
from collections.abc import Iterator

import tensorflow_datasets as tfds
from PIL import Image

from clip_jax.data import images
from clip_jax.data.builders import common
from clip_jax.data.builders import sources as sources_lib
from clip_jax.data.errors import DataError

VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
RESERVED_NAMES = ("clip_demo",)


@dataclasses.dataclass
class ImportConfig:
    sources: list[str]
    read: sources_lib.ReadOptions = dataclasses.field(default_factory=sources_lib.ReadOptions)
    val_fraction: float = 0.01
    max_size: int | None = None
    class_names: list[str] | None = None  # a 'label' ClassLabel with these names
    split: str | None = None  # write every example to this split (no validation hold-out)
    num_threads: int = 4
    progress: bool = True  # a line per ~2% of the source files (tfds shows a bar as well)

    def split_of(self, key: str) -> str:
        if self.split:
            return self.split
        return "validation" if in_validation(key, self.val_fraction) else "train"


def in_validation(key: str, fraction: float) -> bool:
    """Stable hold-out: the first 8 bytes of sha256(key) as a fraction of 2**64."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0**64


def _maybe_downscale(data: bytes, img: Image.Image, max_size: int | None) -> bytes:
    """Shorter side > max_size: resize (bicubic) so it equals max_size and re-encode."""
    if not max_size or min(img.size) <= max_size:
        return data
    w, h = img.size
    s = max_size / min(w, h)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    with Image.open(io.BytesIO(data)) as src:
        has_alpha = src.mode in ("RGBA", "LA", "PA") or "transparency" in src.info
        if has_alpha:
            out_img = src.convert("RGBA").resize(new, Image.Resampling.BICUBIC)
        else:
            out_img = img.resize(new, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if has_alpha:
        out_img.save(buf, "PNG", optimize=False)
    else:
        out_img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@dataclasses.dataclass
class ImportStats:
    """Counts kept by the generator across both split passes, or (Beam) by one worker for
    one source and split, then merged."""

    written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # kind -> up to 5 (rank, text): the first skips in the single-process reading order
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    image_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    reencoded: int = 0
    notes: list = dataclasses.field(default_factory=list)

    def add(self, split: str, example: dict, note: str | None):
        if note == "reencoded":
            self.reencoded += 1
        self.written[split] += 1
        self.image_bytes[split] += len(example["image"])

    def skip(self, reason: str, origin: str, rank: tuple = ()):
        """rank: where the skip comes in the single-process order (split, source, ordinal);
        only merged stats need it."""
        kind = reason.split(":", 1)[0]
        self.skipped[kind] += 1
        text = f"{origin} ({reason})" if kind != reason else origin
        self._keep_first(kind, [(rank, text)])

    def merge(self, other: ImportStats) -> ImportStats:
        self.written.update(other.written)
        self.skipped.update(other.skipped)
        self.image_bytes.update(other.image_bytes)
        self.reencoded += other.reencoded
        for kind, ranked in other.examples.items():
            self._keep_first(kind, ranked)
        return self

    def _keep_first(self, kind: str, ranked: list) -> None:
        kept = self.examples[kind]
        if len(kept) < 5 or any(rank < kept[-1][0] for rank, _ in ranked):
            kept.extend(ranked)
            kept.sort(key=lambda e: e[0])  # stable: equal ranks keep their arrival order
            del kept[5:]

    def skipped_examples(self) -> dict[str, list[str]]:
        return {kind: [text for _, text in ranked] for kind, ranked in self.examples.items()}


class Checker:
    """A candidate -> (example, None) or (None, skip reason). Picklable, so that Beam
    workers run the very checks of the single-process import."""

    def __init__(self, config: ImportConfig):
        self.config = config
        self._class_index = {n: i for i, n in enumerate(config.class_names or [])}

    def __call__(self, cand: sources_lib.Candidate) -> tuple:
        """Runs in a thread pool (PIL frees the GIL)."""
        if cand.problem:
            return None, cand.problem
        captions = [c for c in cand.captions if c.strip()]
        if not captions:
            return None, "empty caption"
        try:
            data = cand.load_image()
        except FileNotFoundError:  # how a table's missing image in a bucket shows
            return None, "missing image file"
        except OSError as e:
            return None, f"unreadable image file: {e.strerror or e}"
        if not data:
            return None, "empty image file"
        max_size = self.config.max_size
        try:
            # A reduced-size JPEG decode still reads every byte of the entropy stream.
            img = images.decode_rgb(data, min_size=None if max_size else 64)
        except images.BadImage as e:
            return None, str(e)
        out = _maybe_downscale(data, img, max_size)
        example = {"image": out, "caption": captions, "key": cand.key}
        if self.config.class_names is not None:
            if cand.label not in self._class_index:  # prepare checks the classes beforehand
                return None, "unknown class" if cand.label else "missing label"
            example["label"] = self._class_index[cand.label]
        return example, ("reencoded" if out is not data else None)


def checked_candidates(
    path: str,
    config: ImportConfig,
    check: Checker,
    pool: concurrent.futures.Executor,
    keep=None,
) -> Iterator[tuple]:
    """(ordinal in the source, candidate, example or None, note) for each candidate of
    `path` that `keep` accepts (default: all), in source order, checked 64 at a time."""
    numbered = enumerate(sources_lib.iter_source(path, config.read))
    if keep is not None:
        numbered = ((n, c) for n, c in numbered if keep(c))
    while chunk := list(itertools.islice(numbered, 64)):
        results = pool.map(check, [c for _, c in chunk])
        for (n, cand), (example, note) in zip(chunk, results):
            yield n, cand, example, note


class ImageText(common.Builder, skip_registration=True):
    """Base builder; `make_builder(name, ...)` gives it the dataset's name."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Import of image-caption pairs (original encoded bytes)."}

    def __init__(self, *, import_config: ImportConfig | None = None, **kwargs):
        self._import = import_config
        self._check = Checker(import_config) if import_config is not None else None
        self.stats = ImportStats()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        meta = tfds.core.MetadataDict()
        features = common.text_features()
        if self._import is not None:
            if self._import.class_names is not None:
                features["label"] = tfds.features.ClassLabel(names=self._import.class_names)
            meta.update(
                {
                    "sources": self._import.sources[:1000],
                    "num_sources": len(self._import.sources),
                    "val_fraction": self._import.val_fraction,
                    "max_size": self._import.max_size,
                }
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-caption pairs imported by clip_jax.data.prepare.",
            features=tfds.features.FeaturesDict(features),
            metadata=meta,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._splits_to_write()}

    def _splits_to_write(self) -> list[str]:
        """The splits that get at least one example; a DataError if the first gets none."""
        if self._import is None:
            raise DataError(
                f"dataset {self.name!r} can only be read here; import it with "
                "`python -m clip_jax.data.prepare --source=... --name=...`"
            )
        # tfds cannot write an empty split: look for one usable example of each split first
        # (stops at the first hit, so this reads ~1/val_fraction examples, not the dataset).
        if self._import.split:
            wanted = [self._import.split]
        else:
            wanted = ["train"] + (["validation"] if self._import.val_fraction > 0 else [])
        found = self._find_first_good(wanted)
        if not found.get(wanted[0]):
            reasons = ", ".join(f"{n} {r}" for r, n in found["_reasons"].items()) or "no examples"
            what = "training" if wanted[0] == "train" else f"{wanted[0]!r}"
            raise DataError(
                f"no usable {what} example in {self._import.sources[0]}"
                f"{' and the other sources' if len(self._import.sources) > 1 else ''}"
                f" ({reasons})"
            )
        if "validation" in wanted and not found.get("validation"):
            self.stats.notes.append("no example fell in the validation split; not written")
        return [split for split in wanted if found.get(split)]

    def _find_first_good(self, wanted: list[str]) -> dict:
        cfg, found, reasons = self._import, {}, collections.Counter()
        for path in cfg.sources:
            for cand in sources_lib.iter_source(path, cfg.read):
                split = cfg.split_of(cand.key)
                if found.get(split):
                    continue
                example, note = self._check(cand)
                if example is None:
                    reasons[note.split(":", 1)[0]] += 1
                    continue
                found[split] = True
                if all(found.get(w) for w in wanted):
                    return found
        found["_reasons"] = reasons
        return found

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        cfg = self._import
        stats = self.stats
        t0 = time.time()
        pool = concurrent.futures.ThreadPoolExecutor(max(1, cfg.num_threads))
        mine = lambda c: cfg.split_of(c.key) == split
        try:
            for si, path in enumerate(cfg.sources):
                for n, cand, example, note in checked_candidates(
                    path, cfg, self._check, pool, mine
                ):
                    if example is None:
                        stats.skip(note, cand.origin)
                        continue
                    stats.add(split, example, note)
                    yield f"{si:06d}:{n:09d}", example
                if (
                    cfg.progress
                    and len(cfg.sources) > 1
                    and (
                        (si + 1) % max(1, len(cfg.sources) // 50) == 0 or si + 1 == len(cfg.sources)
                    )
                ):
                    print(
                        f"\n[{split}] {si + 1}/{len(cfg.sources)} source files read: "
                        f"{stats.written[split]} written, {sum(stats.skipped.values())} skipped so "
                        f"far, {time.time() - t0:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def make_builder(
    name: str,
    data_dir: str,
    config: ImportConfig | None = None,
    base: type[ImageText] = ImageText,
    **kwargs,
) -> ImageText:
    """An `ImageText` (or `base`) builder writing `data_dir/name/1.0.0` in ArrayRecord."""
    if not _NAME_RE.match(name or ""):
        raise DataError(
            f"invalid dataset name {name!r} (expected lower_snake_case, e.g. 'my_captions')"
        )
    if name in RESERVED_NAMES:
        raise DataError(f"dataset name {name!r} is reserved; choose another --name")
    cls = types.new_class(
        "ImageText_" + name,
        (base,),
        {"skip_registration": True},
        lambda ns: ns.update({"name": name, "__module__": __name__}),
    )
    return cls(data_dir=data_dir, import_config=config, file_format="array_record", **kwargs)


def existing_class_names(path: str) -> list[str] | None:
    """The 'label' class names of the prepared dataset in version folder `path`; None if it
    has no label."""
    features = tfds.builder_from_directory(path).info.features
    return list(features["label"].names) if "label" in features else None


def merge_split(into: str, built: str, name: str, split: str) -> None:
    """Moves split `split` of dataset `name`, written in version folder `built`, into the
    prepared version folder `into`, replacing a split of that name there.

    tfds has no way to add a split to a prepared dataset (download_and_prepare writes every
    split at once, or nothing), so this adds it in tfds' own layout: the split's record
    files move beside the others and its entry joins the 'splits' of dataset_info.json.
    The other splits' files are not touched (nothing is re-written)."""
    for meta in ("features.json", "label.labels.txt"):
        old, new = os.path.join(into, meta), os.path.join(built, meta)
        if _read_text(old) != _read_text(new):
            raise DataError(
                f"the {split!r} split does not match dataset {name!r} ({meta} differs: labels "
                "or features); import it as a dataset of its own with another --name"
            )
    with open(os.path.join(built, "dataset_info.json")) as f:
        entry = next(s for s in json.load(f)["splits"] if s["name"] == split)
    info_path = os.path.join(into, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    prefix = f"{name}-{split}."  # tfds' file names: {DATASET}-{SPLIT}.{FORMAT}-{SHARD}
    for f in os.listdir(into):
        if f.startswith(prefix):
            os.remove(os.path.join(into, f))
    for f in os.listdir(built):
        if f.startswith(prefix):
            os.replace(os.path.join(built, f), os.path.join(into, f))
    info["splits"] = [s for s in info["splits"] if s["name"] != split] + [entry]
    tmp = info_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, info_path)  # the split is visible only once its files are all there


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()

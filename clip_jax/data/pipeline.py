"""Input pipeline: grain over `tfds.data_source`; decode and crop (`images`), tokenize, batch.

Sampling (training). Global position p = 0, 1, 2, ... walks the concatenated epochs; each
epoch is a fresh permutation of the split (grain's index shuffle, seeded with seed+epoch).
Global batch k is positions [k*B, (k+1)*B); host h of S takes positions (k*b + j)*S + h,
j < b = B/S. Hence:
  * every example is read once per epoch, by exactly one host, and all hosts produce the
    same number of batches (finite epochs: floor(N * num_epochs / B); the tail is dropped);
  * the *global* batch k is the same set of examples (and pixels) for any host count, so
    a run can resume on a different number of hosts;
  * the random crop and caption choice use numpy's Generator seeded with (seed, p), so
    they do not depend on worker count, prefetching or resumption.
The loader state is {'next_batch': k, ...}: a small JSON-able dict. Restoring it rebuilds
the grain pipeline from batch k; the worker count may differ between save and restore.

With `slices=n` (a gradient-cached step fed micro-batch by micro-batch) each host batch
leaves the loader as n consecutive slices of b/n rows: the same examples and pixels, so the
global batch, the loader state and a resume between steps do not depend on n.

Corrupt images met while training are replaced by a record drawn from the position's own
generator (deterministic and resumable) and counted in `loader.num_replaced`. Evaluation
never substitutes: a corrupt image gets mask False and is counted in `num_corrupt`.

Images leave the loader as uint8 NHWC (the model normalises on device); text as int32
[b, context_length] from the tokenizer's `encode`. `clip_jax.sharding.to_global` turns host
batches into global jax.Arrays.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import sys
import weakref
from collections.abc import Iterator, Sequence
from typing import Protocol

import grain
import jax
import numpy as np
from absl import flags

from clip_jax.data import images as images_lib
from clip_jax.data import shared_memory
from clip_jax.data.errors import DataError
from clip_jax.data.info import dataset_info
from clip_jax.data.source import Source, record_captions

__all__ = [
    "train_loader",
    "eval_loader",
    "TextEncoder",
    "TrainLoader",
    "EvalLoader",
    "STATE_VERSION",
]

STATE_VERSION = 1
MAX_REPLACEMENTS = 32  # consecutive corrupt draws for one position before giving up
_STATE_KEYS = ("seed", "num_records", "global_batch_size", "num_epochs")
_PICKLED_BELOW = 2**40  # bytes: worker processes send every array but the images pickled


class TextEncoder(Protocol):
    """What the loaders need of a tokenizer (`clip_jax.data.tokenizer.Tokenizer` is one)."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), context_length]."""
        ...


def _resolve_shards(shard_index, shard_count) -> tuple[int, int]:
    if shard_index is None:
        shard_index = jax.process_index()
    if shard_count is None:
        shard_count = jax.process_count()
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index must be in [0, shard_count); got {shard_index}/{shard_count}")
    return int(shard_index), int(shard_count)


# ---------------------------------------------------------------------------------------
# Batch makers (picklable; run in the main process, a thread or a worker process)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _TrainBatch:
    source: Source
    order: grain.MapDataset  # global position -> record index
    seed: int
    host_batch: int
    shard_index: int
    shard_count: int
    image_size: int
    crop_scale: tuple[float, float]
    tokenizer: TextEncoder
    slices: int = 1  # each batch k is read as slices k*n .. k*n+n-1
    worker_ring: str = ""  # set by _grain_iter for worker processes (shared_memory)

    def positions(self, k: int) -> list[int]:
        b, s = self.host_batch, self.shard_count
        return [(k * b + j) * s + self.shard_index for j in range(b)]

    def __call__(self, q: int) -> dict:
        """Slice q: rows [i*b/n, (i+1)*b/n) of this host's batch k, for k, i = divmod(q, n)."""
        (k, i), rows = divmod(q, self.slices), self.host_batch // self.slices
        positions = self.positions(k)[i * rows : (i + 1) * rows]
        records = self.source.get_image_text([self.order[p] for p in positions])
        with shared_memory.image_batch(len(positions), self.image_size, self.worker_ring) as out:
            texts, replaced = self._crop_all(out, positions, records)
            tokens = self.tokenizer.encode(texts)
        return {
            "image": shared_memory.sendable(out),
            "text": tokens,
            "_replaced": np.int64(replaced),
        }

    def _crop_all(self, out: np.ndarray, positions, records) -> tuple[list[str], int]:
        """Writes each record's crop into `out`; returns the captions drawn and the number of
        corrupt images replaced by random records."""
        n = len(self.source)
        texts, replaced = [], 0
        for j, (p, rec) in enumerate(zip(positions, records)):
            rng = np.random.default_rng([self.seed, p])
            for _ in range(MAX_REPLACEMENTS):
                try:
                    images_lib.random_square_crop(
                        rec["image"], self.image_size, rng, self.crop_scale, out=out[j]
                    )
                    break
                except images_lib.BadImage:
                    replaced += 1
                    rec = self.source.get_image_text([int(rng.integers(n))])[0]
            else:
                raise DataError(
                    f"{MAX_REPLACEMENTS} corrupt images in a row in "
                    f"{self.source.name}/{self.source.split}; is the dataset broken?"
                )
            caps = record_captions(rec)
            texts.append(caps[int(rng.integers(len(caps)))] if len(caps) > 1 else caps[0])
        return texts, replaced


@dataclasses.dataclass
class _EvalBatch:
    source: Source
    host_batch: int
    shard_index: int
    shard_count: int
    image_size: int
    tokenizer: TextEncoder | None
    has_label: bool
    worker_ring: str = ""  # set by _grain_iter for worker processes (shared_memory)

    def __call__(self, k: int) -> dict:
        b, s, n = self.host_batch, self.shard_count, len(self.source)
        positions = [(k * b + j) * s + self.shard_index for j in range(b)]
        valid = [p for p in positions if p < n]
        records = dict(zip(valid, self.source.get(valid))) if valid else {}
        with shared_memory.image_batch(b, self.image_size, self.worker_ring) as out:
            batch = self._batch(out, positions, records)
        batch["image"] = shared_memory.sendable(out)
        return batch

    def _batch(self, out: np.ndarray, positions: list[int], records: dict) -> dict:
        """The batch of `positions`, their center crops written into `out`; past the split's
        end and where an image is corrupt, a black image, mask False (and index -1 past it)."""
        b, size = len(positions), self.image_size
        out[...] = 0
        mask = np.zeros((b,), bool)
        index = np.full((b,), -1, np.int32)
        label = np.full((b,), -1, np.int32)
        texts, corrupt = [], 0
        for j, p in enumerate(positions):
            rec = records.get(p)
            texts.append(record_captions(rec)[0] if rec is not None else "")
            if rec is None:
                continue
            index[j] = p
            if self.has_label:
                label[j] = int(rec["label"])
            try:
                img = images_lib.decode_rgb(rec["image"], min_size=size)
            except images_lib.BadImage:
                corrupt += 1
                continue
            out[j] = images_lib.center_crop(img, size)
            mask[j] = True
        batch = {"image": out, "mask": mask, "index": index, "_corrupt": np.int64(corrupt)}
        if self.has_label:
            batch["label"] = label
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer.encode(texts)
        return batch


def _allow_unparsed_grain_flag() -> None:
    """grain 0.2.18 reads an absl flag in mp_prefetch that raises UnparsedFlagAccessError
    when the program did not parse absl flags (pytest, plain scripts; google/grain#1355,
    fixed upstream by #1362). Mark just that flag as given so its default is used."""
    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = True


class _WorkerBatches:
    """grain's iterator over worker processes' batches, with their images received from the
    workers' shared-memory rings. Closed at the latest when the interpreter exits: grain's
    own clean-up fails once the interpreter has begun to tear its modules down."""

    def __init__(self, it, reader: shared_memory.RingReader):
        self._it, self._reader = it, reader
        _OPEN_WORKER_BATCHES.add(self)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            raise StopIteration
        return self._reader.receive(next(self._it))

    def close(self) -> None:
        _OPEN_WORKER_BATCHES.discard(self)
        it, self._it = self._it, None  # grain's iterators are freed now, not at teardown
        if it is None:
            return
        try:
            it.close()  # stops the workers first: none makes a slot after the sweep
        finally:
            self._reader.close()


_OPEN_WORKER_BATCHES: weakref.WeakSet[_WorkerBatches] = weakref.WeakSet()


@atexit.register
def _close_worker_batches() -> None:
    for batches in list(_OPEN_WORKER_BATCHES):
        batches.close()


def _pool_threads(num_workers: int, num_threads: int, prefetch: int) -> int:
    """Threads of grain's pool building batches in each process; 0: in the process's own
    loop (the caller's thread, or a worker process's loop)."""
    threads = max(0, int(num_threads))
    if num_workers > 0:
        # A worker process runs apart from training already, so its own loop is its first
        # decoding thread. A pool of one beside that loop only added GIL hand-offs: 4% more
        # CPU per image with two worker processes from 256-px JPEGs, in two runs
        # (benchmarks/input_pipeline.py, "pool" rows; with one, within the noise).
        return threads if threads > 1 else 0
    return threads if prefetch > 0 else 0


def _grain_iter(batch_fn, start: int, stop: int, num_workers: int, num_threads: int, prefetch: int):
    reader = None
    if num_workers > 0:
        _allow_unparsed_grain_flag()
        if shared_memory.ring_available():
            reader = shared_memory.RingReader(shared_memory.ring_prefix())
            batch_fn = dataclasses.replace(batch_fn, worker_ring=reader.prefix)
    ds = grain.MapDataset.range(start, stop).map(batch_fn)
    threads = _pool_threads(num_workers, num_threads, prefetch)
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))
    )
    if num_workers > 0:
        if reader is not None:
            # The images come through the ring; the rest (tokens, masks) is small, and
            # grain's pipe costs it less than a fresh shared-memory segment per array would.
            ds = grain.experimental.WithOptionsIterDataset(
                ds, grain.experimental.DatasetOptions(min_shm_size=_PICKLED_BELOW)
            )
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)
            )
        )
    return iter(ds) if reader is None else _WorkerBatches(iter(ds), reader)


# ---------------------------------------------------------------------------------------
# Training loader
# ---------------------------------------------------------------------------------------


class TrainLoader:
    """Iterator of host batches {'image': uint8 [b, H, W, 3], 'text': int32 [b, L]}.

    Attributes: host_batch_size, batches_per_epoch (global batches in one pass over the
    split), num_batches (None when endless), num_replaced (corrupt images substituted so
    far, including before a restore), next_batch (the first batch not wholly handed out),
    slices (host batches are handed out in this many slices of host_batch_size / slices).
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch_size: int,
        image_size: int,
        tokenizer: TextEncoder,
        seed: int,
        crop_scale,
        num_epochs,
        num_workers: int,
        num_threads: int,
        prefetch: int,
        shard_index: int,
        shard_count: int,
        slices: int = 1,
    ):
        n = len(source)
        if global_batch_size % shard_count:
            raise DataError(
                f"global_batch_size {global_batch_size} is not divisible by "
                f"shard_count {shard_count}"
            )
        if slices < 1 or (global_batch_size // shard_count) % slices:
            raise DataError(
                f"the host batch {global_batch_size // shard_count} is not divisible into "
                f"{slices} slices"
            )
        if n == 0:
            raise DataError(f"split {source.name}/{source.split} is empty")
        if not 0 <= seed < 2**32:
            raise DataError(f"seed must be in [0, 2**32), got {seed}")
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise DataError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if num_epochs is not None and num_epochs < 1:
            raise DataError(f"num_epochs must be >= 1 or None (endless), got {num_epochs}")
        if n < global_batch_size and num_epochs is not None and n * num_epochs < global_batch_size:
            raise DataError(
                f"split {source.name}/{source.split} has {n} examples: fewer than one "
                f"global batch of {global_batch_size} in {num_epochs} epoch(s)"
            )
        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.host_batch_size = self.global_batch_size // shard_count
        self.seed, self.num_epochs = int(seed), num_epochs
        self.num_records = n
        self.batches_per_epoch = n // self.global_batch_size
        self.num_batches = (
            None if num_epochs is None else (n * num_epochs) // self.global_batch_size
        )
        self._stop = (
            self.num_batches
            if num_epochs is not None
            else sys.maxsize // (self.global_batch_size + 1)
        )
        order = grain.MapDataset.range(n).shuffle(seed=self.seed).repeat(num_epochs)
        self._fn = _TrainBatch(
            source,
            order,
            self.seed,
            self.host_batch_size,
            shard_index,
            shard_count,
            int(image_size),
            (float(lo), float(hi)),
            tokenizer,
            slices,
        )
        self._workers, self._threads, self._prefetch = num_workers, num_threads, prefetch
        self.shard_index, self.shard_count, self.slices = shard_index, shard_count, slices
        self._next_slice = 0
        self.num_replaced = 0
        self._it = None

    @property
    def next_batch(self) -> int:
        return self._next_slice // self.slices

    def __iter__(self) -> TrainLoader:
        return self

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("endless loader (num_epochs=None) has no length")
        return self.num_batches

    def __next__(self) -> dict:
        stop = self._stop * self.slices
        if self._next_slice >= stop:
            raise StopIteration
        if self._it is None:
            self._it = _grain_iter(
                self._fn, self._next_slice, stop, self._workers, self._threads, self._prefetch
            )
        batch = next(self._it)
        self._next_slice += 1
        self.num_replaced += int(batch.pop("_replaced"))
        return batch

    def record_indices(self, k: int) -> list[int]:
        """Record indices of this host's batch k (before any corrupt-image replacement)."""
        return [int(self._fn.order[p]) for p in self._fn.positions(k)]

    def get_state(self) -> dict:
        """JSON-able; the same for every host (shard_index is not part of it). Taken between
        the slices of a batch, it points at that batch's start: resumes are between steps."""
        return {
            "version": STATE_VERSION,
            "next_batch": self.next_batch,
            "num_replaced": self.num_replaced,
            "seed": self.seed,
            "num_records": self.num_records,
            "global_batch_size": self.global_batch_size,
            "num_epochs": self.num_epochs,
        }

    def set_state(self, state: dict | bytes | str) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"unknown loader state version {state.get('version')!r} (expected {STATE_VERSION})"
            )
        mine = self.get_state()
        for key in _STATE_KEYS:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state does not match this loader: {key} is "
                    f"{state.get(key)!r} in the state but {mine[key]!r} here"
                )
        self.close()
        self._next_slice = int(state["next_batch"]) * self.slices
        self.num_replaced = int(state.get("num_replaced", 0))

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def train_loader(
    name: str,
    split: str,
    data_dir: str | None,
    *,
    global_batch_size: int,
    image_size: int,
    tokenizer: TextEncoder,
    seed: int,
    crop_scale=(0.9, 1.0),
    num_epochs: int | None = None,
    num_workers: int = 0,
    prefetch: int = 2,
    num_threads: int = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    slices: int = 1,
) -> TrainLoader:
    """Training batches for this host (see the module docstring for the sampling rules).

    tokenizer: a `Tokenizer` (anything with its `encode`). num_workers: grain worker
    processes (0: decode in this process). num_threads: threads building batches in each
    process (without workers, 0 or prefetch 0: in the caller's thread; in a worker process,
    1 is the worker's own loop); the decoders release the GIL, so threads scale without
    pickling batches between processes, up to what the GIL leaves.
    shard_index/shard_count default to jax.process_index()/process_count(). slices: each
    host batch is handed out in this many consecutive slices (see the module docstring).
    Raises DatasetNotPreparedError (with the command to run) if the split is missing.
    """
    if tokenizer is None:
        raise DataError("train_loader needs a tokenizer (clip_jax.data.tokenizer.Tokenizer)")
    shard_index, shard_count = _resolve_shards(shard_index, shard_count)
    source = Source(name, split, data_dir)
    return TrainLoader(
        source,
        global_batch_size=global_batch_size,
        image_size=image_size,
        tokenizer=tokenizer,
        seed=seed,
        crop_scale=tuple(crop_scale),
        num_epochs=num_epochs,
        num_workers=num_workers,
        num_threads=num_threads,
        prefetch=prefetch,
        shard_index=shard_index,
        shard_count=shard_count,
        slices=slices,
    )


# ---------------------------------------------------------------------------------------
# Evaluation loader
# ---------------------------------------------------------------------------------------


class EvalLoader:
    """Re-iterable; every pass yields `len(self)` batches on every host:
    {'image': uint8 [b,H,W,3], 'mask': bool [b], 'index': int64 [b] (-1 for padding),
     'label': int32 [b] (-1 for padding; datasets with labels), 'text': int32 [b, L]
     (first caption; with a tokenizer)}. Host h holds examples (k*b + j)*S + h."""

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        image_size: int,
        tokenizer: TextEncoder | None,
        num_workers: int,
        num_threads: int,
        prefetch: int,
        shard_index: int,
        shard_count: int,
        has_label: bool,
    ):
        if batch_size % shard_count:
            raise DataError(
                f"eval batch_size {batch_size} is not divisible by shard_count {shard_count}"
            )
        self.source = source
        self.num_examples = len(source)
        self.batch_size = int(batch_size)
        self.host_batch_size = self.batch_size // shard_count
        self.num_batches = math.ceil(self.num_examples / self.batch_size)
        self._fn = _EvalBatch(
            source,
            self.host_batch_size,
            shard_index,
            shard_count,
            int(image_size),
            tokenizer,
            has_label,
        )
        self._workers, self._threads, self._prefetch = num_workers, num_threads, prefetch
        self.num_corrupt = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        it = _grain_iter(
            self._fn, 0, self.num_batches, self._workers, self._threads, self._prefetch
        )
        corrupt = 0
        try:
            for batch in it:
                corrupt += int(batch.pop("_corrupt"))
                yield batch
        finally:
            self.num_corrupt = corrupt
            if hasattr(it, "close"):
                it.close()


def eval_loader(
    name: str,
    split: str,
    data_dir: str | None,
    *,
    batch_size: int,
    image_size: int,
    tokenizer: TextEncoder | None = None,
    num_workers: int = 0,
    prefetch: int = 2,
    num_threads: int = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> EvalLoader:
    """Ordered evaluation batches holding every example once (batch_size is global; the
    last batches are padded with mask False so every host runs the same number)."""
    shard_index, shard_count = _resolve_shards(shard_index, shard_count)
    source = Source(name, split, data_dir)
    has_label = "label" in dataset_info(name, data_dir)["features"]
    return EvalLoader(
        source,
        batch_size=batch_size,
        image_size=image_size,
        tokenizer=tokenizer,
        num_workers=num_workers,
        num_threads=num_threads,
        prefetch=prefetch,
        shard_index=shard_index,
        shard_count=shard_count,
        has_label=has_label,
    )

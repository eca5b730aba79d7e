"""Input pipeline throughput: the training transform and loader, old against new, in one run.

Generates photo-like JPEGs (400-600 px a side, quality 90: smooth colour fields, edges and
grain, so they compress and decode like photos), writes them as a webdataset shard and
imports it twice with clip_jax.data.prepare: as they are, and re-encoded with
`--max_size=256` (shorter side 256, the stored size img2dataset defaults to). For each
source it then measures, in this one process:

  * the physical limit: a bare single-core loop of decode, crop and resize over the image
    bytes in memory, no loader around it: the new transform
    (`clip_jax.data.images.random_square_crop`: DCT-scaled decode, OpenCV resize straight
    into the batch row; also returned and copied in, as before), the same crop with PIL's
    decoder only (the decoder this project did not pick), the new decode
    with PIL's bicubic resize of the same float box (the resize this project did not
    pick), and the old transform, kept in this file as the baseline (PIL draft decoding
    sized for the smallest crop, then PIL's bicubic resize of the crop);
  * the training loader (records, transform, tokenizer, batching) with the old transform
    as it ran before (0 workers: one background thread; 1 and 2 worker processes) and with
    the new one in 0 (in the calling thread), 1 and 2 threads, and 1 and 2 processes
    (these also "fresh": each batch's images in fresh shared memory, as worker processes
    wrote them before they reused a ring of shared buffers; and "pool": a pool thread
    decoding beside each worker process's loop, as before the loop decoded itself). All
    walk the shuffled order of a split of a million records folded onto the few hundred
    generated (`FoldedOrder`): grain's index shuffle costs ten times more on so small a
    split than on any real dataset;
  * the new decode and a window cut out without the resize: the host's share were the
    resize done on the devices; and two bare loops at once in two threads: what the GIL
    leaves of the single-core limit;
  * where the loader's CPU goes per image: its steps besides the crop, each timed alone.

"per core" divides by the CPU time this process and its worker processes used (their CPU
clocks, in nanoseconds), which the
other programs on a busy machine change less than the wall time; images/s of wall time and
the cores kept busy are printed beside it. Every figure is the median of --repeats rounds,
each round measuring every configuration once. "vs old" compares with the old loader with
as many decoders (2 threads against 2 worker processes; 0 and 1 thread against 0 workers).

    python benchmarks/input_pipeline.py [--num_images=512] [--batch_size=64] \\
        [--batches=24] [--repeats=3] [--image_size=224] [--sweep_max_sizes=256,320,448]

--sweep_max_sizes adds a table of the new transform's bare-loop rate and the bytes per
image for sources stored at each shorter side, to choose `prepare --max_size`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import random
import shutil
import tarfile
import tempfile
import threading
import time

import cv2
import grain
import numpy as np
import simplejpeg
import tensorflow_datasets as tfds
from grain.multiprocessing import SharedMemoryArray
from PIL import Image, ImageDraw, ImageFilter

from clip_jax.data import images, pipeline, shared_memory
from clip_jax.data import tokenizer as tok_lib
from clip_jax.data.errors import DataError
from clip_jax.data.pipeline import MAX_REPLACEMENTS, TrainLoader, _TrainBatch, train_loader
from clip_jax.data.prepare import prepare_image_text
from clip_jax.data.source import Source, record_captions

WORDS = (
    "a photo of the dog cat man woman child car tree house street beach mountain "
    "river city sky red blue green old small large running sitting with on in at "
    "near under two three people playing field park table food plate window"
).split()
CROP_SCALE = (0.9, 1.0)  # the config's default data.crop_scale_min / max


def photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Low-frequency colour field + shapes + grain (decodes like a camera JPEG)."""
    base = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (h, w, 1)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def caption(rnd: random.Random) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 20)))


def make_shard(path: str, n: int, seed: int = 0) -> tuple[int, list[str]]:
    rng, rnd = np.random.default_rng(seed), random.Random(seed)
    total, caps = 0, []
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            w, h = int(rng.integers(400, 601)), int(rng.integers(400, 601))
            buf = io.BytesIO()
            photo_like(rng, w, h).save(buf, "JPEG", quality=90)
            cap = caption(rnd)
            caps.append(cap)
            for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            total += buf.tell()
    return total, caps


# ---------------------------------------------------------------------------------------
# The baseline: the training transform as it was before DCT-scaled decoding (not in the
# library any more). PIL draft decoding at the scale the smallest crop allows, then the
# crop box drawn on the decoded image and resized bicubically.
# ---------------------------------------------------------------------------------------


def old_draft_size(size: int, scale: tuple[float, float]) -> int:
    return int(math.ceil(size / math.sqrt(max(scale[0], 1e-6))))


def old_random_square_crop(img: Image.Image, size: int, rng, scale) -> np.ndarray:
    lo, hi = scale
    w, h = img.size
    u = rng.uniform(lo, hi)
    side = min(w, h) * math.sqrt(u)
    x0 = rng.uniform(0.0, w - side)
    y0 = rng.uniform(0.0, h - side)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
    return np.asarray(out, dtype=np.uint8)


def old_transform(data: bytes, size: int, rng, scale) -> np.ndarray:
    img = images.decode_rgb(data, min_size=old_draft_size(size, scale))
    return old_random_square_crop(img, size, rng, scale)


@dataclasses.dataclass
class OldTrainBatch(_TrainBatch):
    """The loader's batch maker as it was, with the old transform."""

    def __call__(self, k: int) -> dict:
        size = self.image_size
        positions = self.positions(k)
        records = self.source.get([self.order[p] for p in positions])
        n = len(self.source)
        draft = old_draft_size(size, self.crop_scale)
        out = np.empty((len(positions), size, size, 3), np.uint8)
        texts, replaced = [], 0
        for j, (p, rec) in enumerate(zip(positions, records)):
            rng = np.random.default_rng([self.seed, p])
            for _ in range(MAX_REPLACEMENTS):
                try:
                    img = images.decode_rgb(rec["image"], min_size=draft)
                    break
                except images.BadImage:
                    replaced += 1
                    rec = self.source.get([int(rng.integers(n))])[0]
            else:
                raise DataError("too many corrupt images")
            out[j] = old_random_square_crop(img, size, rng, self.crop_scale)
            caps = record_captions(rec)
            texts.append(caps[int(rng.integers(len(caps)))] if len(caps) > 1 else caps[0])
        return {"image": out, "text": self.tokenizer.encode(texts), "_replaced": np.int64(replaced)}


def fresh_shared_batch(rows: int, size: int) -> SharedMemoryArray:
    """A batch array as worker processes had them before the ring: fresh shared memory, its
    pages reserved; the trainer unmaps and unlinks it when done with it."""
    out = SharedMemoryArray((rows, size, size, 3), np.uint8)
    os.posix_fallocate(out.shm._fd, 0, out.nbytes)
    return out


@dataclasses.dataclass
class FreshTrainBatch(_TrainBatch):
    """The new batch maker as it was before the ring: a worker process wrote each batch into
    fresh shared memory, which grain handed to the trainer."""

    def __call__(self, q: int) -> dict:
        if not self.worker_ring:
            return super().__call__(q)
        (k, i), rows = divmod(q, self.slices), self.host_batch // self.slices
        positions = self.positions(k)[i * rows : (i + 1) * rows]
        records = self.source.get_image_text([self.order[p] for p in positions])
        out = fresh_shared_batch(len(positions), self.image_size)
        texts, replaced = self._crop_all(out, positions, records)
        return {"image": out, "text": self.tokenizer.encode(texts), "_replaced": np.int64(replaced)}


def new_copied(data: bytes, size: int, rng, scale) -> np.ndarray:
    """The new crop returned and copied into the batch, as the loader wrote it before the
    crop went straight into its batch row."""
    return images.random_square_crop(data, size, rng, scale)


def new_pil_only(data: bytes, size: int, rng, scale) -> np.ndarray:
    """The new crop with PIL's draft decoder (1/2, 1/4, 1/8) instead of simplejpeg."""
    return images._crop_pil(data, rng.random(3).tolist(), scale, size)


def dct_scaled(data: bytes, size: int, rng, scale) -> tuple[np.ndarray, tuple[float, ...]]:
    """The new DCT-scaled decode of a plain JPEG and its crop box in the decoded pixels."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    u, dx, dy = rng.random(3)
    side = min(width, height) * math.sqrt(scale[0] + (scale[1] - scale[0]) * u)
    eighths = min(8, math.ceil(8 * size / side))
    eighths = 8 if eighths == 7 else eighths
    f = eighths / 8
    pixels = simplejpeg.decode_jpeg(
        data, "RGB", min_height=math.ceil(height * f), min_width=math.ceil(width * f)
    )
    x0, y0 = (width - side) * dx * f, (height - side) * dy * f
    return pixels, (x0, y0, x0 + side * f, y0 + side * f)


def new_decode_pil_resize(data: bytes, size: int, rng, scale) -> np.ndarray:
    """The new decode with PIL's antialiased bicubic resize of the float box instead."""
    pixels, box = dct_scaled(data, size, rng, scale)
    out = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out)


def decode_and_cut(data: bytes, size: int, rng, scale) -> np.ndarray:
    """What would be left to the host if the devices resized: the new DCT-scaled decode and
    a copy of a size x size window from the box, no resize."""
    pixels, box = dct_scaled(data, size, rng, scale)
    x0, y0 = int(box[0]), int(box[1])
    return pixels[y0 : y0 + size, x0 : x0 + size]


def pil_on_whole_pixels(pixels: np.ndarray, box, size: int) -> np.ndarray:
    """PIL's antialiased bicubic resize of the box rounded to whole pixels, as the new
    transform rounds it."""
    height, width = pixels.shape[:2]
    side = min(round(box[2] - box[0]), width, height)
    x0, y0 = min(round(box[0]), width - side), min(round(box[1]), height - side)
    box = (x0, y0, x0 + side, y0 + side)
    return np.asarray(
        Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, box=box)
    )


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b).mean())


def resize_difference(datas: list[bytes], size: int) -> float:
    """Mean absolute difference (of 255) of the new transform's crops from PIL's resize of
    the same whole-pixel box of the same DCT-scaled pixels."""
    diffs = []
    for j, data in enumerate(datas):
        got = images.random_square_crop(data, size, np.random.default_rng([0, j]), CROP_SCALE)
        pixels, box = dct_scaled(data, size, np.random.default_rng([0, j]), CROP_SCALE)
        diffs.append(mean_abs_diff(got, pil_on_whole_pixels(pixels, box, size)))
    return float(np.mean(diffs))


def filter_differences(size: int, shrinks=(1.1, 1.3, 1.5, 2.0)) -> dict[float, tuple]:
    """Shrink -> mean absolute differences of OpenCV's bicubic and pixel-area resizes from
    PIL's antialiased bicubic, on photo-like images cut to size * shrink pixels."""
    rng = np.random.default_rng(1)
    side = math.ceil(size * max(shrinks))
    photos = [np.asarray(photo_like(rng, side, side)) for _ in range(8)]
    out = {}
    for shrink in shrinks:
        n = round(size * shrink)
        crops = [p[:n, :n] for p in photos]
        pil = [
            np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BICUBIC))
            for c in crops
        ]
        out[shrink] = tuple(
            np.mean(
                [
                    mean_abs_diff(cv2.resize(c, (size, size), interpolation=f), r)
                    for c, r in zip(crops, pil)
                ]
            )
            for f in (cv2.INTER_CUBIC, cv2.INTER_AREA)
        )
    return out


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, its threads and all its descendants,
    read from each process's CPU clock (nanoseconds; /proc's ticks of 10 ms would put a
    few percent of noise on a one-second window)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue  # exited meanwhile
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    total = 0.0
    for pid in tree:
        try:  # Linux's clock id for a process's CPU time: (~pid << 3) | CPUCLOCK_SCHED
            total += time.clock_gettime(((~pid) << 3) | 2)
        except OSError:
            pass  # exited meanwhile
    return total


def crop_into(transform, data: bytes, size: int, rng, row: np.ndarray) -> None:
    """One crop into a batch row as the loader writes it: in place by the new transform
    (its `out`), copied in from the others."""
    if transform is images.random_square_crop:
        transform(data, size, rng, CROP_SCALE, out=row)
    else:
        row[...] = transform(data, size, rng, CROP_SCALE)


def bare_rate(transform, datas: list[bytes], size: int) -> float:
    """Images per CPU-second of one thread: decode, crop, resize into a batch array. The
    second of two passes is timed, as `time_loader` skips a loader's first batches."""
    out = np.empty((len(datas), size, size, 3), np.uint8)
    for _ in range(2):
        t = time.process_time()
        for j, data in enumerate(datas):
            crop_into(transform, data, size, np.random.default_rng([0, j]), out[j])
    return len(datas) / (time.process_time() - t)


def bare_rate_in_threads(transform, datas: list[bytes], size: int, threads: int = 2) -> float:
    """Images per CPU-second of `threads` bare loops running at once in threads of this
    process: what the GIL leaves of the single-core limit, with no loader around it."""
    outs = [np.empty((len(datas), size, size, 3), np.uint8) for _ in range(threads)]

    def loop(out):
        for j, data in enumerate(datas):
            crop_into(transform, data, size, np.random.default_rng([0, j]), out[j])

    for _ in range(2):  # the second pass is timed, as in bare_rate
        pool = [threading.Thread(target=loop, args=(out,)) for out in outs]
        t = time.process_time()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    return threads * len(datas) / (time.process_time() - t)


def second_run(step):
    """step()'s result and the CPU seconds of its second run (the first warms up)."""
    step()
    t = time.process_time()
    out = step()
    return out, time.process_time() - t


def loader_costs(make, batches: int) -> dict[str, float]:
    """CPU microseconds per image of the loader's steps besides the crop, each timed alone
    on the loader's batch maker over `batches` batches."""
    loader = make()
    fn = loader._fn
    positions = [p for k in range(batches) for p in fn.positions(k)]
    n, b = len(positions), len(fn.positions(0))
    small = grain.MapDataset.range(len(fn.source)).shuffle(seed=fn.seed).repeat(None)
    costs = {}
    _, costs[f"order on this {len(fn.source)}-record split"] = second_run(
        lambda: [small[p] for p in positions]
    )
    indices, costs["order (1M-record split)"] = second_run(lambda: [fn.order[p] for p in positions])
    records, costs["record read and parse (image and captions)"] = second_run(
        lambda: [r for i in range(0, n, b) for r in fn.source.get_image_text(indices[i : i + b])]
    )
    _, costs["the same, every feature decoded by tfds (the old read)"] = second_run(
        lambda: [r for i in range(0, n, b) for r in fn.source.get(indices[i : i + b])]
    )
    _, costs["tfds' decoding with array_record's parallel read"] = second_run(
        lambda: [fn.source._ds.__getitems__(indices[i : i + b]) for i in range(0, n, b)]
    )
    rngs, costs["per-image seed"] = second_run(
        lambda: [np.random.default_rng([fn.seed, p]) for p in positions]
    )

    def captions():
        texts = []
        for r, g in zip(records, rngs):
            caps = record_captions(r)
            texts.append(caps[int(g.integers(len(caps)))] if len(caps) > 1 else caps[0])
        return texts

    texts, costs["caption choice"] = second_run(captions)
    _, costs["tokenizer"] = second_run(
        lambda: [fn.tokenizer.encode(texts[i : i + b]) for i in range(0, n, b)]
    )
    size = fn.image_size
    crop = np.full((size, size, 3), 7, np.uint8)

    def fresh_batches():  # batches wait in the prefetch queue: a new array every time
        kept = []
        for _ in range(0, n, b):
            kept.append(np.empty((b, size, size, 3), np.uint8))
            for j in range(b):
                kept[-1][j] = crop

    _, costs["fresh batch array, filled"] = second_run(fresh_batches)

    def fresh_shared_batches():  # what a worker process wrote before the ring
        kept = []
        for _ in range(0, n, b):
            out = fresh_shared_batch(b, size)
            out.unlink_on_del()  # as the trainer's copy does when the batch is dropped
            for j in range(b):
                out[j] = crop
            kept.append(out)

    _, costs["fresh shared-memory batch, filled"] = second_run(fresh_shared_batches)
    reader = shared_memory.RingReader(shared_memory.ring_prefix())

    def ring_batches():  # a worker's slot filled, the trainer's view of it, then dropped
        for _ in range(0, n, b):
            with shared_memory.image_batch(b, size, reader.prefix) as out:
                for j in range(b):
                    out[j] = crop
            reader.receive({"image": shared_memory.sendable(out)})

    _, costs["ring slot: filled, received, given back"] = second_run(ring_batches)
    reader.close()
    loader.close()
    return {k: 1e6 * v / n for k, v in costs.items()}


@contextlib.contextmanager
def pool_beside_worker_loops(enabled: bool):
    """Worker processes as they ran before their own loop decoded: `num_threads` pool
    threads beside it (the rule is read when a loader starts its workers)."""
    rule = pipeline._pool_threads
    if enabled:
        pipeline._pool_threads = lambda w, t, p: max(0, int(t)) if w > 0 else rule(w, t, p)
    try:
        yield
    finally:
        pipeline._pool_threads = rule


@dataclasses.dataclass
class LoaderRun:
    wall_rate: float  # images/s
    cores: float  # CPU seconds per wall second
    per_core: float  # images per CPU second


def time_loader(make, batches: int) -> LoaderRun:
    loader = make()
    for _ in range(2):  # start-up, workers' first batches
        next(loader)
    cpu, t = tree_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    wall, cpu = time.perf_counter() - t, tree_cpu_seconds() - cpu
    loader.close()
    n = batches * batch["image"].shape[0]
    return LoaderRun(n / wall, cpu / wall, n / max(cpu, 1e-9))


def median_run(runs: list[LoaderRun]) -> LoaderRun:
    return LoaderRun(
        *(float(np.median([getattr(r, f) for r in runs])) for f in LoaderRun.__annotations__)
    )


LARGE_SPLIT = 10**6
THREADED = "new, two loops at once in 2 threads, per CPU-second"


@dataclasses.dataclass
class FoldedOrder:
    """grain's shuffled order of a LARGE_SPLIT-record split, folded onto the `n` records
    there are. grain's index shuffle walks cycles on a split of a few hundred records and
    costs about ten times what it does on a large one (printed), which no real dataset pays."""

    n: int
    order: grain.MapDataset

    def __getitem__(self, p: int) -> int:
        return self.order[p] % self.n


def loader_factory(name, data_dir, tok, args, maker: type, workers: int, threads: int):
    def make() -> TrainLoader:
        loader = train_loader(
            name,
            "train",
            data_dir,
            global_batch_size=args.batch_size,
            image_size=args.image_size,
            tokenizer=tok,
            seed=0,
            crop_scale=CROP_SCALE,
            num_workers=workers,
            num_threads=threads,
            prefetch=2 if threads or workers else 0,
            shard_index=0,
            shard_count=1,
        )
        fn = loader._fn
        fields = {f.name: getattr(fn, f.name) for f in dataclasses.fields(fn)}
        large = grain.MapDataset.range(LARGE_SPLIT).shuffle(seed=fn.seed).repeat(None)
        fields["order"] = FoldedOrder(len(fn.source), large)
        loader._fn = maker(**fields)
        return loader

    return make


# (label, batch maker, worker processes, threads); the old rows are the loader as it ran,
# the fresh ones the new transform with fresh shared memory for each batch (before the ring),
# the "pool" ones worker processes with a pool thread beside their own loop (before the loop
# decoded itself).
CONFIGS = (
    ("old", "0 workers (1 thread)", OldTrainBatch, 0, 1),
    ("old", "1 worker process", OldTrainBatch, 1, 1),
    ("old", "2 worker processes", OldTrainBatch, 2, 1),
    ("new", "0 threads (caller)", _TrainBatch, 0, 0),
    ("new", "1 thread", _TrainBatch, 0, 1),
    ("new", "2 threads", _TrainBatch, 0, 2),
    ("fresh", "1 worker process", FreshTrainBatch, 1, 1),
    ("pool", "1 worker process", _TrainBatch, 1, 1),
    ("new", "1 worker process", _TrainBatch, 1, 1),
    ("fresh", "2 worker processes", FreshTrainBatch, 2, 1),
    ("pool", "2 worker processes", _TrainBatch, 2, 1),
    ("new", "2 worker processes", _TrainBatch, 2, 1),
)
# new row -> the old row it is compared with (the same number of decoders)
BASELINE = {
    "0 threads (caller)": "0 workers (1 thread)",
    "1 thread": "0 workers (1 thread)",
    "2 threads": "2 worker processes",
    "1 worker process": "1 worker process",
    "2 worker processes": "2 worker processes",
}


def source_bytes(name: str, data_dir: str, n: int) -> list[bytes]:
    src = Source(name, "train", data_dir)
    return [r["image"] for r in src.get(range(min(n, len(src))))]


def stored_size(datas: list[bytes]) -> str:
    sides = [min(Image.open(io.BytesIO(d)).size) for d in datas]
    kib = sum(len(d) for d in datas) / len(datas) / 1024
    return f"shorter side {min(sides)}-{max(sides)} px, {kib:.1f} KiB per image"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--bare_images", type=int, default=192, help="images in each bare loop")
    p.add_argument("--sweep_max_sizes", default="", help="e.g. 256,320,448")
    args = p.parse_args(argv)
    tfds.disable_progress_bar()

    work = tempfile.mkdtemp(prefix="clip_jax_bench_")
    data_dir = os.path.join(work, "tfds")
    try:
        cpus = len(os.sched_getaffinity(0))
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"CPU cores visible: {cpus}; load average at start: {load}")
        t = time.perf_counter()
        shard = os.path.join(work, "shard-00000.tar")
        total, caps = make_shard(shard, args.num_images)
        print(
            f"generated {args.num_images} JPEGs (400-600 px, q90), mean "
            f"{total / args.num_images / 1024:.1f} KiB, in {time.perf_counter() - t:.1f} s"
        )
        sweep = [int(x) for x in args.sweep_max_sizes.split(",") if x]
        sources = {"256 px": ("bench_photos_256", 256), "400-600 px": ("bench_photos", None)}
        sources.update({f"{m} px": (f"bench_photos_{m}", m) for m in sweep if m != 256})
        for name, max_size in sources.values():
            prepare_image_text(
                name,
                shard,
                data_dir,
                val_fraction=0,
                max_size=max_size,
                verbose=False,
                overwrite=True,
            )
        tok = tok_lib.Tokenizer(
            tok_lib.train_tokenizer(
                caps * 4, os.path.join(work, "sp"), 400, hard_vocab_limit=False
            ),
            context_length=77,
        )

        size = args.image_size
        print(
            f"\n{size} px random square crops, scale {CROP_SCALE}; batch {args.batch_size}, "
            f"{args.batches} timed batches; per core = images per CPU-second\n"
        )
        bare = {
            "new": images.random_square_crop,
            "new, copied into the batch": new_copied,
            "new, PIL decoder only": new_pil_only,
            "new decode + PIL bicubic resize": new_decode_pil_resize,
            "old": old_transform,
            "new decode + cut, no resize": decode_and_cut,
        }
        datas = {
            label: source_bytes(sources[label][0], data_dir, args.bare_images)
            for label in ("256 px", "400-600 px")
        }
        for label, some in datas.items():
            print(f"{label} source: {stored_size(some)}")
        # Every repeat measures every configuration once, so a change of load on a shared
        # machine touches old and new alike; the medians are printed.
        limits, runs = {}, {}
        for _ in range(args.repeats):
            for label, some in datas.items():
                for kind, fn in bare.items():
                    limits.setdefault((label, kind), []).append(bare_rate(fn, some, size))
                limits.setdefault((label, THREADED), []).append(
                    bare_rate_in_threads(images.random_square_crop, some, size)
                )
                for path, par, maker, workers, threads in CONFIGS:
                    make = loader_factory(
                        sources[label][0], data_dir, tok, args, maker, workers, threads
                    )
                    with pool_beside_worker_loops(path == "pool"):
                        run = time_loader(make, args.batches)
                    runs.setdefault((label, path, par), []).append(run)
        limit = {key: float(np.median(v)) for key, v in limits.items()}
        rows = {key: median_run(v) for key, v in runs.items()}

        print(
            "\n| source | transform | loader | img/s | vs old | cores busy | img/s per core "
            "| vs old | of the limit |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for (label, path, par), r in rows.items():
            base = rows.get((label, "old", BASELINE.get(par, "")))
            wall_vs = f"{r.wall_rate / base.wall_rate:.2f}x" if path != "old" else ""
            core_vs = f"{r.per_core / base.per_core:.2f}x" if path != "old" else ""
            of_limit = r.per_core / limit[label, "old" if path == "old" else "new"]
            print(
                f"| {label} | {path} | {par} | {r.wall_rate:.0f} | {wall_vs} | {r.cores:.2f} | "
                f"{r.per_core:.0f} | {core_vs} | {of_limit:.0%} |"
            )
        print("\nPhysical limit, a bare single-core loop (decode, crop, resize; no loader):")
        for label in datas:
            text = ", ".join(f"{kind} {limit[label, kind]:.0f}" for kind in [*bare, THREADED])
            print(f"  {label}: {text} images/s")

        if sweep:
            print(f"\nStored size against the new transform's bare loop, {size} px crops:")
            print("| stored shorter side | KiB per image | img/s per core |")
            print("|---:|---:|---:|")
            for label in [f"{m} px" for m in sorted(set(sweep) | {256})] + ["400-600 px"]:
                stored = source_bytes(sources[label][0], data_dir, args.bare_images)
                kib = sum(len(d) for d in stored) / len(stored) / 1024
                rate = bare_rate(images.random_square_crop, stored, size)
                print(f"| {label} | {kib:.1f} | {rate:.0f} |")

        print(
            "\nCPU microseconds per image, new transform, loader with 0 threads: the loader "
            "altogether, the crop in the bare loop (with its seed and batch copy), and the "
            "loader's steps besides the crop, timed alone:"
        )
        for label in datas:
            make = loader_factory(sources[label][0], data_dir, tok, args, _TrainBatch, 0, 0)
            steps = loader_costs(make, args.batches)
            total = 1e6 / rows[label, "new", "0 threads (caller)"].per_core
            text = ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
            print(f"  {label}: loader {total:.0f}, crop {1e6 / limit[label, 'new']:.0f}; {text}")

        print(
            "\nResize against PIL's antialiased bicubic, mean absolute difference (of 255): "
            "the new transform's crops, PIL resizing the same whole-pixel box"
        )
        for label, some in datas.items():
            print(f"  {label}: {resize_difference(some, size):.2f}")
        print(f"OpenCV's filters by shrink factor, photo-like images cut to {size} px:")
        for shrink, (cubic, area) in filter_differences(size).items():
            print(f"  {shrink:.1f}x: bicubic {cubic:.2f}, pixel area {area:.2f}")

        texts = [caption(random.Random(i)) for i in range(4096)]
        tok.encode(texts[:256])
        t = time.perf_counter()
        reps = 5
        for _ in range(reps):
            for i in range(0, len(texts), 1024):
                tok.encode(texts[i : i + 1024])
        rate = reps * len(texts) / (time.perf_counter() - t)
        print(f"\ntokenizer: {rate:,.0f} captions/s (6-20 words, context 77, batches of 1024)")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average at the end: {load}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

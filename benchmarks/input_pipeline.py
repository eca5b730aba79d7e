"""Input pipeline throughput: training images/s at 224 px and tokenised captions/s.

Generates photo-like JPEGs of realistic size (400-600 px a side, quality 90; smooth
colour fields, edges and grain so they compress and decode like photos), writes them as
a webdataset shard, imports it with clip_jax.data.prepare, then times the training
loader (decode + random square crop + resize to 224 + tokenise + batch) with 0, 1 and 2
grain worker processes, and the tokenizer alone.

    python benchmarks/input_pipeline.py [--num_images=512] [--batch_size=64] \
        [--batches=24] [--workers=0,1,2] [--data_dir=/tmp/...]

Numbers depend on the CPU cores free at the time: the script prints how many it sees.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import tarfile
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFilter

from clip_jax.data import tokenizer as tok_lib
from clip_jax.data.pipeline import train_loader
from clip_jax.data.prepare import prepare_image_text

WORDS = (
    "a photo of the dog cat man woman child car tree house street beach mountain "
    "river city sky red blue green old small large running sitting with on in at "
    "near under two three people playing field park table food plate window"
).split()


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


def time_loader(name, data_dir, tok, workers, batch_size, batches, image_size):
    t0 = time.perf_counter()
    loader = train_loader(
        name,
        "train",
        data_dir,
        global_batch_size=batch_size,
        image_size=image_size,
        tokenizer=tok,
        seed=0,
        num_workers=workers,
        prefetch=2,
        shard_index=0,
        shard_count=1,
    )
    warm = 2
    for _ in range(warm):
        b = next(loader)
    t1 = time.perf_counter()
    for _ in range(batches):
        b = next(loader)
    t2 = time.perf_counter()
    loader.close()
    assert b["image"].shape == (batch_size, image_size, image_size, 3)
    return batches * batch_size / (t2 - t1), t1 - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--data_dir", default=None, help="keep the prepared data here")
    args = p.parse_args(argv)
    tfds.disable_progress_bar()

    work = tempfile.mkdtemp(prefix="clip_jax_bench_")
    data_dir = args.data_dir or os.path.join(work, "tfds")
    try:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(
            f"CPU cores visible: {cpus}; load average: "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        t = time.perf_counter()
        total, caps = make_shard(os.path.join(work, "shard-00000.tar"), args.num_images)
        print(
            f"generated {args.num_images} JPEGs (400-600 px, q90), mean "
            f"{total / args.num_images / 1024:.1f} KiB, in {time.perf_counter() - t:.1f} s"
        )
        t = time.perf_counter()
        summary = prepare_image_text(
            "bench_photos",
            os.path.join(work, "shard-00000.tar"),
            data_dir,
            val_fraction=0,
            verbose=False,
            overwrite=True,
        )
        print(
            f"imported {summary['splits']['train']['examples']} examples in "
            f"{time.perf_counter() - t:.1f} s"
        )
        tok = tok_lib.Tokenizer(
            tok_lib.train_tokenizer(
                caps * 4, os.path.join(work, "sp"), 400, hard_vocab_limit=False
            ),
            context_length=77,
        )

        for w in [int(x) for x in args.workers.split(",")]:
            rate, startup = time_loader(
                "bench_photos", data_dir, tok, w, args.batch_size, args.batches, args.image_size
            )
            print(
                f"train loader, {args.image_size} px, batch {args.batch_size}, "
                f"{w} worker process(es): {rate:8.1f} images/s  (start-up + 2 warm-up "
                f"batches {startup:.1f} s)"
            )

        texts = [caption(random.Random(i)) for i in range(4096)]
        tok.encode(texts[:256])
        t = time.perf_counter()
        reps = 5
        for _ in range(reps):
            for i in range(0, len(texts), 1024):
                tok.encode(texts[i : i + 1024])
        rate = reps * len(texts) / (time.perf_counter() - t)
        print(f"tokenizer: {rate:,.0f} captions/s (6-20 words, context 77, batches of 1024)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

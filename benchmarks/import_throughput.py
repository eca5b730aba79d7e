"""Import throughput: image-text pairs/s of `clip_jax.data.prepare`, single process and on
Apache Beam's DirectRunner (local worker processes).

Writes webdataset shards as img2dataset does by default (256 x 256 JPEG, quality 95, a
caption .txt per image; photo-like pixels, see input_pipeline.photo_like) with a few broken
images among them, imports them once per path into a fresh data folder, and prints pairs
read per second end to end (worker start-up included) and whether each Beam import wrote the
same dataset (examples in order, split sizes, skip counts) as the single-process one.

    python benchmarks/import_throughput.py [--shards=8] [--pairs=500] [--size=256] \
        [--workers=1,2] [--num_threads=4]

Per-worker figures: a run with --workers=1 is one worker's rate, start-up included. The
numbers depend on the CPU cores free at the time: the script prints how many it sees and the
load average when it starts.
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
from input_pipeline import caption, photo_like

from clip_jax.data.prepare import prepare_image_text


def write_shard(path: str, n: int, size: int, seed: int, broken_every: int = 50) -> None:
    """img2dataset's default output: KEY.jpg (size x size, q95) + KEY.txt; every
    `broken_every`-th image is cut short (a download that broke off)."""
    rng, rnd = np.random.default_rng(seed), random.Random(seed)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            photo_like(rng, size, size).save(buf, "JPEG", quality=95)
            data = buf.getvalue()
            if i % broken_every == broken_every - 1:
                data = data[: len(data) // 3]
            key = f"{seed:05d}{i:04d}"
            for name, blob in ((f"{key}.jpg", data), (f"{key}.txt", caption(rnd).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))


def records(name: str, data_dir: str) -> dict:
    out = {}
    for split in tfds.builder_from_directory(f"{data_dir}/{name}/1.0.0").info.splits:
        ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        out[split] = [(r["key"], r["image"]) for r in ds.__getitems__(list(range(len(ds))))]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--pairs", type=int, default=500, help="pairs per shard")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--num_threads", type=int, default=4, help="image check threads per worker")
    args = p.parse_args()
    tfds.disable_progress_bar()
    cores = len(os.sched_getaffinity(0))
    print(f"cores: {cores}, load average: {os.getloadavg()[0]:.2f}")
    root = tempfile.mkdtemp(prefix="import_throughput_")
    try:
        for s in range(args.shards):
            write_shard(f"{root}/shard-{s:05d}.tar", args.pairs, args.size, s)
        source = f"{root}/shard-{{{0:05d}..{args.shards - 1:05d}}}.tar"
        total = args.shards * args.pairs
        mib = sum(os.path.getsize(f"{root}/shard-{s:05d}.tar") for s in range(args.shards)) / 2**20
        print(f"{total} pairs in {args.shards} shards ({mib:.0f} MiB), {args.size} px JPEG")

        def run(name, **beam):
            t0 = time.perf_counter()
            summary = prepare_image_text(
                name,
                source,
                f"{root}/tfds",
                val_fraction=0.05,
                num_threads=args.num_threads,
                verbose=False,
                **beam,
            )
            return summary, total / (time.perf_counter() - t0)

        reference, rate = run("single")
        expected = records("single", f"{root}/tfds")
        print(f"{'path':<44} {'pairs/s':>8}  same dataset")
        print(f"{'single process, ' + str(args.num_threads) + ' threads':<44} {rate:8.1f}  -")
        for workers in map(int, args.workers.split(",")):
            name = f"beam_{workers}"
            options = f"--direct_num_workers={workers} --direct_running_mode=multi_processing"
            summary, rate = run(name, beam_runner="DirectRunner", beam_options=options)
            fields = ("splits", "skipped", "skipped_examples", "image_bytes", "reencoded")
            differ = [k for k in fields if summary[k] != reference[k]]
            if records(name, f"{root}/tfds") != expected:
                differ.append("records")
            same = "yes" if not differ else "no: " + ", ".join(differ)
            label = f"DirectRunner, {workers} worker process(es)"
            print(f"{label:<44} {rate:8.1f}  {same}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

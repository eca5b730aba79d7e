"""Test inputs for the data tests: real image files (good and broken) written to disk as a
webdataset tar shard or a JSONL/CSV folder. No part of clip_jax is used to make them."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def make_cases(seed: int = 0) -> list[dict]:
    """Each case: key, ext, data (file bytes), caption (None = no caption file/field),
    good (bool), and for good PNGs `pixels` (what PIL reads back: exact comparison)."""
    rng = np.random.default_rng(seed)
    cases = []

    def add(key, ext, data, caption, good, pixels=None, rgb=None):
        cases.append(
            dict(key=key, ext=ext, data=data, caption=caption, good=good, pixels=pixels, rgb=rgb)
        )

    yy, xx = np.mgrid[0:40, 0:48]
    photo = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1).astype(np.uint8)
    add(
        "k00_rgb_jpeg",
        "jpg",
        encode(Image.fromarray(photo), "JPEG", quality=90),
        "a smooth gradient, photographed",
        True,
    )
    rgb = rng.integers(0, 256, size=(29, 37, 3), dtype=np.uint8)
    add(
        "k01_rgb_png",
        "png",
        encode(Image.fromarray(rgb), "PNG"),
        "random RGB noise",
        True,
        pixels=rgb,
        rgb=rgb,
    )
    gray = rng.integers(0, 256, size=(31, 17), dtype=np.uint8)
    add(
        "k02_gray_png",
        "png",
        encode(Image.fromarray(gray, "L"), "PNG"),
        "grey noise",
        True,
        pixels=gray,
        rgb=np.stack([gray] * 3, -1),
    )
    cmyk = Image.new("CMYK", (30, 20), (0, 200, 200, 20))
    add("k03_cmyk_jpeg", "jpg", encode(cmyk, "JPEG", quality=95), "a CMYK red square", True)
    idx = rng.integers(0, 4, size=(16, 24), dtype=np.uint8)
    pal = Image.fromarray(idx, "P")
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    pal.putpalette(palette + [0] * (768 - len(palette)))
    pal_rgb = np.array(palette, np.uint8).reshape(4, 3)[idx]
    pal_rgb[idx == 3] = 255  # index 3 is transparent: composited over white
    add(
        "k04_palette_trns_png",
        "png",
        encode(pal, "PNG", transparency=3),
        "palette image with a transparent colour",
        True,
        pixels=idx,
        rgb=pal_rgb,
    )
    rgba = rng.integers(0, 256, size=(12, 10, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((12, 10)) < 0.5, 0, 255)
    rgba_rgb = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
    add(
        "k05_rgba_png",
        "png",
        encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "half transparent",
        True,
        pixels=rgba,
        rgb=rgba_rgb,
    )
    g16 = (rng.integers(0, 65536, size=(9, 11))).astype(np.uint16)
    add(
        "k06_gray16_png",
        "png",
        encode(Image.fromarray(g16), "PNG"),
        "sixteen bit grey",
        True,
        pixels=g16,
        rgb=np.stack([np.round(g16 / 257.0).astype(np.uint8)] * 3, -1),
    )
    c16 = rng.integers(0, 65536, size=(6, 7, 3)).astype(np.uint16)
    add(
        "k07_rgb16_png",
        "png",
        png16_rgb(c16),
        "sixteen bit colour",
        True,
        rgb=(c16 >> 8).astype(np.uint8),
    )  # PIL keeps the high byte of 16-bit colour
    add(
        "k08_unicode_caption",
        "png",
        encode(Image.fromarray(rgb[:8, :8]), "PNG"),
        "Ein Bär über dem Fluß — 東京の夜 🌸  ",
        True,
        pixels=rgb[:8, :8],
        rgb=rgb[:8, :8],
    )
    webp = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    add(
        "k09_webp",
        "webp",
        encode(Image.fromarray(webp), "WEBP", lossless=True),
        "a lossless webp",
        True,
        rgb=webp,
    )
    good_jpeg = encode(Image.fromarray(photo), "JPEG", quality=80)
    add("k10_corrupt_jpeg", "jpg", good_jpeg[:20] + rng.bytes(400), "corrupt jpeg", False)
    good_png = encode(Image.fromarray(rgb), "PNG")
    add("k11_truncated_png", "png", good_png[: len(good_png) // 2], "truncated png", False)
    add("k12_zero_byte", "jpg", b"", "zero byte file", False)
    add("k13_empty_caption", "png", encode(Image.fromarray(gray, "L"), "PNG"), "   ", False)
    add("k14_no_caption", "png", encode(Image.fromarray(gray, "L"), "PNG"), None, False)
    add("k15_text_not_image", "jpg", b"this is not an image at all", "not an image", False)
    return cases


def write_tar(path: str, cases: list[dict], extra_json: bool = True) -> str:
    """img2dataset layout: KEY.ext, KEY.txt, KEY.json for each case, in key order."""
    with tarfile.open(path, "w") as tf:

        def put(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for c in cases:
            put(f"{c['key']}.{c['ext']}", c["data"])
            if c["caption"] is not None:
                put(f"{c['key']}.txt", c["caption"].encode("utf-8"))
            if extra_json:
                put(f"{c['key']}.json", json.dumps({"key": c["key"], "status": "success"}).encode())
    return path


def write_table(
    folder: str,
    cases: list[dict],
    fmt: str = "jsonl",
    image_field: str = "image",
    caption_field: str = "caption",
) -> str:
    """images/KEY.ext plus captions.jsonl (or .csv) naming them relative to the file."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for c in cases:
        rel = f"images/{c['key']}.{c['ext']}"
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(c["data"])
        row = {image_field: rel}
        if c["caption"] is not None:
            row[caption_field] = c["caption"]
        rows.append(row)
    path = os.path.join(folder, f"captions.{fmt}")
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=[image_field, caption_field])
            w.writeheader()
            for r in rows:
                w.writerow(r)
    return path


def solid_png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    return encode(Image.new("RGB", (size, size), rgb), "PNG")


def write_tar_members(path: str, members: list[tuple[str, bytes]]) -> str:
    """A tar holding exactly these (name, bytes) members, in this order (duplicates too)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_lines(path: str, lines: list[bytes]) -> str:
    """A table file written byte for byte (for encodings the csv/json writers would fix)."""
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    return path


def write_image_folder(root: str, classes: dict[str, list[bytes]]) -> int:
    """ImageFolder layout root/CLASS/NNN.png; returns the number of images planted."""
    for name, images in classes.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i, data in enumerate(images):
            with open(os.path.join(root, name, f"{i:03d}.png"), "wb") as f:
                f.write(data)
    return sum(len(v) for v in classes.values())


def write_shards(folder: str, shards: int, pairs: int) -> list[dict]:
    """`shards` webdataset tars shard-00000.tar... of `pairs` cases each: make_cases' good
    and broken files in turn, under keys unique across shards. Returns every case."""
    cases = []
    for s in range(shards):
        pool = make_cases(seed=s)
        shard = [
            dict(pool[i % len(pool)], key=f"s{s}_{i:04d}_{pool[i % len(pool)]['key']}")
            for i in range(pairs)
        ]
        write_tar(os.path.join(folder, f"shard-{s:05d}.tar"), shard)
        cases += shard
    return cases

"""Image decoding (PIL only, never TensorFlow) and the CLIP crops, shared by import and loader.

`decode_rgb(bytes)` returns a fully loaded 8-bit RGB `PIL.Image` for every input PIL reads:
grayscale, 1-bit, palette (with or without transparency), alpha (composited over white),
CMYK and YCbCr JPEGs, 16-bit grayscale (scaled by 1/257, not clipped), 32-bit integer and
float images, and EXIF-rotated photos (turned upright). Anything PIL cannot decode, or a
file that ends early, raises `BadImage` whose message is the skip reason.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "BadImage",
    "decode_rgb",
    "image_format",
    "random_square_crop",
    "center_crop",
    "ALPHA_BACKGROUND",
]

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white
_RESAMPLE = Image.Resampling.BICUBIC


class BadImage(ValueError):
    """Raised for bytes that are not a decodable image; str(e) is a short reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float32)  # 16-bit range (I: 16-bit PNGs in older PIL)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float32)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def image_format(data: bytes) -> str | None:
    """'JPEG', 'PNG', 'WEBP', ... from the header, without decoding pixels; None if unknown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return img.format
    except Exception:
        return None


def decode_rgb(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decodes encoded image bytes to a loaded RGB image.

    min_size: JPEGs may be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL draft)
    as long as the shorter side stays >= min_size; a large speed-up for photos that are
    cropped and resized to a small model input anyway. None: full resolution.
    """
    if not data:
        raise BadImage("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if min_size and img.format == "JPEG":
                img.draft("RGB", (int(min_size), int(min_size)))
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:
                pass  # a broken EXIF block does not make the pixels bad
            img = _to_rgb(img)
            img.load()
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large: {e}") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        TypeError,
        IndexError,
        Image.UnidentifiedImageError,
    ) as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError):
            msg = "corrupt image: not a format PIL can identify"
        elif "truncated" in msg or isinstance(e, EOFError):
            msg = "truncated image: " + msg
        else:
            msg = "corrupt image: " + msg
        raise BadImage(msg) from None
    if img.width < 1 or img.height < 1:
        raise BadImage("image has zero size")
    return img


def _resize_box(img: Image.Image, box, size: int) -> np.ndarray:
    out = img.resize((size, size), _RESAMPLE, box=box)
    return np.asarray(out, dtype=np.uint8)


def random_square_crop(
    img: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.9, 1.0)
) -> np.ndarray:
    """CLIP training augmentation: a random square crop, resized to size x size (bicubic).

    The crop's area is a fraction u ~ U(scale) of the largest square that fits (side =
    shorter side * sqrt(u)), placed uniformly at random. Returns uint8 [size, size, 3].
    Deterministic given the rng state (three draws).
    """
    lo, hi = scale
    w, h = img.size
    u = rng.uniform(lo, hi)
    side = min(w, h) * math.sqrt(u)
    x0 = rng.uniform(0.0, w - side)
    y0 = rng.uniform(0.0, h - side)
    return _resize_box(img, (x0, y0, x0 + side, y0 + side), size)


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Evaluation transform: the centred square of the shorter side, resized to size
    (the same as resizing the shorter side to `size` then centre-cropping)."""
    w, h = img.size
    side = min(w, h)
    x0, y0 = (w - side) / 2.0, (h - side) / 2.0
    return _resize_box(img, (x0, y0, x0 + side, y0 + side), size)


def draft_size(size: int, scale: tuple[float, float] | None = None) -> int:
    """Shorter side a JPEG may be draft-decoded to without upsampling the crop."""
    smallest = scale[0] if scale else 1.0
    return int(math.ceil(size / math.sqrt(max(smallest, 1e-6))))

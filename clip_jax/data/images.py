"""Image decoding (PIL and libjpeg-turbo, never TensorFlow) and the CLIP crops.

`decode_rgb(bytes)` returns a fully loaded 8-bit RGB `PIL.Image` for every input PIL reads:
grayscale, 1-bit, palette (with or without transparency), alpha (composited over white),
CMYK and YCbCr JPEGs, 16-bit grayscale (scaled by 1/257, not clipped), 32-bit integer and
float images, and EXIF-rotated photos (turned upright). Anything PIL cannot decode, or a
file that ends early, raises `BadImage` whose message is the skip reason.

`random_square_crop(bytes, size, rng)` is the training transform. It draws the crop box in
the upright image's coordinates from the header alone, then decodes a JPEG in the DCT
domain at the smallest scale M/8 that keeps the crop at least `size` pixels wide
(libjpeg-turbo through simplejpeg; 8/8 where 7/8 would do, its inverse DCT being slower),
cuts the box from that reduced image, its edges rounded to whole decoded pixels as
torchvision's RandomResizedCrop cuts whole pixels, and resizes it with OpenCV in one pass:
bicubic below a 1.5x shrink, pixel-area averaging from 1.5x. OpenCV's bicubic, unlike
PIL's, does not widen its kernel when shrinking: on grainy photos it is as close to PIL's
antialiased bicubic as area averaging is at 1.1x (0.66 of 255, mean absolute difference),
but 2.0 away at 1.5x where area averaging stays at 0.6. The DCT scaling leaves a JPEG's
crop below 1.5x the output except at 2/8 and 1/8 (at most 4/3 at 8/8, 8/7 from 256-px
JPEGs). OpenCV's bicubic resize runs 7x PIL's at these sizes; on the photo-like 256-px and
400-600 px JPEGs of `benchmarks/input_pipeline.py` it is within 0.39 and 0.56 of PIL's
resize of the same box. EXIF-rotated, CMYK and damaged JPEGs go through PIL's decoder
(draft decoding at 1/2, 1/4 or 1/8); other formats are decoded whole. The box is drawn the
same whichever way the bytes are decoded.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import cv2
import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageOps

__all__ = [
    "BadImage",
    "decode_rgb",
    "image_format",
    "random_square_crop",
    "center_crop",
    "ALPHA_BACKGROUND",
]

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white
_RESAMPLE = Image.Resampling.BICUBIC  # evaluation's centre crop
# Train crops that shrink by this factor or more are resized by pixel-area averaging
# (slower than bicubic, but OpenCV's bicubic aliases from about here).
_AREA_FROM_SHRINK = 1.5
# The loader crops one image per thread or worker process; OpenCV's own thread pool would
# only oversubscribe the cores (and hand each small resize to other threads).
cv2.setNumThreads(1)
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_PLAIN_COLORSPACES = ("YCbCr", "Gray", "RGB")  # libjpeg-turbo gives RGB; CMYK goes to PIL


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


@contextlib.contextmanager
def _bad_image():
    """Turns PIL's many decoding errors into BadImage with a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except BadImage:
        raise
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


def _open(data: bytes) -> Image.Image:
    """The image with its header read and no pixels decoded (call inside `_bad_image`)."""
    if not data:
        raise BadImage("empty image file")
    return Image.open(io.BytesIO(data))


def _load_rgb(img: Image.Image) -> Image.Image:
    """Decodes, turns upright by EXIF and converts to RGB (call inside `_bad_image`)."""
    img.load()
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a broken EXIF block does not make the pixels bad
    img = _to_rgb(img)
    img.load()
    if img.width < 1 or img.height < 1:
        raise BadImage("image has zero size")
    return img


def decode_rgb(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decodes encoded image bytes to a loaded RGB image.

    min_size: JPEGs may be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL draft)
    as long as the shorter side stays >= min_size; a large speed-up for photos that are
    cropped and resized to a small model input anyway. None: full resolution.
    """
    with _bad_image():
        img = _open(data)
        if min_size and img.format == "JPEG":
            img.draft("RGB", (int(min_size), int(min_size)))
        return _load_rgb(img)


def _resize_box(img: Image.Image, box, size: int) -> np.ndarray:
    return np.asarray(img.resize((size, size), _RESAMPLE, box=box), dtype=np.uint8)


def _resize_crop(pixels: np.ndarray, box, size: int, out: np.ndarray | None) -> np.ndarray:
    """The square `box` of an RGB array, its side and corner rounded to whole pixels (kept
    inside the array), resized to size x size (into `out` when given): bicubic, or pixel
    area from a 1.5x shrink."""
    height, width = pixels.shape[:2]
    side = min(max(1, round(box[2] - box[0])), width, height)
    x0 = min(max(0, round(box[0])), width - side)
    y0 = min(max(0, round(box[1])), height - side)
    shrinks = side >= _AREA_FROM_SHRINK * size
    resized = cv2.resize(
        pixels[y0 : y0 + side, x0 : x0 + side],
        (size, size),
        dst=out,
        interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_CUBIC,
    )
    if out is not None and resized is not out:  # OpenCV made a new array: `out` did not fit
        out[...] = resized
    return resized if out is None else out


def _square_box(width: int, height: int, draws, scale) -> tuple[float, float, float, float]:
    """The crop of `random_square_crop` from its three uniform draws in [0, 1)."""
    lo, hi = scale
    # lo + (hi - lo) * d is numpy's Generator.uniform(lo, hi) of the same draw.
    side = min(width, height) * math.sqrt(lo + (hi - lo) * draws[0])
    x0 = (width - side) * draws[1]
    y0 = (height - side) * draws[2]
    return x0, y0, x0 + side, y0 + side


def _scaled(box, factor: float) -> tuple[float, ...]:
    return tuple(v * factor for v in box)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1  # a broken EXIF block: exif_transpose leaves such an image as it is


def _has_app1(data: bytes) -> bool:
    """Whether the segments before a JPEG's image data include APP1, where EXIF and XMP
    keep the orientation; a layout this walk does not follow counts as yes."""
    pos = 2  # after the start-of-image marker
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xE1:
            return True
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:  # other APPn, comment
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        else:
            return False  # tables, frame header: the metadata segments are behind us
    return True


def _plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG libjpeg-turbo turns into upright RGB as it is; None for
    anything else (other formats, CMYK, a rotating EXIF orientation, an unreadable header)."""
    if not simplejpeg.is_jpeg(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in _PLAIN_COLORSPACES:
        return None
    if _has_app1(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if _orientation(Image.open(io.BytesIO(data))) != 1:
                    return None
            except Exception:
                return None
    return width, height


def _crop_dct_scaled(
    data: bytes, width: int, height: int, box, size: int, out: np.ndarray | None
) -> np.ndarray | None:
    """The box of a plain JPEG decoded at the smallest M/8 that does not upsample it; None
    when strict libjpeg-turbo refuses the file (PIL then decodes it or names the defect)."""
    eighths = min(8, max(1, math.ceil(8 * size / (box[2] - box[0]))))
    if eighths == 7:  # libjpeg-turbo's 7x7 inverse DCT has no SIMD: slower than 8/8 here
        eighths = 8
    factor = eighths / 8
    shape = (math.ceil(height * factor), math.ceil(width * factor))
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=shape[0], min_width=shape[1])
    except ValueError:
        return None
    if pixels.shape[:2] != shape:  # not the scale asked for: let PIL decode it instead
        return None
    return _resize_crop(pixels, _scaled(box, factor), size, out)


def _crop_pil(data: bytes, draws, scale, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """`random_square_crop` through PIL: JPEGs draft-decoded at 1, 1/2, 1/4 or 1/8."""
    with _bad_image():
        img = _open(data)
        if img.format != "JPEG":  # no DCT scaling: decoded whole
            img = _load_rgb(img)
            box, reduce = _square_box(img.width, img.height, draws, scale), 1
        else:
            width, height = img.size
            if _orientation(img) in _TRANSPOSED:
                width, height = height, width
            box, reduce = _square_box(width, height, draws, scale), 8
            while reduce > 1 and (box[2] - box[0]) / reduce < size:
                reduce //= 2
            if reduce > 1 and img.draft("RGB", (img.width // reduce, img.height // reduce)) is None:
                reduce = 1  # a JPEG PIL cannot draft (several tiles)
            # A reduced EXIF-rotated image is turned as a whole: its crop may shift by less
            # than one reduced pixel where the size is not a multiple of `reduce`.
            img = _load_rgb(img)
    return _resize_crop(np.asarray(img), _scaled(box, 1 / reduce), size, out)


def random_square_crop(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    out: np.ndarray | None = None,
) -> np.ndarray:
    """CLIP training augmentation of encoded image bytes: a random square crop, resized to
    size x size (OpenCV, bicubic below a 1.5x shrink; never upsampled by the decoder).
    Returns uint8 [size, size, 3]: `out` when given (a batch's row, written in place: 2% less
    CPU than copying the crop in, benchmarks/input_pipeline.py).

    The crop's area is a fraction u ~ U(scale) of the largest square that fits (side =
    shorter side * sqrt(u)), placed uniformly at random in the upright image. Deterministic
    given the rng state: three draws, the same as `rng.uniform(lo, hi)`, `rng.uniform(0,
    width - side)`, `rng.uniform(0, height - side)`; the box is then rounded to whole pixels
    of the image as decoded (at most half a decoded pixel per edge). Raises BadImage like
    `decode_rgb`.
    """
    draws = rng.random(3).tolist()
    plain = _plain_jpeg_size(data)
    if plain is not None:
        crop = _crop_dct_scaled(data, *plain, _square_box(*plain, draws, scale), size, out)
        if crop is not None:
            return crop
    return _crop_pil(data, draws, scale, size, out)


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Evaluation transform: the centred square of the shorter side, resized to size
    (the same as resizing the shorter side to `size` then centre-cropping)."""
    w, h = img.size
    side = min(w, h)
    x0, y0 = (w - side) / 2.0, (h - side) / 2.0
    return _resize_box(img, (x0, y0, x0 + side, y0 + side), size)

"""`clip_demo`: procedurally drawn shapes with captions; offline, deterministic, small.

Every image (default 64 x 64 PNG) shows one shape of 8 kinds in one of 8 colours, in one
of 3 sizes at one of 9 positions, over one of 6 textured backgrounds. Each example has
three captions in different phrasings ("a photo of a red circle", "a small red circle in
the top left", "a red circle on a striped background", ...).

Splits:
  train       shape-colour combinations "seen" in training (48 of 64),
  validation  the same combinations, new images,
  test        the 16 held-out combinations, never seen in training: each shape and each
              colour appears in training, but never together (shape - colour = 0 mod 4),
              so zero-shot classification on `test` measures compositional transfer.

Labelled view: `label` is the shape-colour class ("red circle"), 64 classes in all; the
metadata lists `heldout_labels` (the 16 test classes) so an evaluator can classify among
all 64 names (hard) or the 16 unseen ones. `shape`, `color`, `size`, `position` and
`background` are class labels too.

All randomness comes from numpy Generators seeded with (seed, split, index): the same
seed gives the same bytes on every machine with the same Pillow and zlib.
"""

from __future__ import annotations

import functools
import io
import math
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from clip_jax.data.builders import common

NAME = "clip_demo"
VERSION = "1.0.0"

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_RGB = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 35),
    "green": (40, 170, 60),
    "cyan": (35, 205, 220),
    "blue": (35, 65, 225),
    "purple": (140, 50, 200),
    "pink": (245, 125, 190),
}
SIZES = ("small", "medium", "large")
_SIZE_RADIUS = {"small": 0.13, "medium": 0.20, "large": 0.27}  # fraction of image side
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
_WHERE = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "noisy", "gradient")
TEMPLATES = (
    "a photo of a {color} {shape}",
    "a {color} {shape}",
    "a {color} {shape} on a {background} background",
    "a {size} {color} {shape} {where}",
    "a {size} {color} {shape}",
    "a picture of a {color} {shape} {where}",
    "a {color} {shape} {where} on a {background} background",
    "there is a {size} {color} {shape} {where}",
)
CAPTIONS_PER_IMAGE = 3
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)  # label = shape * 8 + color
_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}


def label_of(shape: int, color: int) -> int:
    return shape * len(COLORS) + color


def is_heldout(shape: int, color: int) -> bool:
    return (shape - color) % 4 == 0


HELDOUT_LABELS = tuple(
    label_of(s, c) for s in range(len(SHAPES)) for c in range(len(COLORS)) if is_heldout(s, c)
)
SEEN_LABELS = tuple(i for i in range(len(CLASS_NAMES)) if i not in HELDOUT_LABELS)


def _article(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(
    template: str, shape: str, color: str, size: str, position: str, background: str
) -> str:
    return _article(
        template.format(
            shape=shape, color=color, size=size, where=_WHERE[position], background=background
        )
    )


def all_caption_variants() -> list[str]:
    """Every caption the dataset can contain (a tokenizer corpus independent of the seed)."""
    out = []
    for t in TEMPLATES:
        for s in SHAPES:
            for c in COLORS:
                for z in SIZES:
                    for p in POSITIONS:
                        for b in BACKGROUNDS:
                            out.append(caption(t, s, c, z, p, b))
    return sorted(set(out))


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Muted (low saturation) textures so every shape colour stays visible."""
    grey = rng.uniform(0.35, 0.8)
    tint = rng.uniform(-0.06, 0.06, size=3)
    base = np.clip(grey + tint, 0, 1)
    contrast = rng.uniform(0.12, 0.22)
    yy, xx = _grid(size)
    if kind == "plain":
        field = np.zeros((size, size), np.float32)
    elif kind == "striped":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.2)
        phase = rng.uniform(0, 1)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase
        field = np.where((t % 1.0) < 0.5, 1.0, -1.0).astype(np.float32)
    elif kind == "checkered":
        cell = rng.uniform(0.08, 0.18)
        ox, oy = rng.uniform(0, cell, size=2)
        field = np.where(
            ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2) == 0, 1.0, -1.0
        ).astype(np.float32)
    elif kind == "dotted":
        cell = rng.uniform(0.1, 0.18)
        ox, oy = rng.uniform(0, cell, size=2)
        dx = ((xx + ox) % cell) / cell - 0.5
        dy = ((yy + oy) % cell) / cell - 0.5
        field = np.where(dx * dx + dy * dy < 0.07, 1.0, -0.3).astype(np.float32)
    elif kind == "noisy":
        field = rng.uniform(-1.0, 1.0, size=(size, size)).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        field = (t * 2.5).astype(np.float32)
    else:
        raise ValueError(kind)
    img = base[None, None, :] + contrast * field[..., None]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _polygon(cx, cy, r, n, angle, inner=None):
    pts = []
    steps = n * (2 if inner else 1)
    for k in range(steps):
        rad = r if (inner is None or k % 2 == 0) else r * inner
        a = angle + 2 * math.pi * k / steps - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill
):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        ri = r * 0.55
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=(0, 0, 0, 0))
    elif shape == "square":
        q = r * 0.85
        draw.polygon(
            _rotate(
                [(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)],
                cx,
                cy,
                angle,
            ),
            fill=fill,
        )
    elif shape == "diamond":
        draw.polygon(
            _rotate(
                [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)], cx, cy, angle
            ),
            fill=fill,
        )
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, r * 1.05, 3, angle), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, angle), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.05, 5, angle, inner=0.45), fill=fill)
    elif shape == "cross":
        t = r * 0.32
        arm = [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
        draw.polygon(_rotate(arm, cx, cy, angle), fill=fill)
    else:
        raise ValueError(shape)


_ROTATION = {
    "circle": 0.0,
    "ring": 0.0,
    "square": 0.26,
    "diamond": 0.26,
    "cross": 0.26,
    "triangle": math.pi,
    "hexagon": math.pi,
    "star": math.pi,
}  # max |angle|
_SUPERSAMPLE = 2


def render(
    shape: str,
    color: str,
    size: str,
    position: str,
    background: str,
    image_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """uint8 [image_size, image_size, 3]."""
    s = image_size
    bg = Image.fromarray(_background(background, s, rng), "RGB")
    r = _SIZE_RADIUS[size] * s * rng.uniform(0.9, 1.1)
    row, col = divmod(POSITIONS.index(position), 3)
    cx = (0.2 + 0.3 * col + rng.uniform(-0.05, 0.05)) * s
    cy = (0.2 + 0.3 * row + rng.uniform(-0.05, 0.05)) * s
    cx = float(np.clip(cx, r + 1, s - r - 1))
    cy = float(np.clip(cy, r + 1, s - r - 1))
    lim = _ROTATION[shape]
    angle = rng.uniform(-lim, lim) if lim else 0.0
    rgb = np.clip(np.array(_RGB[color]) + rng.integers(-15, 16, size=3), 0, 255)
    big = s * _SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    _draw_shape(
        ImageDraw.Draw(layer),
        shape,
        cx * _SUPERSAMPLE,
        cy * _SUPERSAMPLE,
        r * _SUPERSAMPLE,
        angle,
        tuple(int(v) for v in rgb) + (255,),
    )
    layer = layer.resize((s, s), Image.Resampling.BOX)
    bg.paste(layer, (0, 0), layer)
    return np.asarray(bg)


def make_example(seed: int, split: str, index: int, image_size: int = 64) -> dict:
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    labels = HELDOUT_LABELS if split == "test" else SEEN_LABELS
    label = int(labels[rng.integers(len(labels))])
    shape_i, color_i = divmod(label, len(COLORS))
    size_i = int(rng.integers(len(SIZES)))
    pos_i = int(rng.integers(len(POSITIONS)))
    bg_i = int(rng.integers(len(BACKGROUNDS)))
    names = dict(
        shape=SHAPES[shape_i],
        color=COLORS[color_i],
        size=SIZES[size_i],
        position=POSITIONS[pos_i],
        background=BACKGROUNDS[bg_i],
    )
    templates = rng.choice(len(TEMPLATES), size=CAPTIONS_PER_IMAGE, replace=False)
    captions = [caption(TEMPLATES[t], **names) for t in templates]
    pixels = render(**names, image_size=image_size, rng=rng)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG", compress_level=1)
    return {
        "image": buf.getvalue(),
        "caption": captions,
        "key": f"{split}/{index:07d}",
        "label": label,
        "shape": shape_i,
        "color": color_i,
        "size": size_i,
        "position": pos_i,
        "background": bg_i,
    }


class ClipDemo(common.Builder):
    """Procedural shapes with captions (see module docstring)."""

    name = NAME
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Shapes x colours, held-out combinations for zero-shot."}

    def __init__(
        self,
        *,
        seed: int = 0,
        image_size: int = 64,
        num_train: int = 20000,
        num_validation: int = 2000,
        num_test: int = 2000,
        **kwargs,
    ):
        self._seed = int(seed)
        self._image_size = int(image_size)
        self._counts = {
            "train": int(num_train),
            "validation": int(num_validation),
            "test": int(num_test),
        }
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    **common.text_features(),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "shape": tfds.features.ClassLabel(names=list(SHAPES)),
                    "color": tfds.features.ClassLabel(names=list(COLORS)),
                    "size": tfds.features.ClassLabel(names=list(SIZES)),
                    "position": tfds.features.ClassLabel(names=list(POSITIONS)),
                    "background": tfds.features.ClassLabel(names=list(BACKGROUNDS)),
                }
            ),
            metadata=tfds.core.MetadataDict(
                seed=self._seed,
                image_size=self._image_size,
                heldout_labels=list(HELDOUT_LABELS),
                seen_labels=list(SEEN_LABELS),
                templates=list(TEMPLATES),
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split, n in self._counts.items() if n > 0}

    def _generate_examples(self, split: str):
        for i in range(self._counts[split]):
            yield i, make_example(self._seed, split, i, self._image_size)

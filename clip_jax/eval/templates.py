"""Prompt templates for zero-shot classification.

A template is a sentence with exactly one ``{}`` where the class name goes. The sets below
are the ones the CLIP paper used (the 80 ImageNet templates from the CLIP repository's
prompt-engineering notebook, and the per-dataset lists of its ``data/prompts.md``).

``load_templates(spec)`` accepts a set name (``'imagenet'``, ``'cifar10'``, ...), a path to a
UTF-8 text file with one template per line (blank lines and lines starting with ``#`` are
skipped), or a sequence of template strings. Every template is validated.
"""

from __future__ import annotations

from collections.abc import Sequence

from clip_jax import storage

PLACEHOLDER = "{}"

# The 80 ImageNet templates of the CLIP paper, in the notebook's order.
IMAGENET = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7-template subset the CLIP notebook found after its template selection.
IMAGENET_SELECTED = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# CIFAR-10 and CIFAR-100 share one list of 18 templates in the paper.
CIFAR = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

CALTECH101 = (
    "a photo of a {}.",
    "a painting of a {}.",
    "a plastic {}.",
    "a sculpture of a {}.",
    "a sketch of a {}.",
    "a tattoo of a {}.",
    "a toy {}.",
    "a rendition of a {}.",
    "a embroidered {}.",
    "a cartoon {}.",
    "a {} in a video game.",
    "a plushie {}.",
    "a origami {}.",
    "art of a {}.",
    "graffiti of a {}.",
    "a drawing of a {}.",
    "a doodle of a {}.",
    "a photo of the {}.",
    "a painting of the {}.",
    "the plastic {}.",
    "a sculpture of the {}.",
    "a sketch of the {}.",
    "a tattoo of the {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "the embroidered {}.",
    "the cartoon {}.",
    "the {} in a video game.",
    "the plushie {}.",
    "the origami {}.",
    "art of the {}.",
    "graffiti of the {}.",
    "a drawing of the {}.",
    "a doodle of the {}.",
)

DTD = (
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
    "a photo of the {} thing.",
    "a photo of the {} object.",
)

EUROSAT = (
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
)

FGVC_AIRCRAFT = (
    "a photo of a {}, a type of aircraft.",
    "a photo of the {}, a type of aircraft.",
)

STANFORD_CARS = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)

RESISC45 = (
    "satellite imagery of {}.",
    "aerial imagery of {}.",
    "satellite photo of {}.",
    "aerial photo of {}.",
    "satellite view of {}.",
    "aerial view of {}.",
    "satellite imagery of a {}.",
    "aerial imagery of a {}.",
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    "satellite view of a {}.",
    "aerial view of a {}.",
    "satellite imagery of the {}.",
    "aerial imagery of the {}.",
    "satellite photo of the {}.",
    "aerial photo of the {}.",
    "satellite view of the {}.",
    "aerial view of the {}.",
)

GTSRB = (
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
)

COUNTRY211 = (
    "a photo i took in {}.",
    "a photo i took while visiting {}.",
    "a photo from my home country of {}.",
    "a photo from my visit to {}.",
    "a photo showing the country of {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET,
    "imagenet_selected": IMAGENET_SELECTED,
    "simple": ("a photo of a {}.",),
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    "caltech101": CALTECH101,
    "dtd": DTD,
    "eurosat": EUROSAT,
    "fgvc_aircraft": FGVC_AIRCRAFT,
    "stanford_cars": STANFORD_CARS,
    "resisc45": RESISC45,
    "gtsrb": GTSRB,
    "country211": COUNTRY211,
    "food101": ("a photo of {}, a type of food.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "oxford_flowers102": ("a photo of a {}, a type of flower.",),
    "birdsnap": ("a photo of a {}, a type of bird.",),
    "stl10": ("a photo of a {}.", "a photo of the {}."),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "mnist": ('a photo of the number: "{}".',),
    "voc2007": ("a photo of a {}.",),
    "patch_camelyon": ("this is a photo of {}",),
    "clevr_count": ("a photo of {} objects.",),
}

# tfds dataset name -> the template set the CLIP paper used for it.
_DATASET_TO_SET = {
    "imagenet2012": "imagenet",
    "imagenet_v2": "imagenet",
    "imagenet_sketch": "imagenet",
    "imagenet_a": "imagenet",
    "imagenet_r": "imagenet",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "caltech101": "caltech101",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "food101": "food101",
    "oxford_iiit_pet": "oxford_pets",
    "oxford_flowers102": "oxford_flowers102",
    "stl10": "stl10",
    "sun397": "sun397",
    "mnist": "mnist",
    "resisc45": "resisc45",
    "patch_camelyon": "patch_camelyon",
    "cars196": "stanford_cars",
    "gtsrb": "gtsrb",
    "voc/2007": "voc2007",
}


def base_dataset_name(name: str) -> str:
    """'imagenet_v2/matched-frequency:3.0.0' -> 'imagenet_v2' (tfds name without config/version)."""
    return name.split(":")[0].split("/")[0].strip()


def default_template_set(dataset_name: str) -> str:
    """The template set the CLIP paper used for this tfds dataset, else 'simple'."""
    name = dataset_name.split(":")[0].strip()
    if name in _DATASET_TO_SET:
        return _DATASET_TO_SET[name]
    return _DATASET_TO_SET.get(base_dataset_name(dataset_name), "simple")


def validate_template(template: str, where: str = "") -> str:
    """Returns the template, or raises ValueError naming it and what is expected."""
    loc = f" ({where})" if where else ""
    if not isinstance(template, str):
        raise ValueError(
            f"template{loc} must be a string, got {type(template).__name__}: {template!r}"
        )
    count = template.count(PLACEHOLDER)
    others = template.replace(PLACEHOLDER, "")
    if count != 1 or "{" in others or "}" in others:
        raise ValueError(
            f"template {template!r}{loc} must contain exactly one '{{}}' placeholder for the class "
            f"name and no other braces; found {count} '{{}}'"
            + (" and stray braces" if ("{" in others or "}" in others) else "")
            + ", e.g. 'a photo of a {}.'"
        )
    return template


def fill(template: str, class_name: str) -> str:
    """The prompt for one class. Plain replacement, so braces in class names are harmless."""
    return template.replace(PLACEHOLDER, class_name)


def load_templates(spec: str | Sequence[str]) -> list[str]:
    """Template list from a set name, a text file path, or a sequence of strings.

    Raises ValueError for an unknown name / missing file, an empty list, or a template
    without exactly one '{}'.
    """
    if isinstance(spec, str):
        key = spec.strip()
        if key in TEMPLATE_SETS:
            templates = list(TEMPLATE_SETS[key])
            source = f"set {key!r}"
        elif storage.path(key).is_file():
            lines = storage.read_text(key).splitlines()
            templates = []
            for lineno, line in enumerate(lines, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                templates.append(validate_template(line.strip(), f"{key}:{lineno}"))
            source = f"file {key!r}"
        else:
            raise ValueError(
                f"unknown template spec {spec!r}: expected one of {sorted(TEMPLATE_SETS)} "
                "or the path "
                "of an existing text file with one template per line"
            )
    else:
        templates = [validate_template(t, f"entry {i}") for i, t in enumerate(spec)]
        source = "the given list"
    if not templates:
        raise ValueError(
            f"no templates found in {source}; expected at least one line like 'a photo of a {{}}.'"
        )
    for i, t in enumerate(templates):
        validate_template(t, f"{source}, entry {i}")
    return templates

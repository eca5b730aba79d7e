"""The built-in clip_demo dataset and its tokenizer."""

import io
import os

import chex
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clip_jax.data import demo_tokenizer, ensure_prepared
from clip_jax.data.builders import clip_demo
from clip_jax.data.errors import DatasetNotPreparedError
from clip_jax.data.info import dataset_info

tfds.disable_progress_bar()
SMALL = dict(num_train=40, num_validation=10, num_test=12, verbose=False)


def _records(d, split):
    ds = tfds.data_source("clip_demo", split=split, data_dir=d, download=False)
    return [ds[i] for i in range(len(ds))]


def test_examples_are_deterministic_and_well_formed():
    a = clip_demo.make_example(7, "train", 3)
    b = clip_demo.make_example(7, "train", 3)
    assert a == b
    assert clip_demo.make_example(8, "train", 3)["image"] != a["image"]
    img = Image.open(io.BytesIO(a["image"]))
    assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
    shape, color = clip_demo.SHAPES[a["shape"]], clip_demo.COLORS[a["color"]]
    assert a["label"] == clip_demo.label_of(a["shape"], a["color"])
    assert clip_demo.CLASS_NAMES[a["label"]] == f"{color} {shape}"
    assert len(set(a["caption"])) == 3
    assert all(color in c and shape in c for c in a["caption"])
    assert not any(" a orange" in c or " a orange" in c for c in clip_demo.all_caption_variants())


def test_heldout_combinations():
    held = set(clip_demo.HELDOUT_LABELS)
    assert len(held) == 16 and len(clip_demo.CLASS_NAMES) == 64
    seen = [divmod(i, 8) for i in clip_demo.SEEN_LABELS]
    # Every shape and every colour is seen in training, only some pairs are held out.
    assert {s for s, _ in seen} == set(range(8)) and {c for _, c in seen} == set(range(8))


def test_build_splits_and_labelled_view(tmp_path):
    d = str(tmp_path / "a")
    path = ensure_prepared("clip_demo", d, **SMALL)  # built on demand
    assert path.endswith(os.path.join("clip_demo", "1.0.0"))
    assert ensure_prepared("clip_demo", d, splits=("test",)) == path  # no rebuild
    info = dataset_info("clip_demo", d)
    assert info["num_examples"] == {"train": 40, "validation": 10, "test": 12}
    assert info["class_names"] == list(clip_demo.CLASS_NAMES)
    assert info["label_names"]["shape"] == list(clip_demo.SHAPES)
    assert info["metadata"]["heldout_labels"] == list(clip_demo.HELDOUT_LABELS)
    held = set(clip_demo.HELDOUT_LABELS)
    train, test = _records(d, "train"), _records(d, "test")
    assert all(r["label"] in held for r in test)
    assert not any(r["label"] in held for r in train + _records(d, "validation"))
    # Same seed in another folder: the same examples, byte for byte.
    d2 = str(tmp_path / "b")
    ensure_prepared("clip_demo", d2, **SMALL)
    for x, y in zip(_records(d2, "train"), train):
        assert x["image"] == y["image"] and list(x["caption"]) == list(y["caption"])
    with pytest.raises(DatasetNotPreparedError, match="--name=other"):
        ensure_prepared("other", d)


def test_demo_tokenizer_cached_and_deterministic(tmp_path):
    a = demo_tokenizer(str(tmp_path / "a"), context_length=32)
    b = demo_tokenizer(str(tmp_path / "b"), context_length=32)
    assert os.path.dirname(a.model_path) == str(tmp_path / "a" / "clip_demo" / "tokenizer")
    caps = clip_demo.all_caption_variants()
    ea, eb = a.encode(caps), b.encode(caps)
    chex.assert_trees_all_equal(ea, eb)
    # Every caption fits with room to spare; every word is one piece, none unknown.
    lengths = (ea != a.pad_id).sum(1)
    assert lengths.max() <= 20
    words = {w for c in caps for w in c.split()}
    for w in words:
        assert len(a.encode(w)) and (a.encode(w) != a.pad_id).sum() == 3, w
    assert demo_tokenizer(str(tmp_path / "a")).model_path == a.model_path  # cached

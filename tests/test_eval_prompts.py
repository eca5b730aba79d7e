"""Prompt templates and class names (clip_jax.eval.templates / classnames)."""

import os

import chex
import numpy as np
import pytest

from clip_jax.eval import classnames as CN
from clip_jax.eval import templates as T


def test_template_sets_are_valid_and_have_the_papers_sizes():
    assert len(T.load_templates("imagenet")) == 80
    assert len(set(T.IMAGENET)) == 80
    assert len(T.load_templates("cifar10")) == 18 == len(T.load_templates("cifar100"))
    assert T.load_templates("simple") == ["a photo of a {}."]
    for name in T.TEMPLATE_SETS:
        assert T.load_templates(name)  # every built-in template has exactly one '{}'
    assert T.fill("a photo of a {}.", "dog") == "a photo of a dog."
    assert T.fill("a {} thing", "{weird}") == "a {weird} thing"


def test_default_template_set_per_dataset():
    assert T.default_template_set("imagenet2012") == "imagenet"
    assert T.default_template_set("imagenet_v2/matched-frequency:3.0.0") == "imagenet"
    assert T.default_template_set("cifar100") == "cifar100"
    assert T.default_template_set("oxford_iiit_pet") == "oxford_pets"
    assert T.default_template_set("clip_demo") == "simple"


def test_templates_from_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# my prompts\na photo of a {}.\n\n  a drawing of a {}.  \n")
    assert T.load_templates(str(path)) == ["a photo of a {}.", "a drawing of a {}."]


@pytest.mark.parametrize("bad", ["a photo of a dog.", "a {} and a {}.", "a {0} photo", "a {name}."])
def test_template_without_exactly_one_placeholder_is_rejected(bad, tmp_path):
    with pytest.raises(ValueError, match=r"must contain exactly one '\{\}'"):
        T.load_templates([bad])
    path = tmp_path / "bad.txt"
    path.write_text(f"a photo of a {{}}.\n{bad}\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2\).*must contain exactly one"):
        T.load_templates(str(path))


def test_unknown_template_spec_and_empty_file(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown template spec 'imagenett'.*one template per line"
    ):
        T.load_templates("imagenett")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no templates found"):
        T.load_templates(str(empty))


# ------------------------------------------------------------------ class names


def _tfds_imagenet_wnids():
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; only this test reads its file)

    path = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
    with open(path) as f:
        return f.read().split()


def test_imagenet_names_and_subset_indices():
    names = CN.IMAGENET_CLASSNAMES
    assert len(names) == 1000
    assert names[0] == "tench" and names[6] == "stingray" and names[999] == "toilet paper"
    for idx in (CN.IMAGENET_A_INDICES, CN.IMAGENET_R_INDICES):
        assert len(idx) == 200 and list(idx) == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < 1000
    wnids = _tfds_imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids)  # tfds label i = i-th sorted wnid
    # Spot checks against the datasets' WordNet ids.
    assert wnids.index("n01443537") in CN.IMAGENET_R_INDICES  # goldfish: in R, not in A
    assert wnids.index("n01443537") not in CN.IMAGENET_A_INDICES
    assert wnids.index("n01498041") == CN.IMAGENET_A_INDICES[0]  # stingray: first class of A
    assert wnids.index("n12267677") == CN.IMAGENET_A_INDICES[-1]  # acorn: last class of A
    assert wnids.index("n12267677") == CN.IMAGENET_R_INDICES[-1]
    assert names[wnids.index("n12267677")] == "acorn"


def test_class_names_for_imagenet_variants():
    for name in ("imagenet2012", "imagenet_v2/matched-frequency", "imagenet_sketch:0.1.0"):
        cn = CN.class_names_for(name, info_names=[f"n{i:08d}" for i in range(1000)])
        assert cn.names == CN.IMAGENET_CLASSNAMES and cn.label_map is None


@pytest.mark.parametrize(
    "dataset,indices",
    [("imagenet_a", CN.IMAGENET_A_INDICES), ("imagenet_r", CN.IMAGENET_R_INDICES)],
)
def test_class_names_for_200_class_sets(dataset, indices):
    # tfds: labels are ImageNet-1k indices (1000 names) -> 200 columns + a label map.
    cn = CN.class_names_for(dataset, info_names=["x"] * 1000)
    assert len(cn) == 200
    assert cn.names == tuple(CN.IMAGENET_CLASSNAMES[i] for i in indices)
    labels_1k = np.array([indices[5], indices[0], indices[199]])
    chex.assert_trees_all_equal(cn.map_labels(labels_1k), np.array([5, 0, 199]))
    outside = next(i for i in range(1000) if i not in indices)
    assert cn.map_labels([outside])[0] == -1
    # A copy whose labels are already 0..199 gets no map.
    assert CN.class_names_for(dataset, info_names=["x"] * 200).label_map is None
    with pytest.raises(ValueError, match="has 10 label names; expected 1000"):
        CN.class_names_for(dataset, info_names=["x"] * 10)


def test_class_names_from_metadata_and_fixed_lists():
    cn = CN.class_names_for("clip_demo", info_names=["red_circle", "blue_square"])
    assert cn.names == ("red circle", "blue square")
    assert CN.class_names_for("cifar100", info_names=["x"] * 100).names[1] == "aquarium fish"
    assert len(CN.class_names_for("cifar10").names) == 10


def test_class_names_override_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("round thing\nsquare thing\n")
    assert CN.class_names_for("clip_demo", ["a", "b"], override_path=str(path)).names == (
        "round thing",
        "square thing",
    )
    with pytest.raises(
        ValueError, match=r"names\.txt' has 2 names but dataset 'clip_demo' has 3 classes"
    ):
        CN.class_names_for("clip_demo", ["a", "b", "c"], override_path=str(path))
    with pytest.raises(ValueError, match="has 2 names but imagenet_a has 200 classes"):
        CN.class_names_for("imagenet_a", override_path=str(path))
    thousand = tmp_path / "in1k.txt"
    thousand.write_text("\n".join(f"class {i}" for i in range(1000)))
    cn = CN.class_names_for("imagenet_r", override_path=str(thousand))
    assert cn.names[0] == f"class {CN.IMAGENET_R_INDICES[0]}"
    with pytest.raises(ValueError, match="does not exist"):
        CN.class_names_for("clip_demo", ["a"], override_path=str(tmp_path / "missing.txt"))


def test_dataset_without_class_names_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"'my_set' has no class names in its metadata.*class names file"
    ):
        CN.class_names_for("my_set", info_names=None)

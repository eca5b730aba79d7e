"""Task strings and per-dataset settings (clip_jax.eval.tasks) and the eval config schema."""

import pytest

from clip_jax import config as config_lib
from clip_jax.eval.evaluators import EVALUATORS
from clip_jax.eval.schema import config_schema
from clip_jax.eval.tasks import TaskSpec, class_names_file, default_test_split, parse_tasks


def test_parse_tasks():
    specs = parse_tasks("zeroshot:imagenet_v2/matched-frequency, retrieval:coco@val", EVALUATORS)
    assert specs[0] == TaskSpec("zeroshot", "imagenet_v2/matched-frequency", "")
    assert specs[0].name == "zeroshot_imagenet_v2_matched-frequency"
    assert specs[1].split == "val" and specs[1].name == "retrieval_coco_val"
    assert parse_tasks(["linear_probe:cifar10", " "], EVALUATORS) == [
        TaskSpec("linear_probe", "cifar10")
    ]
    assert default_test_split("imagenet2012") == "validation"
    assert default_test_split("cifar10") == "test"


def test_bad_task_strings_are_clear_errors():
    with pytest.raises(
        ValueError, match="unknown evaluator 'zero_shot'.*known: linear_probe, retrieval"
    ):
        parse_tasks("zero_shot:cifar10", EVALUATORS)
    with pytest.raises(ValueError, match="must be written KIND:DATASET"):
        parse_tasks("zeroshot", EVALUATORS)
    with pytest.raises(ValueError, match="eval tasks repeat: zeroshot_cifar10"):
        parse_tasks("zeroshot:cifar10,zeroshot:cifar10", EVALUATORS)


def test_class_names_file_per_dataset():
    assert class_names_file("", "cifar10") is None
    assert class_names_file("names.txt", "cifar10") == "names.txt"
    spec = "cifar10=a.txt; imagenet2012 = b.txt"
    assert class_names_file(spec, "cifar10") == "a.txt"
    assert class_names_file(spec, "imagenet2012:5.1.0") == "b.txt"  # version suffix ignored
    assert class_names_file(spec, "food101") is None


def test_the_training_config_holds_the_eval_schema():
    assert config_lib.defaults().eval.to_dict() == config_schema().to_dict()

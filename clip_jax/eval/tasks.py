"""Evaluation tasks: ``KIND:DATASET[@SPLIT]`` in the comma-separated ``eval.tasks``.

For example ``zeroshot:imagenet2012, zeroshot:imagenet_a, retrieval:coco_captions@test``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Sequence

from clip_jax.eval import templates as templates_lib


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    kind: str
    dataset: str
    split: str = ""  # '' = default_test_split(dataset)

    @property
    def name(self) -> str:
        """File-safe task name: 'zeroshot_imagenet_v2_matched-frequency'."""
        base = f"{self.kind}_{self.dataset}" + (f"_{self.split}" if self.split else "")
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_")


def parse_tasks(tasks: str | Sequence[str], kinds: Collection[str]) -> list[TaskSpec]:
    """'zeroshot:cifar10, retrieval:coco@test' -> TaskSpecs; a kind not in ``kinds`` is an error."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        kind, sep, rest = item.partition(":")
        kind = kind.strip()
        if not sep or not rest.strip():
            raise ValueError(
                f"eval task {item!r} must be written KIND:DATASET[@SPLIT], e.g. 'zeroshot:cifar10'"
            )
        if kind not in kinds:
            raise ValueError(
                f"unknown evaluator {kind!r} in task {item!r}; known: {', '.join(sorted(kinds))}"
            )
        dataset, _, split = rest.strip().partition("@")
        out.append(TaskSpec(kind, dataset.strip(), split.strip()))
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"eval tasks repeat: {', '.join(dupes)}")
    return out


def default_test_split(dataset: str) -> str:
    """imagenet2012 is scored on 'validation' (its test labels are not public); others on 'test'."""
    return "validation" if templates_lib.base_dataset_name(dataset) == "imagenet2012" else "test"


def class_names_file(spec: str, dataset: str) -> str | None:
    """``eval.zeroshot.class_names`` for one dataset: '' -> None; 'FILE' -> FILE;
    'ds1=F1;ds2=F2' -> the file for this dataset (or None)."""
    spec = (spec or "").strip()
    if not spec:
        return None
    if "=" not in spec:
        return spec
    for part in spec.split(";"):
        key, _, path = part.partition("=")
        if key.strip() in (dataset, templates_lib.base_dataset_name(dataset)):
            return path.strip()
    return None

"""Checks of the evaluation tasks that run before anything compiles.

A task whose dataset or split is not prepared, or whose class-name or template file is missing,
would otherwise fail at the first evaluation, after training. `check_tasks` reads only small
files (dataset metadata, name and template lists) and raises one `TaskError` naming the task.
"""

from __future__ import annotations

import ml_collections

from clip_jax.data import catalog, info, prepare
from clip_jax.errors import UserError
from clip_jax.eval import classnames, templates
from clip_jax.eval.evaluators import build_evaluators
from clip_jax.eval.tasks import class_names_file

CLASSIFIERS = ("zeroshot", "tip_adapter")  # the kinds that build a zero-shot classifier


class TaskError(UserError):
    """An evaluation task that cannot run: names the task and the fix."""


def check_tasks(
    eval_config: ml_collections.ConfigDict, data_dir: str, tasks: str | None = None
) -> None:
    """Raises TaskError unless every task of ``tasks`` (default ``eval_config.tasks``) can run.

    The demo dataset is exempt from the prepared check when it is missing: training builds it.
    """
    try:
        evaluators = build_evaluators(eval_config, tasks)
    except ValueError as e:
        raise TaskError(f"eval.tasks: {e}") from e
    for ev in evaluators:
        splits = sorted({ev.split, ev.cfg.get("train_split", ev.split)})
        if ev.dataset == catalog.DEMO_NAME and catalog.prepared_dir(ev.dataset, data_dir) is None:
            continue
        try:
            prepare.ensure_prepared(ev.dataset, data_dir, splits=splits)
            if ev.kind in CLASSIFIERS:
                names = info.dataset_info(ev.dataset, data_dir)["class_names"]
                names_file = class_names_file(ev.zeroshot_cfg.class_names, ev.dataset)
                classnames.class_names_for(ev.dataset, names, names_file)
                spec = ev.zeroshot_cfg.templates or templates.default_template_set(ev.dataset)
                templates.load_templates(spec)
        except (ValueError, OSError) as e:
            raise TaskError(f"eval task {ev.spec.kind}:{ev.dataset}@{ev.split}: {e}") from e

"""Evaluates a training checkpoint with the evaluators of ``clip_jax.eval``.

    python -m clip_jax.evaluate --config=experiments/vit_b32.py --workdir=DIR [--step=N] \
        [--tasks=zeroshot:imagenet2012,retrieval:coco_captions]

Without ``--config`` the run's own ``DIR/config.json`` is used; without ``--step`` the latest
checkpoint. ``--tasks`` replaces ``eval.tasks``, ``--class_names`` ``eval.zeroshot.class_names``.
Results go to ``DIR/eval/STEP/TASK.json``, to TensorBoard (``DIR/tensorboard``, as
``TASK/metric`` scalars at STEP) and to the console as a table (absl's INFO logs only with
``--verbosity=0``). ``evaluate_checkpoint(config, workdir, step, tasks)`` is the same,
callable from Python.

``--workdir`` may also be a converted pretrained directory (``python -m clip_jax.convert``;
recognised by its ``config.json``): its model is evaluated as step 0 with the tokenizer it
names, the eval settings of ``--config`` (default: the defaults of ``clip_jax.config``), and
results in ``DIR/eval/0/``::

    python -m clip_jax.evaluate --workdir=/ckpt/b32 --tasks=zeroshot:imagenet2012
"""

from __future__ import annotations

import json

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from clip_jax import cli, pretrained, sharding, storage
from clip_jax import config as config_lib
from clip_jax import step as step_lib
from clip_jax import train as train_lib
from clip_jax.checkpoint import Checkpointer
from clip_jax.errors import UserError
from clip_jax.eval import runner
from clip_jax.eval.evaluators import build_evaluators
from clip_jax.eval.results import flat_metrics
from clip_jax.metric_writers import MetricWriter


class EvaluationError(UserError):
    """Bad input to the evaluation command: names the value and what is expected."""


def checkpoint_step(available: list[int], step: int | None, directory: str) -> int:
    """The step to evaluate: ``step`` if it was saved, else the latest; clear errors otherwise."""
    if not available:
        raise EvaluationError(
            f"no checkpoints in {directory}; train first or pass the right --workdir"
        )
    if step is None:
        return max(available)
    if step not in available:
        raise EvaluationError(
            f"--step={step}: no checkpoint for step {step} in {directory}; available steps: "
            f"{', '.join(map(str, sorted(available)))}"
        )
    return int(step)


def load_config(
    workdir: str, config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    if config is not None:
        return config
    if pretrained.is_pretrained_dir(workdir):  # no run config: the default eval settings
        return config_lib.defaults()
    path = storage.join(workdir, "config.json")
    if not storage.is_file(path):
        raise EvaluationError(f"no --config given and {path} does not exist; pass --config=FILE")
    return config_lib.from_dict(json.loads(storage.read_text(path)))


def _evaluate_pretrained(
    config: ml_collections.ConfigDict, directory: str, tasks: str | None
) -> list[dict]:
    """A converted model (step 0), with its own tokenizer, replicated on every device."""
    model, variables, tokenizer, _ = pretrained.load_model(directory)
    if tokenizer is None:
        raise EvaluationError(f"{directory}/config.json names no tokenizer to evaluate with")
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.model)
    variables = dict(jax.device_put(variables, sharding.replicated(mesh)))
    params = variables.pop("params")
    return runner.evaluate_state(
        config.eval,
        model,
        params,
        variables,
        tokenizer,
        mesh,
        0,
        data_dir=config_lib.eval_data_dir(config),
        workdir=directory,
        tasks=tasks,
    )


def evaluate_checkpoint(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    step: int | None = None,
    tasks: str | None = None,
    class_names: str | None = None,
) -> list[dict]:
    """Restores ``workdir``'s checkpoint at ``step`` (latest if None) and runs the evaluators;
    ``class_names`` replaces ``eval.zeroshot.class_names``."""
    config = load_config(workdir, config)
    if class_names is not None:
        config.eval.zeroshot.class_names = class_names
    # The cheap checks come first: `setup` below loads (for the demo: trains) the tokenizer.
    config_lib.validate(config, jax.device_count(), jax.process_count())
    if not build_evaluators(config.eval, tasks):
        raise EvaluationError(
            "no evaluation tasks: set eval.tasks in the config or pass --tasks=KIND:DATASET,..."
        )
    if pretrained.is_pretrained_dir(workdir):
        return _evaluate_pretrained(config, workdir, tasks)
    storage.require(workdir, "checkpoints", "--workdir")
    ckpt_dir = storage.join(workdir, "checkpoints")
    if not storage.is_dir(ckpt_dir):
        raise EvaluationError(
            f"no checkpoints in {ckpt_dir} (directory missing); pass the run's --workdir"
        )
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        step = checkpoint_step(ckpt.all_steps(), step, ckpt_dir)
        run = train_lib.setup(config, workdir, eval_tasks=tasks)
        abstract = step_lib.abstract_train_state(run.model, run.tx, run.mesh, config.mesh.rules)
        state, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    results = runner.evaluate_state(
        config.eval,
        run.model,
        state.params,
        state.model_state,
        run.tokenizer,
        run.mesh,
        step,
        data_dir=config_lib.eval_data_dir(config),
        workdir=workdir,
        tasks=tasks,
    )
    writer = MetricWriter(workdir, config.total_steps)
    try:
        writer.write(step, flat_metrics(results), console=False)
    finally:
        writer.close()
    return results


def main(argv=None) -> int:
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config file[:variant] (default: DIR/config.json).",
        lock_config=False,
    )
    flags.DEFINE_string(
        "workdir", None, "The training run's directory (checkpoints/, eval/ go here)."
    )
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_string(
        "tasks", None, "Comma-separated KIND:DATASET[@SPLIT] (default: eval.tasks)."
    )
    flags.mark_flags_as_required(["workdir"])

    flags.DEFINE_string(
        "class_names",
        None,
        "Class-name file (one name a line), or DATASET=FILE;DATASET=FILE "
        "(default: eval.zeroshot.class_names).",
    )

    def run():
        f = flags.FLAGS
        try:
            evaluate_checkpoint(f.config, f.workdir, f.step, f.tasks, f.class_names)
        except ValueError as e:  # the evaluators' checks of tasks, class names and templates
            if isinstance(e, UserError):
                raise
            raise EvaluationError(str(e)) from e

    cli.run_absl(run, argv, check_argv=config_lib.check_command_line)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    main()

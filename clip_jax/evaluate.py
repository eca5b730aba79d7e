"""Evaluates a training checkpoint with the evaluators of ``clip_jax.eval``.

    python -m clip_jax.evaluate --config=experiments/vit_b32.py --workdir=DIR [--step=N] \
        [--tasks=zeroshot:imagenet2012,retrieval:coco_captions]

Without ``--config`` the run's own ``DIR/config.json`` is used; without ``--step`` the latest
checkpoint. ``--tasks`` replaces ``eval.tasks``. Results go to ``DIR/eval/STEP/TASK.json``, to
TensorBoard (``DIR/tensorboard``, as ``TASK/metric`` scalars at STEP) and to the console as a
table. ``evaluate_checkpoint(config, workdir, step, tasks)`` is the same, callable from Python.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from clip_jax import config as config_lib
from clip_jax import step as step_lib
from clip_jax import train as train_lib
from clip_jax.checkpoint import Checkpointer
from clip_jax.data import paths
from clip_jax.eval import runner
from clip_jax.eval.evaluators import build_evaluators
from clip_jax.eval.results import flat_metrics
from clip_jax.metric_writers import MetricWriter


class EvaluationError(ValueError):
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
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise EvaluationError(f"no --config given and {path} does not exist; pass --config=FILE")
    with open(path) as f:
        return config_lib.from_dict(json.load(f))


def evaluate_checkpoint(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    step: int | None = None,
    tasks: str | None = None,
) -> list[dict]:
    """Restores ``workdir``'s checkpoint at ``step`` (latest if None) and runs the evaluators."""
    config = load_config(workdir, config)
    # The cheap checks come first: `setup` below loads (for the demo: trains) the tokenizer.
    config_lib.validate(config, jax.device_count(), jax.process_count())
    if not build_evaluators(config.eval, tasks):
        raise EvaluationError(
            "no evaluation tasks: set eval.tasks in the config or pass --tasks=KIND:DATASET,..."
        )
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise EvaluationError(
            f"no checkpoints in {ckpt_dir} (directory missing); pass the run's --workdir"
        )
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        step = checkpoint_step(ckpt.all_steps(), step, ckpt_dir)
        run = train_lib.setup(config, workdir)
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
        data_dir=paths.resolve_data_dir(config.eval.data_dir or config.data.data_dir),
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

    def run(_):
        f = flags.FLAGS
        try:
            evaluate_checkpoint(f.config, f.workdir, f.step, f.tasks)
        except (ValueError, FileNotFoundError) as e:  # ConfigError, EvaluationError: ValueErrors
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    main()

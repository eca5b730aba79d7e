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

from clip_jax.eval import evaluators as ev


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
    from clip_jax import config as config_lib  # noqa: PLC0415

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
    from clip_jax import config as config_lib  # noqa: PLC0415
    from clip_jax import optim, sharding  # noqa: PLC0415
    from clip_jax import step as step_lib  # noqa: PLC0415
    from clip_jax.checkpoint import Checkpointer  # noqa: PLC0415
    from clip_jax.metric_writers import MetricWriter  # noqa: PLC0415

    config = load_config(workdir, config)
    config_lib.validate(config, jax.device_count(), jax.process_count())
    if not ev.build_evaluators(config.eval, tasks):
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
        from clip_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415

        tokenizer = load_tokenizer(
            config.tokenizer.path,
            dataset=config.data.name,
            data_dir=config_lib.resolve_data_dir(config),
            context_length=config.tokenizer.context_length,
            lowercase=config.tokenizer.lowercase,
        )
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.model)
        model = step_lib.build_model(config, tokenizer.vocab_size, tokenizer.eot_id)
        tx = optim.make_optimizer(config.optim, config.total_steps)
        abstract = step_lib.abstract_train_state(model, tx, mesh, config.seed)
        state, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    results = ev.evaluate_state(
        config, model, state.params, state.model_state, tokenizer, mesh, step, workdir, tasks
    )
    writer = MetricWriter(workdir, config.total_steps)
    try:
        writer.write(step, ev.flat_metrics(results), console=False)
    finally:
        writer.close()
    return results


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

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
        except (
            ValueError,
            FileNotFoundError,
        ) as e:  # ConfigError and EvaluationError are ValueErrors
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    main()

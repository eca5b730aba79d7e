"""Runs evaluators on one model state: the one path of the training loop and the command.

The training loop (every ``eval.every_steps`` and at the last step) and
``python -m clip_jax.evaluate`` both call ``evaluate_state``, so they give the same numbers
for the same checkpoint. Every process computes every result; only process 0 writes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import ml_collections

from clip_jax.eval.evaluators import Evaluator, build_evaluators
from clip_jax.eval.features import Encoders, EvalContext
from clip_jax.eval.results import format_table, write_results


def evaluate(
    evaluators: Sequence[Evaluator],
    ctx: EvalContext,
    step: int,
    workdir: str | None = None,
    *,
    print_table: bool = True,
) -> list[dict]:
    """Runs the evaluators, writes their JSON files, prints the table; returns the results."""
    results = []
    for ev in evaluators:
        t0 = time.time()
        result = ev.run(ctx, step)
        result["time_s"] = round(time.time() - t0, 3)
        if workdir:
            write_results(workdir, step, ev.name, result)
        results.append(result)
    if print_table and results and jax.process_index() == 0:
        print(f"evaluation at step {step}\n" + format_table(results), flush=True)
    return results


def evaluate_state(
    eval_config: ml_collections.ConfigDict,
    model,
    params,
    model_state,
    tokenizer,
    mesh,
    step: int,
    *,
    data_dir: str,
    workdir: str | None = None,
    tasks: str | None = None,
) -> list[dict]:
    """Runs the evaluators of ``eval_config`` (the config's ``eval`` group), or of ``tasks``,
    on one model state, reading datasets from ``data_dir``."""
    evaluators = build_evaluators(eval_config, tasks)
    if not evaluators:
        return []
    encoders = Encoders.from_model(model, params, model_state, mesh, eval_config.batch_size)
    ctx = EvalContext(encoders, tokenizer, mesh, data_dir, model.config.vision.image_size)
    return evaluate(evaluators, ctx, step, workdir)

"""Evaluation results: ``DIR/eval/STEP/TASK.json``, a console table, flat scalars."""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np

from clip_jax import storage


def write_results(workdir: str, step: int, task: str, result: dict) -> str:
    """Writes ``workdir/eval/STEP/TASK.json`` (process 0 only); returns the path."""
    path = storage.join(workdir, "eval", str(int(step)), f"{task}.json")
    if jax.process_index() == 0:
        text = json.dumps(
            {"step": int(step), **result}, indent=2, sort_keys=True, default=_json_default
        )
        storage.write_text(path, text)  # whole: a reader never sees a half-written file
    return path


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fmt(metric: str, value) -> str:
    if isinstance(value, float) and ("top" in metric or "R@" in metric or "recall" in metric):
        return f"{100 * value:.2f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(results: Sequence[dict]) -> str:
    """A plain-text table: task, dataset, split, examples, metric, value (accuracies in %)."""
    rows = [("task", "dataset", "split", "examples", "metric", "value")]
    for r in results:
        first = True
        for metric, value in r["metrics"].items():
            head = (
                (r["task"], r["dataset"], r["split"], str(r["num_examples"]))
                if first
                else ("", "", "", "")
            )
            rows.append(head + (metric, _fmt(metric, value)))
            first = False
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 5 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def flat_metrics(results: Sequence[dict]) -> dict[str, float]:
    """``{'TASK/metric': value}`` for scalar writers (TensorBoard, metrics.jsonl)."""
    return {
        f"{r['task']}/{k}": float(v)
        for r in results
        for k, v in r["metrics"].items()
        if isinstance(v, (int, float, np.number))
    }

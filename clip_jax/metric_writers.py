"""Where training metrics go: the console, `metrics.jsonl` and TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax
from tensorboardX import SummaryWriter  # TensorBoard files without importing TensorFlow


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int):
        self._active = jax.process_index() == 0
        self._total = total_steps
        self._t0 = time.time()
        self._step0 = None
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], *, console: bool = True) -> None:
        if not self._active:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step":
                self._tb.add_scalar(key, value, step)
        if console:
            print(self._progress_line(step, record), flush=True)

    def _progress_line(self, step: int, record: Mapping[str, float]) -> str:
        if self._step0 is None:
            self._step0, self._t0 = step, time.time()
        done = step - self._step0
        rate = done / max(time.time() - self._t0, 1e-9)
        eta = (self._total - step) / rate if rate > 0 else float("nan")
        shown = " ".join(
            f"{k}={record[k]:.4g}"
            for k in ("loss", "i2t_acc", "t2i_acc", "logit_scale", "lr", "samples_per_s", "mfu")
            if k in record
        )
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--"
        return f"step {step}/{self._total} ({100 * step / self._total:.1f}%) {shown} eta {eta_text}"

    def close(self) -> None:
        if self._active:
            self._jsonl.close()
            self._tb.close()

"""Where training metrics go: the console, `metrics.jsonl` and TensorBoard (process 0 only).

`metrics.jsonl` holds one JSON line per logged step. A resumed run passes `resume_step`:
lines of later steps (written before a crash, and about to be re-run) are dropped first,
so every step appears once.

Objects in a bucket cannot be appended to, so for a gs:// or s3:// workdir both files are
written in a local staging folder, and `metrics.jsonl` (whole) and the new TensorBoard event
files are uploaded once the step named by `flush_after` (a checkpoint's) is logged, and at
`close`. A crash loses only lines after the last checkpoint: the ones a resume re-runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping

import jax
from tensorboardX import SummaryWriter  # TensorBoard files without importing TensorFlow

from clip_jax import storage

METRICS_FILE = "metrics.jsonl"

# The progress line's metrics (every metric goes to metrics.jsonl and TensorBoard).
_CONSOLE_KEYS = (
    "loss",
    "i2t_acc",
    "t2i_acc",
    "logit_scale",
    "lr",
    "samples_per_s",
    "mfu",
    "data_wait",
)


def kept_lines(text: str, resume_step: int | None) -> str:
    """The lines of a metrics.jsonl text up to `resume_step` (all when None); a line cut
    short by a crash is dropped."""
    kept = []
    for line in text.splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if resume_step is None or step <= resume_step:
            kept.append(line + "\n")
    return "".join(kept)


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, resume_step: int | None = None):
        """`resume_step`: the step this run restored (0: none); None keeps every line."""
        self._active = jax.process_index() == 0
        self._total = total_steps
        self._t0 = time.time()
        self._step0 = None
        self._flush_at = None  # upload once a step >= this one is written (bucket workdirs)
        if not self._active:
            return
        self._remote = storage.join(workdir, METRICS_FILE) if storage.is_remote(workdir) else None
        self._workdir = workdir
        local = tempfile.mkdtemp(prefix="clip_jax_metrics_") if self._remote else workdir
        self._local = local
        os.makedirs(local, exist_ok=True)
        path = os.path.join(local, METRICS_FILE)
        source = self._remote or path
        if storage.path(source).exists():
            old = storage.read_text(source)
            kept = kept_lines(old, resume_step)
            if kept != old or self._remote:
                storage.write_text(path, kept)
        self._jsonl = open(path, "a", buffering=1)
        self._tb = SummaryWriter(os.path.join(local, "tensorboard"))

    def flush_after(self, step: int) -> None:
        """Upload (bucket workdirs) once `step` is logged: call it when a checkpoint is saved."""
        self._flush_at = step

    def _flush(self) -> None:
        self._flush_at = None
        if not self._active or not self._remote:
            return
        self._jsonl.flush()
        self._tb.flush()
        storage.upload_tree(self._local, self._workdir)

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
        if self._flush_at is not None and step >= self._flush_at:
            self._flush()

    def _progress_line(self, step: int, record: Mapping[str, float]) -> str:
        if self._step0 is None:
            self._step0, self._t0 = step, time.time()
        done = step - self._step0
        rate = done / max(time.time() - self._t0, 1e-9)
        eta = (self._total - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k}={record[k]:.4g}" for k in _CONSOLE_KEYS if k in record)
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--"
        return f"step {step}/{self._total} ({100 * step / self._total:.1f}%) {shown} eta {eta_text}"

    def close(self) -> None:
        if self._active:
            self._tb.close()
            self._jsonl.close()
            if self._remote:
                storage.upload_tree(self._local, self._workdir)
                shutil.rmtree(self._local, ignore_errors=True)

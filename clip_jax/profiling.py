"""`profile_steps=START,COUNT`: a `jax.profiler` trace of training steps START..START+COUNT-1.

The trace goes to `WORKDIR/tensorboard/plugins/profile/RUN/HOST.xplane.pb`, where
TensorBoard's profile tab (the `tensorboard-plugin-profile` package) finds it. Steps are
numbered as in the metrics (the first step is 1); the first steps of a run include
compilation, so a START past them shows the steady state.
"""

from __future__ import annotations

import os

import jax


def parse_steps(text: str) -> tuple[int, int] | None:
    """'START,COUNT' -> (START, COUNT); '' -> None. ValueError names what is wrong."""
    if not text.strip():
        return None
    parts = text.split(",")
    try:
        start, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError("expected START,COUNT: two integers, e.g. 10,5") from None
    if start < 1 or count < 1:
        raise ValueError("START (the first traced step, from 1) and COUNT must be >= 1")
    return start, count


class StepProfiler:
    """Starts the trace before step START runs and stops it once step START+COUNT-1 is done."""

    def __init__(self, profile_steps: str, workdir: str):
        steps = parse_steps(profile_steps)
        self._first, self._last = (steps[0], sum(steps) - 1) if steps else (0, -1)
        self._log_dir = os.path.join(workdir, "tensorboard")
        self._active = self._started = False

    def before_step(self, step: int) -> None:
        """`step`: the number of the step about to run (a resume may start inside the range)."""
        if not self._started and self._first <= step <= self._last:
            jax.profiler.start_trace(self._log_dir)
            self._active = self._started = True

    def after_step(self, step: int, outputs) -> None:
        """`outputs`: what the step returned; waited for, so the trace holds its device work."""
        if self._active and step >= self._last:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        """Writes the trace (also when the run ends or stops inside the traced steps)."""
        if self._active:
            self._active = False
            jax.profiler.stop_trace()
            if jax.process_index() == 0:
                print(
                    f"profile of steps {self._first}-{self._last} written to "
                    f"{self._log_dir}/plugins/profile",
                    flush=True,
                )

"""Two training processes x 4 simulated CPU devices, started by `launch/local.py`.

The uninterrupted run (the `two_process_run` fixture of conftest) is the reference that the
multi-process tests compare with: one process holding all 8 devices, and runs that lost a
process or were preempted, then resumed.
"""

import importlib.util
import os
import subprocess

from test_train import DEMO, read_metrics

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOTAL_STEPS = 16
CHECKPOINT_EVERY = 4

_spec = importlib.util.spec_from_file_location("local", os.path.join(ROOT, "launch", "local.py"))
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


def start(workdir, data_dir, *overrides, only=None) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a run, stdout and stderr captured as text; `only`: flags for
    one process alone ({index: [flags]})."""
    args = [
        f"--config={DEMO}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.total_steps={TOTAL_STEPS}",
        f"--config.checkpoint.every_steps={CHECKPOINT_EVERY}",
        *overrides,
    ]
    return local.start(
        2, 4, args, only, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )


def finish(procs, timeout=600) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process once all have exited 0."""
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-3000:]}{err[-3000:]}"
    return outputs


def losses(workdir) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_metrics(workdir).items()}

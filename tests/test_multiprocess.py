"""Two training processes joined by `jax.distributed` (gloo over localhost), launched with
`launch/local.py`, train exactly like one process holding all 8 devices: each process reads
only its half of every global batch, and the step all-reduces across processes."""

import os
import subprocess
import sys

import chex
from test_train import DEMO, read_metrics, smoke

from clip_jax import train as train_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_two_processes_train_like_one(demo_data_dir, tmp_path):
    overrides = {"total_steps": 4, "checkpoint.every_steps": 2}
    one = str(tmp_path / "one_process")
    train_lib.train(smoke(DEMO, demo_data_dir, **overrides), one)

    two = str(tmp_path / "two_processes")
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "local.py"),
            "--processes=2",
            "--devices_per_process=4",
            "--",
            f"--config={DEMO}:smoke",
            f"--workdir={two}",
            f"--config.data.data_dir={demo_data_dir}",
            "--config.total_steps=4",
            "--config.checkpoint.every_steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    want, got = read_metrics(one), read_metrics(two)
    assert sorted(got) == [1, 2, 3, 4]
    chex.assert_trees_all_close(
        {s: got[s]["loss"] for s in got}, {s: want[s]["loss"] for s in got}, rtol=1e-5, atol=1e-6
    )
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]

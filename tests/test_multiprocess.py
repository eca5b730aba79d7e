"""Two training processes joined by `jax.distributed` (gloo over localhost), launched with
`launch/local.py`, train exactly like one process holding all 8 devices: each process reads
only its half of every global batch, and the step all-reduces across processes."""

import os

import chex
import pytest
from test_train import DEMO, smoke
from two_processes import CHECKPOINT_EVERY, TOTAL_STEPS, losses

from clip_jax import train as train_lib

# One test process runs these: they share the session's 2-process run (conftest).
pytestmark = pytest.mark.xdist_group("two_process_run")


def test_two_processes_train_like_one(demo_data_dir, two_process_run, tmp_path):
    one = str(tmp_path / "one_process")
    overrides = {"total_steps": TOTAL_STEPS, "checkpoint.every_steps": CHECKPOINT_EVERY}
    train_lib.train(smoke(DEMO, demo_data_dir, **overrides), one)

    want, got = losses(one), losses(two_process_run)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    names = os.listdir(os.path.join(two_process_run, "checkpoints"))
    assert sorted(int(n) for n in names) == [8, 12, 16]  # every 4 steps, the last 3 kept

"""Preemption and crashes, with real signals sent to `python -m clip_jax.train` processes.

The reference is the same config trained without interruption (in this process, on the
same 8 simulated devices); an interrupted and resumed run must reproduce its per-step
losses and its final parameters.
"""

import os
import signal

import chex
import pytest
from one_process import (
    TOTAL_STEPS,
    config,
    final_params,
    logged_steps,
    losses_by_step,
    start_training,
    wait_for,
)

from clip_jax.checkpoint import Checkpointer

# One test process runs these: they share the session's uninterrupted run (conftest).
pytestmark = pytest.mark.xdist_group("uninterrupted_run")


@pytest.fixture(scope="module")
def data_dir(demo_data_dir):
    return demo_data_dir


def finish_and_compare(c, workdir, data_dir, reference, interrupted_at, *overrides):
    done = start_training(workdir, data_dir, *overrides)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    assert f"resumed from step {interrupted_at}" in out
    ref_losses, ref_params = reference
    got = losses_by_step(workdir)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    # Bitwise: same devices, same program, same data order and RNG.
    chex.assert_trees_all_equal(got, {s: ref_losses[s] for s in got})
    chex.assert_trees_all_equal(final_params(c, workdir), ref_params)


def test_sigterm_saves_exits_zero_and_resumes_exactly(data_dir, reference, tmp_path):
    workdir = str(tmp_path)
    proc = start_training(workdir, data_dir, "--config.checkpoint.every_steps=10")
    wait_for(lambda: logged_steps(workdir) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    assert saved is not None and 3 <= saved < TOTAL_STEPS, out
    assert f"saved step {saved}, exiting" in out
    # Resumed with 2 worker processes, which hand their batches over in shared memory: the
    # batches do not depend on the worker count, so the run stays bitwise.
    workers = "--config.data.num_workers=2"
    finish_and_compare(config(data_dir), workdir, data_dir, reference, saved, workers)


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(
    data_dir, reference, tmp_path
):
    workdir = str(tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    # A save at every step, asynchronous: one is almost always being written.
    proc = start_training(
        workdir, data_dir, "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2"
    )

    def saving_after_a_complete_one():
        names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
        return any(n.isdigit() for n in names) and any(".orbax-checkpoint-tmp" in n for n in names)

    wait_for(saving_after_a_complete_one, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    names = os.listdir(ckpt_dir)
    assert any(".orbax-checkpoint-tmp" in n for n in names), f"no save was cut short: {names}"
    complete = max(int(n) for n in names if n.isdigit())
    assert Checkpointer(ckpt_dir).latest_step() == complete
    finish_and_compare(config(data_dir), workdir, data_dir, reference, complete)

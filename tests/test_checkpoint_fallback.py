"""A damaged newest checkpoint never blocks a restart (real `python -m clip_jax.train` runs).

The newest step is damaged in three ways (a truncated array file, a missing array file, a
truncated loader JSON); the restart must say so in one line, move the step to
`checkpoints/corrupt/`, and resume from the step before, reproducing the uninterrupted run's
losses and final parameters bit for bit. When no step restores, it stops with one line.
"""

import asyncio
import gc
import glob
import logging
import os
import shutil
import subprocess

import chex
import pytest
from one_process import final_params, losses_by_step, train_command
from test_train import DEMO, smoke

from clip_jax import train as train_lib
from clip_jax.checkpoint import Checkpointer

TOTAL_STEPS = 6
EVERY = 2  # checkpoints at steps 2, 4 and 6
OVERRIDES = {
    "total_steps": TOTAL_STEPS,
    "checkpoint.every_steps": EVERY,
    "checkpoint.keep": 3,
    "checkpoint.async_save": False,
}


def config(data_dir):
    return smoke(DEMO, data_dir, **OVERRIDES)


@pytest.fixture(scope="module")
def trained(demo_data_dir, tmp_path_factory):
    """A workdir with checkpoints 2, 4, 6, and its per-step losses and final parameters."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    c = config(demo_data_dir)
    train_lib.train(c, workdir)
    return workdir, losses_by_step(workdir), final_params(c, workdir)


def largest_array_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    return max(files, key=os.path.getsize)


def truncate_array_file(step_dir):
    path = largest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def remove_array_file(step_dir):
    os.remove(largest_array_file(step_dir))


def truncate_loader_json(step_dir):
    path = os.path.join(step_dir, "loader", "metadata")
    os.truncate(path, os.path.getsize(path) // 2)


def resume(workdir, data_dir):
    overrides = (f"--config.{key}={value}" for key, value in OVERRIDES.items())
    command = train_command(workdir, data_dir, *overrides)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "damage",
    [truncate_array_file, remove_array_file, truncate_loader_json],
    ids=lambda f: f.__name__,
)
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_resumes_exactly(
    damage, trained, demo_data_dir, tmp_path
):
    source, ref_losses, ref_params = trained
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    os.remove(os.path.join(workdir, "metrics.jsonl"))  # only the resumed steps are logged
    ckpt_dir = os.path.join(workdir, "checkpoints")
    damage(os.path.join(ckpt_dir, str(TOTAL_STEPS)))

    done = resume(workdir, demo_data_dir)

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if f"step {TOTAL_STEPS}" in line]
    assert len(said) == 1 and "does not restore" in said[0] and "moved it to" in said[0], said
    moved = glob.glob(os.path.join(ckpt_dir, "corrupt", f"{TOTAL_STEPS}-*"))
    assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], "state")), moved
    previous = TOTAL_STEPS - EVERY
    assert f"resumed from step {previous}" in done.stdout
    got = losses_by_step(workdir)
    assert sorted(got) == list(range(previous + 1, TOTAL_STEPS + 1))
    chex.assert_trees_all_equal(got, {s: ref_losses[s] for s in got})
    chex.assert_trees_all_equal(final_params(config(demo_data_dir), workdir), ref_params)


def test_no_restorable_checkpoint_is_one_line_and_exit_2(trained, demo_data_dir, tmp_path):
    source, _, _ = trained
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(n for n in os.listdir(ckpt_dir) if n.isdigit())
    assert steps == ["2", "4", "6"]
    for step in steps:
        truncate_loader_json(os.path.join(ckpt_dir, step))

    done = resume(workdir, demo_data_dir)

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint" in errors[0] and "restores" in errors[0], errors
    moved = sorted(name.split("-")[0] for name in os.listdir(os.path.join(ckpt_dir, "corrupt")))
    assert moved == steps and not any(n.isdigit() for n in os.listdir(ckpt_dir))


def _abandoned_task_log(filename: str, caplog) -> str:
    """What asyncio logs for a task that raised in code from `filename` and was then
    collected with its error never retrieved (what a failed restore leaves behind)."""
    namespace = {}
    code = "async def read():\n    raise ValueError('Truncated Zstd-compressed stream')\n"
    exec(compile(code, filename, "exec"), namespace)

    async def abandon():
        asyncio.get_running_loop().create_task(namespace["read"]())
        await asyncio.sleep(0)

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(abandon())
        gc.collect()
    return caplog.text


def test_orbax_read_errors_nobody_retrieved_are_dropped_and_others_are_not(tmp_path, caplog):
    # Installed with every Checkpointer: the garbage collector may log them before or after
    # the failed restore's own error reaches us.
    Checkpointer(str(tmp_path / "checkpoints"))
    orbax = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    assert "never retrieved" not in _abandoned_task_log(orbax, caplog)
    ours = os.path.join(os.sep, "site-packages", "somewhere", "else.py")
    assert "Task exception was never retrieved" in _abandoned_task_log(ours, caplog)

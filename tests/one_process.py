"""One `python -m clip_jax.train` run of the demo's smoke variant: the config, a process
to signal, and what to read back (per-step losses, final parameters).

The uninterrupted run of this config (conftest's `reference` fixture, in the test process,
on the same 8 simulated devices) is what the interrupted and resumed runs must reproduce.
"""

import json
import os
import subprocess
import sys
import time

import jax
from test_train import DEMO, read_metrics, smoke

from clip_jax import step as step_lib
from clip_jax import train as train_lib
from clip_jax.checkpoint import Checkpointer

TOTAL_STEPS = 24


def config(data_dir):
    return smoke(DEMO, data_dir, total_steps=TOTAL_STEPS)


def losses_by_step(workdir) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_metrics(workdir).items()}


def final_params(c, workdir):
    run = train_lib.setup(c, workdir)
    abstract = step_lib.abstract_train_state(run.model, run.tx, run.mesh, c.mesh.rules)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == c.total_steps
    state, _ = ckpt.restore(c.total_steps, abstract)
    ckpt.close()
    return jax.device_get(state.params)


def train_command(workdir, data_dir, *overrides) -> list[str]:
    """`python -m clip_jax.train` on the demo's smoke variant; it inherits XLA_FLAGS from
    conftest: the same 8 simulated devices as the in-process reference."""
    return [
        sys.executable,
        "-m",
        "clip_jax.train",
        f"--config={DEMO}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *overrides,
    ]


def start_training(workdir, data_dir, *overrides) -> subprocess.Popen:
    command = train_command(workdir, data_dir, f"--config.total_steps={TOTAL_STEPS}", *overrides)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited early ({proc.returncode}):\n{proc.stdout.read()}"
            )
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.005)


def logged_steps(workdir) -> int:
    try:
        return len(losses_by_step(workdir))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0

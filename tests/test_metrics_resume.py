"""metrics.jsonl after a crash and a resume: each step once.

A run SIGKILLed after its last checkpoint has logged steps that the resume runs again; the
resumed run drops those lines first, so the file never holds a step twice.
"""

import json
import os
import re

from one_process import TOTAL_STEPS, logged_steps, start_training, wait_for


def steps_in_file(workdir) -> list[int]:
    """The step of every training line of metrics.jsonl, repeats included, in file order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows if "loss" in r]


def test_sigkill_after_a_checkpoint_then_resume_logs_each_step_once(demo_data_dir, tmp_path):
    data_dir = demo_data_dir
    workdir = str(tmp_path)
    every = "--config.checkpoint.every_steps=10"
    proc = start_training(workdir, data_dir, every)
    first = os.path.join(workdir, "checkpoints", "10")
    wait_for(lambda: os.path.isdir(first) and logged_steps(workdir) >= 13, proc)
    proc.kill()
    proc.communicate(timeout=60)
    before = steps_in_file(workdir)
    assert max(before) >= 13  # lines past the checkpoint: the resume runs those steps again

    done = start_training(workdir, data_dir, every)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    resumed = int(re.search(r"resumed from step (\d+)", out).group(1))
    assert resumed < max(before), out
    assert steps_in_file(workdir) == list(range(1, TOTAL_STEPS + 1))

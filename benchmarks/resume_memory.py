"""Peak host memory (RSS) of a resume: train one step, then resume to step 2.

    python benchmarks/resume_memory.py [--model=ViT-B/16] [--data_dir=DIR] [--workdir=DIR]

A resume restores the checkpoint into the abstract train state without allocating a fresh
one, so its peak is one train state (plus the compiled step), not two. Runs the real command
line twice as subprocesses and reads `Maximum resident set size` from `/usr/bin/time -v`.
Use a small demo dataset for speed (the final step also computes the validation loss):

    python -c "from clip_jax.data.prepare import prepare_demo; \
        prepare_demo('/tmp/demo_small', num_train=512, num_validation=16, num_test=16)"
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile

_p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_p.add_argument("--model", default="ViT-B/16")
_p.add_argument("--data_dir", default="/tmp/demo_small")
_p.add_argument("--workdir", default="")
ARGS = _p.parse_args()


def train(workdir: str, total_steps: int, timed: bool) -> str:
    command = [
        sys.executable,
        "-m",
        "clip_jax.train",
        "--config=experiments/demo.py",
        f"--config.model.name={ARGS.model}",
        "--config.batch_size=8",
        "--config.eval.every_steps=0",
        "--config.eval.tasks=",
        "--config.eval.batch_size=8",
        f"--config.data.data_dir={ARGS.data_dir}",
        "--config.checkpoint.async_save=False",
        "--config.optim.warmup_steps=1",
        f"--config.total_steps={total_steps}",
        f"--workdir={workdir}",
    ]
    if timed:
        command = ["/usr/bin/time", "-v", *command]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def main():
    workdir = ARGS.workdir or tempfile.mkdtemp(prefix="resume_memory_")
    try:
        train(workdir, 1, timed=False)
        out = train(workdir, 2, timed=True)
    finally:
        if not ARGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1))
    resumed = re.search(r"resumed from step \d+", out)
    print(
        f"{ARGS.model}: {resumed.group(0) if resumed else 'did not resume'}; "
        f"peak RSS of the resume {rss_kib:,} KiB ({rss_kib / 2**20:.2f} GiB)"
    )


if __name__ == "__main__":
    main()

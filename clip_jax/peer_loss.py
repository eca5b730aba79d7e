"""One line, instead of JAX's fatal dump, when another process of a multi-process run dies.

JAX's coordination service notices a process that stopped heartbeating (SIGKILL, a lost
machine) within `jax.distributed`'s heartbeat timeout and ends every other process with a C++
LOG(FATAL): a page of status text and stack frames, exit status 134 (SIGABRT). That is what
bounds the wait: it fires on the client's own thread, whatever the main thread waits in (a
gloo or NCCL collective, a barrier), and a coordinator that dies ends the others at once.
No Python runs then, and jax offers no hook: the client's `missed_heartbeat_callback` cannot
take a Python function in jaxlib 0.10 (its absl::Status argument has no Python conversion;
the process dies of std::bad_cast).

So a multi-process training sends its stderr through a small process of its own
(`start_filter`, running this module). It passes every line on until the dump begins, then
writes one line in its place, which names the lost process and the step a relaunch resumes
from, and drops the rest:

    error: process 1 of 2 stopped responding; the run stops here on process 0. Relaunch all
    processes to resume from the last complete checkpoint (step 8 in /runs/a/checkpoints)

This module imports nothing heavy at the top: the filter starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import BinaryIO

# The first words of the LOG(FATAL) that jax's distributed client writes (xla client.h), and
# the line after its status text.
FATAL_MARKER = b"Terminating process because the JAX distributed service detected fatal errors"
END_OF_STATUS = b"*** Check failure stack trace"

_filter: subprocess.Popen | None = None  # held so that it is never collected while running


def lost_process(status: str, num_processes: int) -> str:
    """Which process the coordination service's status text names as gone."""
    listed = re.search(r"stopped sending heartbeats\):\s*([\d,\s]+)", status)
    tasks = re.findall(r"\d+", listed.group(1)) if listed else []
    tasks = tasks or re.findall(r"Task (\d+) heartbeat timeout", status)
    if tasks:
        plural = "es" if len(tasks) > 1 else ""
        return f"process{plural} {', '.join(tasks)} of {num_processes}"
    if "leader task" in status:  # this process lost the coordination service
        return f"process 0 of {num_processes} (the coordinator)"
    return f"another of the {num_processes} processes"


def message(status: str, num_processes: int, process_id: int, resume_from: str) -> str:
    return (
        f"error: {lost_process(status, num_processes)} stopped responding; the run stops here "
        f"on process {process_id}. Relaunch all processes to resume from {resume_from}"
    )


def relay(lines: Iterable[bytes], out: BinaryIO, describe: Callable[[str], str]) -> bool:
    """Copies `lines` to `out` until the fatal dump begins; then writes `describe(its status
    text)` as one line and drops the rest. True if the dump came."""
    lines = iter(lines)
    status: list[bytes] | None = None
    for line in lines:
        if status is None:
            if FATAL_MARKER not in line:
                out.write(line)
                out.flush()
                continue
            status = [line]
        elif END_OF_STATUS in line:
            break
        else:
            status.append(line)
    if status is None:
        return False
    out.write(describe(b"".join(status).decode(errors="replace")).encode() + b"\n")
    out.flush()
    for _ in lines:  # the stack frames, until the process is gone
        pass
    return True


def last_complete_checkpoint(checkpoint_dir: str) -> str:
    """'the last complete checkpoint (step N in DIR)', as a resume will find it."""
    from absl import logging  # noqa: PLC0415 (with orbax: loaded only after a failure)

    from clip_jax.checkpoint import latest_step  # noqa: PLC0415 (orbax, only after a failure)

    logging.set_verbosity(logging.ERROR)  # orbax warns when a manager is read-only
    try:
        step = latest_step(checkpoint_dir)
    except Exception as e:  # the report must come out whatever the storage says
        listing = f"{type(e).__name__} listing it"
        return f"the last complete checkpoint in {checkpoint_dir} ({listing})"
    if step is None:
        return f"the start (no complete checkpoint in {checkpoint_dir} yet)"
    return f"the last complete checkpoint (step {step} in {checkpoint_dir})"


def start_filter(num_processes: int, process_id: int, checkpoint_dir: str) -> None:
    """Routes this process's stderr (file descriptor 2, so C++ writes too) through the filter."""
    global _filter
    read_end, write_end = os.pipe()
    _filter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            __name__,
            f"--num_processes={num_processes}",
            f"--process_id={process_id}",
            f"--checkpoint_dir={checkpoint_dir}",
        ],
        stdin=read_end,
        stdout=sys.stderr.fileno(),
    )
    os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, sys.stderr.fileno())
    os.close(write_end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--checkpoint_dir", required=True)
    args = parser.parse_args()
    # A signal to the whole process group (Ctrl-C, a scheduler) is the training's to handle;
    # the filter ends when the training closes its stderr.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)

    def describe(status: str) -> str:
        resume_from = last_complete_checkpoint(args.checkpoint_dir)
        return message(status, args.num_processes, args.process_id, resume_from)

    relay(sys.stdin.buffer, sys.stdout.buffer, describe)
    return 0


if __name__ == "__main__":
    sys.exit(main())

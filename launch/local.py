"""Runs N training processes on this machine, each with its own simulated devices.

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        --config=experiments/demo.py --workdir=/tmp/run

Useful to exercise the multi-host code paths (per-host data shards, process-0 logging,
cross-host checkpoints) without a cluster. Exits with the first non-zero exit status.
"""

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(
    processes: int,
    devices_per_process: int,
    train_args: list[str],
    only: dict[int, list[str]] | None = None,
    **popen_args,
) -> list[subprocess.Popen]:
    """Starts the processes of one run. `only` maps a process index to flags that process
    alone gets (after the shared ones); `popen_args` go to each `subprocess.Popen`."""
    only = only or {}
    coordinator = f"localhost:{free_port()}"
    # Appended: the last device count wins, other XLA flags of the caller are kept.
    xla_flags = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={devices_per_process}"
    ).strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clip_jax.train",
                *train_args,
                f"--coordinator={coordinator}",
                f"--num_processes={processes}",
                f"--process_id={i}",
                *only.get(i, []),
            ],
            env=env,
            **popen_args,
        )
        for i in range(processes)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    procs = start(args.processes, args.devices_per_process, train_args)
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())

"""Trains on a Cloud TPU pod slice until the run finishes, through preemptions.

    python launch/tpu_pod.py --name=clip-v4-64 --zone=us-central2-b --accelerator=v4-64 \
        --runtime=tpu-ubuntu2204-base --spot \
        --config=experiments/vit_b32.py --workdir=gs://BUCKET/runs/vit_b32 \
        -- --config.batch_size=32768

Each attempt:
1. create the slice as a queued resource (--spot, --reserved, or on demand), or reuse the
   one of that name, and wait until it is ACTIVE;
2. ship the code of --ref (default HEAD) to every worker (`git archive`, so only committed
   code travels) and install it there with `jax[tpu]`;
3. run `python3 -m clip_jax.train --multihost --config=... --workdir=...` on all workers at
   once, through launch/interruptible.sh: a worker whose trainer was stopped by SIGTERM
   reports it rather than exit 0.
When the slice leaves ACTIVE (a spot preemption), the launcher deletes it, creates it again
and starts over: training resumes from the last checkpoint in the workdir. The run has
finished when the command exits 0 on every worker and the slice is still ACTIVE; a slice
this launcher created is then deleted. A failure on a healthy slice is retried
--max_failures times. --dry_run prints the commands of one attempt and runs none.

Environment (on this machine): the standard library, git, and gcloud authenticated
(`gcloud auth login`) with a project (`gcloud config set project P`, or --project), the TPU
API enabled and quota for the slice; for the commands that reach all workers, the key in
ssh-agent (`ssh-add ~/.ssh/google_compute_engine`). On the workers: a TPU VM runtime with
python3 and pip, and a service account that can write the workdir and read the data (gs://:
a pod's workers share no disk).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "clip_jax.tar.gz"  # in each worker's home
CODE_DIR = "clip_jax"  # ditto
# Queued-resource states: waiting for capacity or being set up; serving; gone or going.
PENDING = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "DELETING"}
ACTIVE = "ACTIVE"
QUEUED_RESOURCES = ["gcloud", "compute", "tpus", "queued-resources"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


class LaunchError(Exception):
    """A mistake in the arguments, or a step that cannot go on: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise LaunchError(message)


@dataclass(frozen=True)
class Slice:
    """The gcloud commands of one named slice (a queued resource and its one node)."""

    name: str
    zone: str
    accelerator: str
    runtime: str
    provisioning: str  # "spot", "reserved" or "" (on demand)
    project: str = ""

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def _queued(self, verb: str) -> list[str]:
        return [*QUEUED_RESOURCES, verb, self.name, *self._where()]

    def describe(self) -> list[str]:
        return [*self._queued("describe"), "--format=value(state.state)"]

    def create(self) -> list[str]:
        return [
            *self._queued("create"),
            f"--node-id={self.name}",
            f"--accelerator-type={self.accelerator}",
            f"--runtime-version={self.runtime}",
            *([f"--{self.provisioning}"] if self.provisioning else []),
        ]

    def delete(self) -> list[str]:
        # --force: delete the node too; --quiet: no prompt.
        return [*self._queued("delete"), "--force", "--quiet"]

    def copy_to_workers(self, local: str, remote: str) -> list[str]:
        # The remote path is relative to the worker's home.
        return [*TPU_VM, "scp", local, f"{self.name}:{remote}", "--worker=all", *self._where()]

    def run_on_workers(self, script: str) -> list[str]:
        command = f"--command=bash -c {shlex.quote(script)}"
        return [*TPU_VM, "ssh", self.name, "--worker=all", *self._where(), command]


def install_script() -> str:
    return (
        f"rm -rf ~/{CODE_DIR} && mkdir -p ~/{CODE_DIR} && tar -xzf ~/{ARCHIVE} -C ~/{CODE_DIR}"
        f' && cd ~/{CODE_DIR} && python3 -m pip install -q -e . "jax[tpu]"'
    )


def train_script(config: str, workdir: str, overrides: list[str]) -> str:
    train = ["python3", "-m", "clip_jax.train", "--multihost", f"--config={config}"]
    train += [f"--workdir={workdir}", *overrides]
    return (
        f"cd ~/{CODE_DIR} && source launch/interruptible.sh && "
        f"run_interruptible {shlex.join(train)}"
    )


class Runner:
    """Runs commands, echoing each (with dry_run, only echoes them); reads a slice's state."""

    def __init__(self, dry_run: bool, poll_s: float):
        self.dry_run, self.poll_s = dry_run, poll_s

    def run(self, argv: list[str]) -> int:
        print("+ " + shlex.join(argv), flush=True)
        return 0 if self.dry_run else subprocess.run(argv).returncode

    def state(self, slice_: Slice, tries: int = 3) -> str | None:
        """The queued resource's state; None when there is none of that name. Retried: one
        failed API call must not end a run of days."""
        for attempt in range(tries):
            out = subprocess.run(slice_.describe(), capture_output=True, text=True)
            if out.returncode == 0:
                return out.stdout.strip()
            if "NOT_FOUND" in out.stderr:
                return None
            if attempt + 1 < tries:
                time.sleep(self.poll_s)
        lines = [line for line in out.stderr.splitlines() if line.strip()] or ["no message"]
        raise LaunchError(f"cannot read the state of TPU {slice_.name}: {lines[-1].strip()}")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)


def check_code(ref: str, config: str) -> str:
    """The commit that --ref names, after checking that it holds the config file."""
    commit = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").stdout.strip()
    if not commit:
        raise LaunchError(f"--ref={ref} is not a commit of {REPO}")
    path = config.split(":", 1)[0]
    if _git("cat-file", "-e", f"{commit}:{path}").returncode:
        raise LaunchError(
            f"config file {path} is not in {ref} ({commit[:12]}), the code the workers get: "
            "commit it, or pass a path relative to the repository root"
        )
    if _git("status", "--porcelain", "--untracked-files=no").stdout.strip():
        print(f"note: uncommitted changes are not shipped; the workers get {commit[:12]}")
    return commit


class Launcher:
    def __init__(self, args: argparse.Namespace, runner: Runner):
        self.args, self.runner = args, runner
        self.slice = Slice(
            args.name,
            args.zone,
            args.accelerator,
            args.runtime,
            "spot" if args.spot else "reserved" if args.reserved else "",
            args.project,
        )
        self.created = False

    def _delete(self) -> None:
        if self.runner.run(self.slice.delete()):
            raise LaunchError(f"could not delete TPU {self.slice.name}; see gcloud's message")

    def ensure_active(self) -> None:
        """Creates (or re-creates) the slice as needed and waits until it is ACTIVE."""
        deadline = time.monotonic() + self.args.max_wait_s
        reported = None
        while (state := self.runner.state(self.slice)) != ACTIVE:
            if state is None:
                if self.runner.run(self.slice.create()):
                    raise LaunchError(
                        f"could not create TPU {self.slice.name}; see gcloud's message"
                    )
                self.created = True
            elif state == "FAILED":
                raise LaunchError(
                    f"the queued resource {self.slice.name} FAILED (quota, capacity or the "
                    f"request): see `{shlex.join(self.slice.describe()[:-1])}`, then delete it"
                )
            elif state not in PENDING:  # SUSPENDED or SUSPENDING after a preemption
                print(f"TPU {self.slice.name} is {state}: deleting it to create it again")
                self._delete()
            elif state != reported:
                print(f"TPU {self.slice.name} is {state}; waiting for ACTIVE", flush=True)
                reported = state
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"TPU {self.slice.name} not ACTIVE after {self.args.max_wait_s} s "
                    f"(last state {state}); raise --max_wait_s or try another zone"
                )
            time.sleep(self.runner.poll_s)

    def ship(self, commit: str) -> int:
        """Copies the commit to every worker and installs it; the exit status."""
        with tempfile.TemporaryDirectory() as tmp:
            archive = os.path.join(tmp, ARCHIVE)
            git = ["git", "-C", REPO, "archive", "--format=tar.gz", "-o", archive, commit]
            if self.runner.run(git):
                raise LaunchError(f"git archive of {commit[:12]} failed")
            status = self.runner.run(self.slice.copy_to_workers(archive, ARCHIVE))
        return status or self.runner.run(self.slice.run_on_workers(install_script()))

    def train(self) -> int:
        a = self.args
        return self.runner.run(
            self.slice.run_on_workers(train_script(a.config, a.workdir, a.overrides))
        )

    def dry_run(self, commit: str) -> int:
        """The commands of one attempt, in order; nothing runs."""
        for argv in (self.slice.describe(), self.slice.create()):
            self.runner.run(argv)
        self.ship(commit)
        self.train()
        print("# on preemption, then again from the create command:")
        self.runner.run(self.slice.delete())
        return 0

    def run(self, commit: str) -> int:
        preemptions = failures = 0
        shipped = False
        while True:
            self.ensure_active()
            status = 0 if shipped else self.ship(commit)
            shipped = status == 0
            if shipped:
                status = self.train()
            state = self.runner.state(self.slice)
            if status and state == ACTIVE:
                time.sleep(self.runner.poll_s)  # a preempted slice takes a moment to leave ACTIVE
                state = self.runner.state(self.slice)
            if state != ACTIVE:
                preemptions += 1
                if preemptions > self.args.max_preemptions:
                    raise LaunchError(
                        f"TPU {self.slice.name} was preempted {preemptions} times; "
                        "raise --max_preemptions to go on"
                    )
                print(
                    f"TPU {self.slice.name} is {state or 'gone'} (preemption {preemptions}): "
                    "creating it again; training resumes from its last checkpoint",
                    flush=True,
                )
                if state is not None:
                    self._delete()
                shipped = False
                continue
            if status == 0:
                print(f"training finished in {self.args.workdir}", flush=True)
                if self.created:
                    self._delete()
                return 0
            failures += 1
            if failures > self.args.max_failures:
                print(
                    f"error: training failed {failures} times on a healthy TPU "
                    f"{self.slice.name} (last exit status {status}); see the output above",
                    file=sys.stderr,
                )
                return 1
            print(
                f"training exited with status {status} on a healthy TPU (failure {failures} of "
                f"{self.args.max_failures} allowed): starting it again",
                flush=True,
            )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="queued resource and TPU name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator", required=True, help="e.g. v4-64, v5litepod-256")
    p.add_argument("--runtime", required=True, help="TPU VM runtime version")
    p.add_argument("--project", default="", help="default: gcloud's configured project")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    model.add_argument("--reserved", action="store_true", help="the project's reservation")
    p.add_argument("--config", required=True, help="config file[:variant], repository-relative")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH, shared by all workers")
    p.add_argument("--ref", default="HEAD", help="the git commit to ship to the workers")
    p.add_argument("--max_preemptions", type=int, default=100)
    p.add_argument("--max_failures", type=int, default=3, help="on a healthy slice")
    p.add_argument("--max_wait_s", type=float, default=24 * 3600, help="for ACTIVE, each time")
    p.add_argument("--poll_s", type=float, default=30, help="between state checks")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run none")
    p.add_argument("overrides", nargs="*", help="after --: trainer flags (--config.k=v)")
    args = p.parse_args(argv)
    if not args.workdir.startswith("gs://"):
        raise LaunchError(
            f"--workdir={args.workdir}: a pod's workers share no disk; "
            "use a Cloud Storage path, gs://BUCKET/PATH"
        )
    bad = [o for o in args.overrides if not o.startswith("--")]
    if bad:
        raise LaunchError(f"trainer flags start with --, got {bad[0]!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    launcher = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        commit = check_code(args.ref, args.config)
        launcher = Launcher(args, Runner(args.dry_run, args.poll_s))
        return launcher.dry_run(commit) if args.dry_run else launcher.run(commit)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if launcher is not None:
            print(
                f"\ninterrupted: TPU {launcher.slice.name} is left as it is; run the same "
                f"command to go on, or delete it: {shlex.join(launcher.slice.delete())}",
                file=sys.stderr,
            )
        return 130


if __name__ == "__main__":
    sys.exit(main())

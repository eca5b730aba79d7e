"""The cluster launchers against fake `gcloud`, `srun` and `scontrol` placed first on PATH.

The fake gcloud keeps a small world in a JSON file (the queued resource's state, the exit
statuses the training command will have) and logs every call, so a test reads back the exact
sequence of commands the launcher ran: creation, shipping, start on all workers, re-creation
after a preemption, and the stop when training has finished. The SLURM script runs under
bash with real signals: a SIGTERM to the batch shell must reach the trainer (the fake srun)
and requeue the job; a run that ends on its own must not be requeued.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.py")
SBATCH = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
CONFIG = "experiments/demo.py:smoke"
WORKDIR = "gs://bucket/runs/demo"

FAKE_GCLOUD = """\
#!{python} -S
import json, os, sys, tarfile

world_path, log_path = os.environ["FAKE_WORLD"], os.environ["FAKE_LOG"]
with open(world_path) as f:
    world = json.load(f)
argv = sys.argv[1:]
entry = {{"argv": argv}}
status = 0
if argv[:3] == ["compute", "tpus", "queued-resources"]:
    verb = argv[3]
    if verb == "describe":
        entry["state"] = world["state"]
        if world["state"] is None:
            print("ERROR: NOT_FOUND: queued resource not found", file=sys.stderr)
            status = 1
        else:
            print(world["state"])
            if world["state"] == "WAITING_FOR_RESOURCES":
                world["state"] = "ACTIVE"  # capacity arrives by the next look
    elif verb == "create":
        world["state"] = "WAITING_FOR_RESOURCES"
    elif verb == "delete":
        world["state"] = None
elif argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    with tarfile.open(argv[4]) as archive:
        entry["shipped"] = sorted(archive.getnames())
elif argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = next(a for a in argv if a.startswith("--command="))
    if "clip_jax.train" in command:
        outcome = world["trainings"].pop(0)
        if outcome.get("preempted"):
            world["state"] = "SUSPENDED"
        status = outcome["status"]
else:
    status = 64
entry["status"] = status
with open(world_path, "w") as f:
    json.dump(world, f)
with open(log_path, "a") as f:
    f.write(json.dumps(entry) + "\\n")
sys.exit(status)
"""

# Like clip_jax.train under srun: on SIGTERM it "saves" and exits 0. It logs its arguments and
# the environment the batch script set up.
FAKE_SRUN = """\
#!/bin/bash
printf '%s\\n' "srun $* JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS-unset} XLA_FLAGS=$XLA_FLAGS" \
  >> "$FAKE_LOG"
case $FAKE_SRUN in
  exit:*) exit "${FAKE_SRUN#exit:}" ;;
esac
trap 'echo "srun got SIGTERM" >> "$FAKE_LOG"; exit 0' TERM
touch "$FAKE_LOG.running"
for _ in $(seq 200); do sleep 0.1; done
exit 1  # never signalled
"""

FAKE_SCONTROL = """\
#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


@pytest.fixture
def fakes(tmp_path):
    """PATH with the fakes first, the log path and the world file; returns (env, log, world)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "gcloud": FAKE_GCLOUD.format(python=sys.executable),
        "srun": FAKE_SRUN,
        "scontrol": FAKE_SCONTROL,
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    log, world = tmp_path / "calls.log", tmp_path / "world.json"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(log),
        FAKE_WORLD=str(world),
    )
    return env, log, world


def set_world(world, state, trainings):
    world.write_text(json.dumps({"state": state, "trainings": trainings}))


def gcloud_calls(log):
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def kind(call):
    """A short name for a gcloud call: 'describe', 'create', 'scp', 'install', 'train'..."""
    argv = call["argv"]
    if argv[2] == "queued-resources":
        return argv[3]
    if argv[3] == "scp":
        return "scp"
    command = next(a for a in argv if a.startswith("--command="))
    return "train" if "clip_jax.train" in command else "install"


def launch_tpu(env, *flags, overrides=("--config.total_steps=100",)):
    argv = [sys.executable, TPU_POD, "--name=clip", "--zone=us-central2-b"]
    argv += ["--accelerator=v4-32", "--runtime=tpu-ubuntu2204-base", "--poll_s=0"]
    argv += [f"--config={CONFIG}", f"--workdir={WORKDIR}", *flags, "--", *overrides]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_tpu_pod_recreates_a_preempted_slice_and_stops_when_training_finished(fakes):
    env, log, world = fakes
    set_world(world, None, [{"status": 255, "preempted": True}, {"status": 0}])
    run = launch_tpu(env, "--spot")
    assert run.returncode == 0, run.stdout + run.stderr
    calls = gcloud_calls(log)
    one_attempt = ["describe", "create", "describe", "describe", "scp", "install", "train"]
    assert [kind(c) for c in calls] == [
        *one_attempt,
        "describe",  # SUSPENDED: preempted
        "delete",
        *one_attempt,
        "describe",  # still ACTIVE after exit 0 everywhere: finished
        "delete",  # this launcher created it
    ]
    assert [c["state"] for c in calls if kind(c) == "describe"] == [
        None,
        "WAITING_FOR_RESOURCES",
        "ACTIVE",
        "SUSPENDED",
        None,
        "WAITING_FOR_RESOURCES",
        "ACTIVE",
        "ACTIVE",
    ]
    create = next(c["argv"] for c in calls if kind(c) == "create")
    for flag in ["--node-id=clip", "--accelerator-type=v4-32", "--spot", "--zone=us-central2-b"]:
        assert flag in create
    for ship in (c for c in calls if kind(c) in ("scp", "install", "train")):
        assert "--worker=all" in ship["argv"]
    shipped = next(c["shipped"] for c in calls if kind(c) == "scp")
    committed = subprocess.run(
        ["git", "-C", ROOT, "ls-tree", "-r", "--name-only", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {p for p in shipped if not p.endswith("/")} >= set(committed)
    assert "experiments/demo.py" in shipped
    trains = [c["argv"] for c in calls if kind(c) == "train"]
    assert trains[0] == trains[1]  # the same command resumes from the workdir's checkpoint
    command = trains[0][-1]
    for part in [
        "run_interruptible python3 -m clip_jax.train --multihost",
        f"--config={CONFIG}",
        f"--workdir={WORKDIR}",
        "--config.total_steps=100",
    ]:
        assert part in command
    assert "preemption 1" in run.stdout and "training finished" in run.stdout


def test_tpu_pod_reuses_an_active_slice_and_keeps_it(fakes):
    env, log, world = fakes
    set_world(world, "ACTIVE", [{"status": 0}])
    run = launch_tpu(env, "--reserved")
    assert run.returncode == 0, run.stdout + run.stderr
    assert [kind(c) for c in gcloud_calls(log)] == [
        "describe",
        "scp",
        "install",
        "train",
        "describe",
    ]


def test_tpu_pod_gives_up_after_repeated_failures_on_a_healthy_slice(fakes):
    env, log, world = fakes
    set_world(world, "ACTIVE", [{"status": 1}, {"status": 1}])
    run = launch_tpu(env, "--max_failures=1")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "failed 2 times on a healthy TPU clip" in run.stderr
    kinds = [kind(c) for c in gcloud_calls(log)]
    assert kinds.count("train") == 2 and kinds.count("scp") == 1  # retried without re-shipping
    assert "create" not in kinds and "delete" not in kinds


def test_tpu_pod_dry_run_prints_every_command_and_runs_none(fakes):
    env, log, world = fakes
    set_world(world, None, [])
    run = launch_tpu(env, "--spot", "--dry_run")
    assert run.returncode == 0, run.stderr
    assert gcloud_calls(log) == []
    printed = [line[2:] for line in run.stdout.splitlines() if line.startswith("+ ")]
    verbs = [line.split()[3:5] for line in printed if line.startswith("gcloud")]
    assert verbs == [
        ["queued-resources", "describe"],
        ["queued-resources", "create"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "ssh"],
        ["queued-resources", "delete"],
    ]
    assert any(line.startswith("git -C") and " archive " in line for line in printed)


@pytest.mark.parametrize(
    "flags, words",
    [
        ({"--workdir": "/tmp/run"}, ["--workdir=/tmp/run", "gs://"]),
        ({"--config": "experiments/missing.py"}, ["experiments/missing.py", "not in HEAD"]),
        ({"--ref": "no-such-branch"}, ["--ref=no-such-branch", "not a commit"]),
    ],
)
def test_tpu_pod_bad_arguments_are_one_line(fakes, flags, words):
    env, log, world = fakes
    set_world(world, None, [])
    argv = [sys.executable, TPU_POD, "--name=clip", "--zone=z", "--accelerator=v4-32"]
    argv += ["--runtime=r", f"--config={CONFIG}", f"--workdir={WORKDIR}"]
    argv += [f"{k}={v}" for k, v in flags.items()]  # the last of a repeated flag wins
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]
    assert gcloud_calls(log) == []


def slurm_env(env, tasks_per_node=1, gpus=8, srun="wait"):
    return dict(
        env,
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=ROOT,
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_GPUS_ON_NODE=str(gpus),
        FAKE_SRUN=srun,
        XLA_FLAGS="--xla_caller_flag=1",
    )


def sbatch(env):
    return subprocess.Popen(
        ["bash", SBATCH, CONFIG, "/shared/runs/demo", "--config.total_steps=100"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_slurm_requeues_after_sigterm(fakes, tmp_path):
    env, log, _ = fakes
    job = sbatch(slurm_env(env))
    deadline = time.monotonic() + 20
    while not os.path.exists(f"{log}.running") and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch shell
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, out + err
    lines = log.read_text().splitlines()
    assert lines[1:] == ["srun got SIGTERM", "scontrol requeue 4242"]
    srun = lines[0]
    assert "python -m clip_jax.train --multihost" in srun
    assert f"--config={CONFIG} --workdir=/shared/runs/demo --config.total_steps=100" in srun
    # One process per node sees all 8 GPUs; the XLA flags follow the caller's.
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 " in srun
    assert "XLA_FLAGS=--xla_caller_flag=1 --xla_gpu_enable_latency_hiding_scheduler=true" in srun


@pytest.mark.parametrize("status", [0, 3])
def test_slurm_does_not_requeue_a_run_that_ended(fakes, status):
    env, log, _ = fakes
    job = sbatch(slurm_env(env, srun=f"exit:{status}"))
    out, err = job.communicate(timeout=30)
    assert job.returncode == status, out + err
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srun ")


def test_slurm_one_process_per_gpu_leaves_device_choice_to_jax(fakes):
    env, log, _ = fakes
    job = sbatch(slurm_env(env, tasks_per_node=8, srun="exit:0"))
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, out + err
    # JAX's SLURM detection then gives process SLURM_LOCALID the GPU of that index.
    assert "JAX_LOCAL_DEVICE_IDS=unset" in log.read_text()


def test_slurm_tasks_per_node_that_match_neither_mode_is_one_line(fakes):
    env, log, _ = fakes
    job = sbatch(slurm_env(env, tasks_per_node=3, srun="exit:0"))
    out, err = job.communicate(timeout=30)
    assert job.returncode == 2
    assert err.strip() == (
        "error: --ntasks-per-node=3 with 8 GPUs per node: use 1 (a process per node) "
        "or 8 (a process per GPU)"
    )
    assert not log.exists()


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib():
    """XLA parses XLA_FLAGS when a backend starts, GPU flags included, and aborts on an
    unknown name: a renamed flag would stop every GPU job at start-up."""
    script = textwrap.dedent(
        f"""\
        source {os.path.join(ROOT, "launch", "gpu_xla_flags.sh")}
        echo "$XLA_FLAGS"
        {sys.executable} -c 'import jax; print(len(jax.devices()))'
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    run = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    flags = run.stdout.splitlines()[0].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert all(f.startswith("--xla_gpu_") for f in flags)

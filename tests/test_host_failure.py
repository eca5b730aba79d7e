"""A multi-process run that loses a process, or whose one host is preempted, with real
processes (2 x 4 simulated CPU devices, gloo) and real signals.

- SIGTERM to one process only: every process saves the same step and exits 0.
- SIGKILL of one process: the other exits non-zero within a bound, with one line that names
  the lost process and the checkpoint a relaunch resumes from; never a hang in a collective
  (conftest raises XLA:CPU's collective timeouts to 20 minutes, so the bound cannot come
  from them).
- The relaunches resume: every loss equals the uninterrupted 2-process run's.

One run goes through all three (preempted, resumed, killed, relaunched), which saves two
process launches. The filter that turns JAX's fatal dump into that line is also checked on
the dumps that jaxlib 0.10 writes in each way a process can be lost.
"""

import io
import os
import re
import signal
import time

import chex
import pytest
import two_processes
from two_processes import TOTAL_STEPS, losses

from clip_jax import peer_loss
from clip_jax.checkpoint import latest_step

# One test process runs these: they share the session's 2-process run (conftest).
pytestmark = pytest.mark.xdist_group("two_process_run")

HEARTBEAT_TIMEOUT_S = 5
# From the SIGKILL to the other process's exit: the heartbeat timeout, the report (which
# lists the checkpoints), and slack for a loaded 2-core machine.
BOUND_S = 60


def wait_for(condition, procs, timeout=300.0):
    deadline = time.time() + timeout
    while not condition():
        for i, p in enumerate(procs):
            if p.poll() is not None:
                out, err = p.communicate()
                raise AssertionError(f"process {i} exited early ({p.returncode}):\n{out}{err}")
        assert time.time() < deadline, "timed out waiting for the training processes"
        time.sleep(0.005)


def logged_steps(workdir) -> int:
    try:
        return len(losses(workdir))
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
        return 0


def complete_checkpoints(workdir) -> list[int]:
    """Steps whose directories Orbax has finalised (a save in flight has a tmp suffix)."""
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def test_preempted_host_and_lost_process_stop_every_process_and_resume_exactly(
    demo_data_dir, two_process_run, tmp_path
):
    workdir = str(tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    heartbeat = f"--heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}"

    # 1. SIGTERM to process 1 alone: both stop at one step, save it, and exit 0.
    procs = two_processes.start(workdir, demo_data_dir, heartbeat)
    wait_for(lambda: logged_steps(workdir) >= 3, procs)
    procs[1].send_signal(signal.SIGTERM)
    outputs = two_processes.finish(procs)
    saved = [re.findall(r"saved step (\d+), exiting", out) for out, _ in outputs]
    assert saved[0] == saved[1] and len(saved[0]) == 1, outputs
    preempted_at = int(saved[0][0])
    assert preempted_at < TOTAL_STEPS
    assert latest_step(ckpt_dir) == preempted_at

    # 2. Resume, then SIGKILL process 1 once a checkpoint after the resume is complete.
    procs = two_processes.start(workdir, demo_data_dir, heartbeat)
    wait_for(lambda: complete_checkpoints(workdir)[-1] > preempted_at, procs)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, err = procs[0].communicate(timeout=BOUND_S + 60)
    took = time.time() - killed_at
    procs[1].communicate()
    assert procs[1].returncode == -signal.SIGKILL
    assert f"resumed from step {preempted_at}" in out, out
    assert procs[0].returncode == -signal.SIGABRT, out + err  # LOG(FATAL): exit status 134
    assert took < BOUND_S, f"process 0 took {took:.0f} s to stop:\n{err}"
    assert "Traceback" not in out + err and "Check failure" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    resume_at = latest_step(ckpt_dir)
    assert resume_at > preempted_at
    for words in (
        "process 1 of 2 stopped responding",
        "on process 0",
        "Relaunch all processes",
        f"(step {resume_at} in {ckpt_dir})",
    ):
        assert words in errors[0], (words, errors[0])

    # 3. Relaunch to the end: every loss as in the uninterrupted run; the steps after the
    # preemption come from the run resumed at it, and match to the bit.
    outputs = two_processes.finish(two_processes.start(workdir, demo_data_dir, heartbeat))
    assert f"resumed from step {resume_at}" in outputs[0][0]
    want, got = losses(two_process_run), losses(workdir)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    chex.assert_trees_all_close(got, want, rtol=0, atol=1e-6)
    after_preemption = range(preempted_at + 1, resume_at + 1)
    chex.assert_trees_all_equal(
        {s: got[s] for s in after_preemption}, {s: want[s] for s in after_preemption}
    )
    assert complete_checkpoints(workdir)[-1] == TOTAL_STEPS


def test_an_error_on_one_process_ends_it_at_once_and_the_others_within_the_bound(
    demo_data_dir, tmp_path
):
    """A user error that only process 1 meets (its data folder is a file). Exiting normally,
    it would wait in jax.distributed's shutdown barrier (5 minutes) while process 0 waits
    for it in a collective."""
    not_a_folder = tmp_path / "data_is_a_file"
    not_a_folder.write_text("")
    started = time.time()
    procs = two_processes.start(
        str(tmp_path / "run"),
        demo_data_dir,
        f"--heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}",
        only={1: [f"--config.data.data_dir={not_a_folder}"]},
    )
    out1, err1 = procs[1].communicate(timeout=BOUND_S + 60)
    out0, err0 = procs[0].communicate(timeout=BOUND_S + 60)
    took = time.time() - started
    assert procs[1].returncode == 2, err1
    assert "Traceback" not in err1
    assert err1.strip().splitlines()[-1].startswith("error:"), err1
    assert str(not_a_folder) in err1
    assert procs[0].returncode == -signal.SIGABRT, out0 + err0
    assert "process 1 of 2 stopped responding" in err0, err0
    assert "Traceback" not in err0
    assert took < BOUND_S + 30, f"the processes took {took:.0f} s to stop"


# The status text of jaxlib 0.10.2's fatal dump, as the survivor writes it, for each way a
# process is lost (the stack frames after END_OF_STATUS are cut).
DUMP_HEAD = (
    "F1126 03:41:56.660916   22339 client.h:80] Terminating process because the JAX "
    "distributed service detected fatal errors. This most likely indicates that another task "
    "died; see the other task logs for more details. absl::Status: "
)
LOST_TASK_1 = (
    "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
    "The tasks have crashed. Check the task logs for an earlier error, or scheduler events "
    "(e.g. preemption, eviction) to debug further.\n\n"
    "RPC: /xla.coordination.CoordinationService/PollForError\n"
)
LOST_COORDINATOR = (
    "UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was "
    "preempted/died/restarted unexpectedly or this task is experiencing network issues.\n"
    "Additional GRPC error information from remote target coordination_service while calling "
    "/xla.coordination.CoordinationService/PollForError:\n:UNKNOWN:Error received from peer  "
    '{grpc_status:14, grpc_message:"Socket closed"}\n'
)
LOST_AT_SHUTDOWN = (
    "INTERNAL: Shutdown barrier has failed.\nBarrier result: 'INTERNAL: Barrier failed "
    "because: task is set to ERROR: UNAVAILABLE: Task 3 heartbeat timeout. This indicates "
    "that the remote task has failed, got preempted, or crashed unexpectedly.\n"
)


def filtered(status: str, num_processes: int = 2) -> str:
    before = "step 7/24 loss=2.8\n[Gloo] Rank 0 is connected to 1 peer ranks.\n"
    dump = DUMP_HEAD + status + "*** Check failure stack trace: ***\n    @  0x7f40 SendToLog()\n"
    out = io.BytesIO()
    came = peer_loss.relay(
        io.BytesIO((before + dump).encode()).readlines(),
        out,
        lambda s: peer_loss.message(s, num_processes, 0, "the last complete checkpoint"),
    )
    text = out.getvalue().decode()
    assert came and text.startswith(before), text
    (line,) = text[len(before) :].splitlines()
    return line


def test_the_dump_becomes_one_line_naming_the_lost_process():
    assert "error: process 1 of 2 stopped responding; the run stops here on process 0" in (
        filtered(LOST_TASK_1)
    )
    assert "process 0 of 2 (the coordinator) stopped responding" in filtered(LOST_COORDINATOR)
    assert "process 3 of 4 stopped responding" in filtered(LOST_AT_SHUTDOWN, num_processes=4)
    assert "another of the 2 processes stopped" in filtered("INTERNAL: something new\n")


def test_output_without_the_dump_passes_unchanged():
    text = b"step 1/4 loss=3.1\nerror: a user's mistake\n"
    out = io.BytesIO()
    assert not peer_loss.relay(io.BytesIO(text).readlines(), out, lambda s: "unused")
    assert out.getvalue() == text

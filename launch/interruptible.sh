# Sourced by the launchers (launch/slurm_gpu.sbatch, and on every TPU worker by
# launch/tpu_pod.py). Defines run_interruptible.
#
#   run_interruptible CMD [ARGS...]
#
# Runs CMD and waits for it. A SIGTERM received meanwhile (a scheduler's or a preempted VM's
# notice) is passed on to CMD, which saves a checkpoint and exits 0 (clip_jax.train does), and
# makes run_interruptible return INTERRUPTED_STATUS instead of CMD's status: a launcher then
# knows the run stopped early and must be resumed, while 0 always means it ran to its end.

INTERRUPTED_STATUS=75 # EX_TEMPFAIL: try again later

run_interruptible() {
  local pid status interrupted=0
  trap 'interrupted=1; kill -TERM "$pid" 2>/dev/null' TERM
  "$@" &
  pid=$!
  while true; do
    wait "$pid"
    status=$?
    # `wait` also returns when the trap runs; CMD may still be saving.
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - TERM
  if [ "$interrupted" = 1 ]; then
    return "$INTERRUPTED_STATUS"
  fi
  return "$status"
}

# XLA flags for training on NVIDIA GPUs: the one place they are set. Sourced by
# launch/slurm_gpu.sbatch; source it before any other GPU launch too:
#
#   source launch/gpu_xla_flags.sh && python -m clip_jax.train ...
#
# Appends to XLA_FLAGS; XLA reads them left to right, so to change one of these, append your
# setting after sourcing this file.
# tests/test_launchers.py checks that the installed jaxlib knows every flag: XLA aborts at
# start-up on an unknown one.
gpu_xla_flags=(
  # Schedule collectives asynchronously, placed to overlap with independent compute.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Inside loops (gradient-cache micro-batches, the ring loss), start the next iteration's
  # all-gather and finish the previous one's reduce-scatter while this one computes ...
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  # ... which needs two loop iterations in flight.
  --xla_gpu_enable_while_loop_double_buffering=true
)
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${gpu_xla_flags[*]}"
unset gpu_xla_flags

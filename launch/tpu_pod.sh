#!/bin/bash
# Starts the same command on every worker of a Cloud TPU pod slice; JAX discovers the
# other workers itself (--multihost). The workdir must be shared storage (e.g. gs://...).
#
#   launch/tpu_pod.sh TPU_NAME ZONE experiments/vit_b32.py gs://bucket/runs/vit_b32 [--config.k=v ...]
#
# Spot/preemptible slices get SIGTERM before preemption: the run saves and exits 0, and
# re-running this script resumes exactly from the last checkpoint.
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
OVERRIDES="$*"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/clip_jax && pip install -q -e . 'jax[tpu]' &&
  python -m clip_jax.train --multihost --config=$CONFIG --workdir=$WORKDIR $OVERRIDES"

#!/bin/bash
# The accelerator measurements still missing from README.md, most wanted first, under one
# deadline (seconds, default 420): a run that would end past it is skipped and says so.
#
#   DEADLINE=420 bash benchmarks/gpu_checks.sh 2>&1 | tee gpu_checks.log
#
# Needs the project installed (pip install -e .). Each entry is one
# `benchmarks/train_step.py` run (5 timed steps after 1; 1 for the gradient-cached batch),
# with per-device batches times the GPUs present; a run that fails prints its last lines and
# the next one starts. What it measured on an H200 (jax 0.11.2): a ViT-B/16 run at 256 per device takes
# about 110 s (45 s compiling), the ViT-B/32 32k gradient-cached step about 120 s.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
source "$(dirname "$0")/../launch/gpu_xla_flags.sh"
nvidia-smi -L
gpus=$(nvidia-smi -L | wc -l)
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
start=$(date +%s)
deadline=${DEADLINE:-420}
run() {  # run NAME SECONDS ARGS...
  local name=$1 estimate=$2 now=$(( $(date +%s) - start ))
  shift 2
  if (( now + estimate > deadline )); then echo "=== $name skipped at ${now} s"; return; fi
  echo "=== $name (at ${now} s)"
  timeout $(( estimate * 2 )) python3 "$(dirname "$0")/train_step.py" "$@" 2>&1 |
    grep -v -E "^[IW][0-9]{4} " | tail -n 14
  echo "=== $name: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start - now )) s"
}
gc="--config=experiments/vit_b32_64k.py --config.model.dtype=bfloat16 --steps=1 --warmup=0"
grid="--config.model.dtype=bfloat16 --steps=5 --warmup=1"
run "B/32 64k, micro-batch 1024" 150 $gc --config.batch_size=65536
# cuDNN with odd lengths padded (text 77 -> 78, B/16 197 -> 198): never yet run on a GPU.
run "B/16 256 cudnn" 120 --config=experiments/vit_b16.py $grid \
  --config.batch_size=$(( 256 * gpus )) --config.model.attention=cudnn
for per_device in 512 1024; do
  for remat in none dots; do
    for attention in cudnn xla; do
      run "B/16 $per_device $remat $attention" 120 --config=experiments/vit_b16.py $grid \
        --config.batch_size=$(( per_device * gpus )) --config.model.remat_policy=$remat \
        --config.model.attention=$attention
    done
  done
done
for per_device in 256 512 1024; do
  for attention in auto cudnn xla; do
    run "B/32 $per_device $attention" 90 --config=experiments/vit_b32.py $grid \
      --config.batch_size=$(( per_device * gpus )) --config.model.attention=$attention
  done
done
echo "=== done at $(( $(date +%s) - start )) s"

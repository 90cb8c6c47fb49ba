#!/usr/bin/env bash
# Starts the same training command on every host of a Cloud TPU VM slice (e.g. v3-32).
#
#   scripts/launch_tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags...]
#   scripts/launch_tpu_vm.sh my-v3-32 europe-west4-a experiments/configs/cifar10.py gs://bucket/runs/cifar10
#
# Every host must have this repository at ~/ddpm_jax with its dependencies
# installed (pip install -e ~/ddpm_jax jax[tpu]). --multihost makes each process
# call jax.distributed.initialize(), which finds its peers from the TPU metadata;
# the global batch (training.batch_size) is split over all hosts and chips.
# WORKDIR must be shared by all hosts (a GCS bucket): Orbax writes checkpoints
# from all of them. Re-running the same command resumes from the newest checkpoint.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [extra flags...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
printf -v EXTRA ' %q' "$@"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  cd ~/ddpm_jax && python3 -m ddpm_jax.main --config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR") \
    --mode=train --multihost${EXTRA}"

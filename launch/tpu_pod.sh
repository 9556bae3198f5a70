#!/usr/bin/env bash
# TPU pod slice: run the same command on every worker (jax.distributed reads the TPU metadata).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh base gs://bucket/runs/mplug_base \
#       [--config.x=y ...]
# The repo must be checked out at ~/mplug-jax on every worker with `pip install -c constraints.txt -e .` done
# (e.g. first: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all \
#   --command "git clone <repo> ~/mplug-jax && pip install -c ~/mplug-jax/constraints.txt -e ~/mplug-jax").
# Expected overrides on TPU: --config.model.dtype=bfloat16 --config.mesh.sharding=fsdp
#   --config.mesh.shape.fsdp=<chips per host or more> --config.input.batch_size=<global batch>
set -euo pipefail
VARIANT=${1:?usage: launch/tpu_pod.sh VARIANT WORKDIR [overrides]}
WORKDIR=${2:?usage: launch/tpu_pod.sh VARIANT WORKDIR [overrides]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all --command \
  "cd ~/mplug-jax && python -m mplug_jax.main --config=configs/pretrain.py:${VARIANT} \
   --workdir=${WORKDIR}${ARGS}"

#!/usr/bin/env bash
# Single host, all local accelerators (or the CPU), one process.
#   VARIANT=base WORKDIR=/runs/mplug_base bash launch/single_host.sh [--config.x=y ...]
# Overrides it expects on a GPU: bf16 compute and remat for base/large, e.g.
#   --config.model.dtype=bfloat16 --config.model.remat_policy=dots_no_batch
set -euo pipefail
VARIANT=${VARIANT:-tiny}
WORKDIR=${WORKDIR:-runs/pretrain_${VARIANT}}
cd "$(dirname "$0")/.."
# Let XLA take most GPU memory up front and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec python -m mplug_jax.main --config="configs/pretrain.py:${VARIANT}" --workdir="${WORKDIR}" "$@"

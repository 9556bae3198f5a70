#!/usr/bin/env bash
# One-GPU check (base pretraining step + MFU + remat/batch ladder + rng impls, cached
# generation at batch 32, host input feed) in at most 8 minutes; writes
# benchmarks/results/gpu_check_<device>.json even when a part fails or runs out of time.
# Usage: bash benchmarks/gpu_check.sh [--parts a,b] [--total-budget S]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The parts enforce their own budgets (470 s in all); this is only a safety net.
exec timeout --signal=KILL 490 python benchmarks/gpu_check.py "$@"

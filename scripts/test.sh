#!/usr/bin/env bash
# Install what is missing, then run the linter and the whole test suite on the CPU.
#
#   bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/install.sh --test

# Small tensor work is 10-15x slower with the default thread count on 2-core machines.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
"$PYTHON" -m ruff check .
"$PYTHON" -m pytest -q "$@"

#!/usr/bin/env bash
# Install what this project needs into the current Python, skipping what is already there.
#
#   bash scripts/install.sh          # runtime dependencies
#   bash scripts/install.sh --test   # plus the test tools
#
# PyTorch is installed only when it is missing, so an existing (e.g. CUDA) build is never replaced.
# The pinned version is one whose CPU build is small; any recent PyTorch works.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "Installing PyTorch..."
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi

requirements=(-r requirements.txt)
if [[ "${1:-}" == "--test" ]]; then
    requirements+=(-r requirements-test.txt)
fi
# Fast path: nothing to do when every requirement is already importable at a satisfying version.
if ! "$PYTHON" scripts/check_requirements.py "${requirements[@]}" >/dev/null 2>&1; then
    echo "Installing Python packages..."
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
fi

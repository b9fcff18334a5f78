#!/usr/bin/env bash
# Thin wrapper for the device machine: install carried wheels (open_clip etc.), then run the check.
# Exit status is the check's own (non-zero on any failure, mismatch or timeout; 2 without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec timeout 480 python3 bench/gpu_check.py "$@"

#!/usr/bin/env bash
# Create (or reuse) .venv with drople_fast installed in editable mode and its C++ extension built.
# Idempotent: a second run only re-checks the install. Works offline against the configured mirrors.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision, open_clip, triton, pytest, pytest_benchmark, hypothesis, matplotlib" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  # torch first: the C++ extension is compiled against it (no build isolation).
  python -m pip install -q "torch>=2.11" "torchvision>=0.26" triton "open_clip_torch>=3.0" numpy tqdm pillow \
    safetensors matplotlib pytest pytest-benchmark hypothesis ninja setuptools wheel
fi
# xformers is optional (attention="xformers", CUDA only); without it the SDPA paths run and its tests skip.
if ! python -c "import xformers" 2>/dev/null; then
  python -m pip install -q xformers || echo "setup_env: xformers did not install; attention='xformers' will be refused"
fi
if ! python -c "import drople_fast._C" 2>/dev/null; then
  python -m pip install -q --no-build-isolation --no-deps -e .
fi
python -c "import drople_fast, drople_fast._C; print('drople_fast', drople_fast.__version__, 'ready in .venv')"

#!/usr/bin/env bash
# Create (or reuse) .venv-oldest: the oldest versions drople_fast supports, which are what the GPU machines
# carry (torch 2.11, torchvision 0.26, triton 3.6) with open_clip 3.3.0 and the test tools. CI's second leg
# (scripts/test_oldest.sh) runs the suite in it. Idempotent: a second run only re-checks the versions.
# numpy < 2.4: triton 3.6's interpreter, which runs every Triton test on the CPU, fails with numpy >= 2.4.
# The index offers only CUDA builds of torch 2.11 (about 4.9 GB installed); they run on the CPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-oldest
PINS=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 open_clip_torch==3.3.0 "numpy<2.4")
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md
import numpy, open_clip, pytest, pytest_benchmark, hypothesis, matplotlib, ninja  # noqa: F401
want = {"torch": "2.11.", "torchvision": "0.26.", "triton": "3.6.", "open_clip_torch": "3.3.0"}
assert all(md.version(name).startswith(prefix) for name, prefix in want.items())
assert tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 4)
PY
then
  "$VENV/bin/python" -m pip install -q "${PINS[@]}" tqdm pillow safetensors matplotlib pytest pytest-benchmark \
    hypothesis ninja setuptools wheel 2> >(grep -v "^WARNING: Location" >&2)
fi
"$VENV/bin/python" -c "import torch, triton, numpy, open_clip
print('setup_env_oldest: torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__,
      'open_clip', open_clip.__version__, 'ready in .venv-oldest')"

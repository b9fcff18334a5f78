#!/usr/bin/env bash
# One prepared GPU session for drople_fast (nothing here has run on a GPU yet).
# On the device machine (python3 with torch + triton + pytest + pytest-benchmark already there),
# carry open_clip_torch and its pure-Python needs as wheels in .whl/ (see the device tool's README),
# then run:  bash bench/gpu_check.sh   -- results land in $OUT (or bench/results/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# Build the C++ operator in place (the CUDA paths do not need it, the CPU rows do).
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || echo "C++ build failed (see build.log)"
python3 -m drople_fast.info | tee "$out/info.txt"
# 1. exactness of the Triton kernel and the patch on the GPU (no interpreter)
python3 -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_patch_modes.py 2>&1 | tee "$out/tests.log"
# 2. the op: reference vs triton vs block, median + peak memory
python3 -m pytest bench/bench_iwtd.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json "$out/iwtd.json" > "$out/bench_iwtd.log" 2>&1
python3 bench/report_iwtd.py "$out/iwtd.json" | tee "$out/iwtd.md"
# 3. end to end, batch 32, SDPA and xformers where importable
python3 -m pytest bench/bench_e2e.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json "$out/e2e.json" > "$out/bench_e2e.log" 2>&1
python3 bench/report_e2e.py "$out/e2e.json" | tee "$out/e2e.md"

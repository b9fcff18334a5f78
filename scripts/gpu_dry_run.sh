#!/usr/bin/env bash
# The GPU machine's whole flow, on this CPU: a venv with only what that machine carries (torch 2.11,
# triton 3.6, ninja, setuptools: .venv-gpusim), the wheels scripts/fetch_gpu_wheels.sh fetches (for this
# Python), a copy of the tree as the machine receives it (build/gpusim/src: no binaries, no links), then
# bench/gpu_check.sh --cpu-dry there. Prints the one-shot's wall time; its JSON/Markdown land in build/gpusim/out.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PYTHON:-python3}
if [ ! -x .venv-gpusim/bin/python ]; then
  "$PY" -m venv .venv-gpusim
  .venv-gpusim/bin/python -m pip install -q torch==2.11.0 triton==3.6.0 ninja setuptools \
    2> >(grep -v "^WARNING: Location" >&2)
fi
pyver=$(.venv-gpusim/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYVER=$pyver DEST=build/whl$pyver bash scripts/fetch_gpu_wheels.sh | tail -n 1
rm -rf build/gpusim
mkdir -p build/gpusim/src build/gpusim/out
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C build/gpusim/src
cd build/gpusim/src
start=$SECONDS
set +e
PYTHON=$root/.venv-gpusim/bin/python WHEELS=$root/build/whl$pyver SITE=$root/build/gpusim/site OUT=$root/build/gpusim/out \
  bash bench/gpu_check.sh --cpu-dry "$@"
rc=$?
echo "gpu_dry_run: bench/gpu_check.sh --cpu-dry exited $rc after $((SECONDS - start)) s (wheels from build/whl$pyver)"
exit "$rc"

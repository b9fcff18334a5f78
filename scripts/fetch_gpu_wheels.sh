#!/usr/bin/env bash
# Download into .whl/ the wheels that bench/gpu_check.sh may need on a GPU machine that carries only Python,
# torch, triton, CUDA, nvcc, ninja and setuptools (no network there), and print their total size: the
# working tree sent to that machine (repo + .whl/) must stay under 64 MiB.
#
#   bash scripts/fetch_gpu_wheels.sh                  # Python 3.12, manylinux x86_64, into .whl/
#   PYVER=3.11 DEST=build/whl311 bash scripts/fetch_gpu_wheels.sh   # for the CPU dry run here
#
# --no-deps with an explicit list: open_clip_torch 3.3.0's closure (what `import open_clip`,
# create_model and tokenize import) plus drople_fast's own imports, without torch, triton and their
# dependencies, which the machine has; pytest because bench/bench_e2e.py (the speed_step step) imports
# it. torchvision is pinned to the torch the machine carries (2.11); numpy < 2.4 because triton 3.6's
# interpreter (the dry run) fails with numpy >= 2.4. On the machine, gpu_check.sh installs only those
# of these that are missing there (pip decides, from what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PY=${PYTHON:-python3}
WHEELS=(
  open_clip_torch==3.3.0 torchvision==0.26.0 "numpy<2.4" pillow
  ftfy wcwidth regex tqdm safetensors "timm>=1.0.17" pyyaml
  huggingface_hub hf-xet httpx2 httpcore2 anyio h11 idna truststore click packaging
  filelock fsspec typing_extensions pytest iniconfig pluggy pygments
)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
ls -1 "$DEST"
bytes=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
echo "fetch_gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((bytes / 1024)) KiB in $DEST (Python $PYVER);" \
  "with the tracked repo ($((repo / 1024)) KiB): $(((bytes + repo) / 1024)) KiB of the 65536 KiB limit"
if [ $((bytes + repo)) -ge $((64 * 1024 * 1024)) ]; then
  echo "fetch_gpu_wheels: over the 64 MiB working-tree limit" >&2
  exit 1
fi

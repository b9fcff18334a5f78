#!/usr/bin/env bash
# The one-shot GPU check, for a machine that carries only Python, torch, triton, CUDA, nvcc, ninja and
# setuptools and cannot download: installs from .whl/ (scripts/fetch_gpu_wheels.sh, carried with the
# tree) only what that machine lacks, builds drople_fast._C against its torch, then runs every step of
# bench/gpu_check.py, which writes its JSON and Markdown to bench/results/ and to $OUT when set.
#
#   bash bench/gpu_check.sh                                 # on the GPU machine
#   WHEELS=build/whl311 bash bench/gpu_check.sh --cpu-dry   # the same flow on CPU (interpreter, tiny shapes)
#
# Arguments go to bench/gpu_check.py. BUDGET_S (480) bounds the whole run, install and build included.
# Exit status: gpu_check.py's (1 on any failed, timed-out or skipped step, 2 without CUDA), or that of the
# phase that failed before it, which is named (3 wheels, 4 build, 5 no time left for the check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-${TMPDIR:-/tmp}/drople_fast-site}
BUDGET_S=${BUDGET_S:-480}  # the whole one-shot, install and build included: 8 minutes of the machine's time
start=$SECONDS
say() { echo "gpu_check.sh: $* ($((SECONDS - start)) s)"; }

# 1. The carried wheels the machine lacks. Only these wheels: no index, and no pip configuration of the
#    machine that prepared them (this one's mirrors and constraints mean nothing there).
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# What drople_fast, bench/gpu_check.py and the modules it imports (tests/, bench/bench_e2e.py) need.
REQUIREMENTS=(open_clip_torch==3.3.0 torchvision numpy pillow tqdm safetensors pytest)
plan=$(mktemp)
trap 'rm -f "$plan"' EXIT
if [ -d "$WHEELS" ]; then
  # pip resolves against what is installed (PYTHONPATH included) and reports only what it would add.
  "$PY" -m pip install -q --dry-run --no-index --find-links "$WHEELS" --report "$plan" "${REQUIREMENTS[@]}" ||
    { echo "gpu_check.sh: the wheels in $WHEELS do not cover ${REQUIREMENTS[*]} here (bash scripts/fetch_gpu_wheels.sh)" >&2; exit 3; }
  mapfile -t files < <("$PY" -c 'import json, sys, urllib.parse, urllib.request
for item in json.load(open(sys.argv[1]))["install"]:
    print(urllib.request.url2pathname(urllib.parse.urlparse(item["download_info"]["url"]).path))' "$plan")
  if [ "${#files[@]}" -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${files[@]}"
  fi
  say "installed ${#files[@]} carried wheel(s) into $SITE: $(printf '%s ' "${files[@]##*/}" | sed 's/-[^ ]*//g')"
else
  say "no $WHEELS/ here: using what is installed"
fi
"$PY" -c "import open_clip, torch, triton; print('gpu_check.sh: torch', torch.__version__, 'triton', triton.__version__,
      'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"

# 2. drople_fast._C against this machine's torch (the tree carries no binaries), in place: PYTHONPATH=$PWD
#    imports the package from here, and kernels/ as drople_fast.kernels (the link an editable install maps).
[ -e drople_fast/kernels ] || ln -s ../kernels drople_fast/kernels
rm -f drople_fast/_C*.so
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py -q build_ext --inplace >/dev/null ||
  { echo "gpu_check.sh: building drople_fast._C failed (setup.py build_ext --inplace)" >&2; exit 4; }
"$PY" -c "import drople_fast._C"
say "built drople_fast._C"

# 3. Every step of the check, in what is left of the budget: gpu_check.py gives each step at most that
#    and records the steps it had no time for; `timeout` (30 s later) only guards against a hang.
left=$((BUDGET_S - (SECONDS - start)))
[ "$left" -gt 0 ] || { echo "gpu_check.sh: the ${BUDGET_S} s budget was spent before the check" >&2; exit 5; }
set +e
timeout "$((left + 30))" "$PY" bench/gpu_check.py --budget-s "$left" "$@"
rc=$?
set -e
[ "$rc" -eq 124 ] && echo "gpu_check.sh: bench/gpu_check.py hung past its ${left} s budget" >&2
say "bench/gpu_check.py exited $rc"
exit "$rc"

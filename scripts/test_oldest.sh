#!/usr/bin/env bash
# CI's second leg: the whole suite at the oldest supported versions (scripts/setup_env_oldest.sh: torch 2.11,
# torchvision 0.26, triton 3.6, what the GPU machines carry), on a copy of the sources in build/oldest/src,
# so that its drople_fast._C, built against torch 2.11, does not replace the checkout's (built against
# .venv's torch by scripts/setup_env.sh). Exit status: pytest's, except that "no tests collected" fails.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bash scripts/setup_env_oldest.sh || exit 1
py=$root/.venv-oldest/bin/python
src=build/oldest/src
mkdir -p "$src"
# The copy: tracked and untracked-but-not-ignored files as they are now. Between runs it keeps build/ and
# the built extension, so an unchanged csrc/ is not compiled again.
find "$src" -mindepth 1 \( -path "$src/build" -o -name "*.egg-info" -o -name "_C*.so" \) -prune -o -type f -print0 |
  xargs -0 rm -f
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$src" || { echo "CI (oldest): copying the sources failed" >&2; exit 1; }
cd "$src"
so=$(ls drople_fast/_C*.so 2>/dev/null | head -n 1)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -type f -newer "$so" 2>/dev/null | head -n 1)" ] ||
   ! "$py" -c "import drople_fast._C, drople_fast.kernels" 2>/dev/null; then
  echo "CI (oldest): building drople_fast._C against torch 2.11 in $src"
  "$py" -m pip install -q --no-build-isolation --no-deps -e . 2> >(grep -v "^WARNING: Location" >&2) ||
    { echo "CI (oldest): building drople_fast._C failed" >&2; exit 1; }
fi
echo "CI (oldest): running: .venv-oldest/bin/python -m pytest -q -p no:cacheprovider tests (in $src)"
"$py" -m pytest -q -p no:cacheprovider tests
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "CI (oldest): pytest collected no tests" >&2
  exit 1
fi
exit "$rc"

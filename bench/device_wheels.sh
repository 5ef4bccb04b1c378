#!/usr/bin/env bash
# Wheels for a GPU machine with no package index (Python 3.12, x86-64, torch/numpy/scipy/OpenCV
# already there), downloaded here from PyPI, to travel with the working tree (never committed:
# the script adds /.whl/ to .git/info/exclude):
#   DEST/mmseg/  MMSegmentation 1.2.2's throwaway environment: every pin of tests/mmseg_ref/env.py
#                but scipy; there, HOOKTRAIN_MMSEG_WHEELS=DEST/mmseg makes MmsegEnv.install() use
#                them (pip --no-index --find-links; scipy comes from the interpreter).
#   DEST/*.whl   what hooktrain's training path imports that the machine lacks (datasets, dill,
#                multiprocess, pydantic + pydantic-core, annotated-types, typing-inspection,
#                typing-extensions, torchdata): bench/gpu_checks.sh installs DEST/*.whl into
#                /tmp/site. The versions are the ones hooktrain's venv runs.
#
#   bash bench/device_wheels.sh [DEST]          # DEST defaults to .whl (in the repo root)
#   WHEEL_PYTHON=3.11 bash bench/device_wheels.sh /tmp/w   # for another Python (a local check)
#
# On the device, bench/mmseg_train.py installs from .whl/mmseg when it holds wheels (or from
# $HOOKTRAIN_MMSEG_WHEELS); the whole folder (~10 MB) travels when `run` names .whl in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${WHEEL_PYTHON:-3.12}
PYTHON=${PYTHON:-python3}
HOOKTRAIN_PINS=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 torchdata==0.11.0
)

if [ "$DEST" = .whl ]; then  # the default folder travels with the tree but must never be committed
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
fi
# The mmseg pins, read from env.py (one source of truth), scipy left out.
mapfile -t MMSEG_PINS < <(cd tests && "$PYTHON" -c '
from mmseg_ref.env import PACKAGES
for package in PACKAGES:
    if not package.startswith("scipy"):
        print(package)')

download() {  # download DIR PINS...: binary wheels for CPython $PY on manylinux x86-64
  local dir=$1; shift
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
}

rm -rf "$DEST/mmseg"  # one version of each: two in a folder stop the whole install
mkdir -p "$DEST/mmseg"
download "$DEST/mmseg" "${MMSEG_PINS[@]}"
for pin in "${HOOKTRAIN_PINS[@]}"; do
  name=${pin%%==*}
  rm -f "$DEST/${name//-/_}"-*.whl "$DEST/$name"-*.whl
done
download "$DEST" "${HOOKTRAIN_PINS[@]}"

count() { find "$1" -maxdepth 1 -type f -name '*.whl' | wc -l; }
echo "$(count "$DEST/mmseg") wheels in $DEST/mmseg, $(count "$DEST") in $DEST; $(du -sh "$DEST" | cut -f1) in all:"
(cd "$DEST" && ls -1 ./*.whl mmseg/*.whl | sed 's|^\./||')

#!/usr/bin/env bash
# Runs the C++ suites of a build folder. Without a GPU the suites labelled "gpu" are left out,
# and this says so.
set -euo pipefail
build="${1:-build}"
if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  ctest --test-dir "$build" --output-on-failure -j2
else
  echo "ctest: no GPU found (nvidia-smi -L): the GPU suites (label 'gpu') were NOT run"
  ctest --test-dir "$build" --output-on-failure -j2 -LE gpu
fi

#!/usr/bin/env bash
# One hash of the files that make the library, its tests and the bench (their contents, not git's
# metadata): run it here and compare with the "sources:" line of a device run's env.log, which
# names the tree that was built even when the device copy's git HEAD lags behind it.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc nsa bench scripts CMakeLists.txt pyproject.toml -type f \
  -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 | LC_ALL=C sort -z |
  xargs -0 sha1sum | sha1sum | cut -c1-12

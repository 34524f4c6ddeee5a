#!/usr/bin/env bash
# Unpacks Debian's googletest source package into .deps/ (git-ignored), idempotently.
# The same folder is carried to the GPU machine, which has no network:
#   cmake -DNSA_SEL_GTEST_SOURCE_DIR=$PWD/.deps/usr/src/googletest ...
set -euo pipefail
cd "$(dirname "$0")/.."
deps="$PWD/.deps"
src="$deps/usr/src/googletest"

if [[ -f "$src/CMakeLists.txt" ]]; then
  echo "gtest: $src (already there)"
  exit 0
fi
command -v apt-get >/dev/null || { echo "gtest: apt-get not found; pass NSA_SEL_GTEST_SOURCE_DIR" >&2; exit 1; }

mkdir -p "$deps/debs"
cd "$deps/debs"
# apt-get download runs as the _apt user where it can; a root-owned folder it cannot write into
# makes it warn and fall back to root, which is fine.
if ! apt-get download googletest 2>/dev/null; then
  echo "gtest: download failed; running apt-get update once and retrying"
  apt-get update -qq
  apt-get download googletest
fi
deb=$(ls -t googletest_*.deb | head -n1)
dpkg -x "$deb" "$deps"
[[ -f "$src/CMakeLists.txt" ]] || { echo "gtest: $deb has no $src/CMakeLists.txt" >&2; exit 1; }
echo "gtest: unpacked $deb into $src"

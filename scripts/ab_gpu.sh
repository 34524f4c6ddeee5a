#!/usr/bin/env bash
# A/B timing of the kernel at a git ref against the working tree, on one GPU, interleaved, so that
# the comparison does not depend on which machine a run lands on or on its host's load.
#
#   scripts/ab_gpu.sh prepare REF   here: the ref's CMakeLists.txt and csrc/ into .ab/ref
#                                   (git-ignored: name .ab in the device call's carry)
#   scripts/ab_gpu.sh run           on the GPU machine: builds both libraries (no tests), then for
#                                   each CASE:BATCH in $AB_CASES times the ref and the tree in turn,
#                                   $AB_REPS times (default 2), with bench/profile_kernel.py
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
case "${1:-}" in
  prepare)
    ref="${2:?usage: scripts/ab_gpu.sh prepare REF}"
    rm -rf .ab/ref && mkdir -p .ab/ref
    git archive "$ref" CMakeLists.txt csrc | tar -x -C .ab/ref
    git rev-parse --short "$ref" >.ab/ref/REF
    echo "prepared $(cat .ab/ref/REF) in .ab/ref"
    ;;
  run)
    [[ -f .ab/ref/REF ]] || { echo "no .ab/ref: run 'scripts/ab_gpu.sh prepare REF' first"; exit 1; }
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    build() {  # SRC DIR
      cmake -S "$1" -B "$2" "${generator[@]}" -DNSA_SEL_WITH_CUDA=ON -DNSA_SEL_CUDA_ARCHS=90 \
        -DNSA_SEL_BUILD_TESTS=OFF >/dev/null && cmake --build "$2" -j"$(nproc)" >/dev/null
    }
    build .ab/ref build-ab-ref || { echo "build of the ref failed"; exit 1; }
    build . build-ab-tree || { echo "build of the tree failed"; exit 1; }
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" NSA_SEL_CUDA=1 NSA_SEL_CUDA_STRICT=1
    echo "ref $(cat .ab/ref/REF) against the working tree"
    for c in ${AB_CASES:-nsa27b:1 nsa27b:16 m125:64 d128:64}; do
      IFS=: read -r name batch <<<"$c"
      for rep in $(seq "${AB_REPS:-2}"); do
        for side in ref tree; do
          printf '%-4s %s:%s #%s  ' "$side" "$name" "$batch" "$rep"
          NSA_SEL_LIB="$root/build-ab-$side/libnsa_sel.so" \
            python3 bench/profile_kernel.py --case "$name" --batch "$batch" | sed 's/^.*: warm/warm/'
        done
      done
    done
    ;;
  *)
    echo "usage: scripts/ab_gpu.sh prepare REF | run"
    exit 2
    ;;
esac

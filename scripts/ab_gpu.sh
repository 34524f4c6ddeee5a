#!/usr/bin/env bash
# A/B timing of the kernel at a git ref against the working tree, on one GPU, interleaved, so that
# the comparison does not depend on which machine a run lands on or on its host's load.
#
#   scripts/ab_gpu.sh prepare REF   here: the ref's CMakeLists.txt and csrc/ into .ab/ref
#                                   (git-ignored: name .ab in the device call's carry)
#   scripts/ab_gpu.sh run           on the GPU machine: builds both libraries (no tests), then for
#                                   each CASE:BATCH in $AB_CASES times the ref and the tree in turn,
#                                   $AB_REPS times (default 2), with bench/profile_kernel.py
#                                   (and the words of $AB_ARGS, e.g. --kv-lens)
#   scripts/ab_gpu.sh knob VAR=A VAR=B
#                                   on the GPU machine: the tree's library (NSA_SEL_LIB if set,
#                                   e.g. one built here and carried, else built) timed the same
#                                   way with each setting of a debug knob in turn
#                                   (e.g. NSA_SEL_DEBUG_KVSPLIT=1 NSA_SEL_DEBUG_KVSPLIT=2)
#   scripts/ab_gpu.sh libs LIB_A LIB_B
#                                   on the GPU machine: two libraries built here and carried
#                                   (e.g. one at a ref, one of the tree), timed the same way
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
build() {  # SRC DIR
  cmake -S "$1" -B "$2" "${generator[@]}" -DNSA_SEL_WITH_CUDA=ON -DNSA_SEL_CUDA_ARCHS=90 \
    -DNSA_SEL_BUILD_TESTS=OFF >/dev/null && cmake --build "$2" -j"$(nproc)" >/dev/null
}
# time_cases LABEL_A ENV_A LABEL_B ENV_B: each CASE:BATCH of $AB_CASES, $AB_REPS times, A then B;
# ENV_* are space-separated VAR=VALUE words (NSA_SEL_LIB among them).
time_cases() {
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" NSA_SEL_CUDA=1 NSA_SEL_CUDA_STRICT=1
  for c in ${AB_CASES:-nsa27b:1 nsa27b:16 m125:64 d128:64}; do
    IFS=: read -r name batch <<<"$c"
    for rep in $(seq "${AB_REPS:-2}"); do
      for side in A B; do
        local label env_words
        if [[ $side == A ]]; then label=$1 env_words=$2; else label=$3 env_words=$4; fi
        printf '%-4s %s:%s #%s  ' "$label" "$name" "$batch" "$rep"
        # shellcheck disable=SC2086  # env_words and AB_ARGS are lists of words
        env $env_words python3 bench/profile_kernel.py --case "$name" --batch "$batch" \
          ${AB_ARGS:-} |
          sed 's/^.*: warm/warm/'
      done
    done
  done
}
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
    build .ab/ref build-ab-ref || { echo "build of the ref failed"; exit 1; }
    build . build-ab-tree || { echo "build of the tree failed"; exit 1; }
    echo "ref $(cat .ab/ref/REF) against the working tree"
    time_cases ref "NSA_SEL_LIB=$root/build-ab-ref/libnsa_sel.so" \
      tree "NSA_SEL_LIB=$root/build-ab-tree/libnsa_sel.so"
    ;;
  knob)
    a="${2:?usage: scripts/ab_gpu.sh knob VAR=A VAR=B}"
    b="${3:?usage: scripts/ab_gpu.sh knob VAR=A VAR=B}"
    lib="${NSA_SEL_LIB:-}"
    if [[ -z "$lib" ]]; then
      build . build-ab-tree || { echo "build of the tree failed"; exit 1; }
      lib="$root/build-ab-tree/libnsa_sel.so"
    fi
    echo "$a against $b ($lib)"
    time_cases A "NSA_SEL_LIB=$lib $a" B "NSA_SEL_LIB=$lib $b"
    ;;
  libs)
    a="${2:?usage: scripts/ab_gpu.sh libs LIB_A LIB_B}"
    b="${3:?usage: scripts/ab_gpu.sh libs LIB_A LIB_B}"
    echo "$a against $b"
    time_cases A "NSA_SEL_LIB=$a" B "NSA_SEL_LIB=$b"
    ;;
  *)
    echo "usage: scripts/ab_gpu.sh prepare REF | run | knob VAR=A VAR=B | libs LIB_A LIB_B"
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Tuning runs on the GPU machine: for each CASE:BATCH[:SPLITS[:STAGES[:TEAMS[:PDL_LEAD]]]] in
# $PROFILE_CASES (forcing the split count, pipeline stages, warp teams and the PDL trigger's lead
# through NSA_SEL_DEBUG_SPLITS / _STAGES / _TEAMS / _PDL_LEAD; an empty or 0 field keeps the
# planner's choice), the kernel's graph time
# (warm and L2-cold, bench/profile_kernel.py with build-gpu/libnsa_sel.so) and its phase trace
# (a second build with -DNSA_SEL_TRACE=ON in build-trace). Run after gpu_check.sh has built
# build-gpu (STEPS="configure build" is enough). NO_TRACE=1 skips the traces; ROOF=1 also times a
# read-only gather of the same selection (profile_kernel.py --roof). Output: stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
cases="${PROFILE_CASES:-nsa27b:1 nsa27b:16 d128:64 m125:64 seed256:1024}"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [[ -z "${NO_TRACE:-}" ]]; then
  cmake -S . -B build-trace "${generator[@]}" -DNSA_SEL_WITH_CUDA=ON -DNSA_SEL_CUDA_ARCHS=90 \
    -DNSA_SEL_BUILD_TESTS=OFF -DNSA_SEL_TRACE=ON >/dev/null &&
    cmake --build build-trace -j"$(nproc)" >/dev/null || { echo "trace build failed"; exit 1; }
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" NSA_SEL_CUDA=1 NSA_SEL_CUDA_STRICT=1
for c in $cases; do
  IFS=: read -r case_name batch splits stages teams lead <<<"$c"
  knobs=(NSA_SEL_DEBUG_SPLITS="${splits:-0}" NSA_SEL_DEBUG_STAGES="${stages:-0}"
         NSA_SEL_DEBUG_TEAMS="${teams:-0}" NSA_SEL_DEBUG_PDL_LEAD="${lead:-0}")
  echo "--- $c"
  env "${knobs[@]}" NSA_SEL_LIB="$root/build-gpu/libnsa_sel.so" \
    python3 bench/profile_kernel.py --case "$case_name" --batch "$batch" ${ROOF:+--roof} ||
    echo "profile $c failed"
  [[ -n "${NO_TRACE:-}" ]] && continue
  env "${knobs[@]}" NSA_SEL_LIB="$root/build-trace/libnsa_sel.so" \
    python3 bench/profile_kernel.py --case "$case_name" --batch "$batch" --trace ||
    echo "trace $c failed"
done

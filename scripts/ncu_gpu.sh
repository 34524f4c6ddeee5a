#!/usr/bin/env bash
# Nsight Compute counters for the shapes that decide the performance targets, on the GPU machine,
# after gpu_check.sh has built build-gpu (STEPS="configure build" is enough). For each
# CASE:BATCH in $NCU_CASES: one L2-cold launch (ncu flushes the caches before each replay) at
# the GPU's own clocks (--clock-control none), of bench/profile_kernel.py --ncu's third call,
# with the sections that say what limits a launch (speed of light, memory, occupancy, launch
# resources, scheduler, warp states) and every warp-stall ratio. Then the resource report of every
# kernel in the library (cuobjdump -res-usage: registers, shared memory, stack, spills).
# Output: stdout. ncu's durations are of one launch alone (no graph, no PDL overlap), so they
# run longer than the benchmark's per-call figure at B=1.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
lib="$root/build-gpu/libnsa_sel.so"
[[ -f "$lib" ]] || { echo "no $lib: run gpu_check.sh with STEPS=\"configure build\" first"; exit 1; }
ncu_bin="$(command -v ncu || true)"
[[ -n "$ncu_bin" ]] || ncu_bin="$(dirname "$(command -v nvcc)")/ncu"
[[ -x "$ncu_bin" ]] || { echo "ncu not found"; exit 1; }
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" NSA_SEL_CUDA=1 NSA_SEL_CUDA_STRICT=1 \
  NSA_SEL_LIB="$lib" NSA_SEL_DEBUG_PLAN=1
rc=0
for c in ${NCU_CASES:-nsa27b:1 d128:1 m125:1 nsa27b:64 d128:128 nsa27b:128}; do
  IFS=: read -r name batch <<<"$c"
  echo "=== ncu $name B=$batch"
  "$ncu_bin" --clock-control none -k regex:sel_decode --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section SchedulerStats --section WarpStateStats \
    --metrics 'regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$' \
    python3 bench/profile_kernel.py --case "$name" --batch "$batch" --ncu || rc=1
done
echo "=== resource report (cuobjdump -res-usage)"
cuobjdump -res-usage "$lib" | c++filt || rc=1
exit "$rc"

#!/usr/bin/env bash
# `make gpu-check`: everything on the GPU machine, which has no network (no pip, no apt).
# Uses the python3 there (torch + pytest), the repo via PYTHONPATH, and the googletest source
# carried in .deps/ (scripts/fetch_gtest.sh, run beforehand on a machine with apt).
#
# Steps: configure, build (sm_90), fast_path (the eager fast path's torch extension, compiled
# while CMake builds), ctest (all suites, GPU included), stages1 (the GPU suite
# again with one pipeline stage forced on every shape: the plan v13 takes on many-wave shapes),
# teams4 (the GPU suite with NSA_SEL_DEBUG_TEAMS=4: four warp teams on every d=64 shape, two on
# the others), splits16 (the GPU suite with NSA_SEL_DEBUG_SPLITS=16: 16-block clusters wherever
# they are all resident at once and h <= 16, 8 elsewhere), early (the GPU suite with
# NSA_SEL_DEBUG_EARLY_TMA=2: the early first-tile issue on every one-team plan of 2+ stages that
# allows it, where by default only one wave of 2-stage blocks takes it), early_restart (the same
# with NSA_SEL_DEBUG_EARLY_TMA=3: the early kernel takes the check of the ranges it read ahead as
# failed and always starts over), tma_all (the same with NSA_SEL_DEBUG_NO_TMA=2: the kernels with
# the tensor-copy path on every plan, where by default the one-split plans without the split K/V
# or early kernel take the kernels without it),
# pytest (CUDA, strict), compute-sanitizer memcheck/racecheck/initcheck on the GPU tests named
# *Sanitizer* (racecheck again with one stage forced, with four teams, and with the early issue),
# bench.
# STEPS="configure build fast_path bench" runs a subset (for performance iterations);
# BENCH_ARGS replaces the benchmark's default arguments (--quick). STEPS may also name "profile" (not a default
# step): scripts/profile_gpu.sh, graph time and phase trace of a few shapes; and "ncu" (not a
# default step either): scripts/ncu_gpu.sh, Nsight Compute counters of the target shapes.
# Each step's log goes to $OUT/<step>.log; a failing step does not stop the next ones; a summary
# table closes the run, and the exit status is non-zero if any step failed. The whole run keeps
# to GPU_CHECK_BUDGET_S seconds (default 570, under the 10-minute ceiling of one device call;
# the full benchmark grid alone takes about 300 s on the H200).
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
OUT="${OUT:-$root/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
build="$root/build-gpu"
gtest_dir="$root/.deps/usr/src/googletest"
archs="${CUDA_ARCHS:-90}"
jobs="$(nproc 2>/dev/null || echo 8)"
deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-570} ))
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

sanitizer="$(command -v compute-sanitizer || true)"
if [[ -z "$sanitizer" ]]; then
  for candidate in "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/nvcc)")/compute-sanitizer" \
                   /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -x "$candidate" ]] && { sanitizer="$candidate"; break; }
  done
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# The bench's fla peer: wheels carried in .whl/ (`make peer-wheels` on a machine with the
# registries) go into a scratch site here, since this machine has no network.
if compgen -G "$root/.whl/*.whl" >/dev/null && ! python3 -c "import fla" 2>/dev/null; then
  peer_site="${TMPDIR:-/tmp}/nsa_sel_peer_site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$peer_site" "$root"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:$peer_site"
fi
strict_env=(NSA_SEL_CUDA=1 NSA_SEL_CUDA_STRICT=1 NSA_SEL_LIB="$build/libnsa_sel.so")
# The eager fast path (a torch extension, ~30 s to compile) lives in this cache.
export NSA_SEL_CACHE_DIR="$build/cache"

names=()
results=()
seconds=()

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under a timeout of min(CAP, time left), tees its
# output into $OUT/NAME.log and records pass/fail.
step() {
  local name="$1" cap="$2"
  shift 2
  [[ " ${STEPS:-configure build fast_path ctest stages1 teams4 splits16 early early_restart pytest memcheck racecheck initcheck racecheck_stages1 racecheck_teams4 racecheck_early bench} " == *" $name "* ]] || return 0
  local left=$(( deadline - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  local t0 rc status
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  if (( limit < 5 )); then
    echo "skipped: the time budget is spent" | tee "$OUT/$name.log"
    status="FAIL (no time left)"
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    if (( rc == 0 )); then
      status="pass"
    elif (( rc == 124 || rc == 137 )); then
      status="FAIL (timeout ${limit}s)"
    else
      status="FAIL (exit $rc)"
    fi
  fi
  names+=("$name")
  results+=("$status")
  seconds+=("$(( $(date +%s) - t0 ))")
}

# --sanitize TOOL (this script calling itself, so that `timeout` can run it): one
# compute-sanitizer tool over the GPU tests named *Sanitizer*. A filter that matches nothing is a
# failure, not a silent pass.
if [[ "${1:-}" == --sanitize ]]; then
  [[ -n "$sanitizer" ]] || { echo "compute-sanitizer not found"; exit 1; }
  tmp="$(mktemp)"
  "$sanitizer" --tool "$2" --error-exitcode 99 "$build/nsa_sel_gpu_tests" \
    --gtest_filter='*Sanitizer*' 2>&1 | tee "$tmp"
  rc=${PIPESTATUS[0]}
  if grep -q "PASSED  \] 0 tests" "$tmp" || ! grep -q "PASSED  \]" "$tmp"; then
    echo "no test matched --gtest_filter='*Sanitizer*', or none passed"
    rc=1
  fi
  rm -f "$tmp"
  exit "$rc"
fi
sanitize=(bash "$root/scripts/gpu_check.sh" --sanitize)

# --shards VAR=VALUE (this script calling itself): the GPU suite in 4 parallel shards with one
# debug knob set (the knobs are read once per process, so ctest's run cannot cover them).
if [[ "${1:-}" == --shards ]]; then
  rc=0
  pids=()
  for i in 0 1 2 3; do
    env "$2" GTEST_TOTAL_SHARDS=4 GTEST_SHARD_INDEX=$i "$build/nsa_sel_gpu_tests" \
      >"$OUT/shard$i.log" 2>&1 &
    pids+=($!)
  done
  for i in 0 1 2 3; do
    wait "${pids[$i]}" || rc=1
    echo "shard $i: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/shard$i.log" | tr '\n' ' ')"
    grep -E '^\[  FAILED  \]' "$OUT/shard$i.log" || true
    # A shard that passed nothing, or skipped a test (no GPU), is a failure, not a pass.
    grep -q "PASSED  \]" "$OUT/shard$i.log" || rc=1
    if grep -qE "PASSED  \] 0 tests|SKIPPED \]" "$OUT/shard$i.log"; then
      echo "shard $i ran no test or skipped some"
      rc=1
    fi
  done
  exit "$rc"
fi
shards=(bash "$root/scripts/gpu_check.sh" --shards)

{
  echo "date: $(date -u +%FT%TZ)"
  # The device copy's git metadata can lag its files: the sources hash names the tree that was
  # built (compare with scripts/source_hash.sh where the change was made).
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo none) (git metadata; may lag the files)"
  echo "sources: $(bash "$root/scripts/source_hash.sh")"
  nvidia-smi 2>&1 | head -15
  nvcc --version 2>&1 | tail -2
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  echo "compute-sanitizer: ${sanitizer:-not found}"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# The fast path compiles (one process, one core) while CMake builds: started here, waited for
# by its step.
if [[ " ${STEPS:-fast_path} " == *" fast_path "* ]]; then
  rm -f "$OUT/fast_path.rc"
  ( python3 -m nsa.kernels.build_fast_path >"$OUT/fast_path_build.log" 2>&1
    echo $? >"$OUT/fast_path.rc" ) &
fi

step configure 90 cmake -S . -B "$build" "${generator[@]}" -DNSA_SEL_WITH_CUDA=ON \
  -DNSA_SEL_CUDA_ARCHS="$archs" -DNSA_SEL_GTEST_SOURCE_DIR="$gtest_dir"
step build 240 cmake --build "$build" -j"$jobs"
step fast_path 240 bash -c 'while [[ ! -f "$0/fast_path.rc" ]]; do sleep 1; done
  cat "$0/fast_path_build.log"; exit "$(cat "$0/fast_path.rc")"' "$OUT"
step ctest 150 ctest --test-dir "$build" --output-on-failure -j4 --timeout 120
step stages1 120 "${shards[@]}" NSA_SEL_DEBUG_STAGES=1
step teams4 120 "${shards[@]}" NSA_SEL_DEBUG_TEAMS=4
step splits16 120 "${shards[@]}" NSA_SEL_DEBUG_SPLITS=16
step early 120 "${shards[@]}" NSA_SEL_DEBUG_EARLY_TMA=2
step early_restart 120 "${shards[@]}" NSA_SEL_DEBUG_EARLY_TMA=3
step tma_all 120 "${shards[@]}" NSA_SEL_DEBUG_NO_TMA=2
step pytest 180 env "${strict_env[@]}" python3 -m pytest -q -rs nsa/tests
step memcheck 60 "${sanitize[@]}" memcheck
step racecheck 90 "${sanitize[@]}" racecheck
step initcheck 60 "${sanitize[@]}" initcheck
step racecheck_stages1 90 env NSA_SEL_DEBUG_STAGES=1 "${sanitize[@]}" racecheck
step racecheck_teams4 90 env NSA_SEL_DEBUG_TEAMS=4 "${sanitize[@]}" racecheck
step racecheck_early 90 env NSA_SEL_DEBUG_EARLY_TMA=2 "${sanitize[@]}" racecheck
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
step bench 400 env "${strict_env[@]}" PYTHONUNBUFFERED=1 python3 bench/bench_sel_cuda.py \
  ${BENCH_ARGS:---quick} --csv "$OUT/bench.csv" --plot "$OUT/bench.png"
# Not in the default steps: kernel timing + phase trace per shape (scripts/profile_gpu.sh).
step profile 240 bash "$root/scripts/profile_gpu.sh"
# Not in the default steps: ncu counters and the resource report (scripts/ncu_gpu.sh).
step ncu 300 bash "$root/scripts/ncu_gpu.sh"

{
  echo
  printf '%-10s  %-24s  %s\n' step result seconds
  for i in "${!names[@]}"; do
    printf '%-10s  %-24s  %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}"
  done
  echo "logs: $OUT/<step>.log, also bundled in $OUT/logs.tar.gz"
} | tee "$OUT/summary.txt"
# The device tool returns at most 8 files: bundle the step logs, keep the headline files.
tar -C "$OUT" -czf "$OUT/logs.tar.gz" --exclude=logs.tar.gz --exclude=bench.png \
  --exclude=bench.csv --exclude=summary.txt . 2>/dev/null
find "$OUT" -maxdepth 1 -name '*.log' ! -name bench.log -delete
# The table is also what decides the exit status.
grep -q FAIL "$OUT/summary.txt" && exit 1
exit 0

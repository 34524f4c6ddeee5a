# The v26a/b/c A/Bs, two device calls (seventeenth session wrote them; no device was lent to run
# them). Libraries: HEAD and each patch, built here (about 30 s each on 2 cores after the first):
#   cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DNSA_SEL_WITH_CUDA=ON \
#     -DNSA_SEL_BUILD_TESTS=OFF -DNSA_SEL_CUDA_ARCHS=90   (and /tmp/bt with -DNSA_SEL_TRACE=ON)
#   .carry/head, .carry/trace_head: HEAD;  .carry/new, .carry/trace_new: v26a;
#   .carry/v26b, .carry/v26c: one patch each;  .carry/v26abc: all three
#   (git apply docs/perf/v26*.patch, build, copy libnsa_sel.so, git checkout csrc)
#   cd .carry && tar czf libs.tgz head trace_head new trace_new v26b v26c v26abc  (about 38 MB:
#   carry is limited to 64 MiB, a library is 18 MB, 5.4 MB gzipped); cp docs/perf/v26_ab_run.sh .
# Then: run(carry=[".carry/libs.tgz", ".carry/v26_ab_run.sh"],
#   command="bash .carry/v26_ab_run.sh a > $OUT/ab_a.log 2>&1"), about 5 min; then "bc" the same.
set -u
export PYTHONPATH=$PWD NSA_SEL_CUDA=1 NSA_SEL_CUDA_STRICT=1
L=$PWD/.carry
[ -d $L/head ] || tar xzf $L/libs.tgz -C $L
what=${1:-a}
pk() { python3 bench/profile_kernel.py --case $1 --batch $2 2>&1 | tail -1 | sed 's/^.*: warm/warm/' ; }
tr() { python3 bench/profile_kernel.py --case $1 --batch $2 --trace 2>&1 |
       grep -v "^      [0-9]\|SMs\|per SM\|block end by" ; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [[ $what == *a* ]]; then
  echo "== v26a plans (early forced)"
  for c in nsa27b:1 d128:1 m125:1 nsa27b:64; do IFS=: read n bb <<<"$c"
    NSA_SEL_DEBUG_PLAN=1 NSA_SEL_DEBUG_EARLY_TMA=2 NSA_SEL_LIB=$L/new/libnsa_sel.so \
      python3 bench/profile_kernel.py --case $n --batch $bb 2>&1 | grep "plan:" | head -1; done
  echo "== v26a: head E=1 (plain), head E=2 (early as is), v26a E=2 (check first), v26a E=4 (+ prefetch)"
  for rep in 1 2; do
    for c in nsa27b:1 d128:1 m125:1; do IFS=: read n bb <<<"$c"
      echo -n "$c #$rep head E=1 "; NSA_SEL_DEBUG_EARLY_TMA=1 NSA_SEL_LIB=$L/head/libnsa_sel.so pk $n $bb
      echo -n "$c #$rep head E=2 "; NSA_SEL_DEBUG_EARLY_TMA=2 NSA_SEL_LIB=$L/head/libnsa_sel.so pk $n $bb
      echo -n "$c #$rep v26a E=2 "; NSA_SEL_DEBUG_EARLY_TMA=2 NSA_SEL_LIB=$L/new/libnsa_sel.so pk $n $bb
      echo -n "$c #$rep v26a E=4 "; NSA_SEL_DEBUG_EARLY_TMA=4 NSA_SEL_LIB=$L/new/libnsa_sel.so pk $n $bb
    done
    for c in nsa27b:64 d128:64; do IFS=: read n bb <<<"$c"  # default plans: the early kernel
      echo -n "$c #$rep head dflt "; NSA_SEL_LIB=$L/head/libnsa_sel.so pk $n $bb
      echo -n "$c #$rep v26a dflt "; NSA_SEL_LIB=$L/new/libnsa_sel.so pk $n $bb
    done
  done
  echo "== traces: head E=1, v26a E=2, v26a E=4 (nsa27b B=1)"
  echo "##### head E=1"; NSA_SEL_DEBUG_EARLY_TMA=1 NSA_SEL_LIB=$L/trace_head/libnsa_sel.so tr nsa27b 1
  for e in 2 4; do
    echo "##### v26a E=$e"; NSA_SEL_DEBUG_EARLY_TMA=$e NSA_SEL_LIB=$L/trace_new/libnsa_sel.so tr nsa27b 1
  done
fi
if [[ $what == *b* ]]; then
  echo "== v26b (split combine by shifts): head / v26b, default plans"
  for rep in 1 2; do
    for c in nsa27b:1 d128:1 m125:1 nsa27b:16; do IFS=: read n bb <<<"$c"
      echo -n "$c #$rep head "; NSA_SEL_LIB=$L/head/libnsa_sel.so pk $n $bb
      echo -n "$c #$rep v26b "; NSA_SEL_LIB=$L/v26b/libnsa_sel.so pk $n $bb
    done
  done
fi
if [[ $what == *c* ]]; then
  echo "== v26c (one-split kernels without the split combine): head / v26c, default plans"
  for c in m125:64 m125:128 seed256:1024 seed1024:1024 nsa27b:32; do IFS=: read n bb <<<"$c"
    NSA_SEL_DEBUG_PLAN=1 NSA_SEL_LIB=$L/v26c/libnsa_sel.so \
      python3 bench/profile_kernel.py --case $n --batch $bb 2>&1 | grep "plan:" | head -1; done
  for rep in 1 2; do
    for c in m125:64 m125:128 seed256:1024 seed1024:1024 nsa27b:32; do IFS=: read n bb <<<"$c"
      echo -n "$c #$rep head "; NSA_SEL_LIB=$L/head/libnsa_sel.so pk $n $bb
      echo -n "$c #$rep v26c "; NSA_SEL_LIB=$L/v26c/libnsa_sel.so pk $n $bb
    done
  done
  echo "== all three (v26abc), default plans and the early kernel at B=1 with the prefetch"
  for c in nsa27b:64 d128:64 m125:64 m125:128; do IFS=: read n bb <<<"$c"
    echo -n "$c v26abc "; NSA_SEL_LIB=$L/v26abc/libnsa_sel.so pk $n $bb; done
  for c in nsa27b:1 d128:1 m125:1; do IFS=: read n bb <<<"$c"
    echo -n "$c v26abc E=4 "; NSA_SEL_DEBUG_EARLY_TMA=4 NSA_SEL_LIB=$L/v26abc/libnsa_sel.so pk $n $bb; done
fi

# The v26a A/B for one device call (seventeenth session wrote it; no device was lent to run it).
# Here first (about 5 min on 2 cores): build four libraries into .carry/ and pack them (carry is
# limited to 64 MiB; each library is 18 MB, 5.4 MB gzipped):
#   for v in head trace_head new trace_new; do ... done, that is:
#   cmake -S . -B /tmp/b_head -G Ninja -DCMAKE_BUILD_TYPE=Release -DNSA_SEL_WITH_CUDA=ON \
#     -DNSA_SEL_BUILD_TESTS=OFF -DNSA_SEL_CUDA_ARCHS=90 (and /tmp/b_trace with -DNSA_SEL_TRACE=ON)
#   build both at HEAD -> .carry/head, .carry/trace_head; git apply
#   docs/perf/v26a_early_check_first.patch, build both -> .carry/new, .carry/trace_new; git checkout csrc
#   (cd .carry && tar czf libs.tgz head new trace_new trace_head); cp docs/perf/v26a_ab_run.sh .carry/
# Then one call: run(carry=[".carry/libs.tgz", ".carry/v26a_ab_run.sh"],
#   command="bash .carry/v26a_ab_run.sh > $OUT/ab.log 2>&1"), about 7 min.
set -u
export PYTHONPATH=$PWD NSA_SEL_CUDA=1 NSA_SEL_CUDA_STRICT=1
L=$PWD/.carry
[ -d $L/head ] || tar xzf $L/libs.tgz -C $L
pk() { python3 bench/profile_kernel.py --case $1 --batch $2 2>&1 | tail -1 | sed 's/^.*: warm/warm/' ; }
echo "== plans"
for c in nsa27b:1 nsa27b:2 nsa27b:4 d128:1 m125:1 nsa27b:64; do IFS=: read n bb <<<"$c"; NSA_SEL_DEBUG_PLAN=1 NSA_SEL_DEBUG_EARLY_TMA=2 NSA_SEL_LIB=$L/new/libnsa_sel.so python3 bench/profile_kernel.py --case $n --batch $bb 2>&1 | grep "plan:" | head -1; done
echo "== timing: head E=1 (plain), head E=2 (early as was), new E=2 (check loads first), new E=4 (+ L2 prefetch)"
for rep in 1 2; do
 for c in nsa27b:1 d128:1 m125:1 nsa27b:2 nsa27b:4; do IFS=: read n bb <<<"$c"
  echo -n "$c #$rep head E=1 "; NSA_SEL_DEBUG_EARLY_TMA=1 NSA_SEL_LIB=$L/head/libnsa_sel.so pk $n $bb
  echo -n "$c #$rep head E=2 "; NSA_SEL_DEBUG_EARLY_TMA=2 NSA_SEL_LIB=$L/head/libnsa_sel.so pk $n $bb
  echo -n "$c #$rep new  E=2 "; NSA_SEL_DEBUG_EARLY_TMA=2 NSA_SEL_LIB=$L/new/libnsa_sel.so pk $n $bb
  echo -n "$c #$rep new  E=4 "; NSA_SEL_DEBUG_EARLY_TMA=4 NSA_SEL_LIB=$L/new/libnsa_sel.so pk $n $bb
 done
 for c in nsa27b:64 d128:64; do IFS=: read n bb <<<"$c"
  echo -n "$c #$rep head dflt "; NSA_SEL_LIB=$L/head/libnsa_sel.so pk $n $bb
  echo -n "$c #$rep new  dflt "; NSA_SEL_LIB=$L/new/libnsa_sel.so pk $n $bb
  echo -n "$c #$rep new  E=4  "; NSA_SEL_DEBUG_EARLY_TMA=4 NSA_SEL_LIB=$L/new/libnsa_sel.so pk $n $bb
 done
done
echo "== traces (HEAD with marks 13, 14: plain and early as is; v26a: early, early + prefetch)"
for e in 1 2; do echo "##### head nsa27b:1 E=$e"; NSA_SEL_DEBUG_EARLY_TMA=$e NSA_SEL_LIB=$L/trace_head/libnsa_sel.so python3 bench/profile_kernel.py --case nsa27b --batch 1 --trace 2>&1 | grep -v "^      [0-9]\|SMs\|per SM\|block end by"; done
for e in 2 4; do echo "##### nsa27b:1 E=$e"; NSA_SEL_DEBUG_EARLY_TMA=$e NSA_SEL_LIB=$L/trace_new/libnsa_sel.so python3 bench/profile_kernel.py --case nsa27b --batch 1 --trace 2>&1 | grep -v "^      [0-9]\|SMs\|per SM\|block end by"; done
echo "##### d128:1 E=2"; NSA_SEL_DEBUG_EARLY_TMA=2 NSA_SEL_LIB=$L/trace_new/libnsa_sel.so python3 bench/profile_kernel.py --case d128 --batch 1 --trace 2>&1 | grep -v "^      [0-9]\|SMs\|per SM\|block end by"

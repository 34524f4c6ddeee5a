"""Where the wall time of one eager call goes (host-side), for tuning the Python path.

    python3 bench/eager_probe.py [--case m125] [--sets 1 8 64 489]

1. Bursts of 8 calls then a sync (the benchmark's eager pattern, and a research loop's): median
   wall µs per call and the host time before the sync, with 1 or more rotated input sets; on
   the eager fast path (nsa/kernels/_fast.py) and on the Python path.
2. The pieces of one call, each timed alone over 3000 back-to-back calls: argument validation,
   the output allocation, packing NsaSelParams, the C validation and the C launch through ctypes
   (planning + cudaLaunchKernelEx), and one tiny torch op for scale.
3. With --after-bench CASE:B,...: the same after each of those benchmark shapes has run in this
   process with its peers (bench_sel_cuda.run_case), plus a cProfile of 2000 calls, to see what
   the benchmark process accumulates that slows an eager call.
Needs a CUDA device and the library (NSA_SEL_LIB); NOTES.md quotes its H200 figures.
"""

import argparse
import gc
import os
import statistics
import time

import torch

os.environ.setdefault("NSA_SEL_CUDA", "1")
os.environ.setdefault("NSA_SEL_CUDA_STRICT", "1")

from profile_kernel import CASES, make_inputs  # noqa: E402

from nsa._validate import validate  # noqa: E402
from nsa.kernels import _lib  # noqa: E402
from nsa.kernels import cuda_sel_kernel as ck  # noqa: E402


def bursts(case: str, batch: int, n_sets: int, gen, samples: int = 40) -> str:
    sets = [make_inputs(case, batch, gen) for _ in range(n_sets)]
    for a in sets[:4]:
        ck.selection_attention_cuda(*a)
    torch.cuda.synchronize()
    k, walls, issues = 0, [], []
    gc.collect()
    gc.freeze()
    try:
        for _ in range(samples):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(8):
                ck.selection_attention_cuda(*sets[k % n_sets])
                k += 1
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) / 8 * 1e6)
            issues.append((t1 - t0) / 8 * 1e6)
    finally:
        gc.unfreeze()
    return (
        f"{case} B={batch} sets={n_sets}: wall {statistics.median(walls):.1f} us/call, "
        f"host before the sync {statistics.median(issues):.1f}"
    )


def pieces(case: str, batch: int, gen, calls: int = 3000) -> list:
    Q, K, V, r = make_inputs(case, batch, gen)
    sizes = validate(Q, K, V, r, None)
    lib = _lib.get_library(Q.device.index or 0)
    out = torch.empty(sizes[:4] + (sizes.Dv,), dtype=V.dtype, device=Q.device)
    scale = 1.0 / sizes.Dk**0.5

    def pack():
        return _lib.pack_params(
            Q.data_ptr(), K.data_ptr(), V.data_ptr(), r.data_ptr(), 0, out.data_ptr(),
            *sizes, *Q.stride(), *K.stride(), *V.stride(), *out.stride(), *r.stride(), 0,
            scale, 1, 0, 0,
        )  # fmt: skip

    params = pack()
    stream = ck._current_stream(Q.device)
    t = torch.zeros(16, device=Q.device)

    def python_path():
        ck._fast_enabled = False
        try:
            return ck.selection_attention_cuda(Q, K, V, r)
        finally:
            ck._fast_enabled = True

    fns = {
        "whole call": lambda: ck.selection_attention_cuda(Q, K, V, r),
        "whole call, Python path": python_path,
        "validate": lambda: validate(Q, K, V, r, None),
        "torch.empty (output)": lambda: torch.empty(
            sizes[:4] + (sizes.Dv,), dtype=V.dtype, device=Q.device
        ),
        "current stream": lambda: ck._current_stream(Q.device),
        "pack_params": pack,
        "C decode_supported": lambda: lib.supported(params),
        "C decode_cuda (launch)": lambda: lib.launch(params, Q.device.index or 0, stream),
        "add_ (one torch op)": lambda: t.add_(1),
    }
    rows = []
    for name, fn in fns.items():
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        gc.collect()
        gc.freeze()
        try:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            us = (time.perf_counter() - t0) / calls * 1e6
        finally:
            gc.unfreeze()
        torch.cuda.synchronize()
        rows.append(f"  {name:24s} {us:6.1f} us")
    return rows


def profile_calls(case: str, batch: int, gen, calls: int = 2000, top: int = 12) -> str:
    import cProfile
    import io
    import pstats

    Q, K, V, r = make_inputs(case, batch, gen)
    for _ in range(100):
        ck.selection_attention_cuda(Q, K, V, r)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    gc.collect()
    gc.freeze()
    try:
        prof.enable()
        for _ in range(calls):
            ck.selection_attention_cuda(Q, K, V, r)
        prof.disable()
    finally:
        gc.unfreeze()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def bench_cases(spec: str) -> list:
    """(label, bench_sel_cuda.Case) for each CASE:B of a comma list."""
    import bench_sel_cuda as bench

    out = []
    for item in spec.split(","):
        name, b = item.split(":")
        out.append((item, bench.model_case(name, int(b))))
    return out


def after_bench(spec: str, case: str, batch: int, gen) -> None:
    import bench_sel_cuda as bench
    import peers as peerlib

    roof = bench.measure_copy_roof()

    def report(when: str) -> None:
        print(f"== {when}: {bursts(case, batch, 1, gen)}", flush=True)
        print("\n".join(pieces(case, batch, gen, calls=1000)), flush=True)
        print(profile_calls(case, batch, gen), flush=True)

    report("fresh process")
    for item, c in bench_cases(spec):
        t0 = time.perf_counter()
        res = bench.run_case(c, torch.bfloat16, list(peerlib.PEER_NAMES), roof)
        print(
            f"ran {c.label()} with peers in {time.perf_counter() - t0:.1f} s: bench eager "
            f"{res.eager_us} us, graph {res.graph_us} us",
            flush=True,
        )
        report(f"after {item}")


def bench_eager(spec: str) -> None:
    """The benchmark's own eager timing (bench_sel_cuda.time_eager) on its rotated inputs, against
    the same with one input set and with a longer warm-up, several times over, in one process."""
    import bench_sel_cuda as bench

    for item, c in bench_cases(spec):
        inp = bench.make_inputs(c, torch.bfloat16, "cuda", bench.free_bytes())

        def call(r, inp=inp):
            K, V = inp.kv(r)
            return ck.selection_attention_cuda(inp.Q[r], K, V, inp.ranges[r], scale=inp.scale)

        def spin(seconds, R=inp.R):
            t0 = time.perf_counter()
            k = 0
            while time.perf_counter() - t0 < seconds:
                call(k % R)
                k += 1
            torch.cuda.synchronize()

        for rep in range(3):
            a = bench.time_eager(call, inp.R)
            b1 = bench.time_eager(call, 1)
            spin(0.05)
            w = bench.time_eager(call, inp.R)
            time.sleep(0.05)
            s = bench.time_eager(call, inp.R)
            print(
                f"{item} R={inp.R} rep {rep}: time_eager {a:.1f} us, one set {b1:.1f}, after 50 ms "
                f"of calls {w:.1f}, after 50 ms asleep {s:.1f}",
                flush=True,
            )
        del inp
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="m125", choices=CASES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sets", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--after-bench", default="", metavar="CASE:B,...")
    ap.add_argument("--bench-eager", default="", metavar="CASE:B,...")
    a = ap.parse_args()
    if a.bench_eager:
        bench_eager(a.bench_eager)
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    if a.after_bench:
        after_bench(a.after_bench, a.case, a.batch, gen)
        return
    status = ck.kernel_status()
    print(f"eager fast path: {status['fast_path']} {status['fast_path_reason']}".rstrip())
    for n in a.sets:
        print(bursts(a.case, a.batch, n, gen), flush=True)
        ck._fast_enabled = False
        print("  Python path: " + bursts(a.case, a.batch, n, gen), flush=True)
        ck._fast_enabled = True
    print(f"{a.case} B={a.batch}, each piece alone over 3000 calls:")
    print("\n".join(pieces(a.case, a.batch, gen)))


if __name__ == "__main__":
    main()

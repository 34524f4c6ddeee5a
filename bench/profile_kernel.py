"""Kernel-only timing for tuning: one shape, CUDA-graph replay of 32 calls, warm or L2-cold.

    python3 bench/profile_kernel.py --case nsa27b --batch 1 [--sets 64] [--calls 32]

Prints the graph time per call for the same inputs (warm L2) and for `--sets` rotated input sets
(K/V copies, cold L2). Use with NSA_SEL_DEBUG_SPLITS=k to force the split count, and under ncu
(`--ncu` runs a handful of eager calls only). bench_sel_cuda.py is the benchmark of record.
"""

import argparse
import os

import torch

os.environ.setdefault("NSA_SEL_CUDA", "1")
os.environ.setdefault("NSA_SEL_CUDA_STRICT", "1")

from nsa.kernels.cuda_sel_kernel import selection_attention_cuda  # noqa: E402

CASES = {  # G, h, Dk, Dv, S_kv, n
    "nsa27b": (4, 16, 192, 128, 65536, 16),
    "d128": (4, 16, 128, 128, 32768, 16),
    "m125": (2, 6, 64, 64, 8192, 16),
    "seed1024": (1, 8, 128, 128, 512, 1),
    "seed256": (1, 4, 64, 64, 512, 1),
}


def make_inputs(case, B, gen):
    G, h, dk, dv, s_kv, n = CASES[case]
    dt = torch.bfloat16
    Q = torch.randn(B, 1, G, h, dk, device="cuda", dtype=dt, generator=gen)
    K = torch.randn(B, G, s_kv, dk, device="cuda", dtype=dt, generator=gen)
    V = torch.randn(B, G, s_kv, dv, device="cuda", dtype=dt, generator=gen)
    if n == 1:
        r = torch.tensor([0, s_kv], device="cuda", dtype=torch.int32).expand(B, 1, G, 1, 2)
    else:
        nb = s_kv // 64
        blk = torch.rand(B, 1, G, nb, device="cuda", generator=gen).argsort(-1)[..., :n]
        blk, _ = blk.sort(-1)
        r = torch.stack([blk * 64, blk * 64 + 64], -1).to(torch.int32)
    return Q, K, V, r.contiguous()


def graph_us(sets, calls):
    outs = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for a in sets:
            selection_attention_cuda(*a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            outs.append(selection_attention_cuda(*sets[i % len(sets)]))
    times = []
    for _ in range(25):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


def eager_us(fn, n=200, reps=15):
    """Median wall us per call of `fn` (n back-to-back calls, then a sync)."""
    import time

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) / n * 1e6)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="nsa27b", choices=CASES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sets", type=int, default=0, help="rotated input sets (0: ~256 MB worth)")
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--ncu", action="store_true", help="a few eager calls only (for ncu)")
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    G, h, dk, dv, s_kv, n = CASES[a.case]
    L = min(n * 64, s_kv) if n > 1 else s_kv
    sel_bytes = a.batch * G * L * (dk + dv) * 2
    if a.ncu:
        x = make_inputs(a.case, a.batch, gen)
        for _ in range(3):
            selection_attention_cuda(*x)
        torch.cuda.synchronize()
        return
    x = make_inputs(a.case, a.batch, gen)
    warm = graph_us([x], a.calls)
    t = torch.zeros(16, device="cuda")
    host = (
        f"eager {eager_us(lambda: selection_attention_cuda(*x)):.1f} us/call "
        f"(torch.empty {eager_us(lambda: torch.empty(64, device='cuda')):.1f}, "
        f"add_ {eager_us(lambda: t.add_(1)):.1f})"
    )
    full_bytes = a.batch * G * s_kv * (dk + dv) * 2
    sets = a.sets or max(1, min(64, int(256e6 // max(sel_bytes, 1)), int(20e9 // full_bytes)))
    cold = graph_us([make_inputs(a.case, a.batch, gen) for _ in range(sets)], a.calls)
    tag = os.environ.get("NSA_SEL_DEBUG_SPLITS", "auto")
    print(
        f"{a.case} B={a.batch} splits={tag}: warm {warm:.2f} us  cold({sets} sets) {cold:.2f} us"
        f"  selected {sel_bytes / 1e6:.1f} MB -> {sel_bytes / cold / 1e3:.0f} GB/s cold; {host}"
    )


if __name__ == "__main__":
    main()

"""Where the wall time of one eager call goes (host-side), for tuning the Python path.

    python3 bench/eager_probe.py [--case m125] [--sets 1 8 64 489]

1. Bursts of 8 calls then a sync (the benchmark's eager pattern, and a research loop's): median
   wall µs per call and the host time before the sync, with 1 or more rotated input sets.
2. The pieces of one call, each timed alone over 3000 back-to-back calls: argument validation,
   the output allocation, packing NsaSelParams, the C validation and the C launch through ctypes
   (planning + cudaLaunchKernelEx), and one tiny torch op for scale.
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
    fns = {
        "whole call": lambda: ck.selection_attention_cuda(Q, K, V, r),
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="m125", choices=CASES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sets", type=int, nargs="+", default=[1, 8, 64])
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in a.sets:
        print(bursts(a.case, a.batch, n, gen), flush=True)
    print(f"{a.case} B={a.batch}, each piece alone over 3000 calls:")
    print("\n".join(pieces(a.case, a.batch, gen)))


if __name__ == "__main__":
    main()

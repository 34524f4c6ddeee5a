"""Kernel-only timing for tuning: one shape, CUDA-graph replay of 32 calls, warm or L2-cold.

    python3 bench/profile_kernel.py --case nsa27b --batch 1 [--sets 64] [--calls 32]

Prints the graph time per call for the same inputs (warm L2) and for `--sets` rotated input sets
(K/V copies, cold L2). Use with NSA_SEL_DEBUG_SPLITS / _STAGES / _TEAMS=k to force the plan, and
under ncu (`--ncu` runs a handful of eager calls only). bench_sel_cuda.py is the benchmark of
record.

`--trace` needs a tuning build of the library (cmake -DNSA_SEL_TRACE=ON, named by NSA_SEL_LIB):
the kernel then stamps each block's phases with %globaltimer, and this prints, per phase, the
median over blocks and calls of the cold graph replay, plus each call's span and the gap between
consecutive calls.
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
    "seed1024s": (1, 8, 128, 128, 256, 1),  # the seed grid's D=128, L=256
    "seed1024t": (1, 8, 128, 128, 128, 1),  # the seed grid's D=128, L=128
    "seed256": (1, 4, 64, 64, 512, 1),
    "seed256s": (1, 4, 64, 64, 256, 1),  # the seed grid's D=64, L=256
}


def make_inputs(case, B, gen, kv_lens=False):
    """(Q, K, V, ranges), and with `kv_lens` a fifth tensor: kv_lens = S_kv for every sequence
    (the same result, but the kernel reads it, as it does for an engine's ragged batch)."""
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
    x = (Q, K, V, r.contiguous())
    return x + (torch.full((B,), s_kv, device="cuda", dtype=torch.int32),) if kv_lens else x


def call(Q, K, V, r, kv_lens=None):
    return selection_attention_cuda(Q, K, V, r, kv_lens=kv_lens)


def graph_us(sets, calls, fn=None):
    fn = fn or call
    outs = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for a in sets:
            fn(*a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            outs.append(fn(*sets[i % len(sets)]))
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


TRACE_LAUNCHES, TRACE_BLOCKS, TRACE_WORDS = 64, 2048, 32
PHASES = [  # (from slot, to slot, name): the kernel's NSA_SEL_TRACE_MARK points
    (0, 1, "entry -> griddepcontrol.wait done"),
    (1, 9, "ranges: loads + scan (warp 0)"),  # the early kernel: its check of them
    (1, 2, "ranges to shared memory"),  # the early kernel: the check and its barrier
    (2, 3, "first tile landed"),
    (3, 4, "main loop"),
    (4, 5, "block merge (+ store if unsplit)"),
    (4, 11, "  wait for the block's other warps"),
    (11, 12, "  publish warp states"),
    (12, 5, "  merge (+ store)"),
    (12, 13, "    split: merge"),
    (13, 5, "    split: cluster barrier wait"),
    (5, 7, "split: push to owners + wait for peers"),
    (5, 14, "  push issued"),
    (14, 7, "  wait for the peers' pushes"),
    (7, 8, "split: owner combine + store"),
]
CLOCK = 16  # slot 16 + i: clock64 at mark i (slot i: %globaltimer, in steps of about 32 ns)


def phase_rows(recs):
    """Per phase of PHASES, the median and p90 over every block of `recs` (one int64 array of
    trace records [blocks, TRACE_WORDS] per call), and the SM clock. A block's phases are timed by
    its SM's clock64 at the block's mean clock over the call (the globaltimer's 32 ns steps are as
    long as some phases); spans across SMs (trace_report) use the globaltimer."""
    import numpy as np

    ghz = [(r[:, CLOCK + 6] - r[:, CLOCK]) / np.maximum(r[:, 6] - r[:, 0], 1) for r in recs]
    rows = []
    for a, b, name in PHASES:
        d = []
        for r, f in zip(recs, ghz):
            ok = (r[:, a] > 0) & (r[:, b] >= r[:, a]) & (f > 0)
            d.append((r[ok, CLOCK + b] - r[ok, CLOCK + a]) / f[ok] / 1e3)
        d = np.concatenate(d) if d else np.zeros(0)
        if d.size:
            med, p90 = np.median(d), np.percentile(d, 90)
            rows.append(f"  {name:38s} median {med:7.2f} us  p90 {p90:7.2f}")
    mhz = np.concatenate([f * 1e3 for r, f in zip(recs, ghz) if r.size])
    rows.append(f"  SM clock (clock64 / globaltimer)       median {np.median(mhz):7.0f} MHz")
    return rows


def trace_report(sets, calls, blocks, sel_bytes=0):
    """Phase breakdown of the last `calls` launches (one graph replay of cold sets), and a
    timeline of one call: blocks resident and the streaming rate, each block's share of
    `sel_bytes` spread evenly over its loads (ranges done -> loop end)."""
    import ctypes

    import numpy as np

    lib = ctypes.CDLL(os.environ["NSA_SEL_LIB"])
    fetch = lib.nsa_sel_trace_fetch
    fetch.restype = ctypes.c_longlong
    fetch.argtypes = [ctypes.c_void_p, ctypes.c_longlong]
    graph_us(sets, calls)  # eager warm-up allocates the ring, then capture + replays
    words = TRACE_LAUNCHES * TRACE_BLOCKS * TRACE_WORDS
    buf = np.zeros(words, dtype=np.uint64)
    seq = fetch(buf.ctypes.data, words)
    if seq < calls:
        raise SystemExit(f"trace fetch failed ({seq}): is NSA_SEL_LIB a -DNSA_SEL_TRACE=ON build?")
    ring = buf.reshape(TRACE_LAUNCHES, TRACE_BLOCKS, TRACE_WORDS)
    nb = min(blocks, TRACE_BLOCKS)
    recs = [ring[k % TRACE_LAUNCHES, :nb].astype(np.int64) for k in range(seq - calls, seq)]
    recs = [r[r[:, 0] > 0] for r in recs]  # blocks of the grid (the ring starts zeroed)
    rows = phase_rows(recs)
    spans, gaps, ends, waits = [], [], [], []
    for i, r in enumerate(recs):
        if not r.size:
            continue
        t1 = r[:, 1].min()
        spans.append((r[:, 6].max() - t1) / 1e3)  # first wait done -> last block end
        ends.append(np.percentile(r[:, 6] - t1, [10, 50, 90]) / 1e3)
        waits.append(np.percentile(r[:, 1] - t1, [50, 90, 100]) / 1e3)
        if i and recs[i - 1].size:
            gaps.append((t1 - recs[i - 1][:, 6].max()) / 1e3)
    e, w = np.median(np.array(ends), 0), np.median(np.array(waits), 0)
    print(f"trace: {calls} calls, {recs[-1].shape[0]} blocks per call")
    print("\n".join(rows))
    print(
        f"  call: first wait done -> last block end median {np.median(spans):7.2f} us\n"
        f"  block wait-done after the first  p50 {w[0]:.2f} p90 {w[1]:.2f} max {w[2]:.2f} us\n"
        f"  block end after the first wait   p10 {e[0]:.2f} p50 {e[1]:.2f} p90 {e[2]:.2f} us\n"
        f"  previous call's last end -> first wait done  median {np.median(gaps):7.2f} us"
    )
    sm_report(recs)
    r = recs[len(recs) // 2]
    if r.size and sel_bytes:
        t1, nbk = r[:, 1].min(), 16
        t_end = r[:, 6].max()
        edges = t1 + (t_end - t1) * np.arange(nbk + 1) / nbk
        per_block = sel_bytes / r.shape[0]
        lo, hi = r[:, 2], np.maximum(r[:, 4], r[:, 2] + 1)
        cells = []
        for k in range(nbk):
            a, b = edges[k], edges[k + 1]
            live = int(((r[:, 1] < b) & (r[:, 6] > a)).sum())
            ov = np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0, None) / (hi - lo)
            tbs = (ov * per_block).sum() / max(b - a, 1) / 1e3  # bytes / ns -> TB/s
            cells.append(f"{(a - t1) / 1e3:5.1f}:{live:4d}/{tbs:4.2f}")
        print("  timeline of one call (start us: resident blocks / est. TB/s streamed):")
        for k in range(0, nbk, 4):
            print("    " + "  ".join(cells[k : k + 4]))


def sm_report(recs):
    """Is a block's end time a property of its SM? Over the traced calls: the share of the
    block-end variance that lies between SMs (per-SM means), the correlation of the per-SM mean
    end between even and odd calls (1: the same SMs are late every call), the mean end by blocks
    resident on the SM, and the latest and earliest SMs (ids as %smid)."""
    import numpy as np

    sm_ids, ends, share = [], [], []
    for r in recs:
        if not r.size:
            continue
        sm = r[:, 15]
        cnt = np.bincount(sm, minlength=256)
        sm_ids.append(sm)
        ends.append((r[:, 6] - r[:, 1].min()) / 1e3)
        share.append(cnt[sm])
    if len(ends) < 4:
        return
    sm_all, end_all, share_all = map(np.concatenate, (sm_ids, ends, share))
    n_sm = int(sm_all.max()) + 1

    def mean_by_sm(sm, end):  # NaN for SMs without a block
        c = np.bincount(sm, minlength=n_sm)
        t = np.bincount(sm, weights=end, minlength=n_sm)
        return np.where(c > 0, t / np.maximum(c, 1), np.nan)

    def per_sm(idx):
        sm = np.concatenate([sm_ids[i] for i in idx])
        return mean_by_sm(sm, np.concatenate([ends[i] for i in idx]))

    k = len(ends)
    even, odd = per_sm(range(0, k, 2)), per_sm(range(1, k, 2))
    both = ~np.isnan(even) & ~np.isnan(odd)
    corr = np.corrcoef(even[both], odd[both])[0, 1] if both.sum() > 2 else float("nan")
    mean_sm = per_sm(range(k))
    between = np.var(mean_sm[sm_all]) / max(np.var(end_all), 1e-12)
    # The same among the blocks on SMs holding the most common count (one wave of 256 blocks on
    # 132 SMs leaves 8 SMs with one block, which end early whichever SMs they are).
    counts, freq = np.unique(share_all, return_counts=True)
    mode = counts[np.argmax(freq)]
    modal = share_all == mode
    sm_m, end_m = sm_all[modal], end_all[modal]
    between_m = np.var(mean_by_sm(sm_m, end_m)[sm_m]) / max(np.var(end_m), 1e-12)
    lone = [set(sm_ids[i][share[i] == 1].tolist()) for i in range(k)]
    same_lone = np.mean([len(lone[i] & lone[0]) / max(len(lone[0]), 1) for i in range(1, k)])
    by_share = "  ".join(
        f"{c} block(s): {end_all[share_all == c].mean():.2f} us ({(share_all == c).mean():.0%})"
        for c in np.unique(share_all)
    )
    order = np.argsort(np.nan_to_num(mean_sm, nan=-1.0))
    used = order[~np.isnan(mean_sm[order])]
    late = ", ".join(f"{i}:{mean_sm[i]:.1f}" for i in used[::-1][:12])
    early = ", ".join(f"{i}:{mean_sm[i]:.1f}" for i in used[:12])
    print(
        f"  per SM ({used.size} SMs, {k} calls): {between:.0%} of the block-end variance is"
        f" between SMs; per-SM mean end, even vs odd calls: r = {corr:.2f}\n"
        f"  on SMs of {mode} blocks only: {between_m:.0%} between SMs;"
        f" SMs with one block: {len(lone[0])} per call, {same_lone:.0%} the same as call 0's\n"
        f"  block end by blocks on its SM: {by_share}\n"
        f"  latest SMs (id:mean end us)   {late}\n"
        f"  earliest SMs                  {early}"
    )


def gather_roof_fn(tpr):
    """A Triton kernel that only reads what the op must read (the K and V rows of each selected
    64-token tile, contiguous per (b, g) in these inputs, whose ranges are whole 64-token blocks)
    and writes one float per tile: the stream bandwidth this access pattern allows, with no
    softmax, pipeline or combine around it. `tpr`: 64-token tiles per range (all ranges alike)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_sum(
        k_ptr,
        v_ptr,
        r_ptr,
        out_ptr,
        s_kv,
        n,
        tpr,
        DK: tl.constexpr,
        DV: tl.constexpr,
        CH: tl.constexpr,
    ):
        pid = tl.program_id(0)  # (row, range j, tile t of the range)
        row = pid // (n * tpr)
        j = (pid // tpr) % n
        start = tl.load(r_ptr + (row * n + j) * 2).to(tl.int64) + (pid % tpr) * 64
        offs = tl.arange(0, CH)
        acc = tl.zeros([CH], dtype=tl.float32)
        kb = k_ptr + row.to(tl.int64) * s_kv * DK + start * DK
        for c in tl.static_range(0, 64 * DK, CH):
            acc += tl.load(kb + c + offs).to(tl.float32)
        vb = v_ptr + row.to(tl.int64) * s_kv * DV + start * DV
        for c in tl.static_range(0, 64 * DV, CH):
            acc += tl.load(vb + c + offs).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc))

    def fn(Q, K, V, r):
        B, G, s_kv, dk = K.shape
        n = r.shape[3]
        out = torch.empty(B * G * n * tpr, device=K.device, dtype=torch.float32)
        _gather_sum[(B * G * n * tpr,)](
            K, V, r, out, s_kv, n, tpr, DK=dk, DV=V.shape[3], CH=2048, num_warps=4
        )
        return out

    return fn


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
    ap.add_argument("--trace", action="store_true", help="phase breakdown (NSA_SEL_TRACE build)")
    ap.add_argument(
        "--roof",
        action="store_true",
        help="also time a read-only gather of the same selected bytes (Triton)",
    )
    ap.add_argument(
        "--kv-lens", action="store_true", help="pass kv_lens (= S_kv: same result, one more read)"
    )
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    G, h, dk, dv, s_kv, n = CASES[a.case]
    L = min(n * 64, s_kv) if n > 1 else s_kv
    sel_bytes = a.batch * G * L * (dk + dv) * 2
    full_bytes = a.batch * G * s_kv * (dk + dv) * 2
    # Cold sets: about 256 MB of selected bytes, at most 64 sets and 20 GB of K/V copies.
    sets = a.sets or max(1, min(64, int(256e6 // max(sel_bytes, 1)), int(20e9 // full_bytes)))
    if a.ncu:
        x = make_inputs(a.case, a.batch, gen, a.kv_lens)
        for _ in range(3):
            call(*x)
        torch.cuda.synchronize()
        return
    if a.trace:
        splits = 16  # the most (kMaxSplits): blocks past the grid keep zero records, dropped
        trace_report(
            [make_inputs(a.case, a.batch, gen, a.kv_lens) for _ in range(sets)],
            a.calls,
            a.batch * G * splits,
            sel_bytes,
        )
        return
    x = make_inputs(a.case, a.batch, gen, a.kv_lens)
    warm = graph_us([x], a.calls)
    t = torch.zeros(16, device="cuda")
    host = (
        f"eager {eager_us(lambda: call(*x)):.1f} us/call "
        f"(torch.empty {eager_us(lambda: torch.empty(64, device='cuda')):.1f}, "
        f"add_ {eager_us(lambda: t.add_(1)):.1f})"
    )
    csets = [make_inputs(a.case, a.batch, gen, a.kv_lens) for _ in range(sets)]
    cold = graph_us(csets, a.calls)
    knob = {
        k: os.environ.get(f"NSA_SEL_DEBUG_{k.upper()}", "0")
        for k in ("splits", "stages", "teams", "pdl_lead", "kvsplit")
    }
    tag = " ".join(f"{k}={'auto' if v in ('', '0') else v}" for k, v in knob.items())
    tag += " kv_lens=given" if a.kv_lens else ""
    print(
        f"{a.case} B={a.batch} {tag}: warm {warm:.2f} us  cold({sets} sets) {cold:.2f} us"
        f"  selected {sel_bytes / 1e6:.1f} MB -> {sel_bytes / cold / 1e3:.0f} GB/s cold; {host}"
    )
    if a.roof:
        roof_fn = gather_roof_fn(1 if n > 1 else s_kv // 64)
        g_us = graph_us([c[:4] for c in csets], a.calls, roof_fn)
        print(
            f"  gather roof (Triton read-only, same selection, cold): {g_us:.2f} us  "
            f"-> {sel_bytes / g_us / 1e3:.0f} GB/s"
        )


if __name__ == "__main__":
    main()

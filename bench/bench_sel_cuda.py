"""Benchmark of the NSA selection-attention decode kernel against its peers (PERF.md's method).

One self-describing line per configuration:

    <shape> | path=kernel cuda_ms ref_ms speedup mae | eager_us graph_us GB/s roof% floor_us
            | peers graph_us: packed gather_sdpa flex dense fla

- cuda_ms / ref_ms: graph figures of the kernel and of this project's packed PyTorch reference
  (``grouped_selection_attention_packed``), in ms; speedup = ref / cuda; when the reference cannot
  be captured at that size (under capture it sizes its gather by the static bound n * S_kv) both
  use the eager figure and the line says ``(eager)``. mae: the kernel against a float64 oracle.
- eager_us: wall time per Python call, host overhead included: a sample is 8 back-to-back calls
  (rotating inputs) then a synchronize, divided by 8 (1 call per sample for calls over 2 ms);
  median of 25 samples after warm-up.
- graph_us: one CUDA graph holding >= 32 calls (whole rounds over the R input sets), replayed;
  replay time / calls from CUDA events, median of >= 20 replays.
- GB/s from bytes = B*G*L*(Dk+Dv)*2 + B*G*h*(Dk+Dv)*2 (decimal GB), roof% against the
  device-to-device copy bandwidth measured at start (read + write counted), floor_us = bytes /
  that bandwidth.
- L2 is kept cold: R input sets (Q and selection) and C copies of K/V per round, so that the
  selected bytes touched per round exceed 256 MB (``rot=RxC`` on the line).

Strict mode: NSA_SEL_CUDA=1 and NSA_SEL_CUDA_STRICT=1 are set before any call, and before timing a
shape the kernel path is proven to run: the wrapper's reference fallback is replaced by a function
that raises, one call is made, and its output is checked against the float64 oracle. A shape the
kernel does not cover is printed as ``path=reference (not covered)`` without kernel figures.

Usage:
    python3 bench/bench_sel_cuda.py              # full grid (seed grid, 3 models, context)
    python3 bench/bench_sel_cuda.py --quick      # PERF.md's peer table shapes
    python3 bench/bench_sel_cuda.py --demo       # CPU: references only; GPU: a small subset
    options: --csv FILE --plot FILE.png --peers packed,gather_sdpa,flex,dense,fla --no-peers
             --dtype bf16|fp16 --only nsa27b,ctx,...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import peers as peerlib  # noqa: E402

ROT_BYTES = 256e6  # selected bytes touched per rotation round (> 200 MB: L2 is 50 MB)
MAX_SETS = 512  # input sets per round (tiny shapes)
KV_BUDGET_FRACTION = 0.35  # of free memory, for extra K/V copies (fla's layout copies come on top)
MIN_GRAPH_CALLS = 32
EAGER_SAMPLES = 25
EAGER_INNER = 8
GRAPH_REPLAYS = 20
SLOW_CALL_S = 2e-3
KERNEL_HEAD_DIMS = {(64, 64), (128, 128), (192, 128), (256, 256)}
MAE_BAR = 1e-3  # SPEC.md
PEER_MAE_WARN = 5e-3  # a peer further than this from the oracle is flagged (setup bug?)
SHORT = {
    "packed": "packed",
    "gather_sdpa": "gather",
    "flex": "flex",
    "dense": "dense",
    "fla": "fla",
}

# PERF.md, Targets (H100, bf16, graph figure unless stated).
TARGET_ROOF_PCT = 95.0
TARGET_ROOF_MIN_US = 40.0


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str  # seed | nsa27b | d128 | m125 | ctx
    B: int
    G: int
    h: int
    Dk: int
    Dv: int
    S_kv: int
    n: int  # ranges per row
    blk: int  # tokens per range

    @property
    def L(self) -> int:
        return self.n * self.blk

    def bytes(self, elem: int = 2) -> int:
        return (
            self.B * self.G * self.L * (self.Dk + self.Dv) * elem
            + self.B * self.G * self.h * (self.Dk + self.Dv) * elem
        )

    def kv_bytes(self, elem: int = 2) -> int:
        return self.B * self.G * self.S_kv * (self.Dk + self.Dv) * elem

    def label(self) -> str:
        return (
            f"{self.family} B={self.B} G={self.G} h={self.h} Dk={self.Dk} Dv={self.Dv} "
            f"S_kv={self.S_kv} n={self.n}x{self.blk} L={self.L}"
        )


MODELS = {  # G, h, Dk, Dv, S_kv (n = 16 blocks of 64)
    "nsa27b": (4, 16, 192, 128, 65536),
    "d128": (4, 16, 128, 128, 32768),
    "m125": (2, 6, 64, 64, 8192),
}


def model_case(name: str, B: int, S_kv: Optional[int] = None, family: Optional[str] = None):
    G, h, Dk, Dv, s = MODELS[name]
    return Case(family or name, B, G, h, Dk, Dv, S_kv or s, 16, 64)


def seed_case(N: int, h: int, D: int, L: int) -> Case:
    # The seed's grid: n in {8, 16} collapsed into one contiguous range [0, L), S_kv = L, G = 1.
    return Case("seed", N, 1, h, D, D, L, 1, L)


def quick_grid() -> list:
    cases = [model_case("nsa27b", B) for B in (1, 16, 128)]
    cases += [model_case("d128", B) for B in (1, 64)]
    cases += [model_case("m125", B) for B in (1, 64)]
    cases += [seed_case(256, 4, 64, 512), seed_case(1024, 8, 128, 512)]
    return cases


def full_grid() -> list:
    cases = [
        seed_case(N, h, D, L)
        for N in (256, 1024)
        for h in (4, 8)
        for D in (64, 128)
        for L in (128, 256, 512)
    ]
    for name in MODELS:
        cases += [model_case(name, B) for B in (1, 4, 16, 64, 128)]
    cases += [model_case("nsa27b", 16, S_kv=1 << e, family="ctx") for e in range(13, 21)]
    return cases


def demo_grid() -> list:
    return [model_case("nsa27b", 16), model_case("m125", 1), seed_case(256, 4, 64, 512)]


# ------------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ------------------------------------------------------------------------------------------------


def make_ranges(case: Case, gen: torch.Generator, device) -> torch.Tensor:
    """[B, 1, G, n, 2] int32. Models: blocks 0, nb-2, nb-1 plus n-3 distinct random blocks."""
    B, G, n = case.B, case.G, case.n
    if case.family == "seed":
        r = torch.tensor([0, case.L], dtype=torch.int32, device=device)
        return r.expand(B, 1, G, 1, 2).contiguous()
    nb = case.S_kv // case.blk
    assert case.S_kv % case.blk == 0 and nb >= n >= 3, case
    rows = B * G
    fixed = torch.tensor([0, nb - 2, nb - 1], dtype=torch.int64, device=device).expand(rows, 3)
    keys = torch.rand(rows, nb - 3, generator=gen, device=device)
    rand = keys.topk(n - 3, dim=-1).indices + 1  # distinct blocks in [1, nb - 3]
    blocks = torch.cat([fixed, rand], dim=-1).sort(dim=-1).values
    start = blocks * case.blk
    r = torch.stack([start, start + case.blk], dim=-1)  # the last block ends at S_kv = kv_len
    return r.view(B, 1, G, n, 2).to(torch.int32).contiguous()


def make_inputs(case: Case, dtype, device, free_bytes: int, seed: int = 0) -> peerlib.Inputs:
    """R input sets (Q, ranges) and C K/V copies, sized so a round touches >= ROT_BYTES.

    Model shapes: C = R separate K/V copies where they fit in KV_BUDGET_FRACTION of the free
    memory, so even the blocks every set selects (first, last two) are not L2-resident.
    Context sweep ("ctx"): one cache [B, G, S_kv + 192 * (R - 1), D] and set r reads the window
    starting at token 192 * r (a slice of a larger cache, as a serving engine has): the fixed
    blocks of every set are distinct memory at every S_kv, with one layout along the sweep.
    Seed grid: the selection is the whole cache, so C = R copies.
    """
    elem = torch.tensor([], dtype=dtype).element_size()
    sel = max(case.B * case.G * case.L * (case.Dk + case.Dv) * elem, 1)
    R = int(min(MAX_SETS, max(1, math.ceil(ROT_BYTES / sel))))
    kv = case.kv_bytes(elem)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    B, G, h = case.B, case.G, case.h
    Q = [
        torch.randn(B, 1, G, h, case.Dk, generator=gen, device=device, dtype=dtype)
        for _ in range(R)
    ]
    ranges = [make_ranges(case, gen, device) for _ in range(R)]
    scale = 1.0 / math.sqrt(case.Dk)
    if case.family == "ctx":
        step = 3 * case.blk
        S_big = case.S_kv + step * (R - 1)
        if kv * S_big / case.S_kv > 0.9 * free_bytes:
            raise MemoryError(
                f"K/V ({kv * S_big / case.S_kv / 1e9:.1f} GB) do not fit "
                f"({free_bytes / 1e9:.1f} GB free)"
            )
        K_big = torch.randn(B, G, S_big, case.Dk, generator=gen, device=device, dtype=dtype)
        V_big = torch.randn(B, G, S_big, case.Dv, generator=gen, device=device, dtype=dtype)
        K = [K_big[:, :, step * r : step * r + case.S_kv] for r in range(R)]
        V = [V_big[:, :, step * r : step * r + case.S_kv] for r in range(R)]
        return peerlib.Inputs(
            Q=Q, ranges=ranges, K=K, V=V, blk=case.blk, scale=scale, layout="windows"
        )
    if case.family == "seed":
        C = R  # one fixed selection: only separate K/V copies rotate
    else:
        C = int(max(1, min(R, (KV_BUDGET_FRACTION * free_bytes) // max(kv, 1))))
    if C * kv > 0.9 * free_bytes:
        raise MemoryError(
            f"K/V ({C} x {kv / 1e9:.1f} GB) do not fit ({free_bytes / 1e9:.1f} GB free)"
        )
    K = [
        torch.randn(B, G, case.S_kv, case.Dk, generator=gen, device=device, dtype=dtype)
        for _ in range(C)
    ]
    V = [
        torch.randn(B, G, case.S_kv, case.Dv, generator=gen, device=device, dtype=dtype)
        for _ in range(C)
    ]
    return peerlib.Inputs(Q=Q, ranges=ranges, K=K, V=V, blk=case.blk, scale=scale)


def oracle_f64(Q, K, V, ranges, blk: int, scale: float, chunk_bytes: float = 1e9):
    """float64 selection attention for ranges of exactly blk valid tokens: [B, 1, G, h, Dv]."""
    B, _, G, h, Dk = Q.shape
    Dv = V.shape[3]
    idx = peerlib.token_index(ranges, blk)  # [B, G, L]
    L = idx.shape[-1]
    out = torch.empty(B, 1, G, h, Dv, dtype=torch.float64, device=Q.device)
    step = max(1, int(chunk_bytes // max(G * L * (Dk + Dv) * 8, 1)))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        k = peerlib.gather_rows(K[b0:b1], idx[b0:b1]).double()
        v = peerlib.gather_rows(V[b0:b1], idx[b0:b1]).double()
        q = Q[b0:b1, 0].double()
        p = torch.softmax(torch.einsum("bghd,bgld->bghl", q, k) * scale, dim=-1)
        out[b0:b1, 0] = torch.einsum("bghl,bgld->bghd", p, v)
    return out


def mae_of(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((out.double() - ref64).abs().mean())


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def sync():
    torch.cuda.synchronize()


def time_eager(call, R: int) -> float:
    """Median wall µs per Python call (host overhead included), inputs rotating.

    Calls run back to back, EAGER_INNER per sample then one sync, as in a research loop. Whether
    a call is slow (then one call per sample) is judged after warm-up calls: a first call pays
    one-time costs (lazy module loading, allocator growth, autotuning) that would otherwise turn
    every sample into a single call plus a full synchronisation.
    """
    for i in range(3):
        call(i % R)
    sync()
    t0 = time.perf_counter()
    call(3 % R)
    sync()
    slow = time.perf_counter() - t0 > SLOW_CALL_S
    inner = 1 if slow else EAGER_INNER
    samples = 20 if slow else EAGER_SAMPLES
    k = 0
    ts = []
    # The garbage collector's passes cost in proportion to the whole Python heap (large once the
    # compiled peers are loaded), not to the call timed: keep them out of the samples.
    gc.collect()
    gc.freeze()
    try:
        for _ in range(samples):
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                call(k % R)
                k += 1
            sync()
            ts.append((time.perf_counter() - t0) / inner)
    finally:
        gc.unfreeze()
    return statistics.median(ts) * 1e6


def time_graph(call, R: int) -> float:
    """Median µs per call of one CUDA graph holding whole rounds (>= 32 calls), replayed."""
    calls = R * math.ceil(MIN_GRAPH_CALLS / R)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream (lazy init, autotuning) before capture
        for i in range(min(R, 2)):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    sync()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                call(i % R)
        graph.replay()
        sync()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(GRAPH_REPLAYS + 1):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end) * 1e3 / calls)
        return statistics.median(ts[1:])
    finally:
        del graph


def measure_copy_roof() -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write counted (2 x 1 GiB buffers)."""
    nbytes = 1 << 30
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    x.fill_(1)
    for _ in range(3):
        y.copy_(x)
    sync()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(20):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) * 1e-3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(ts)


def free_bytes() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def reset_after_error():
    """Synchronizes after a failed measurement; a poisoned context ends the run."""
    try:
        sync()
    except Exception as exc:  # noqa: BLE001
        print(f"FATAL: the CUDA context is unusable after an error ({exc}); stopping.", flush=True)
        raise SystemExit(2) from exc
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The kernel path: coverage, proof that it ran
# ------------------------------------------------------------------------------------------------


class ReferenceCalled(RuntimeError):
    pass


@contextlib.contextmanager
def references_disabled():
    """Replaces every nsa module's reference of the packed/oracle functions by one that raises."""
    import nsa
    import nsa.reference as ref

    targets = [
        getattr(ref, "_packed", None),
        getattr(nsa, "grouped_selection_attention_packed", None),
        getattr(nsa, "grouped_selection_attention", None),
    ]
    ids = {id(f) for f in targets if f is not None}

    def raiser(*args, **kwargs):
        raise ReferenceCalled("the CUDA entry point called the PyTorch reference")

    patched = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "nsa" or name.startswith("nsa.")):
            continue
        for attr, val in list(vars(mod).items()):
            if id(val) in ids:
                setattr(mod, attr, raiser)
                patched.append((mod, attr, val))
    try:
        yield len(patched)
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)


def kernel_covers(case: Case, dtype) -> bool:
    return (
        dtype in (torch.float16, torch.bfloat16)
        and (case.Dk, case.Dv) in KERNEL_HEAD_DIMS
        and 1 <= case.h <= 64
    )


def prove_kernel(case: Case, dtype, inp: peerlib.Inputs) -> tuple:
    """(path, out, message): path is 'kernel', 'reference (not covered)' or 'FAILED'."""
    from nsa.kernels.cuda_sel_kernel import selection_attention_cuda

    if not kernel_covers(case, dtype):
        return "reference (not covered)", None, ""
    K, V = inp.kv(0)
    try:
        with references_disabled() as n_patched:
            out = selection_attention_cuda(inp.Q[0], K, V, inp.ranges[0], scale=inp.scale)
            sync()
        if n_patched == 0:
            return "FAILED", None, "could not find the wrapper's reference to disable"
    except ReferenceCalled:
        reset_after_error()
        return "reference (not covered)", None, "the wrapper used the reference"
    except Exception as exc:  # noqa: BLE001 - strict mode raises RuntimeError on any fallback
        reset_after_error()
        return "FAILED", None, peerlib._first_line(exc, 120)
    if not bool(torch.isfinite(out).all()):
        return "FAILED", out, "non-finite output"
    return "kernel", out, ""


# ------------------------------------------------------------------------------------------------
# One configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    dtype: str
    rot: str = ""
    path: str = ""
    note: str = ""
    mae: Optional[float] = None
    eager_us: Optional[float] = None
    graph_us: Optional[float] = None
    ref_ms: Optional[float] = None
    cuda_ms: Optional[float] = None
    speedup: Optional[float] = None
    basis: str = ""
    peers: dict = field(default_factory=dict)  # name -> dict(graph_us, eager_us, mae, note)

    def ok(self) -> bool:
        return self.path == "kernel" and self.mae is not None and self.mae <= MAE_BAR


def packed_capture_bytes(case: Case) -> int:
    """Rough peak of the packed reference under capture, where it gathers n * S_kv per row."""
    Lb = case.n * case.S_kv
    return case.B * case.G * Lb * ((case.Dk + case.Dv) * 8 + case.h * 12 + 40)


def measure_callable(call, R: int, graph_ok: bool = True) -> tuple:
    """(eager_us, graph_us or None, note)."""
    eager = time_eager(call, R)
    if not graph_ok:
        return eager, None, "graph n/a"
    try:
        return eager, time_graph(call, R), ""
    except torch.cuda.OutOfMemoryError:
        reset_after_error()
        return eager, None, "graph OOM"
    except Exception as exc:  # noqa: BLE001
        reset_after_error()
        return eager, None, f"graph failed ({peerlib._first_line(exc, 60)})"


def run_case(case: Case, dtype, peer_names, roof_bps: float) -> Result:
    from nsa.kernels.cuda_sel_kernel import selection_attention_cuda

    res = Result(case, str(dtype).replace("torch.", ""))
    try:
        inp = make_inputs(case, dtype, "cuda", free_bytes())
    except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
        reset_after_error()
        res.path, res.note = "skipped", f"inputs do not fit: {exc}"
        return res
    res.rot = f"{inp.R}x{inp.C}" + ("w" if inp.layout == "windows" else "")
    ref64 = oracle_f64(inp.Q[0], *inp.kv(0), inp.ranges[0], inp.blk, inp.scale)

    res.path, out, msg = prove_kernel(case, dtype, inp)
    res.note = msg
    if out is not None:
        res.mae = mae_of(out, ref64)
        if res.mae > MAE_BAR:
            res.note = (res.note + "; " if res.note else "") + f"WRONG: mae {res.mae:.2e}"
        del out
    if res.path == "kernel":

        def cuda_call(r):
            K, V = inp.kv(r)
            return selection_attention_cuda(inp.Q[r], K, V, inp.ranges[r], scale=inp.scale)

        try:
            res.eager_us, res.graph_us, gnote = measure_callable(cuda_call, inp.R)
            if gnote:
                res.note = (res.note + "; " if res.note else "") + "kernel " + gnote
        except Exception as exc:  # noqa: BLE001
            reset_after_error()
            res.path, res.note = "FAILED", peerlib._first_line(exc, 120)

    for name in peer_names:
        res.peers[name] = measure_peer(name, case, inp, ref64)

    # Seed fields: cuda_ms, ref_ms, speedup (graph figures where both exist, else eager).
    pk = res.peers.get("packed", {})
    if res.path == "kernel":
        if res.graph_us is not None and pk.get("graph_us") is not None:
            res.cuda_ms, res.ref_ms, res.basis = res.graph_us / 1e3, pk["graph_us"] / 1e3, "graph"
        elif res.eager_us is not None and pk.get("eager_us") is not None:
            res.cuda_ms, res.ref_ms, res.basis = res.eager_us / 1e3, pk["eager_us"] / 1e3, "eager"
        elif res.graph_us is not None:
            res.cuda_ms, res.basis = res.graph_us / 1e3, "graph"
        if res.cuda_ms and res.ref_ms:
            res.speedup = res.ref_ms / res.cuda_ms
    return res


def measure_peer(name: str, case: Case, inp: peerlib.Inputs, ref64) -> dict:
    rec = {"graph_us": None, "eager_us": None, "mae": None, "note": ""}
    if name == "flex" and case.family == "seed":
        rec["note"] = "-"  # not run on the seed grid (one compile per shape; PERF.md has none)
        return rec
    peer = peerlib.make_peer(name, inp, mem_free_bytes=free_bytes())
    if isinstance(peer, str):
        rec["note"] = peer
        return rec
    try:
        out = peer.call(0)
        sync()
        rec["mae"] = mae_of(out, ref64)
        del out
        graph_ok = True
        if name == "packed" and (
            case.n * case.S_kv > 4 * case.L or packed_capture_bytes(case) > 0.5 * free_bytes()
        ):
            # Under capture it gathers the static bound n * S_kv per row, not the selection:
            # a different (much slower) computation than the eager call; report eager only.
            graph_ok = False
        rec["eager_us"], rec["graph_us"], gnote = measure_callable(peer.call, inp.R, graph_ok)
        if name == "packed" and not graph_ok:
            gnote = "no graph: capture gathers n*S_kv per row"
        notes = [peer.note, gnote]
        if not peer.exact:
            rec["mae"] = None  # a different computation (dense over all of S_kv)
        elif not rec["mae"] <= PEER_MAE_WARN:
            notes.append(f"mae {rec['mae']:.1e}!")
        rec["note"] = "; ".join(x for x in notes if x)
    except torch.cuda.OutOfMemoryError:
        reset_after_error()
        rec["note"] = "n/a (out of memory)"
    except Exception as exc:  # noqa: BLE001
        reset_after_error()
        rec["note"] = f"failed ({peerlib._first_line(exc, 70)})"
    finally:
        peer.cleanup.clear()
        del peer
    return rec


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def fmt(x, spec=".1f", none="n/a") -> str:
    return none if x is None else format(x, spec)


def peer_cell(rec: dict) -> str:
    if rec.get("graph_us") is not None:
        cell = fmt(rec["graph_us"])
    elif rec.get("eager_us") is not None:
        cell = "eager:" + fmt(rec["eager_us"])
    else:
        return rec.get("note") or "n/a"
    return cell + (f" ({rec['note']})" if rec.get("note") else "")


def result_line(res: Result, roof_bps: float) -> str:
    c = res.case
    floor_us = c.bytes() / roof_bps * 1e6
    head = f"{c.label()} {res.dtype} rot={res.rot or '-'}"
    if res.path == "kernel":
        gbps = c.bytes() / (res.graph_us * 1e-6) / 1e9 if res.graph_us else None
        pct = 100 * gbps * 1e9 / roof_bps if gbps else None
        spd = f"{res.speedup:.1f}x" if res.speedup else "n/a"
        if res.basis == "eager" and res.speedup:
            spd += "(eager)"
        kern = (
            f"path=kernel cuda_ms={fmt(res.cuda_ms, '.4f')} ref_ms={fmt(res.ref_ms, '.4f')} "
            f"speedup={spd} mae={fmt(res.mae, '.2e')} | eager_us={fmt(res.eager_us)} "
            f"graph_us={fmt(res.graph_us)} GB/s={fmt(gbps, '.0f')} roof={fmt(pct)}% "
            f"floor_us={floor_us:.1f}"
        )
    else:
        kern = (
            f"path={res.path} cuda_ms=n/a ref_ms=n/a speedup=n/a mae={fmt(res.mae, '.2e')} "
            f"floor_us={floor_us:.1f}"
        )
    if res.note:
        kern += f" [{res.note}]"
    peers = " ".join(f"{k}={peer_cell(v)}" for k, v in res.peers.items())
    return f"{head} | {kern}" + (f" | peers graph_us: {peers}" if peers else "")


def short_cell(rec: Optional[dict]) -> str:
    if not rec:
        return "-"
    if rec.get("graph_us") is not None:
        return fmt(rec["graph_us"])
    if rec.get("eager_us") is not None:
        return "e" + fmt(rec["eager_us"], ".0f")
    note = rec.get("note", "")
    return "n/a" if note.startswith("n/a") else ("-" if note.startswith("-") else "fail")


def print_table(results: list, peer_names, roof_bps: float):
    cols = ["case", "B", "h", "Dk/Dv", "S_kv", "L", "floor", "graph", "eager", "roof%", "spdup"]
    cols += [SHORT[p] for p in peer_names]
    rows = []
    for r in results:
        c = r.case
        pct = (100 * c.bytes() / (r.graph_us * 1e-6) / roof_bps) if r.graph_us else None
        row = [
            c.family if r.path == "kernel" else c.family + "*",
            str(c.B),
            str(c.h),
            f"{c.Dk}/{c.Dv}",
            str(c.S_kv),
            str(c.L),
            f"{c.bytes() / roof_bps * 1e6:.1f}",
            fmt(r.graph_us),
            fmt(r.eager_us),
            fmt(pct),
            fmt(r.speedup),
        ]
        row += [short_cell(r.peers.get(p)) for p in peer_names]
        rows.append(row)
    widths = [max(len(cols[i]), *(len(row[i]) for row in rows)) for i in range(len(cols))]
    print("\n== summary (µs; graph figures; e = eager only; * = kernel did not run) ==")
    print("  ".join(h.rjust(w) for h, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))


def _find(results, family, B=None, S_kv=None):
    for r in results:
        c = r.case
        if c.family == family and (B is None or c.B == B) and (S_kv is None or c.S_kv == S_kv):
            return r
    return None


def targets_check(results: list, roof_bps: float) -> list:
    """[(target, verdict, detail)] for PERF.md's Targets table."""
    out = []

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    def graph(r):
        return r.graph_us if (r is not None and r.ok()) else None

    big = [r for r in results if r.case.bytes() / roof_bps * 1e6 >= TARGET_ROOF_MIN_US]
    if big:
        pcts = [
            (100 * r.case.bytes() / (graph(r) * 1e-6) / roof_bps if graph(r) else 0.0, r)
            for r in big
        ]
        worst_pct, worst = min(pcts, key=lambda t: t[0])
        nfail = sum(1 for p, _ in pcts if p < TARGET_ROOF_PCT)
        out.append(
            (
                f"roof >= {TARGET_ROOF_PCT:.0f}% on every shape with floor >= 40 us "
                f"({len(big)} shapes)",
                verdict(nfail == 0),
                f"worst {worst_pct:.1f}% at {worst.case.family} B={worst.case.B} "
                f"S_kv={worst.case.S_kv} L={worst.case.L}; {nfail} below",
            )
        )
    else:
        out.append(("roof >= 95% on shapes with floor >= 40 us", "n/a", "none measured"))

    for fam, B, limit in (("nsa27b", 128, 125.0), ("nsa27b", 16, 18.0), ("m125", 64, 13.0)):
        r = _find(results, fam, B)
        g = graph(r)
        name = f"{fam} B={B} <= {limit:.0f} us"
        out.append(
            (name, "n/a", "not measured")
            if r is None
            else (name, verdict(g is not None and g <= limit), f"{fmt(g)} us")
        )

    b1 = [(fam, _find(results, fam, 1)) for fam in ("nsa27b", "d128", "m125")]
    b1 = [(f, r) for f, r in b1 if r is not None]
    if b1:
        gs = [(graph(r), f) for f, r in b1]
        worst = max(gs, key=lambda t: float("inf") if t[0] is None else t[0])
        ok = all(g is not None and g <= 5.0 for g, _ in gs)
        out.append(
            (
                "every B=1 model shape <= 5 us (graph)",
                verdict(ok),
                ", ".join(f"{f} {fmt(g)}" for g, f in gs) + f" (worst {worst[1]})",
            )
        )
        es = [(r.eager_us if r.ok() else None, f) for f, r in b1]
        ok = all(e is not None and e <= 25.0 for e, _ in es)
        out.append(
            (
                "eager call at B=1 <= 25 us wall",
                verdict(ok),
                ", ".join(f"{f} {fmt(e)}" for e, f in es),
            )
        )
    else:
        out.append(("every B=1 model shape <= 5 us", "n/a", "not measured"))
        out.append(("eager call at B=1 <= 25 us wall", "n/a", "not measured"))

    seeds = [r for r in results if r.case.family == "seed"]
    if seeds:
        sp = [(r.speedup if r.ok() else None, r) for r in seeds]
        ok = all(s is not None and s >= 5.0 for s, _ in sp)
        known = [s for s, _ in sp if s is not None]
        basis = {r.basis for r in seeds if r.basis}
        out.append(
            (
                f"every seed shape >= 5x the packed reference ({len(seeds)} shapes)",
                verdict(ok),
                f"min {fmt(min(known) if known else None)}x, "
                f"{len(seeds) - len(known)} unmeasured, basis {'/'.join(sorted(basis))}",
            )
        )
    else:
        out.append(("every seed shape >= 5x the packed reference", "n/a", "not measured"))

    ctx = sorted((r for r in results if r.case.family == "ctx"), key=lambda r: r.case.S_kv)
    if len(ctx) >= 2:
        gs = [graph(r) for r in ctx]
        if all(g is not None for g in gs):
            spread = max(gs) / min(gs) - 1
            detail = (
                f"{min(gs):.1f}..{max(gs):.1f} us over S_kv {ctx[0].case.S_kv}.."
                f"{ctx[-1].case.S_kv}: spread {100 * spread:.1f}%"
            )
            out.append(
                ("cost flat within 10% vs context (8k..1M)", verdict(spread <= 0.10), detail)
            )
        else:
            out.append(("cost flat within 10% vs context", "FAIL", "some points not measured"))
    else:
        out.append(("cost flat within 10% vs context", "n/a", "not measured"))
    return out


def write_csv(path: str, results: list, peer_names, roof_bps: float):
    import csv

    fields = [
        "family",
        "B",
        "G",
        "h",
        "Dk",
        "Dv",
        "S_kv",
        "n",
        "blk",
        "L",
        "dtype",
        "rot",
        "path",
        "cuda_ms",
        "ref_ms",
        "speedup",
        "speedup_basis",
        "mae",
        "eager_us",
        "graph_us",
        "gbps",
        "roof_pct",
        "floor_us",
        "bytes",
        "note",
    ]
    for p in peer_names:
        fields += [f"{p}_graph_us", f"{p}_eager_us", f"{p}_mae", f"{p}_note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            c = r.case
            gbps = c.bytes() / (r.graph_us * 1e-6) / 1e9 if r.graph_us else None
            row = dict(
                family=c.family,
                B=c.B,
                G=c.G,
                h=c.h,
                Dk=c.Dk,
                Dv=c.Dv,
                S_kv=c.S_kv,
                n=c.n,
                blk=c.blk,
                L=c.L,
                dtype=r.dtype,
                rot=r.rot,
                path=r.path,
                cuda_ms=r.cuda_ms,
                ref_ms=r.ref_ms,
                speedup=r.speedup,
                speedup_basis=r.basis,
                mae=r.mae,
                eager_us=r.eager_us,
                graph_us=r.graph_us,
                gbps=gbps,
                roof_pct=100 * gbps * 1e9 / roof_bps if gbps else None,
                floor_us=c.bytes() / roof_bps * 1e6,
                bytes=c.bytes(),
                note=r.note,
            )
            for p in peer_names:
                rec = r.peers.get(p, {})
                row.update(
                    {
                        f"{p}_graph_us": rec.get("graph_us"),
                        f"{p}_eager_us": rec.get("eager_us"),
                        f"{p}_mae": rec.get("mae"),
                        f"{p}_note": rec.get("note", ""),
                    }
                )
            w.writerow(row)
    print(f"csv: {path}")


def write_plot(path: str, results: list, peer_names, roof_bps: float, title: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"plot: skipped ({peerlib._first_line(exc)})")
        return
    panels = [(fam, "B") for fam in MODELS if any(r.case.family == fam for r in results)]
    if any(r.case.family == "ctx" for r in results):
        panels.append(("ctx", "S_kv"))
    if not panels:
        print("plot: skipped (no model or context shapes measured)")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (fam, xkey) in zip(axes[0], panels):
        rs = sorted(
            (r for r in results if r.case.family == fam), key=lambda r: getattr(r.case, xkey)
        )
        xs = [getattr(r.case, xkey) for r in rs]
        series = [("this kernel", [r.graph_us for r in rs], "k-", 2.2)]
        for p in peer_names:
            ys = [r.peers.get(p, {}).get("graph_us") for r in rs]
            if all(y is None for y in ys):  # e.g. the packed reference on the model shapes
                ys = [r.peers.get(p, {}).get("eager_us") for r in rs]
                series.append((f"{p} (eager)", ys, "--", 1.0))
            else:
                series.append((p, ys, "-", 1.2))
        series.append(("copy-roof floor", [r.case.bytes() / roof_bps * 1e6 for r in rs], "k:", 1.0))
        for name, ys, style, lw in series:
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, lw=lw, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        c = rs[0].case
        ax.set_title(
            f"{fam}: G={c.G} h={c.h} Dk/Dv={c.Dk}/{c.Dv} L={c.L}"
            + (f" S_kv={c.S_kv}" if xkey == "B" else f" B={c.B}"),
            fontsize=9,
        )
        ax.set_xlabel(xkey)
        ax.set_ylabel("µs per call (CUDA graph, L2 cold)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ------------------------------------------------------------------------------------------------
# Header, demo, main
# ------------------------------------------------------------------------------------------------


def header(roof_bps: Optional[float]) -> str:
    now = datetime.datetime.now()
    lines = [f"# nsa selection-attention decode benchmark, {now:%Y-%m-%d %H:%M}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"# GPU {p.name}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB, cc {p.major}.{p.minor}"
        )
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "n/a"
    lines.append(
        f"# torch {torch.__version__}, CUDA {torch.version.cuda}, triton {tv}, "
        f"python {platform.python_version()}"
    )
    if roof_bps:
        lines.append(
            f"# copy roof (device-to-device, read+write counted): {roof_bps / 1e12:.3f} "
            f"TB/s (PERF.md: 2.88-3.01 on the H100; 4.07-4.18 measured on the H200, NOTES.md)"
        )
    try:
        from nsa.kernels.cuda_sel_kernel import kernel_status

        st = kernel_status()
        lines.append(
            f"# kernel: available={st.get('available')} library={st.get('library')} "
            f"{st.get('reason') or ''}".rstrip()
        )
        lines.append(
            f"# eager path: {'C++ fast path' if st.get('fast_path') else 'Python path'} "
            f"{st.get('fast_path_reason') or ''}".rstrip()
        )
    except Exception as exc:  # noqa: BLE001
        lines.append(f"# kernel status: n/a ({peerlib._first_line(exc)})")
    lines.append(
        f"# env NSA_SEL_CUDA={os.environ.get('NSA_SEL_CUDA')} "
        f"NSA_SEL_CUDA_STRICT={os.environ.get('NSA_SEL_CUDA_STRICT')}; eager: median of "
        f"{EAGER_SAMPLES} samples of {EAGER_INNER} calls + sync; graph: >= "
        f"{MIN_GRAPH_CALLS} calls per graph, median of {GRAPH_REPLAYS} replays; "
        f">= {ROT_BYTES / 1e6:.0f} MB selected per round"
    )
    return "\n".join(lines)


def demo_cpu() -> int:
    import nsa

    print("no CUDA GPU: ran the PyTorch references on the CPU (the CUDA kernel needs a GPU)")
    case = Case("demo", 2, 2, 4, 64, 64, 1024, 4, 64)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    Q = torch.randn(case.B, 1, case.G, case.h, case.Dk, generator=gen, dtype=dtype)
    K = torch.randn(case.B, case.G, case.S_kv, case.Dk, generator=gen, dtype=dtype)
    V = torch.randn(case.B, case.G, case.S_kv, case.Dv, generator=gen, dtype=dtype)
    ranges = make_ranges(case, gen, "cpu")
    ref64 = nsa.grouped_selection_attention(Q.double(), K.double(), V.double(), ranges)
    print(
        f"shape: {case.label()} {str(dtype).replace('torch.', '')} (float64 oracle: "
        f"grouped_selection_attention on .double() inputs)"
    )
    for name, fn in (
        ("grouped_selection_attention_packed", nsa.grouped_selection_attention_packed),
        ("grouped_selection_attention", nsa.grouped_selection_attention),
    ):
        out = fn(Q, K, V, ranges)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(Q, K, V, ranges)
            ts.append(time.perf_counter() - t0)
        err = (out.double() - ref64).abs()
        print(
            f"{name}: cpu_ms={statistics.median(ts) * 1e3:.3f} mae={float(err.mean()):.2e} "
            f"max_err={float(err.max()):.2e}"
        )
    return 0


def parse_peers(args) -> list:
    if args.no_peers:
        return []
    names = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in names if p not in peerlib.PEER_NAMES]
    if bad:
        raise SystemExit(f"--peers: unknown {bad}; expected a subset of {peerlib.PEER_NAMES}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="PERF.md's peer-table shapes only")
    ap.add_argument(
        "--demo", action="store_true", help="CPU: the references only; GPU: a small subset"
    )
    ap.add_argument("--csv", metavar="FILE")
    ap.add_argument("--plot", metavar="FILE.png")
    ap.add_argument(
        "--peers",
        default=",".join(peerlib.PEER_NAMES),
        help=f"comma list from {','.join(peerlib.PEER_NAMES)}",
    )
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--only", default="", help="comma list of families: seed,nsa27b,d128,m125,ctx")
    args = ap.parse_args(argv)

    # Strict mode before anything touches nsa: a fallback can never be timed as the kernel.
    os.environ["NSA_SEL_CUDA"] = "1"
    os.environ["NSA_SEL_CUDA_STRICT"] = "1"

    if not torch.cuda.is_available():
        if args.demo:
            return demo_cpu()
        print("no CUDA GPU: the benchmark needs one (use --demo to run the references on the CPU)")
        return 1

    peer_names = parse_peers(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if args.demo:
        cases = demo_grid()
        if args.peers == ",".join(peerlib.PEER_NAMES):  # default: skip compile-heavy peers
            peer_names = [p for p in peer_names if p not in ("flex", "fla")]
    else:
        cases = quick_grid() if args.quick else full_grid()
    if args.only:
        keep = {f.strip() for f in args.only.split(",")}
        cases = [c for c in cases if c.family in keep]

    t_start = time.perf_counter()
    roof = measure_copy_roof()
    print(header(roof))
    print(f"# {len(cases)} shapes; peers: {', '.join(peer_names) or 'none'}", flush=True)
    results = []
    for case in cases:
        t0 = time.perf_counter()
        res = run_case(case, dtype, peer_names, roof)
        free_bytes()  # the case's inputs are gone: return their memory before the next one
        results.append(res)
        print(result_line(res, roof) + f"  ({time.perf_counter() - t0:.1f}s)", flush=True)

    if args.csv:
        write_csv(args.csv, results, peer_names, roof)
    if args.plot:
        p = torch.cuda.get_device_properties(0)
        write_plot(
            args.plot,
            results,
            peer_names,
            roof,
            f"{p.name}, {args.dtype}, copy roof {roof / 1e12:.2f} TB/s",
        )
    print_table(results, peer_names, roof)
    print("\n== targets (PERF.md) ==")
    for name, verdict, detail in targets_check(results, roof):
        print(f"{verdict:4s}  {name}: {detail}")
    print(f"# total {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

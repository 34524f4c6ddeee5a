"""The CUDA decode kernel against float64 oracles (SPEC.md), on an NVIDIA GPU.

Every test runs with NSA_SEL_CUDA=1 and NSA_SEL_CUDA_STRICT=1, so a failure of the CUDA path raises
instead of passing through the reference. Every test is marked ``gpu`` and skipped where torch
sees no CUDA device; the module imports and collects on a CPU-only machine.

Tolerance (SPEC.md, Numerics): max abs error against the float64 oracle <= 2 x the max error of
the same computation done by plain PyTorch in the input dtype, + 1e-5; mean abs error <= 1e-3.

Oracles: ``grouped_selection_attention`` on float64 inputs (the project's loop oracle) on the
parity grid; two independent float64 oracles written here for larger shapes: ``dense_oracle64``
(dense logits weighted by how many ranges cover each token) and ``rows_oracle64`` (gathers only
the selected rows, for caches too big to convert).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import nsa
from nsa.kernels import cuda_sel_kernel as csk

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [(64, 64), (128, 128), (192, 128), (256, 256)]
HEADS = [1, 6, 16, 64]
EXTRA_HEADS = [2, 8, 33]
ODD_S_KV = [1, 3, 63, 65, 1999]
NS = [1, 3, 16]

run = csk.selection_attention_cuda


def _id(x):
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, tuple):
        return "x".join(str(v) for v in x)
    return str(x)


@pytest.fixture(autouse=True)
def strict_cuda(monkeypatch):
    monkeypatch.setenv("NSA_SEL_CUDA", "1")
    monkeypatch.setenv("NSA_SEL_CUDA_STRICT", "1")
    yield
    if HAS_CUDA:
        torch.cuda.synchronize()  # an asynchronous error shows up in the test that caused it


def need_memory(gib: float):
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def release():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def rand_ranges(B, G, n, S_kv, gen, *, dtype=torch.int32, max_len=200):
    """[B, 1, G, n, 2] ranges not aligned to 64: the first of each row is valid and non-empty,
    the others may be empty, reversed, negative, past S_kv or overlapping."""
    start = torch.randint(-8, S_kv + 8, (B, 1, G, n), generator=gen)
    length = torch.randint(-4, max_len + 1, (B, 1, G, n), generator=gen)
    first_start = torch.randint(0, S_kv, (B, 1, G), generator=gen)
    first_len = torch.randint(1, max_len + 1, (B, 1, G), generator=gen)
    start[..., 0] = first_start
    length[..., 0] = first_len
    return torch.stack([start, start + length], dim=-1).to(dtype)


def make_inputs(
    B, G, h, Dk, Dv, S_kv, n, dtype, *, seed=0, kv_lens=False, index_dtype=torch.int32, max_len=200
):
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(B, 1, G, h, Dk, generator=gen).to(dtype).cuda()
    K = torch.randn(B, G, S_kv, Dk, generator=gen).to(dtype).cuda()
    V = torch.randn(B, G, S_kv, Dv, generator=gen).to(dtype).cuda()
    ranges = rand_ranges(B, G, n, S_kv, gen, dtype=index_dtype, max_len=max_len).cuda()
    lens = None
    if kv_lens:
        lens = torch.randint(0, S_kv + 1, (B,), generator=gen)
        lens[0] = S_kv
        if B > 2:
            lens[1] = 0  # an empty sequence: its rows select nothing
        lens = lens.to(index_dtype).cuda()
    return Q, K, V, ranges, lens


# ------------------------------------------------------------------------------------------------
# Oracles and the tolerance rule
# ------------------------------------------------------------------------------------------------


def selection_counts(ranges, kv_lens, S_kv):
    """[B, G, S_kv] int64: how many clamped ranges cover each token (decode, S = 1)."""
    r = ranges[:, 0].long()  # [B, G, n, 2]
    B = r.shape[0]
    lim = (
        torch.full((B,), S_kv, device=r.device)
        if kv_lens is None
        else kv_lens.long().clamp(0, S_kv)
    ).view(B, 1, 1)
    start = r[..., 0].clamp_min(0)
    end = torch.minimum(r[..., 1], lim)
    valid = end > start
    start = torch.where(valid, start, 0)
    end = torch.where(valid, end, 0)
    one = valid.long()
    diff = torch.zeros(r.shape[0], r.shape[1], S_kv + 1, dtype=torch.int64, device=r.device)
    diff.scatter_add_(-1, start, one)
    diff.scatter_add_(-1, end, -one)
    return diff.cumsum(-1)[..., :S_kv]


def _dense(Q, K, V, ranges, kv_lens, scale, cdt):
    """Dense count-weighted softmax attention, every tensor op in dtype cdt."""
    B, _, G, h, Dk = Q.shape
    S_kv = K.shape[2]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    cnt = selection_counts(ranges, kv_lens, S_kv)  # [B, G, S_kv]
    sel = cnt > 0
    zero = torch.zeros((), dtype=cdt, device=Q.device)
    k = torch.where(sel[..., None], K.to(cdt), zero)  # NaN in unselected rows cannot leak
    v = torch.where(sel[..., None], V.to(cdt), zero)
    logits = torch.matmul(Q[:, 0].to(cdt), k.transpose(-1, -2)) * scale  # [B, G, h, S_kv]
    logits = logits + torch.log(cnt.to(cdt))[:, :, None, :]  # multiplicity; -inf if unselected
    logits = torch.where(sel[:, :, None, :], logits, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(sel[:, :, None, :], probs, zero)  # empty rows: NaN -> 0
    return torch.matmul(probs, v).unsqueeze(1)  # [B, 1, G, h, Dv]


def _dense_chunked(Q, K, V, ranges, kv_lens, scale, dtype, chunk_rows=1 << 14):
    """_dense in `dtype`, chunked over the batch to bound memory."""
    B, _, G = Q.shape[:3]
    step = max(1, chunk_rows // G)
    outs = [
        _dense(
            Q[b : b + step],
            K[b : b + step],
            V[b : b + step],
            ranges[b : b + step],
            None if kv_lens is None else kv_lens[b : b + step],
            scale,
            dtype,
        )
        for b in range(0, B, step)
    ]
    return torch.cat(outs, dim=0)


def dense_oracle64(Q, K, V, ranges, kv_lens=None, scale=None, chunk_rows=1 << 14):
    """float64 oracle (dense, count-weighted), chunked over the batch."""
    return _dense_chunked(Q, K, V, ranges, kv_lens, scale, torch.float64, chunk_rows)


def lowp_reference(Q, K, V, ranges, kv_lens=None, scale=None, chunk_rows=1 << 14):
    """The same computation in plain PyTorch in the input dtype (for the tolerance rule)."""
    return _dense_chunked(Q, K, V, ranges, kv_lens, scale, Q.dtype, chunk_rows)


def rows_oracle64(Q, K, V, ranges, kv_lens=None, scale=None):
    """float64 oracle that converts only the selected rows (huge caches); loops over (b, g)."""
    B, _, G, h, Dk = Q.shape
    S_kv, Dv = K.shape[2], V.shape[3]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    lens = [S_kv] * B if kv_lens is None else [min(max(x, 0), S_kv) for x in kv_lens.tolist()]
    out = torch.zeros(B, 1, G, h, Dv, dtype=torch.float64, device=Q.device)
    for b, g in itertools.product(range(B), range(G)):
        idx = []
        for s, e in ranges[b, 0, g].tolist():
            idx.extend(range(max(s, 0), min(e, lens[b])))
        if not idx:
            continue
        sel = torch.tensor(idx, dtype=torch.long, device=Q.device)
        k = K[b, g].index_select(0, sel).double()
        v = V[b, g].index_select(0, sel).double()
        p = torch.softmax(Q[b, 0, g].double() @ k.T * scale, dim=-1)
        out[b, 0, g] = p @ v
    return out


def assert_parity(out, ref64, lowp, what=""):
    assert out.dtype == lowp.dtype and out.shape == ref64.shape, (out.dtype, out.shape)
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output"
    err = (out.double() - ref64).abs()
    bound = 2 * float((lowp.double() - ref64).abs().max()) + 1e-5
    assert float(err.max()) <= bound, (
        f"{what}: max err {float(err.max()):.3e} > 2 x torch-{_id(out.dtype)} err + 1e-5 = "
        f"{bound:.3e}"
    )
    assert float(err.mean()) <= 1e-3, f"{what}: mae {float(err.mean()):.3e} > 1e-3"


def check(Q, K, V, ranges, kv_lens=None, scale=None, what=""):
    out = run(Q, K, V, ranges, kv_lens=kv_lens, scale=scale)
    ref = dense_oracle64(Q, K, V, ranges, kv_lens, scale)
    assert_parity(out, ref, lowp_reference(Q, K, V, ranges, kv_lens, scale), what)
    return out


# ------------------------------------------------------------------------------------------------
# Proof that the kernel (not the reference) ran
# ------------------------------------------------------------------------------------------------


class ReferenceCalled(AssertionError):
    pass


@contextlib.contextmanager
def reference_forbidden():
    """Replaces every nsa module's handle on the PyTorch references with one that raises."""
    import nsa.reference as ref

    targets = {
        id(f)
        for f in (
            getattr(ref, "_packed", None),
            getattr(nsa, "grouped_selection_attention_packed", None),
            getattr(nsa, "grouped_selection_attention", None),
        )
        if f is not None
    }

    def forbidden(*args, **kwargs):
        raise ReferenceCalled("the CUDA entry point ran the PyTorch reference")

    patched = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "nsa" or name.startswith("nsa.")):
            continue
        for attr, val in list(vars(mod).items()):
            if id(val) in targets:
                setattr(mod, attr, forbidden)
                patched.append((mod, attr, val))
    assert patched, "found no handle on the PyTorch references to forbid"
    try:
        yield
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
def test_kernel_really_runs(dtype, dims):
    Q, K, V, ranges, lens = make_inputs(2, 2, 16, *dims, 300, 3, dtype, kv_lens=True)
    with reference_forbidden():
        out = run(Q, K, V, ranges, kv_lens=lens)
        torch.cuda.synchronize()
    assert_parity(
        out,
        dense_oracle64(Q, K, V, ranges, lens),
        lowp_reference(Q, K, V, ranges, lens),
        "kernel path",
    )


def test_uncovered_configs_use_the_reference_silently():
    # fp32 and S > 1 are not kernel configurations: the reference, no error even when strict.
    Q, K, V, ranges, _ = make_inputs(2, 2, 4, 64, 64, 100, 3, torch.float32)
    out = run(Q, K, V, ranges)
    assert_parity(out, dense_oracle64(Q, K, V, ranges), lowp_reference(Q, K, V, ranges), "fp32")
    with reference_forbidden(), pytest.raises(ReferenceCalled):  # the probe above sees this
        run(Q, K, V, ranges)


# ------------------------------------------------------------------------------------------------
# Parity grid against the project's float64 loop oracle
# ------------------------------------------------------------------------------------------------


def _parity_cases(dtype, dims, h, seed):
    """One test = every odd S_kv, with n, kv_lens and the index dtype varied along."""
    for i, S_kv in enumerate(ODD_S_KV):
        n = NS[(i + seed) % len(NS)]
        yield dict(
            B=3 if i % 2 else 2,
            G=2 if i % 3 else 1,
            h=h,
            Dk=dims[0],
            Dv=dims[1],
            S_kv=S_kv,
            n=n,
            dtype=dtype,
            seed=seed * 10 + i,
            kv_lens=bool(i % 2),
            index_dtype=torch.int64 if (i + seed) % 2 else torch.int32,
        )


def _check_against_loop_oracle(c):
    Q, K, V, ranges, lens = make_inputs(
        c["B"],
        c["G"],
        c["h"],
        c["Dk"],
        c["Dv"],
        c["S_kv"],
        c["n"],
        c["dtype"],
        seed=c["seed"],
        kv_lens=c["kv_lens"],
        index_dtype=c["index_dtype"],
    )
    out = run(Q, K, V, ranges, kv_lens=lens)
    ref = nsa.grouped_selection_attention(Q.double(), K.double(), V.double(), ranges, kv_lens=lens)
    # The dense oracle used by the larger tests agrees with the project's loop oracle.
    dense = dense_oracle64(Q, K, V, ranges, lens)
    assert float((dense - ref).abs().max()) <= 1e-9
    assert_parity(out, ref, lowp_reference(Q, K, V, ranges, lens), str(c))


@pytest.mark.parametrize("h", HEADS)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_parity_grid(dtype, dims, h):
    for c in _parity_cases(dtype, dims, h, seed=h + dims[0]):
        _check_against_loop_oracle(c)


@pytest.mark.parametrize("h", EXTRA_HEADS)
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_parity_extra_heads(dtype, dims, h):
    for c in _parity_cases(dtype, dims, h, seed=h):
        _check_against_loop_oracle(c)


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
def test_parity_model_like(dims):
    # NSA-like: 16 blocks of 64 in a long cache (the first and the last two always selected),
    # B*G rows enough to fill the GPU, plus a split-heavy B=1.
    for B, S_kv in ((1, 65536), (8, 8192)):
        G, h, n = 4, 16, 16
        gen = torch.Generator().manual_seed(B)
        nb = S_kv // 64
        rows = []
        for _ in range(B * G):
            rnd = torch.randperm(nb - 3, generator=gen)[: n - 3] + 1
            rows.append(torch.cat([torch.tensor([0, nb - 2, nb - 1]), rnd]).sort().values)
        starts = torch.stack(rows).view(B, 1, G, n) * 64
        ranges = torch.stack([starts, starts + 64], -1).to(torch.int32).cuda()
        Q = torch.randn(B, 1, G, h, dims[0], generator=gen).bfloat16().cuda()
        K = torch.randn(B, G, S_kv, dims[0], generator=gen).bfloat16().cuda()
        V = torch.randn(B, G, S_kv, dims[1], generator=gen).bfloat16().cuda()
        out = run(Q, K, V, ranges)
        assert_parity(
            out,
            rows_oracle64(Q, K, V, ranges),
            lowp_reference(Q, K, V, ranges),
            f"B={B} S_kv={S_kv}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_corner_ranges(dtype):
    # Per row: a single token at the limit, a range ending exactly at the limit, one past it,
    # a reversed one, a negative one, overlapping ranges (a token counted twice), all empty.
    S_kv, lim = 130, 97
    rows = [
        [[lim - 1, lim], [0, 0], [5, 3], [-10, -1]],  # one token: the last valid one
        [[30, lim], [lim, lim + 50], [-5, 2], [200, 300]],  # ends exactly at the limit
        [[0, S_kv + 100], [10, 20], [15, 25], [15, 16]],  # past the limit; overlaps
        [[lim, S_kv], [5, 5], [-3, 0], [99, 98]],  # all empty after clamping
    ]
    B, G, h = 2, 2, 8
    ranges = torch.tensor(rows, dtype=torch.int32).view(B, 1, G, 4, 2).cuda()
    lens = torch.tensor([lim, lim], dtype=torch.int32).cuda()
    Q, K, V, _, _ = make_inputs(B, G, h, 128, 128, S_kv, 4, dtype, seed=3)
    out = check(Q, K, V, ranges, lens, what="corners")
    assert torch.equal(out[1, 0, 1], torch.zeros_like(out[1, 0, 1]))  # the all-empty row
    # With one token selected the output is exactly that token's V row.
    assert torch.equal(out[0, 0, 0], V[0, 0, lim - 1].expand(h, -1))


def test_int32_and_int64_ranges_agree():
    Q, K, V, r32, l32 = make_inputs(
        3, 2, 16, 192, 128, 1999, 16, torch.bfloat16, seed=5, kv_lens=True
    )
    out32 = check(Q, K, V, r32, l32, what="int32")
    out64 = run(Q, K, V, r32.long(), kv_lens=l32.long())
    assert torch.equal(out32, out64)
    assert torch.equal(out32, run(Q, K, V, r32.long(), kv_lens=l32))
    assert torch.equal(out32, run(Q, K, V, r32, kv_lens=l32.long()))


def test_explicit_scale():
    Q, K, V, ranges, _ = make_inputs(2, 2, 6, 64, 64, 300, 3, torch.float16, seed=7)
    check(Q, K, V, ranges, scale=0.3, what="scale=0.3")


# ------------------------------------------------------------------------------------------------
# Equivalences by construction
# ------------------------------------------------------------------------------------------------


def _sdpa(Q, K, V, cdt=None):
    """Plain SDPA, the h heads of a group as its query rows: [B, 1, G, h, Dv]."""
    q, k, v = Q[:, 0], K, V
    if cdt is not None:
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    return F.scaled_dot_product_attention(q, k, v).unsqueeze(1)


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_full_range_equals_dense_sdpa(dtype, dims):
    B, G, h, S_kv = 2, 2, 16, 777
    Q, K, V, _, _ = make_inputs(B, G, h, *dims, S_kv, 1, dtype, seed=11)
    ranges = torch.tensor([0, S_kv], dtype=torch.int32).expand(B, 1, G, 1, 2).contiguous().cuda()
    out = run(Q, K, V, ranges)
    assert_parity(out, _sdpa(Q, K, V, torch.float64), _sdpa(Q, K, V), "full range vs SDPA")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_single_range_equals_sdpa_on_the_slice(dtype):
    B, G, h, S_kv, a, b = 2, 2, 8, 1000, 123, 456
    Q, K, V, _, _ = make_inputs(B, G, h, 128, 128, S_kv, 1, dtype, seed=12)
    ranges = torch.tensor([a, b], dtype=torch.int32).expand(B, 1, G, 1, 2).contiguous().cuda()
    out = run(Q, K, V, ranges)
    Ks, Vs = K[:, :, a:b], V[:, :, a:b]
    assert_parity(out, _sdpa(Q, Ks, Vs, torch.float64), _sdpa(Q, Ks, Vs), "slice vs SDPA")


@pytest.mark.parametrize("dims", [(64, 64), (192, 128)], ids=_id)
def test_permuting_ranges_changes_nothing_beyond_rounding(dims):
    Q, K, V, ranges, lens = make_inputs(
        3, 2, 16, *dims, 4000, 16, torch.bfloat16, seed=13, kv_lens=True
    )
    out = check(Q, K, V, ranges, lens, what="original order")
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0)).cuda()
    out_p = check(Q, K, V, ranges[:, :, :, perm], lens, what="permuted")
    ref = dense_oracle64(Q, K, V, ranges, lens)
    lowp_err = float((lowp_reference(Q, K, V, ranges, lens).double() - ref).abs().max())
    assert float((out.double() - out_p.double()).abs().max()) <= 2 * lowp_err + 1e-5


# ------------------------------------------------------------------------------------------------
# Empty selections, poisoning
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
def test_empty_selection_gives_exact_zeros(dims):
    B, G, h, S_kv, n = 3, 2, 16, 200, 4
    Q, K, V, _, _ = make_inputs(B, G, h, *dims, S_kv, n, torch.bfloat16, seed=21)
    empty = torch.tensor([[5, 5], [9, 2], [-20, -1], [S_kv, S_kv + 64]], dtype=torch.int32)
    ranges = empty.expand(B, 1, G, n, 2).contiguous().cuda()
    out = run(Q, K, V, ranges)
    assert torch.equal(out, torch.zeros_like(out))
    # kv_lens = 0 empties every row whatever the ranges say.
    full = torch.tensor([0, S_kv], dtype=torch.int32).expand(B, 1, G, n, 2).contiguous().cuda()
    out = run(Q, K, V, full, kv_lens=torch.zeros(B, dtype=torch.int32, device="cuda"))
    assert torch.equal(out, torch.zeros_like(out))


def _poison_allocator(numel, dtype):
    """Frees a NaN-filled block of `numel` elements so the next allocation likely reuses it."""
    for n in (numel, numel + 1):
        junk = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
        del junk


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_nan_never_leaks(dtype, dims):
    B, G, h, S_kv, n = 3, 2, 16, 1999, 8
    Q, K, V, ranges, lens = make_inputs(B, G, h, *dims, S_kv, n, dtype, seed=31, kv_lens=True)
    ranges[2, 0, 1] = torch.tensor([5, 5], dtype=ranges.dtype)  # one row selects nothing
    ref = dense_oracle64(Q, K, V, ranges, lens)
    lowp = lowp_reference(Q, K, V, ranges, lens)
    # NaN in every K/V row that is not selected (so also in every row past kv_lens).
    unselected = selection_counts(ranges, lens, S_kv) == 0  # [B, G, S_kv]
    assert bool(unselected.any()) and not bool(unselected.all())
    Kp = K.masked_fill(unselected[..., None], float("nan"))
    Vp = V.masked_fill(unselected[..., None], float("nan"))
    torch.cuda.synchronize()
    _poison_allocator(B * G * h * dims[1], dtype)
    out = run(Q, Kp, Vp, ranges, kv_lens=lens)
    assert_parity(out, ref, lowp, "NaN in unselected K/V")
    assert torch.equal(out[2, 0, 1], torch.zeros_like(out[2, 0, 1]))


def test_nan_in_a_selected_row_propagates():
    # SPEC.md step 6: NaN inside the selection propagates (the kernel must not hide it either).
    Q, K, V, _, _ = make_inputs(1, 1, 4, 128, 128, 256, 1, torch.bfloat16, seed=32)
    ranges = torch.tensor([[[[[10, 50]]]]], dtype=torch.int32, device="cuda")
    V[0, 0, 20, 3] = float("nan")
    out = run(Q, K, V, ranges)
    assert bool(torch.isnan(out[0, 0, 0, :, 3]).all())


# ------------------------------------------------------------------------------------------------
# Serving: CUDA graphs, determinism, strided views, torch.compile, opcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [(64, 64), (192, 128)], ids=_id)
def test_cuda_graph_replay_with_new_inputs(dims):
    B, G, h, S_kv, n = 4, 2, 16, 3000, 16
    Q, K, V, ranges, lens = make_inputs(
        B, G, h, *dims, S_kv, n, torch.bfloat16, seed=41, kv_lens=True
    )
    Q2, _, _, ranges2, lens2 = make_inputs(
        B, G, h, *dims, S_kv, n, torch.bfloat16, seed=42, kv_lens=True
    )
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(Q, K, V, ranges, kv_lens=lens)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(Q, K, V, ranges, kv_lens=lens)
    graph.replay()
    torch.cuda.synchronize()
    assert_parity(
        out,
        dense_oracle64(Q, K, V, ranges, lens),
        lowp_reference(Q, K, V, ranges, lens),
        "graph, first inputs",
    )
    Q.copy_(Q2)
    ranges.copy_(ranges2)
    lens.copy_(lens2)
    graph.replay()
    torch.cuda.synchronize()
    assert_parity(
        out,
        dense_oracle64(Q2, K, V, ranges2, lens2),
        lowp_reference(Q2, K, V, ranges2, lens2),
        "graph, new inputs",
    )
    del graph


@pytest.mark.parametrize(
    "B,G,h,dims,S_kv,n",
    [
        (1, 1, 16, (192, 128), 65536, 16),  # few rows, long selection: split-KV territory
        (1, 4, 16, (128, 128), 32768, 64),
        (64, 4, 16, (192, 128), 4096, 16),
        (7, 3, 33, (256, 256), 1999, 3),
    ],
)
def test_repeated_runs_are_bitwise_equal(B, G, h, dims, S_kv, n):
    Q, K, V, ranges, lens = make_inputs(
        B, G, h, *dims, S_kv, n, torch.bfloat16, seed=51, kv_lens=True, max_len=S_kv // 8
    )
    first = check(Q, K, V, ranges, lens, what="first run")
    for _ in range(3):
        run(Q[:1], K[:1], V[:1], ranges[:1])  # other work in between
        assert torch.equal(run(Q, K, V, ranges, kv_lens=lens), first)


def _peak_extra_bytes(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=_id)
def test_strided_views_are_read_in_place(dims):
    Dk, Dv = dims
    B, G, h, S_kv, n, S_big = 2, 2, 16, 4000, 16, 5000
    dtype = torch.bfloat16
    Q, K, V, ranges, lens = make_inputs(B, G, h, Dk, Dv, S_kv, n, dtype, seed=61, kv_lens=True)
    ref = dense_oracle64(Q, K, V, ranges, lens)
    lowp = lowp_reference(Q, K, V, ranges, lens)
    out_bytes = B * G * h * Dv * 2
    layouts = {}
    # A slice of a larger preallocated cache [B, G, S_big, D][:, :, :S_kv].
    Kc = torch.full((B, G, S_big, Dk), float("nan"), dtype=dtype, device="cuda")
    Vc = torch.full((B, G, S_big, Dv), float("nan"), dtype=dtype, device="cuda")
    Kc[:, :, :S_kv] = K
    Vc[:, :, :S_kv] = V
    layouts["cache slice"] = (Q, Kc[:, :, :S_kv], Vc[:, :, :S_kv], ranges)
    # The [B, S_kv, G, D] layout, permuted to [B, G, S_kv, D].
    Kp = K.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    Vp = V.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    layouts["permuted"] = (Q, Kp, Vp, ranges)
    # Q as a slice of a wider buffer; Q stored head-major [B, S, h, G, Dk]; ranges with a
    # padded pair axis.
    Qw = torch.zeros(B, 1, G, h, Dk + 64, dtype=dtype, device="cuda")
    Qw[..., :Dk] = Q
    Qt = Q.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    rp = torch.zeros(*ranges.shape[:-1], 3, dtype=ranges.dtype, device="cuda")
    rp[..., :2] = ranges
    layouts["Q slice, ranges slice"] = (Qw[..., :Dk], K, V, rp[..., :2])
    layouts["Q permuted"] = (Qt, K, V, ranges)
    for name, (q, k, v, r) in layouts.items():
        out, extra = _peak_extra_bytes(lambda q=q, k=k, v=v, r=r: run(q, k, v, r, kv_lens=lens))
        assert_parity(out, ref, lowp, name)
        assert extra <= out_bytes + (1 << 20), f"{name}: {extra} bytes allocated (a copy?)"
    # A last dim that is not contiguous is copied first: still correct.
    Kt = K.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert Kt.stride(-1) != 1
    assert_parity(run(Q, Kt, V, ranges, kv_lens=lens), ref, lowp, "K last dim strided")


def test_torch_compile_fullgraph_matches_eager():
    Q, K, V, ranges, lens = make_inputs(
        2, 2, 16, 128, 128, 500, 4, torch.bfloat16, seed=71, kv_lens=True
    )

    def step(q, k, v, r, kl):
        return csk.selection_attention_cuda(q * 1.0, k, v, r, kv_lens=kl) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager = step(Q, K, V, ranges, lens)
    got = compiled(Q, K, V, ranges, lens)
    assert torch.equal(got, eager)
    Q2, _, _, ranges2, _ = make_inputs(2, 2, 16, 128, 128, 500, 4, torch.bfloat16, seed=72)
    assert torch.equal(compiled(Q2, K, V, ranges2, lens), step(Q2, K, V, ranges2, lens))


def test_opcheck():
    op = getattr(getattr(torch.ops, "nsa", None), "selection_attention", None)
    if op is None:
        pytest.fail("torch.ops.nsa.selection_attention is not registered")
    samples = [
        make_inputs(2, 2, 16, 64, 64, 300, 3, torch.bfloat16, seed=81, kv_lens=True),
        make_inputs(1, 3, 8, 192, 128, 65, 2, torch.float16, seed=82),
    ]
    for Q, K, V, ranges, lens in samples:
        torch.library.opcheck(op, (Q, K, V, ranges, lens, None))
    Q, K, V, ranges, _ = samples[1]
    torch.library.opcheck(op, (Q, K, V, ranges, None, 0.25))


# ------------------------------------------------------------------------------------------------
# Index arithmetic and grid limits
# ------------------------------------------------------------------------------------------------


def test_offsets_past_2_pow_31_elements():
    # K and V hold B*G*S_kv*D = 4*2*1114112*256 > 2^31 elements each (4.6 GB in bf16): the last
    # (b, g) row starts near 2^31 elements and its ranges end past it.
    B, G, h, D, S_kv = 4, 2, 4, 256, (1 << 20) + (1 << 16)
    need_memory(12)
    assert B * G * S_kv * D > 2**31
    dtype = torch.bfloat16
    Q = torch.randn(B, 1, G, h, D, device="cuda", dtype=dtype)
    K = torch.randn(B, G, S_kv, D, device="cuda", dtype=dtype)
    V = torch.randn(B, G, S_kv, D, device="cuda", dtype=dtype)
    ranges = torch.zeros(B, 1, G, 3, 2, dtype=torch.int64)
    ranges[..., 0, :] = torch.tensor([0, 70])
    ranges[..., 1, :] = torch.tensor([S_kv // 2 - 33, S_kv // 2 + 31])
    ranges[..., 2, :] = torch.tensor([S_kv - 100, S_kv])
    ranges[B - 1, 0, G - 1] = torch.tensor(
        [[S_kv - 5000, S_kv - 4900], [S_kv - 77, S_kv], [S_kv - 1, S_kv + 10]]
    )
    ranges = ranges.cuda()
    # The selected rows of the last (b, g) lie past 2^31 elements from K's start.
    assert ((B - 1) * G + (G - 1)) * S_kv * D + (S_kv - 77) * D > 2**31
    out = run(Q, K, V, ranges)
    ref = rows_oracle64(Q, K, V, ranges)
    # The same computation in bf16, on the gathered selection (a dense one would not fit).
    lowp = torch.empty_like(out)
    for b, g in itertools.product(range(B), range(G)):
        idx = sorted(i for s, e in ranges[b, 0, g].tolist() for i in range(s, min(e, S_kv)))
        ii = torch.tensor(idx, device="cuda")
        k, v = K[b, g].index_select(0, ii), V[b, g].index_select(0, ii)
        p = torch.softmax((Q[b, 0, g] @ k.T) * (1.0 / math.sqrt(D)), dim=-1)
        lowp[b, 0, g] = p @ v
    assert_parity(out, ref, lowp, "offsets > 2^31")
    del Q, K, V
    release()


def test_a_million_rows():
    # B*G = 10^6 (b, g) rows, h = 1: the grid must not be bounded by 65535 in y/z.
    B, G, h, D, S_kv = 500_000, 2, 1, 64, 64
    need_memory(24)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(91)
    Q = torch.randn(B, 1, G, h, D, device="cuda", dtype=dtype, generator=gen)
    K = torch.randn(B, G, S_kv, D, device="cuda", dtype=dtype, generator=gen)
    V = torch.randn(B, G, S_kv, D, device="cuda", dtype=dtype, generator=gen)
    start = torch.randint(0, S_kv, (B, 1, G, 1), device="cuda", generator=gen)
    length = torch.randint(1, S_kv + 1, (B, 1, G, 1), device="cuda", generator=gen)
    ranges = torch.stack([start, (start + length).clamp_max(S_kv)], -1).to(torch.int32)
    out = run(Q, K, V, ranges)
    assert_parity(
        out,
        dense_oracle64(Q, K, V, ranges, chunk_rows=1 << 16),
        lowp_reference(Q, K, V, ranges, chunk_rows=1 << 16),
        "10^6 rows",
    )
    del Q, K, V, out
    release()

"""Both PyTorch references against float64 oracles, on odd sizes and every SPEC.md edge case."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from nsa import grouped_selection_attention, grouped_selection_attention_packed
from nsa.tests.conftest import make_case

REFERENCES = {"packed": grouped_selection_attention_packed, "oracle": grouped_selection_attention}


def dense_oracle(Q, K, V, ranges, kv_lens=None, scale=None):
    """Independent float64 check: dense logits weighted by how many ranges cover each token."""
    Q, K, V = Q.double(), K.double(), V.double()
    B, S, G, h, Dk = Q.shape
    S_kv = K.shape[2]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    kv = torch.full((B,), S_kv) if kv_lens is None else kv_lens.long().cpu()
    t = kv[:, None] - S + torch.arange(S)[None, :]  # [B, S]
    lim = torch.minimum(t + 1, kv[:, None])[:, :, None, None, None]
    tok = torch.arange(S_kv).view(1, 1, 1, 1, S_kv)
    r = ranges.long().cpu()
    start, end = r[..., 0:1], r[..., 1:2]  # [B, S, G, n, 1]
    covered = (tok >= start.clamp_min(0)) & (tok < torch.minimum(end, lim))
    count = covered.sum(dim=3).double()  # [B, S, G, S_kv]
    logits = torch.einsum("bsghd,bgtd->bsght", Q, K) * scale
    logits = logits.masked_fill(count[:, :, :, None, :] == 0, float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = count[:, :, :, None, :] * torch.exp(logits - m)
    den = w.sum(-1, keepdim=True)
    out = torch.einsum("bsght,bgtd->bsghd", w, V) / torch.where(den > 0, den, torch.ones_like(den))
    return out


def lowp_attention(Q, K, V, ranges, kv_lens=None):
    """The same computation done by plain PyTorch in the input dtype (disjoint ranges only)."""
    B, S, G, h, Dk = Q.shape
    S_kv = K.shape[2]
    kv = torch.full((B,), S_kv) if kv_lens is None else kv_lens.long()
    t = kv[:, None] - S + torch.arange(S)[None, :]
    lim = torch.minimum(t + 1, kv[:, None])[:, :, None, None, None]
    tok = torch.arange(S_kv).view(1, 1, 1, 1, S_kv)
    r = ranges.long()
    covered = ((tok >= r[..., 0:1].clamp_min(0)) & (tok < torch.minimum(r[..., 1:2], lim))).any(3)
    logits = torch.einsum("bsghd,bgtd->bsght", Q, K) * (1.0 / math.sqrt(Dk))
    logits = logits.masked_fill(~covered[:, :, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    p = torch.where(covered[:, :, :, None, :], p, torch.zeros_like(p))
    return torch.einsum("bsght,bgtd->bsghd", p, V)


def as64(*ts):
    return [None if t is None or not t.is_floating_point() else t.double() for t in ts]


# --- odd sizes against both oracles ---------------------------------------------------------


@pytest.mark.parametrize("S_kv", [1, 3, 63, 65, 1999])
@pytest.mark.parametrize("h", [1, 6, 16])
def test_odd_sizes_match_oracles(S_kv, h):
    Q, K, V, r, kl = make_case(
        B=2, S=1, G=2, h=h, Dk=40, Dv=24, S_kv=S_kv, n=5, seed=S_kv * h, kv_lens=True
    )
    Q64, K64, V64 = as64(Q, K, V)
    gold = grouped_selection_attention(Q64, K64, V64, r, kv_lens=kl)
    dense = dense_oracle(Q, K, V, r, kl)
    torch.testing.assert_close(gold, dense, atol=1e-12, rtol=1e-12)
    packed64 = grouped_selection_attention_packed(Q64, K64, V64, r, kv_lens=kl)
    torch.testing.assert_close(packed64, gold, atol=1e-12, rtol=1e-12)
    for ref in REFERENCES.values():
        out = ref(Q, K, V, r, kv_lens=kl)
        assert out.dtype == torch.float32 and out.shape == (2, 1, 2, h, 24)
        assert (out.double() - gold).abs().max() < 1e-5


@pytest.mark.parametrize("S", [2, 5])
def test_prefill_rows_are_causal(S):
    """S > 1: row s is the token at kv_len - S + s; it equals an S=1 call with that cache length."""
    Q, K, V, r, kl = make_case(B=3, S=S, G=2, h=3, Dk=16, Dv=8, S_kv=40, n=3, seed=S, kv_lens=True)
    kl[1] = S - 1  # fewer valid tokens than queries: the first rows see nothing
    Q64, K64, V64 = as64(Q, K, V)
    gold = grouped_selection_attention(Q64, K64, V64, r, kv_lens=kl)
    torch.testing.assert_close(gold, dense_oracle(Q, K, V, r, kl), atol=1e-12, rtol=1e-12)
    packed = grouped_selection_attention_packed(Q64, K64, V64, r, kv_lens=kl)
    torch.testing.assert_close(packed, gold, atol=1e-12, rtol=1e-12)
    for s in range(S):
        lens_s = (kl - S + s + 1).clamp(0, 40)
        one = grouped_selection_attention_packed(
            Q64[:, s : s + 1], K64, V64, r[:, s : s + 1], kv_lens=lens_s
        )
        torch.testing.assert_close(packed[:, s : s + 1], one, atol=1e-12, rtol=1e-12)


# --- SPEC.md edge cases ---------------------------------------------------------------------


@pytest.mark.parametrize("name", REFERENCES)
def test_empty_rows_are_exact_zeros(name):
    Q, K, V, _, _ = make_case(B=2, S=2, G=3, h=4, Dk=16, Dv=8, S_kv=20, n=3)
    K.fill_(float("nan"))  # nothing is selected, so nothing may be read
    V.fill_(float("nan"))
    ranges = torch.tensor([[-5, 0], [7, 3], [25, 40]]).expand(2, 2, 3, 3, 2)
    out = REFERENCES[name](Q, K, V, ranges)
    assert torch.equal(out, torch.zeros_like(out))
    kl = torch.zeros(2, dtype=torch.int64)  # empty caches: every range empty
    out = REFERENCES[name](Q, K, V, torch.tensor([0, 20]).expand(2, 2, 3, 1, 2), kv_lens=kl)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", REFERENCES)
def test_clamping_of_bad_ranges(name):
    """Negative, reversed and out-of-range ranges clamp to the token list written by hand."""
    Q, K, V, _, _ = make_case(B=1, S=1, G=1, h=2, Dk=8, Dv=8, S_kv=12, n=1, dtype=torch.float64)
    kl = torch.tensor([10])  # t = 9, lim = 10
    ranges = torch.tensor([[-5, 2], [6, 4], [11, 30], [8, 40], [3, 3]]).view(1, 1, 1, 5, 2)
    tokens = [0, 1, 8, 9]
    out = REFERENCES[name](Q, K, V, ranges, kv_lens=kl)
    expect = F.softmax(Q[0, 0, 0] @ K[0, 0, tokens].T / math.sqrt(8), dim=-1) @ V[0, 0, tokens]
    torch.testing.assert_close(out[0, 0, 0], expect, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", REFERENCES)
def test_overlapping_ranges_count_twice(name):
    Q, K, V, _, _ = make_case(B=1, S=1, G=1, h=3, Dk=8, Dv=4, S_kv=10, n=1, dtype=torch.float64)
    ranges = torch.tensor([[0, 4], [2, 6]]).view(1, 1, 1, 2, 2)
    tokens = [0, 1, 2, 3, 2, 3, 4, 5]
    out = REFERENCES[name](Q, K, V, ranges)
    expect = F.softmax(Q[0, 0, 0] @ K[0, 0, tokens].T / math.sqrt(8), dim=-1) @ V[0, 0, tokens]
    torch.testing.assert_close(out[0, 0, 0], expect, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", REFERENCES)
def test_kv_lens_equals_truncated_cache(name):
    Q, K, V, r, _ = make_case(B=2, S=1, G=2, h=4, Dk=16, Dv=16, S_kv=50, n=4, seed=3)
    kl = torch.tensor([50, 31], dtype=torch.int32)
    out = REFERENCES[name](Q, K, V, r, kv_lens=kl)
    for b in range(2):
        L = int(kl[b])
        one = REFERENCES[name](Q[b : b + 1], K[b : b + 1, :, :L], V[b : b + 1, :, :L], r[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], one, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", REFERENCES)
def test_int32_and_int64_ranges_agree(name):
    Q, K, V, r, kl = make_case(S_kv=63, kv_lens=True, seed=5)
    a = REFERENCES[name](Q, K, V, r.long(), kv_lens=kl.long())
    b = REFERENCES[name](Q, K, V, r.int(), kv_lens=kl.int())
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", REFERENCES)
def test_strided_views_are_used_correctly(name):
    """A slice of a bigger cache, permuted Q/K/V layouts and strided ranges give the same result."""
    B, S, G, h, Dk, Dv, S_kv, n = 2, 1, 3, 4, 16, 8, 33, 3
    Q, K, V, r, kl = make_case(B, S, G, h, Dk, Dv, S_kv, n, seed=11, kv_lens=True)
    expect = REFERENCES[name](Q, K, V, r, kv_lens=kl)
    # KV cache with room for 100 tokens and 5 groups; the call sees a slice of it.
    big_k = torch.full((B, 5, 100, Dk), float("nan"))
    big_v = torch.full((B, 5, 100, Dv), float("nan"))
    big_k[:, 1:4, :S_kv] = K
    big_v[:, 1:4, :S_kv] = V
    # Token-major storage [B, S_kv, G, D] seen as [B, G, S_kv, D] (a permuted view).
    perm_k = K.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    perm_v = V.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    perm_q = Q.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
    strided_r = r.transpose(-1, -2).contiguous().transpose(-1, -2)  # r_stride_e != 1
    strided_kl = torch.stack([kl, kl], dim=1)[:, 0]  # kv_lens stride 2
    variants = [
        (Q, big_k[:, 1:4, :S_kv], big_v[:, 1:4, :S_kv], r, kl),
        (perm_q, perm_k, perm_v, strided_r, strided_kl),
        (Q, K.transpose(-1, -2).contiguous().transpose(-1, -2), V, r, kl),  # last dim strided
    ]
    for q, k, v, rr, kk in variants:
        torch.testing.assert_close(
            REFERENCES[name](q, k, v, rr, kv_lens=kk), expect, atol=1e-6, rtol=1e-6
        )


@pytest.mark.parametrize("name", REFERENCES)
def test_nan_in_unselected_rows_does_not_leak(name):
    Q, K, V, r, kl = make_case(B=2, S=2, G=2, h=4, Dk=16, Dv=16, S_kv=65, n=4, seed=7, kv_lens=True)
    expect = REFERENCES[name](Q, K, V, r, kv_lens=kl)
    assert torch.isfinite(expect).all()
    # Poison every K/V row no (b, s, g) row selects, including everything past kv_lens.
    selected = torch.zeros(2, 2, 65, dtype=torch.bool)  # [B, G, S_kv]
    S = 2
    for b, s, g, i in itertools.product(range(2), range(S), range(2), range(4)):
        lim = min(int(kl[b]) - S + s + 1, int(kl[b]))
        lo, hi = max(int(r[b, s, g, i, 0]), 0), min(int(r[b, s, g, i, 1]), lim)
        if lo < hi:
            selected[b, g, lo:hi] = True
    Kp = torch.where(selected[..., None], K, torch.full_like(K, float("nan")))
    Vp = torch.where(selected[..., None], V, torch.full_like(V, float("inf")))
    out = REFERENCES[name](Q, Kp, Vp, r, kv_lens=kl)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expect, atol=0, rtol=0)


@pytest.mark.parametrize("name", REFERENCES)
def test_nan_in_a_selected_row_propagates(name):
    Q, K, V, _, _ = make_case(B=1, S=1, G=2, h=2, Dk=8, Dv=8, S_kv=10, n=1)
    ranges = torch.tensor([0, 5]).expand(1, 1, 2, 1, 2)
    K[0, 0, 2, 0] = float("nan")  # selected by group 0 only
    out = REFERENCES[name](Q, K, V, ranges)
    assert torch.isnan(out[0, 0, 0]).all()
    assert torch.isfinite(out[0, 0, 1]).all()


@pytest.mark.parametrize("name", REFERENCES)
def test_range_order_does_not_matter(name):
    Q, K, V, r, kl = make_case(
        B=2, S=1, G=2, h=4, Dk=32, Dv=32, S_kv=200, n=6, seed=9, kv_lens=True
    )
    out = REFERENCES[name](Q, K, V, r, kv_lens=kl)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    out_p = REFERENCES[name](Q, K, V, r[..., perm, :], kv_lens=kl)
    torch.testing.assert_close(out_p, out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", REFERENCES)
@pytest.mark.parametrize("L", [1, 2, 64, 511])
def test_one_query_attends_to_all_selected_keys(name, L):
    """The seed's packed SDPA used is_causal=True on a one-row query and saw only key 0."""
    Q, K, V, _, _ = make_case(
        B=1, S=1, G=1, h=8, Dk=64, Dv=64, S_kv=600, n=1, dtype=torch.float64, seed=L
    )
    off = 17
    ranges = torch.tensor([off, off + L]).view(1, 1, 1, 1, 2)
    out = REFERENCES[name](Q, K, V, ranges)
    q = Q[0, 0, 0][:, None]  # [h, 1, Dk]
    k = K[0, 0, off : off + L].expand(8, L, 64)
    v = V[0, 0, off : off + L].expand(8, L, 64)
    full = F.scaled_dot_product_attention(q, k, v)[:, 0]
    torch.testing.assert_close(out[0, 0, 0], full, atol=1e-12, rtol=1e-12)
    if L > 1:
        first_only = v[:, 0]
        assert (out[0, 0, 0] - first_only).abs().mean() > 1e-3


@pytest.mark.parametrize("name", REFERENCES)
def test_full_range_equals_dense_attention(name):
    B, G, h, D, S_kv = 2, 3, 4, 32, 77
    Q, K, V, _, _ = make_case(
        B=B, S=1, G=G, h=h, Dk=D, Dv=D, S_kv=S_kv, n=1, dtype=torch.float64, seed=4
    )
    ranges = torch.tensor([0, S_kv]).expand(B, 1, G, 1, 2)
    out = REFERENCES[name](Q, K, V, ranges, scale=0.3)
    q = Q[:, 0].unsqueeze(3)  # [B, G, h, 1, D]
    k = K.unsqueeze(2).expand(B, G, h, S_kv, D)
    v = V.unsqueeze(2).expand(B, G, h, S_kv, D)
    dense = F.scaled_dot_product_attention(q, k, v, scale=0.3)[:, :, :, 0]
    torch.testing.assert_close(out[:, 0], dense, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", REFERENCES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_numerics(name, dtype):
    """SPEC.md Numerics: MAE <= 1e-3 and max err <= 2x plain torch in the dtype + 1e-5."""
    Q, K, V, r, kl = make_case(
        B=2,
        S=1,
        G=4,
        h=16,
        Dk=128,
        Dv=64,
        S_kv=1999,
        n=8,
        seed=21,
        dtype=dtype,
        kv_lens=True,
        junk=False,
    )
    # Disjoint ranges (NSA's shape): n blocks of 64 tokens at random block offsets.
    gen = torch.Generator().manual_seed(2)
    blocks = torch.stack([torch.randperm(31, generator=gen)[:8] for _ in range(2 * 4)])
    start = (blocks * 64).view(2, 1, 4, 8)
    r = torch.stack([start, start + 64], dim=-1)
    gold = grouped_selection_attention(*as64(Q, K, V), r, kv_lens=kl)
    base_err = (lowp_attention(Q, K, V, r, kl).double() - gold).abs().max().item()
    out = REFERENCES[name](Q, K, V, r, kv_lens=kl)
    assert out.dtype == dtype
    err = (out.double() - gold).abs()
    assert err.mean().item() <= 1e-3
    assert err.max().item() <= 2 * base_err + 1e-5, (err.max().item(), base_err)


@pytest.mark.parametrize("name", REFERENCES)
def test_repeated_runs_are_bitwise_identical(name):
    Q, K, V, r, kl = make_case(S_kv=300, n=6, kv_lens=True, dtype=torch.bfloat16, seed=12)
    a = REFERENCES[name](Q, K, V, r, kv_lens=kl)
    b = REFERENCES[name](Q, K, V, r, kv_lens=kl)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("name", REFERENCES)
@pytest.mark.parametrize(
    "sizes", [dict(B=0), dict(n=0), dict(S_kv=0), dict(h=0), dict(G=0), dict(S=0), dict(Dv=0)]
)
def test_zero_sized_dims(name, sizes):
    args = dict(B=2, S=1, G=2, h=3, Dk=8, Dv=8, S_kv=10, n=2)
    args.update(sizes)
    Q, K, V, r, _ = make_case(**args, junk=False)
    out = REFERENCES[name](Q, K, V, r)
    assert out.shape == (args["B"], args["S"], args["G"], args["h"], args["Dv"])
    assert torch.equal(out, torch.zeros_like(out))


def test_packed_matches_oracle_on_many_random_cases():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        dims = [int(x) for x in torch.randint(1, 6, (5,), generator=g)]
        B, S, G, h, n = dims
        S_kv = int(torch.randint(1, 150, (1,), generator=g))
        Q, K, V, r, kl = make_case(
            B,
            S,
            G,
            h,
            8,
            12,
            S_kv,
            n,
            seed=seed,
            kv_lens=True,
            dtype=torch.float64,
            index_dtype=torch.int32,
        )
        torch.testing.assert_close(
            grouped_selection_attention_packed(Q, K, V, r, kv_lens=kl),
            grouped_selection_attention(Q, K, V, r, kv_lens=kl),
            atol=1e-12,
            rtol=1e-12,
        )

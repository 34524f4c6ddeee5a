"""PyTorch references of selection attention (SPEC.md, Semantics).

``grouped_selection_attention_packed``: the vectorised reference and the fallback users get when
the CUDA kernel does not apply. ``grouped_selection_attention``: the plain gather oracle (loops
over rows, obviously right), used by the tests.

Both take Q [B, S, G, h, Dk], K [B, G, S_kv, Dk], V [B, G, S_kv, Dv], ranges [B, S, G, n, 2]
(int32/int64 half-open [start, end) token ranges), kv_lens [B] (optional) and return
out [B, S, G, h, Dv] in V's dtype. fp16/bf16/fp32 inputs are computed in fp32, fp64 in fp64.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._validate import Sizes, resolve_scale, validate

__all__ = ["grouped_selection_attention_packed", "grouped_selection_attention"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped_selection_attention_packed(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    ranges: torch.Tensor,
    *,
    kv_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Vectorised reference of selection attention, for any S.

    Shapes: Q [B, S, G, h, Dk], K [B, G, S_kv, Dk], V [B, G, S_kv, Dv], ranges [B, S, G, n, 2],
    kv_lens [B] or None (default S_kv); returns [B, S, G, h, Dv] in V's dtype.

    The selected tokens of every row are packed into [rows, Lmax] (Lmax: the longest selection
    over all rows), gathered once, and attended with a masked fp32 softmax (fp64 for fp64
    inputs). Costs one host read per call (Lmax sizes the gather; under CUDA-graph capture a
    static bound ``n * S_kv`` is used instead) and ``rows * Lmax * (Dk + Dv)`` gathered elements.
    """
    sizes = validate(Q, K, V, ranges, kv_lens, allow_float64=True)
    return _packed(Q, K, V, ranges, kv_lens, resolve_scale(scale, sizes.Dk), sizes)


def _packed(Q, K, V, ranges, kv_lens, scale: float, sizes: Sizes) -> torch.Tensor:
    """The packed reference on validated arguments (the kernel wrapper's fallback)."""
    B, S, G, h, Dk, Dv, S_kv, n = sizes
    dev = Q.device
    cdt = _compute_dtype(Q.dtype)
    if B * S * G * h * Dv == 0 or n == 0 or S_kv == 0:
        return torch.zeros((B, S, G, h, Dv), dtype=V.dtype, device=dev)

    # Causal limit per (b, s): t = kv_len - S + s, lim = min(t + 1, kv_len) (SPEC.md step 1).
    if kv_lens is None:  # lim = S_kv - S + s + 1 <= S_kv: one op instead of five
        lim = torch.arange(S_kv - S + 1, S_kv + 1, device=dev).expand(B, S)
    else:
        # Clamped for memory safety: validate() checked the values wherever it could.
        kv = kv_lens.to(torch.int64).clamp(0, S_kv)[:, None]
        lim = torch.minimum(kv - S + 1 + torch.arange(S, device=dev), kv)  # [B, S]

    # Clamp every range to [max(start, 0), min(end, lim)); empty ranges get length 0 (step 2).
    # (int32 ranges promote to int64 against lim; no overflow: every value stays within int32.)
    start = ranges[..., 0].clamp_min(0)  # [B, S, G, n]
    end = torch.minimum(ranges[..., 1], lim[:, :, None, None])
    length = (end - start).clamp_min(0)
    cum = length.cumsum(-1)  # [B, S, G, n] inclusive prefix sums
    total = cum[..., -1]  # [B, S, G]: selection size per row

    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        L = n * S_kv  # no host read under capture: a static bound
    else:
        L = int(total.max())  # the one host read of this function
    if L == 0:
        return torch.zeros((B, S, G, h, Dv), dtype=V.dtype, device=dev)

    # Position p of a row's packed selection lies in range r = #{cum <= p}; its token is
    # start[r] + (p - exclusive_cum[r]).
    R = B * S * G
    p = torch.arange(L, device=dev, dtype=torch.int64)
    cum2 = cum.reshape(R, n)
    which = torch.searchsorted(cum2, p.expand(R, L).contiguous(), right=True)
    valid = p < total.reshape(R, 1)  # [R, L]
    base = (start - (cum - length)).reshape(R, n)
    tok = torch.gather(base, 1, which.clamp_max(n - 1)) + p
    tok = torch.where(valid, tok, 0).view(B, S, G, L)  # in bounds: invalid slots read token 0

    b_idx = torch.arange(B, device=dev).view(B, 1, 1, 1)
    g_idx = torch.arange(G, device=dev).view(1, 1, G, 1)
    # Invalid slots hold token 0, which may be NaN/Inf: their scores are replaced by -inf below
    # and their V rows by zeros with torch.where (a multiply by 0 would keep NaN; SPEC step 6).
    k_sel = K[b_idx, g_idx, tok].to(cdt)  # [B, S, G, L, Dk]
    v_sel = torch.where(valid.view(B, S, G, L, 1), V[b_idx, g_idx, tok], 0).to(cdt)

    q = Q.to(cdt) * scale
    scores = torch.matmul(q, k_sel.transpose(-1, -2))  # [B, S, G, h, L]
    mask = valid.view(B, S, G, 1, L)
    scores = torch.where(mask, scores, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # An empty row is all -inf, so softmax gives NaN there: the where turns it into exact zeros.
    probs = torch.where(mask, probs, 0.0)
    out = torch.matmul(probs, v_sel)  # [B, S, G, h, Dv]
    return out.to(V.dtype)


def grouped_selection_attention(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    ranges: torch.Tensor,
    *,
    kv_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Plain gather oracle of selection attention (slow; for tests).

    Same contract as :func:`grouped_selection_attention_packed`. Loops over the (b, s, g) rows,
    concatenates the clamped ranges into a token list, gathers K/V and computes a stable softmax
    in fp64 for fp64 inputs, else fp32. An empty selection gives exact zeros.
    """
    B, S, G, h, Dk, Dv, S_kv, n = validate(Q, K, V, ranges, kv_lens, allow_float64=True)
    scale = resolve_scale(scale, Dk)
    cdt = _compute_dtype(Q.dtype)
    out = torch.zeros((B, S, G, h, Dv), dtype=cdt, device=Q.device)
    lens = [S_kv] * B if kv_lens is None else [min(max(x, 0), S_kv) for x in kv_lens.tolist()]
    rng = ranges.tolist()
    for b in range(B):
        for s in range(S):
            t = lens[b] - S + s
            lim = min(t + 1, lens[b])
            for g in range(G):
                idx = []
                for start, end in rng[b][s][g]:
                    idx.extend(range(max(start, 0), min(end, lim)))
                if not idx:
                    continue
                sel = torch.tensor(idx, dtype=torch.long, device=Q.device)
                k = K[b, g].index_select(0, sel).to(cdt)  # [L, Dk]
                v = V[b, g].index_select(0, sel).to(cdt)  # [L, Dv]
                logits = (Q[b, s, g].to(cdt) @ k.T) * scale  # [h, L]
                m = logits.max(dim=-1, keepdim=True).values
                w = torch.exp(logits - m)
                out[b, s, g] = (w @ v) / w.sum(dim=-1, keepdim=True)
    return out.to(V.dtype)

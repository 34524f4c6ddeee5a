"""Peers of the selection-attention decode kernel, measured side by side by bench_sel_cuda.py.

Every peer computes the same thing as ``selection_attention`` on the benchmark's inputs (n ranges of
``blk`` tokens per (b, g) row, all valid, S = 1, kv_len = S_kv) and is built by a ``make_*``
function that returns either a :class:`Peer` (``call(r)`` runs the peer on input set ``r``) or a
string saying why the peer cannot run this shape ("n/a (Dk != Dv)"). Builders do the per-shape
preparation that a serving engine would also do once (layout copies, block masks, compilation);
the timed call does the per-step work only.

Input sets (``Inputs``): ``Q[r]`` and ``ranges[r]`` for r < R and K/V copies ``K[c]``, ``V[c]``
for c < C; set r reads copy ``r % C``. Rotating over the sets keeps the L2 cache cold.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

PEER_NAMES = ("packed", "gather_sdpa", "flex", "dense", "fla")


@dataclass
class Inputs:
    """Rotated benchmark inputs of one shape (see the module docstring)."""

    Q: list  # R x [B, 1, G, h, Dk]
    ranges: list  # R x [B, 1, G, n, 2] int32, each range exactly blk tokens, inside [0, S_kv)
    K: list  # C x [B, G, S_kv, Dk]
    V: list  # C x [B, G, S_kv, Dv]
    blk: int  # tokens per range (64 for the model shapes; L for the seed grid)
    scale: float
    layout: str = "copies"  # "copies": C separate K/V; "windows": C windows of one larger cache

    @property
    def R(self) -> int:
        return len(self.Q)

    @property
    def C(self) -> int:
        return len(self.K)

    def kv(self, r: int):
        return self.K[r % self.C], self.V[r % self.C]


@dataclass
class Peer:
    name: str
    call: Callable[[int], torch.Tensor]  # call(r) -> out [B, 1, G, h, Dv]
    note: str = ""  # shown next to the figures (e.g. "fla layout copies 1/2")
    exact: bool = True  # computes selection attention (False: dense over all S_kv, other work)
    cleanup: list = field(default_factory=list)  # objects to drop after timing


MakeResult = Union[Peer, str]


def _first_line(exc: BaseException, width: int = 90) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= width else line[: width - 3] + "..."


def row_view(K: torch.Tensor):
    """(rows [N, D] over K's storage, row_base [B, G, 1]) with K[b, g, t] == rows[row_base + t].

    Works on any K whose token and feature axes are dense (stride(2) == D, stride(3) == 1) and
    whose batch/group strides are multiples of D: contiguous K, and windows of a larger cache.
    None where K has another layout.
    """
    B, G, S_kv, D = K.shape
    sb, sg, st, sd = K.stride()
    if sd != 1 or st != D or sb % D or sg % D:
        return None
    n_rows = ((B - 1) * sb + (G - 1) * sg) // D + S_kv
    rows = K.as_strided((n_rows, D), (D, 1))  # keeps K's storage offset
    dev = K.device
    base = torch.arange(B, device=dev, dtype=torch.int64).view(B, 1, 1) * (sb // D) + torch.arange(
        G, device=dev, dtype=torch.int64
    ).view(1, G, 1) * (sg // D)
    return rows, base


def gather_rows(K: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """K [B, G, S_kv, D], idx [B, G, L] token indices -> [B, G, L, D] (one index_select)."""
    B, G, _, D = K.shape
    rv = row_view(K)
    if rv is None:
        b = torch.arange(B, device=K.device).view(B, 1, 1)
        g = torch.arange(G, device=K.device).view(1, G, 1)
        return K[b, g, idx]
    rows, base = rv
    return rows.index_select(0, (idx + base).reshape(-1)).view(B, G, -1, D)


def token_index(ranges: torch.Tensor, blk: int) -> torch.Tensor:
    """[B, 1, G, n, 2] ranges of exactly blk tokens -> [B, G, n * blk] int64 token indices."""
    starts = ranges[:, 0, :, :, 0].to(torch.int64)  # [B, G, n]
    offs = torch.arange(blk, device=ranges.device, dtype=torch.int64)
    B, G, n = starts.shape
    return (starts.unsqueeze(-1) + offs).reshape(B, G, n * blk)


# --------------------------------------------------------------------------------------------
# This project's packed PyTorch reference
# --------------------------------------------------------------------------------------------


def make_packed(inp: Inputs) -> MakeResult:
    import nsa

    fn = nsa.grouped_selection_attention_packed

    def call(r: int) -> torch.Tensor:
        K, V = inp.kv(r)
        return fn(inp.Q[r], K, V, inp.ranges[r], scale=inp.scale)

    return Peer("packed", call)


# --------------------------------------------------------------------------------------------
# Gather the selected K/V rows, then SDPA with the h heads as query rows (no mask)
# --------------------------------------------------------------------------------------------


def make_gather_sdpa(inp: Inputs) -> MakeResult:
    B, _, G, h, Dk = inp.Q[0].shape
    Dv = inp.V[0].shape[3]
    views = []
    for K, V in zip(inp.K, inp.V):
        rk, rv = row_view(K), row_view(V)
        if rk is None or rv is None:
            return "n/a (K/V layout not [.., S_kv, D] dense)"
        views.append((rk, rv))

    def call(r: int) -> torch.Tensor:
        (k_rows, k_base), (v_rows, v_base) = views[r % inp.C]
        tok = token_index(inp.ranges[r], inp.blk)  # [B, G, L]
        L = tok.shape[-1]
        Kg = k_rows.index_select(0, (tok + k_base).view(-1)).view(B, G, L, Dk)
        Vg = v_rows.index_select(0, (tok + v_base).view(-1)).view(B, G, L, Dv)
        o = F.scaled_dot_product_attention(inp.Q[r][:, 0], Kg, Vg, scale=inp.scale)  # [B,G,h,Dv]
        return o.unsqueeze(1)

    return Peer("gather_sdpa", call, cleanup=views)


# --------------------------------------------------------------------------------------------
# Dense SDPA over the whole context (all S_kv tokens; the h heads are the query rows of a group)
# --------------------------------------------------------------------------------------------


def make_dense(inp: Inputs) -> MakeResult:
    B, _, G, h, Dk = inp.Q[0].shape
    Dv = inp.V[0].shape[3]

    def call(r: int) -> torch.Tensor:
        K, V = inp.kv(r)
        if Dk == Dv:
            # One query token, G*h query heads over G KV heads: SDPA's flash-decoding path.
            q = inp.Q[r][:, 0].reshape(B, G * h, 1, Dk)
            o = F.scaled_dot_product_attention(q, K, V, scale=inp.scale, enable_gqa=True)
            return o.view(B, 1, G, h, Dv)
        # Dk != Dv has no flash path: the h heads become query rows of one KV head per group.
        return F.scaled_dot_product_attention(inp.Q[r][:, 0], K, V, scale=inp.scale).unsqueeze(1)

    S_kv = inp.V[0].shape[2]
    # Same result as the selection only where the selection is the whole context (seed grid).
    exact = all(bool(((r[..., 0] == 0) & (r[..., 1] == S_kv)).all()) for r in inp.ranges)
    return Peer("dense", call, exact=exact)


# --------------------------------------------------------------------------------------------
# FlexAttention (compiled), decode path: (b, g) folded into the batch, one KV head, h query heads
# (enable_gqa), a BlockMask with one head and 64-token KV blocks listing the selected blocks.
# --------------------------------------------------------------------------------------------

_FLEX_COMPILED = None


def _flex_compiled():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        # One compiled graph per shape (dynamic=False keeps batch and heads static, which the
        # decode path needs); allow enough recompiles for the whole grid.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        elif hasattr(cfg, "accumulated_cache_size_limit"):
            cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4096)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex_block_mask(ranges: torch.Tensor, S_kv: int, kv_block: int = 64):
    """BlockMask [B*G, 1 head, 1 query, S_kv] selecting the kv_block-token blocks in `ranges`."""
    from torch.nn.attention.flex_attention import BlockMask

    B, _, G, n, _ = ranges.shape
    nb = math.ceil(S_kv / kv_block)
    blocks = (ranges[:, 0, :, :, 0].to(torch.int64) // kv_block).reshape(B * G, n)
    blocks = blocks.sort(dim=-1).values.to(torch.int32)
    # Every token of a selected block is valid, so the blocks go in as *full* blocks (no
    # mask_mod is evaluated); the partial-block list is empty.
    full_indices = torch.zeros(B * G, 1, 1, nb, dtype=torch.int32, device=ranges.device)
    full_indices[:, 0, 0, :n] = blocks
    full_num = torch.full((B * G, 1, 1), n, dtype=torch.int32, device=ranges.device)
    partial_num = torch.zeros_like(full_num)
    partial_indices = torch.zeros_like(full_indices)
    kwargs = dict(BLOCK_SIZE=(128, kv_block), seq_lengths=(1, S_kv))
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: the q-block transpose is not needed
    return BlockMask.from_kv_blocks(partial_num, partial_indices, full_num, full_indices, **kwargs)


def make_flex(inp: Inputs) -> MakeResult:
    B, _, G, h, Dk = inp.Q[0].shape
    S_kv, Dv = inp.V[0].shape[2], inp.V[0].shape[3]
    if h & (h - 1):
        return "n/a (h not 2^k: no decode path)"
    if inp.blk % 64:
        return "n/a (ranges not 64-token blocks)"
    for r in range(inp.R):
        if bool((inp.ranges[r][..., 0] % 64 != 0).any()):
            return "n/a (ranges not 64-aligned)"
    for K, V in zip(inp.K, inp.V):
        for t in (K, V):  # (b, g) must fold into one batch axis without a copy
            if t.stride(0) != G * t.stride(1) or t.stride(-1) != 1:
                return "n/a (K/V layout: (b, g) do not fold)"
    try:
        masks = [flex_block_mask(inp.ranges[r], S_kv) for r in range(inp.R)]
        # Compiled only: the eager (unfused) flex path does not honour full-block-only masks,
        # and a dynamo fallback to it shows up as a large mae on the line.
        fn = _flex_compiled()
    except Exception as exc:  # noqa: BLE001 - report any setup failure as the peer's reason
        return f"failed ({_first_line(exc)})"

    def call(r: int) -> torch.Tensor:
        K, V = inp.kv(r)
        q = inp.Q[r].view(B * G, h, 1, Dk)
        k = K.view(B * G, 1, S_kv, Dk)
        v = V.view(B * G, 1, S_kv, Dv)
        o = fn(q, k, v, block_mask=masks[r], scale=inp.scale, enable_gqa=True)
        return o.view(B, 1, G, h, Dv)

    return Peer("flex", call, cleanup=masks)


# --------------------------------------------------------------------------------------------
# fla (flash-linear-attention, fla-core 0.6.0): fla.ops.nsa.parallel.parallel_nsa_fwd
#   parallel_nsa_fwd(q [B, TQ, HQ, K], k [B, TK, H, K], v [B, TK, H, V],
#                    block_indices [B, TQ, H, S] (block ids: block i covers [i*BS, i*BS + BS)),
#                    block_counts int | [B, TQ, H], block_size BS, scale,
#                    cu_seqlens_q=None, cu_seqlens_k=None, token_indices_q=None) -> (o, lse)
#   query head hq belongs to KV head hq // (HQ / H) (so [G, h] flattens to HQ = G*h); the TQ
#   queries are the last TQ tokens of TK (no kv_lens); HQ / H must be a power of two >= 16 (a
#   tl.dot tile), K, V <= 256; `@contiguous` copies non-contiguous inputs, so K/V get their own
#   [B, S_kv, G, D] layout copies, made once per shape.
# --------------------------------------------------------------------------------------------

_FLA = None  # (function, None) or (None, reason)


def load_fla():
    """Import fla's parallel_nsa_fwd without its model zoo; returns (fn, None) or (None, why)."""
    global _FLA
    if _FLA is not None:
        return _FLA
    errors = []
    try:
        from fla.ops.nsa.parallel import parallel_nsa_fwd

        _FLA = (parallel_nsa_fwd, None)
        return _FLA
    except Exception as exc:  # noqa: BLE001
        errors.append(_first_line(exc, 60))
    # Second try: bypass fla/__init__.py and fla/ops/__init__.py (they import every op and the
    # transformers-based layers), importing only the nsa module's own dependency chain.
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        del sys.modules[name]
    try:
        spec = importlib.util.find_spec("fla")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("fla not installed")
        root = list(spec.submodule_search_locations)
        for pkg, path in (("fla", root), ("fla.ops", [p + "/ops" for p in root])):
            mod = types.ModuleType(pkg)
            mod.__path__ = path
            sys.modules[pkg] = mod
        fn = importlib.import_module("fla.ops.nsa.parallel").parallel_nsa_fwd
        _FLA = (fn, None)
    except Exception as exc:  # noqa: BLE001
        errors.append(_first_line(exc, 60))
        _FLA = (None, "n/a (import failed: " + " | ".join(errors) + ")")
    return _FLA


def make_fla(inp: Inputs, mem_free_bytes: Optional[int] = None) -> MakeResult:
    B, _, G, h, Dk = inp.Q[0].shape
    Dv = inp.V[0].shape[3]
    if h < 16 or h & (h - 1):
        return "n/a (h<16 or not 2^k)"
    if Dk > 256 or Dv > 256:
        return "n/a (D>256)"
    if inp.blk % 64:
        return "n/a (ranges not 64-token blocks)"
    fn, why = load_fla()
    if fn is None:
        return why
    per_copy = sum(t.numel() * t.element_size() for t in (inp.K[0], inp.V[0]))
    n_copies = inp.C
    if mem_free_bytes is not None:
        n_copies = min(n_copies, int(0.9 * mem_free_bytes) // max(per_copy, 1))
    if n_copies < 1:
        return f"n/a (no memory for its [B,T,H,D] layout copy, {per_copy / 1e9:.1f} GB)"
    # fla's layout, made once per shape: [B, S_kv, G, D] contiguous.
    Kf = [inp.K[c].transpose(1, 2).contiguous() for c in range(n_copies)]
    Vf = [inp.V[c].transpose(1, 2).contiguous() for c in range(n_copies)]
    # Block ids [B, 1, G, n] from the ranges (int32; the kernel widens them to int64).
    bidx = [(inp.ranges[r][..., 0] // 64).to(torch.int32).contiguous() for r in range(inp.R)]
    n = bidx[0].shape[-1]

    def call(r: int) -> torch.Tensor:
        c = r % inp.C % n_copies
        q = inp.Q[r].view(B, 1, G * h, Dk)
        o, _ = fn(q, Kf[c], Vf[c], bidx[r], n, 64, inp.scale)
        return o.view(B, 1, G, h, Dv)

    note = "" if n_copies == inp.C else f"layout copies {n_copies}/{inp.C}"
    return Peer("fla", call, note=note, cleanup=[Kf, Vf, bidx])


def make_peer(name: str, inp: Inputs, mem_free_bytes: Optional[int] = None) -> MakeResult:
    try:
        if name == "packed":
            return make_packed(inp)
        if name == "gather_sdpa":
            return make_gather_sdpa(inp)
        if name == "dense":
            return make_dense(inp)
        if name == "flex":
            return make_flex(inp)
        if name == "fla":
            return make_fla(inp, mem_free_bytes)
    except torch.cuda.OutOfMemoryError:
        return "n/a (out of memory preparing it)"
    except Exception as exc:  # noqa: BLE001
        return f"failed ({_first_line(exc)})"
    raise ValueError(f"unknown peer {name!r}; expected one of {PEER_NAMES}")

"""The public wrapper: the seed's CPU parity smoke, torch.library registration, GPU checks."""

from __future__ import annotations

import pytest
import torch

from nsa import (
    grouped_selection_attention,
    grouped_selection_attention_packed,
    kernel_status,
    selection_attention,
    selection_attention_cuda,
)
from nsa.tests.conftest import make_case


def gold_of(Q, K, V, r, kl, scale=None):
    return grouped_selection_attention(
        Q.double(), K.double(), V.double(), r, kv_lens=kl, scale=scale
    )


@pytest.mark.parametrize("cuda_flag", [None, "1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,H,D,L", [(256, 4, 64, 128), (1024, 8, 128, 512)])
def test_cpu_parity_smoke(nsa_env, cuda_flag, dtype, N, H, D, L):
    """The seed's grid: one range of L tokens, decode; wrapper == packed, MAE <= 1e-3."""
    if cuda_flag:
        nsa_env.setenv("NSA_SEL_CUDA", cuda_flag)
    B, G = 2, 1
    Q, K, V, _, _ = make_case(B, 1, G, H, D, D, N, 1, dtype=dtype, seed=N + H)
    ranges = torch.tensor([[N - L - 5, N - 5], [0, L]]).view(B, 1, G, 1, 2).int()
    out = selection_attention_cuda(Q, K, V, ranges)
    assert out.shape == (B, 1, G, H, D) and out.dtype == dtype
    assert torch.equal(out, grouped_selection_attention_packed(Q, K, V, ranges))
    assert (out.double() - gold_of(Q, K, V, ranges, None)).abs().mean().item() <= 1e-3


def test_alias_and_op_registration():
    assert selection_attention is selection_attention_cuda
    assert hasattr(torch.ops.nsa, "selection_attention")


def test_opcheck(nsa_env):
    Q, K, V, r, kl = make_case(B=2, S=1, G=2, h=3, Dk=16, Dv=8, S_kv=30, n=3, kv_lens=True)
    op = torch.ops.nsa.selection_attention.default
    torch.library.opcheck(op, (Q, K, V, r, kl, 0.5))
    torch.library.opcheck(op, (Q.half(), K.half(), V.half(), r.int(), None, None))


def test_torch_compile_fullgraph_traces_the_op(nsa_env):
    Q, K, V, r, kl = make_case(B=2, S=1, G=2, h=3, Dk=16, Dv=8, S_kv=30, n=3, kv_lens=True)

    def f(q, k, v, rr, lens):
        return selection_attention(q, k, v, rr, kv_lens=lens, scale=0.5) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(Q, K, V, r, kl), f(Q, K, V, r, kl))


def test_compile_rejects_caller_bugs_at_trace_time(nsa_env):
    Q, K, V, r, _ = make_case()
    compiled = torch.compile(
        lambda *a: selection_attention(*a), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(Exception, match="K: expected shape"):
        compiled(Q, K[:1], V, r)


# --- GPU ------------------------------------------------------------------------------------
# Strict mode, the caller's NSA_SEL_LIB / NSA_SEL_CACHE_DIR / NSA_SEL_CUDA_BUILD: a test can never
# pass on the fallback by accident.

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def strict_cuda(monkeypatch):
    from nsa.kernels import cuda_sel_kernel

    monkeypatch.setenv("NSA_SEL_CUDA", "1")
    monkeypatch.setenv("NSA_SEL_CUDA_STRICT", "1")
    monkeypatch.setattr(cuda_sel_kernel, "_warned", False)
    return monkeypatch


def nsa_blocks(B, G, n, S_kv, seed=1, device="cuda"):
    """n disjoint 64-token blocks per (b, g) row at random offsets: ranges [B, 1, G, n, 2]."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.stack([torch.randperm(S_kv // 64, generator=gen)[:n] for _ in range(B * G)])
    start = (blocks * 64).view(B, 1, G, n).int()
    return torch.stack([start, start + 64], dim=-1).to(device)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G,h,Dk,Dv", [(4, 16, 192, 128), (4, 16, 128, 128), (2, 6, 64, 64)])
def test_gpu_kernel_matches_oracle(strict_cuda, dtype, G, h, Dk, Dv):
    B, S_kv, n = 3, 4096, 16
    Q, K, V, _, kl = make_case(
        B, 1, G, h, Dk, Dv, S_kv, n, dtype=dtype, seed=Dk, kv_lens=True, device="cuda"
    )
    r = nsa_blocks(B, G, n, S_kv)
    out = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    gold = gold_of(Q.cpu(), K.cpu(), V.cpu(), r.cpu(), kl.cpu())
    assert (out.double().cpu() - gold).abs().mean().item() <= 1e-3
    assert torch.equal(out, selection_attention_cuda(Q, K, V, r, kv_lens=kl))  # deterministic


@gpu
@needs_cuda
def test_gpu_cache_slice_and_poison(strict_cuda):
    B, G, h, D, S_kv, S_max = 2, 2, 8, 128, 1000, 3000
    cache_k = torch.full((B, G + 1, S_max, D), float("nan"), dtype=torch.float16, device="cuda")
    cache_v = torch.full_like(cache_k, float("nan"))
    Q, K, V, _, _ = make_case(B, 1, G, h, D, D, S_kv, 1, dtype=torch.float16, device="cuda")
    cache_k[:, 1:, :S_kv] = K
    cache_v[:, 1:, :S_kv] = V
    r = torch.tensor([[10, 300], [900, 1000]], device="cuda").view(B, 1, 1, 1, 2)
    r = r.expand(B, 1, G, 1, 2)
    out = selection_attention_cuda(Q, cache_k[:, 1:, :S_kv], cache_v[:, 1:, :S_kv], r)
    assert torch.isfinite(out).all()
    gold = gold_of(Q.cpu(), K.cpu(), V.cpu(), r.cpu(), None)
    assert (out.double().cpu() - gold).abs().mean().item() <= 1e-3


@gpu
@needs_cuda
def test_gpu_cuda_graph_capture_and_replay(strict_cuda):
    """kv_lens on the device: its value check is skipped under capture, never a sync."""
    B, G, h, D, S_kv, n = 4, 2, 16, 128, 2048, 4
    Q, K, V, _, kl = make_case(
        B, 1, G, h, D, D, S_kv, n, dtype=torch.bfloat16, kv_lens=True, device="cuda"
    )
    r = nsa_blocks(B, G, n, S_kv, seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    Q2, _, _, _, kl2 = make_case(
        B, 1, G, h, D, D, S_kv, n, dtype=torch.bfloat16, seed=5, kv_lens=True, device="cuda"
    )
    Q.copy_(Q2)
    r.copy_(nsa_blocks(B, G, n, S_kv, seed=2))
    kl.copy_(kl2)
    graph.replay()
    torch.cuda.synchronize()
    gold = gold_of(Q.cpu(), K.cpu(), V.cpu(), r.cpu(), kl.cpu())
    assert (out.double().cpu() - gold).abs().mean().item() <= 1e-3


@gpu
@needs_cuda
def test_gpu_compile_fullgraph(strict_cuda):
    Q, K, V, _, kl = make_case(
        2, 1, 2, 8, 64, 64, 512, 4, dtype=torch.float16, kv_lens=True, device="cuda"
    )
    r = nsa_blocks(2, 2, 4, 512)
    f = torch.compile(lambda *a: selection_attention(*a[:4], kv_lens=a[4]), fullgraph=True)
    torch.testing.assert_close(f(Q, K, V, r, kl), selection_attention(Q, K, V, r, kv_lens=kl))


@gpu
@needs_cuda
def test_gpu_kernel_status_available(strict_cuda):
    status = kernel_status(build=True)
    assert status["available"], status["reason"]

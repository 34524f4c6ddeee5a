"""Shared pytest setup for nsa/tests.

- Tests marked ``gpu`` are skipped (reported as skipped, never passed) when torch sees no CUDA
  device, so every module collects on a CPU-only machine.
- ``nsa_env``: a clean flag environment for one test (NSA_SEL_CUDA/_BUILD/_STRICT unset, a
  private NSA_SEL_CACHE_DIR, NSA_SEL_LIB kept as the caller set it), with the loader caches and the
  once-per-process warning reset before and after. Not autouse: the GPU suites set flags on
  purpose.
- ``make_case``: random inputs of given sizes (see its docstring).
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _reset_package_state():
    from nsa.kernels import _fast, _lib, cuda_sel_kernel

    _lib.clear_cache()
    _fast.clear_cache()
    cuda_sel_kernel._warned = False


@pytest.fixture
def nsa_env(monkeypatch, tmp_path):
    for name in ("NSA_SEL_CUDA", "NSA_SEL_CUDA_BUILD", "NSA_SEL_CUDA_STRICT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NSA_SEL_CACHE_DIR", str(tmp_path / "nsa_cache"))
    _reset_package_state()
    yield monkeypatch
    _reset_package_state()


def random_ranges(B, S, G, n, S_kv, *, generator, dtype=torch.int64, junk=True):
    """Random [B, S, G, n, 2] ranges; with ``junk`` some are negative, reversed or past S_kv."""
    lo = -3 if junk else 0
    hi = S_kv + 3 if junk else S_kv
    a = torch.randint(lo, hi + 1, (B, S, G, n), generator=generator)
    length = torch.randint(0, max(2, S_kv // 3 + 1), (B, S, G, n), generator=generator)
    b = a + length
    if junk:
        swap = torch.rand((B, S, G, n), generator=generator) < 0.15
        a, b = torch.where(swap, b, a), torch.where(swap, a, b)
    else:
        b = b.clamp_max(S_kv)
    return torch.stack([a, b], dim=-1).to(dtype)


def make_case(
    B=2,
    S=1,
    G=2,
    h=4,
    Dk=32,
    Dv=32,
    S_kv=65,
    n=4,
    *,
    dtype=torch.float32,
    seed=0,
    index_dtype=torch.int64,
    junk=True,
    kv_lens=False,
    device="cpu",
):
    """Random (Q, K, V, ranges, kv_lens) of the given sizes (kv_lens None unless asked)."""
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn((B, S, G, h, Dk), generator=gen).to(dtype)
    K = torch.randn((B, G, S_kv, Dk), generator=gen).to(dtype)
    V = torch.randn((B, G, S_kv, Dv), generator=gen).to(dtype)
    ranges = random_ranges(B, S, G, n, S_kv, generator=gen, dtype=index_dtype, junk=junk)
    lens = None
    if kv_lens:
        lens = torch.randint(0, S_kv + 1, (B,), generator=gen).to(index_dtype)
        lens[0] = S_kv
    out = [Q, K, V, ranges, lens]
    return tuple(None if t is None else t.to(device) for t in out)


@pytest.fixture
def case():
    return make_case

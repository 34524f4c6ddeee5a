"""Flags read at call time and the routing of every outcome of the CUDA path (mocked library)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from nsa import flags, grouped_selection_attention_packed, kernel_status, selection_attention_cuda
from nsa.kernels import _lib, cuda_sel_kernel
from nsa.tests.conftest import make_case

pytestmark = pytest.mark.usefixtures("nsa_env")
Status = _lib.Status


class FakeLibrary:
    """Stands in for a loaded libnsa_sel.so: returns a fixed status and records the params."""

    built_with_cuda = True
    path = "/fake/libnsa_sel.so"

    def __init__(self, status=0, message=""):
        self.status, self.message, self.calls = status, message, []

    def launch(self, params, device_index, stream_handle):
        self.calls.append((_lib._PACKER.unpack(params), device_index, stream_handle))
        return self.status, ("" if self.status == 0 else self.message)


FIELDS = [name for name, _ in _lib.NsaSelParams._fields_]


def fields_of(call):
    return dict(zip(FIELDS, call[0]))


@pytest.fixture
def kernel_path(nsa_env):
    """Routes CPU tensors down the CUDA path (NSA_SEL_CUDA=1) into a FakeLibrary."""
    nsa_env.setenv("NSA_SEL_CUDA", "1")
    nsa_env.setattr(cuda_sel_kernel, "_on_kernel_device", lambda t: True)
    nsa_env.setattr(cuda_sel_kernel, "_current_stream", lambda device: 1234)

    def install(lib):
        nsa_env.setattr(_lib, "get_library", lambda *a, **k: lib)
        return lib

    return install


def half_case(**kw):
    args = dict(B=2, S=1, G=2, h=4, Dk=64, Dv=64, S_kv=100, n=3, dtype=torch.float16, kv_lens=True)
    args.update(kw)
    return make_case(**args)


def packed(Q, K, V, r, kl):
    return grouped_selection_attention_packed(Q, K, V, r, kv_lens=kl)


def test_flags_are_read_at_call_time(nsa_env):
    assert not flags.cuda_enabled() and not flags.strict() and not flags.build_enabled()
    nsa_env.setenv("NSA_SEL_CUDA", "1")
    nsa_env.setenv("NSA_SEL_CUDA_STRICT", "1")
    nsa_env.setenv("NSA_SEL_CUDA_BUILD", "1")
    nsa_env.setenv("NSA_SEL_LIB", "/x/libnsa_sel.so")
    nsa_env.setenv("NSA_SEL_CACHE_DIR", "/tmp/somewhere")
    assert flags.cuda_enabled() and flags.strict() and flags.build_enabled()
    assert flags.lib_path() == "/x/libnsa_sel.so"
    assert str(flags.cache_dir()) == "/tmp/somewhere"
    nsa_env.setenv("NSA_SEL_CUDA", "0")
    assert not flags.cuda_enabled()
    nsa_env.delenv("NSA_SEL_CACHE_DIR")
    assert flags.cache_dir().parts[-2:] == (".cache", "nsa_sel")


def test_flag_unset_uses_reference(nsa_env, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the CUDA path must not be entered")

    monkeypatch.setattr(cuda_sel_kernel, "_run_kernel", boom)
    Q, K, V, r, kl = half_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    assert torch.equal(out, packed(Q, K, V, r, kl))


def test_flag_set_on_cpu_tensors_is_silent_reference(nsa_env, monkeypatch, caplog):
    nsa_env.setenv("NSA_SEL_CUDA", "1")
    nsa_env.setenv("NSA_SEL_CUDA_STRICT", "1")  # not a failure: strict must not raise either

    def boom(*a, **k):
        raise AssertionError("the library must not be loaded for CPU tensors")

    monkeypatch.setattr(_lib, "get_library", boom)
    Q, K, V, r, kl = half_case()
    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="nsa"):
        warnings.simplefilter("error")
        out = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    assert torch.equal(out, packed(Q, K, V, r, kl))
    assert "not a kernel configuration" in caplog.text


@pytest.mark.parametrize("kw", [dict(dtype=torch.float32), dict(S=2), dict(n=0), dict(S_kv=0)])
def test_uncovered_configs_are_silent_reference(kernel_path, kw):
    lib = kernel_path(FakeLibrary(Status.OK))
    Q, K, V, r, kl = half_case(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    assert lib.calls == []
    assert torch.equal(out, packed(Q, K, V, r, kl))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ok_returns_kernel_output_with_real_strides(kernel_path, dtype, index_dtype):
    lib = kernel_path(FakeLibrary(Status.OK))
    B, G, h, Dk, Dv, n = 2, 3, 4, 64, 32, 5
    Q, K, V, r, kl = make_case(
        B, 1, G, h, Dk, Dv, 100, n, dtype=dtype, kv_lens=True, index_dtype=index_dtype
    )
    cache_k = torch.zeros(B, 4, 300, Dk, dtype=dtype)  # K is a slice of a bigger cache
    K_view = cache_k[:, 1:4, :100]
    V_perm = V.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # token-major storage
    out = selection_attention_cuda(Q, K_view, V_perm, r, kv_lens=kl, scale=0.25)
    (call,) = lib.calls
    f = fields_of(call)
    assert call[1:] == (0, 1234)
    assert out.shape == (B, 1, G, h, Dv) and out.dtype == dtype and out.is_contiguous()
    assert f["out"] == out.data_ptr()
    # No copies: the kernel gets the caller's pointers and strides.
    assert f["q"] == Q.data_ptr() and f["k"] == K_view.data_ptr() and f["v"] == V_perm.data_ptr()
    assert f["ranges"] == r.data_ptr() and f["kv_lens"] == kl.data_ptr()
    assert (f["b"], f["s"], f["g"], f["h"], f["d_k"], f["d_v"], f["s_kv"], f["n"]) == (
        B,
        1,
        G,
        h,
        Dk,
        Dv,
        100,
        n,
    )
    assert tuple(f[k] for k in FIELDS if k.startswith("k_stride")) == K_view.stride()
    assert tuple(f[k] for k in FIELDS if k.startswith("v_stride")) == V_perm.stride()
    assert tuple(f[k] for k in FIELDS if k.startswith("q_stride")) == Q.stride()
    assert tuple(f[k] for k in FIELDS if k.startswith("o_stride")) == out.stride()
    assert tuple(f[k] for k in FIELDS if k.startswith("r_stride")) == r.stride()
    assert f["kv_lens_stride_b"] == 1
    assert f["scale"] == 0.25
    assert f["dtype"] == (0 if dtype == torch.float16 else 1)
    assert f["index_type"] == f["kv_lens_type"] == (0 if index_dtype == torch.int32 else 1)


def test_ok_without_kv_lens_and_default_scale(kernel_path):
    lib = kernel_path(FakeLibrary(Status.OK))
    Q, K, V, r, _ = half_case()
    selection_attention_cuda(Q, K, V, r)
    f = fields_of(lib.calls[0])
    assert f["kv_lens"] == 0 and f["kv_lens_stride_b"] == 0
    assert f["scale"] == pytest.approx(1 / 8)


def test_non_contiguous_last_dim_is_copied(kernel_path):
    lib = kernel_path(FakeLibrary(Status.OK))
    Q, K, V, r, kl = half_case()
    K_t = K.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    selection_attention_cuda(Q, K_t, V, r, kv_lens=kl)
    f = fields_of(lib.calls[0])
    assert f["k"] != K_t.data_ptr() and f["k_stride_d"] == 1
    assert f["q"] == Q.data_ptr()


def test_unsupported_is_silent_reference(kernel_path, caplog):
    kernel_path(FakeLibrary(Status.UNSUPPORTED, "head dim 40 not instantiated"))
    Q, K, V, r, kl = half_case()
    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="nsa"):
        warnings.simplefilter("error")
        out = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    assert torch.equal(out, packed(Q, K, V, r, kl))
    assert "head dim 40 not instantiated" in caplog.text


def test_invalid_argument_raises_value_error(kernel_path):
    kernel_path(FakeLibrary(Status.INVALID_ARGUMENT, "k: stride_d must be 1"))
    Q, K, V, r, kl = half_case()
    with pytest.raises(ValueError, match="k: stride_d must be 1"):
        selection_attention_cuda(Q, K, V, r, kv_lens=kl)


@pytest.mark.parametrize("strict", ["0", "1"])
def test_sticky_error_always_raises(kernel_path, nsa_env, strict):
    nsa_env.setenv("NSA_SEL_CUDA_STRICT", strict)
    kernel_path(FakeLibrary(Status.CUDA_STICKY, "an illegal memory access was encountered"))
    Q, K, V, r, kl = half_case()
    with pytest.raises(RuntimeError, match="poisoned.*illegal memory access"):
        selection_attention_cuda(Q, K, V, r, kv_lens=kl)


@pytest.mark.parametrize("status", [Status.NO_DEVICE, Status.CUDA, Status.NOT_BUILT, 99])
def test_failure_warns_once_and_falls_back(kernel_path, status):
    lib = kernel_path(FakeLibrary(status, "details from the library"))
    Q, K, V, r, kl = half_case()
    with pytest.warns(RuntimeWarning, match="details from the library") as record:
        out = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    assert len(record) == 1
    assert torch.equal(out, packed(Q, K, V, r, kl))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure is silent
        out2 = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    assert torch.equal(out2, out)
    assert len(lib.calls) == 2


@pytest.mark.parametrize("status", [Status.NO_DEVICE, Status.CUDA, Status.NOT_BUILT])
def test_failure_in_strict_mode_raises(kernel_path, nsa_env, status):
    nsa_env.setenv("NSA_SEL_CUDA_STRICT", "1")
    kernel_path(FakeLibrary(status, "details from the library"))
    Q, K, V, r, kl = half_case()
    with pytest.raises(RuntimeError, match="NSA_SEL_CUDA_STRICT=1.*details from the library"):
        selection_attention_cuda(Q, K, V, r, kv_lens=kl)


def test_library_unavailable_warns_once_or_raises_in_strict(kernel_path, nsa_env):
    calls = []

    def unavailable(*a, **k):
        calls.append(a)
        raise _lib.LibraryUnavailable("no libnsa_sel.so here")

    nsa_env.setattr(_lib, "get_library", unavailable)
    Q, K, V, r, kl = half_case()
    with pytest.warns(RuntimeWarning, match="no libnsa_sel.so here"):
        out = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    assert torch.equal(out, packed(Q, K, V, r, kl))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    nsa_env.setenv("NSA_SEL_CUDA_STRICT", "1")
    with pytest.raises(RuntimeError, match="library unavailable: no libnsa_sel.so here"):
        selection_attention_cuda(Q, K, V, r, kv_lens=kl)


def test_real_loader_without_gpu_falls_back(kernel_path, nsa_env, monkeypatch):
    """No NSA_SEL_LIB, no cached build, no build flag: one warning naming the remedy."""
    nsa_env.delenv("NSA_SEL_LIB", raising=False)
    monkeypatch.setattr(_lib, "device_arch", lambda index: "sm_90")
    Q, K, V, r, kl = half_case()
    with pytest.warns(RuntimeWarning, match="NSA_SEL_CUDA_BUILD=1"):
        selection_attention_cuda(Q, K, V, r, kv_lens=kl)


def test_kernel_status_reports_a_reason(nsa_env):
    status = kernel_status()
    assert set(status) == {
        "enabled",
        "strict",
        "available",
        "reason",
        "library",
        "built_with_cuda",
        "fast_path",
        "fast_path_reason",
    }
    if not torch.cuda.is_available():
        assert status["available"] is False and status["reason"]


def test_kernel_status_never_builds(nsa_env, monkeypatch):
    nsa_env.setenv("NSA_SEL_CUDA_BUILD", "1")
    nsa_env.delenv("NSA_SEL_LIB", raising=False)
    monkeypatch.setattr(_lib, "device_arch", lambda index: "sm_90")

    def no_build(*a, **k):
        raise AssertionError("kernel_status must not build")

    monkeypatch.setattr(_lib, "build_library", no_build)
    status = kernel_status()
    assert status["available"] is False and "not built" in status["reason"]


def test_fast_env_getter_tracks_os_environ_and_has_a_fallback(nsa_env, monkeypatch):
    nsa_env.setenv("NSA_SEL_CUDA_BUILD", "1")
    assert flags.build_enabled()
    import os

    del os.environ["NSA_SEL_CUDA_BUILD"]
    assert not flags.build_enabled()
    monkeypatch.setattr(flags, "_environ", {"NSA_SEL_CUDA": "1"})  # no CPython _data layout
    get = flags._make_getter()
    assert get("NSA_SEL_CUDA") == "1" and get("NSA_SEL_LIB") is None

"""The eager fast path (nsa/kernels/_fast.py, csrc/torch/nsa_sel_torch.cpp).

On the CPU (CI): the extension builds and loads; for every call it takes, it packs exactly the
NsaSelParams bytes the Python path packs; it takes no call the Python path would reject, send to
the reference or copy first (it returns None for them, and the Python path decides). On a GPU:
it is what eager calls use, its results are bitwise those of the Python path, caller bugs on CUDA
tensors still raise the Python path's errors, and a failed launch goes down the Python route.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from nsa import flags
from nsa._validate import resolve_scale, validate
from nsa.kernels import _fast, _lib
from nsa.kernels import cuda_sel_kernel as csk
from nsa.tests.conftest import make_case

HAS_CUDA = torch.cuda.is_available()


def gpu(test):
    """Marked gpu (skipped, and reported so, where torch sees no CUDA device)."""
    skip = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


@pytest.fixture(scope="module")
def ext():
    """The extension, from the default cache (`make test` builds it there) or built here."""
    return _fast.load_module(build_missing=True)


def half(**kw):
    args = dict(B=2, S=1, G=3, h=4, Dk=64, Dv=64, S_kv=50, n=3, dtype=torch.float16, junk=False)
    args.update(kw)
    Q, K, V, r, kl = make_case(**args)
    return dict(Q=Q, K=K, V=V, ranges=r, kv_lens=kl)


def python_params(Q, K, V, ranges, kv_lens, scale, out) -> bytes:
    sizes = validate(Q, K, V, ranges, kv_lens)
    return csk._pack(Q, K, V, ranges, kv_lens, resolve_scale(scale, sizes.Dk), sizes, out)


def both(ext, a, scale=None):
    sizes = validate(a["Q"], a["K"], a["V"], a["ranges"], a["kv_lens"])
    out = torch.empty(sizes[:4] + (sizes.Dv,), dtype=a["V"].dtype)
    fast = ext.pack_params(a["Q"], a["K"], a["V"], a["ranges"], a["kv_lens"], scale, out)
    return fast, python_params(a["Q"], a["K"], a["V"], a["ranges"], a["kv_lens"], scale, out)


def strided(a):
    """K/V as a slice of a longer, token-major cache; Q and ranges as permuted views."""
    B, G, S_kv, Dk = a["K"].shape
    big = torch.randn(B, S_kv + 7, G, Dk + a["V"].shape[3]).half()
    a["K"] = big[:, 3 : 3 + S_kv, :, :Dk].permute(0, 2, 1, 3)
    a["V"] = big[:, 3 : 3 + S_kv, :, Dk:].permute(0, 2, 1, 3)
    a["Q"] = a["Q"].transpose(1, 2).contiguous().transpose(1, 2)  # S = 1: only strides change
    a["ranges"] = a["ranges"].transpose(-1, -2).contiguous().transpose(-1, -2)
    return a


PARITY = {
    "f16": lambda: half(),
    "bf16_i32_kvlens32": lambda: half(dtype=torch.bfloat16, index_dtype=torch.int32, kv_lens=True),
    "kvlens64_strided": lambda: {**half(kv_lens=True), "kv_lens": torch.tensor([50, 3, 9, 4])[::2]},
    "views": lambda: strided(half(kv_lens=True)),
    "nsa27b_dims": lambda: half(G=1, h=16, Dk=192, Dv=128, n=16),
}


@pytest.mark.parametrize("scale", [None, 0.3, 2, 1e-3])
@pytest.mark.parametrize("name", PARITY)
def test_packs_what_the_python_path_packs(ext, name, scale):
    fast, py = both(ext, PARITY[name](), scale)
    assert fast is not None, "the fast path refused a call the kernel takes as it is"
    assert fast == py


def test_default_scale_rounds_as_python_does(ext):
    for dk in range(1, 300):
        a = half(B=1, G=1, h=1, Dk=dk, Dv=8, S_kv=4, n=1)
        fast, py = both(ext, a)
        assert fast == py, f"Dk={dk}"


def _cat(t, dim):
    return torch.cat([t, t], dim)


def _column_major(t):
    """The same values and shape, the last dim of stride != 1 (the Python path copies it)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# (id, mutation of an eligible half-precision case): each must come back None (Python path).
REFUSED = [
    ("Q_not_tensor", lambda a: a.update(Q=a["Q"].tolist())),
    ("kv_lens_not_tensor", lambda a: a.update(kv_lens=[50, 5])),
    ("Q_rank", lambda a: a.update(Q=a["Q"][0])),
    ("K_rank", lambda a: a.update(K=a["K"][0])),
    ("V_rank", lambda a: a.update(V=a["V"][None])),
    ("ranges_rank", lambda a: a.update(ranges=a["ranges"][0])),
    ("kv_lens_rank", lambda a: a.update(kv_lens=torch.tensor([[50, 5]]))),
    ("K_batch", lambda a: a.update(K=a["K"][:1])),
    ("K_groups", lambda a: a.update(K=a["K"][:, :2])),
    ("K_head_dim", lambda a: a.update(K=a["K"][..., :32])),
    ("V_tokens", lambda a: a.update(V=a["V"][:, :, :7])),
    ("V_batch", lambda a: a.update(V=_cat(a["V"], 0))),
    ("ranges_last_dim", lambda a: a.update(ranges=torch.cat([a["ranges"], a["ranges"]], -1))),
    ("ranges_S", lambda a: a.update(ranges=_cat(a["ranges"], 1))),
    ("ranges_G", lambda a: a.update(ranges=a["ranges"][:, :, :1])),
    ("kv_lens_shape", lambda a: a.update(kv_lens=torch.tensor([1, 2, 3]))),
    ("fp32", lambda a: a.update(Q=a["Q"].float(), K=a["K"].float(), V=a["V"].float())),
    ("K_dtype", lambda a: a.update(K=a["K"].bfloat16())),
    ("V_dtype", lambda a: a.update(V=a["V"].float())),
    ("ranges_float", lambda a: a.update(ranges=a["ranges"].float())),
    ("ranges_int16", lambda a: a.update(ranges=a["ranges"].short())),
    ("kv_lens_float", lambda a: a.update(kv_lens=torch.tensor([50.0, 5.0]))),
    ("K_device", lambda a: a.update(K=a["K"].to("meta"))),
    ("V_device", lambda a: a.update(V=a["V"].to("meta"))),
    ("ranges_device", lambda a: a.update(ranges=a["ranges"].to("meta"))),
    ("kv_lens_device", lambda a: a.update(kv_lens=torch.tensor([50, 5], device="meta"))),
    ("S_2", lambda a: a.update(Q=_cat(a["Q"], 1), ranges=_cat(a["ranges"], 1))),
    ("B_0", lambda a: a.update({k: a[k][:0] for k in ("Q", "K", "V", "ranges")})),
    ("n_0", lambda a: a.update(ranges=a["ranges"][:, :, :, :0])),
    ("S_kv_0", lambda a: a.update(K=a["K"][:, :, :0], V=a["V"][:, :, :0])),
    ("Q_last_stride", lambda a: a.update(Q=_column_major(a["Q"]))),
    ("K_last_stride", lambda a: a.update(K=_column_major(a["K"]))),
    ("V_last_stride", lambda a: a.update(V=_column_major(a["V"]))),
]
BAD_SCALES = [True, "big", np.float32(0.5), torch.tensor(0.5), 10**400]


@pytest.mark.parametrize("mutate", [m for _, m in REFUSED], ids=[i for i, _ in REFUSED])
def test_refuses_what_the_python_path_rejects_or_reroutes(ext, mutate):
    a = half(kv_lens=True)
    a["kv_lens"] = torch.tensor([50, 5])
    out = torch.empty(2, 1, 3, 4, 64, dtype=torch.float16)
    args = (a["Q"], a["K"], a["V"], a["ranges"], a["kv_lens"], None, out)
    assert ext.pack_params(*args) is not None  # the control: the unmutated case is taken
    mutate(a)
    assert ext.pack_params(a["Q"], a["K"], a["V"], a["ranges"], a["kv_lens"], None, out) is None


@pytest.mark.parametrize("scale", BAD_SCALES, ids=lambda s: type(s).__name__)
def test_refuses_a_scale_resolve_scale_rejects(ext, scale):
    a = half()
    out = torch.empty(2, 1, 3, 4, 64, dtype=torch.float16)
    assert ext.pack_params(a["Q"], a["K"], a["V"], a["ranges"], None, 0.5, out) is not None
    assert ext.pack_params(a["Q"], a["K"], a["V"], a["ranges"], None, scale, out) is None


def test_launcher_binds_the_library_and_refuses_cpu_tensors(ext):
    with pytest.raises(RuntimeError, match="cannot load"):
        ext.Launcher("/nonexistent/libnsa_sel.so")
    path = flags.lib_path()
    if path is None:
        pytest.skip("NSA_SEL_LIB is not set (make test sets it to the built library)")
    launcher = ext.Launcher(path)
    assert launcher.path == path
    a = half()
    assert launcher(a["Q"], a["K"], a["V"], a["ranges"], None, None, 0, False) is None


def test_tag_follows_sources_and_torch(tmp_path, monkeypatch):
    root = tmp_path / "src"
    for rel in (_fast.SOURCE, _fast.HEADER):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_lib.source_root() / rel, root / rel)
    tag = _fast.ext_tag(root)
    assert tag == _fast.ext_tag(root)
    with open(root / _fast.SOURCE, "a") as f:
        f.write("\n// changed\n")
    assert _fast.ext_tag(root) != tag
    changed = _fast.ext_tag(root)
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert _fast.ext_tag(root) != changed


def test_missing_extension_names_the_remedy_and_is_cached(nsa_env, tmp_path, monkeypatch):
    looks = []
    find = _fast._find_or_build
    monkeypatch.setattr(_fast, "_find_or_build", lambda *a: looks.append(1) or find(*a))
    for _ in range(2):
        with pytest.raises(_lib.LibraryUnavailable, match="build_fast_path.*NSA_SEL_CUDA_BUILD=1"):
            _fast.load_module(build_missing=False, cache=tmp_path / "empty")
    assert looks == [1]  # the failure is the cached answer, not retried per call
    monkeypatch.setattr(_fast, "_find_or_build", lambda *a: 1 / 0)
    with pytest.raises(_lib.LibraryUnavailable, match="failed to load: ZeroDivisionError"):
        _fast.load_module(build_missing=False, cache=tmp_path / "other")
    monkeypatch.setattr(_fast, "_find_or_build", find)
    _fast.clear_cache()

    class Lib:
        path = "/fake/libnsa_sel.so"

    lib = Lib()
    nsa_env.setenv("NSA_SEL_CACHE_DIR", str(tmp_path / "empty"))
    assert _fast.launcher_for(lib) is None
    assert "not built" in lib.fast_reason
    assert _fast.launcher_for(lib) is None  # cached on the library: no second look-up


# --- GPU ------------------------------------------------------------------------------------


@pytest.fixture
def strict_cuda(monkeypatch):
    monkeypatch.setenv("NSA_SEL_CUDA", "1")
    monkeypatch.setenv("NSA_SEL_CUDA_STRICT", "1")
    yield monkeypatch
    if HAS_CUDA:
        torch.cuda.synchronize()


def cuda_case(**kw):
    return {k: (None if t is None else t.cuda()) for k, t in half(**kw).items()}


@gpu
def test_gpu_eager_calls_take_the_fast_path(strict_cuda):
    status = csk.kernel_status(build=True)
    assert status["fast_path"], status["fast_path_reason"]

    def no_python_path(*a, **k):
        raise AssertionError("the eager call took the Python path")

    a = cuda_case(kv_lens=True)
    args = (a["Q"], a["K"], a["V"], a["ranges"])
    strict_cuda.setattr(csk, "_route", no_python_path)
    out = csk.selection_attention_cuda(*args, kv_lens=a["kv_lens"])
    assert out.shape == (2, 1, 3, 4, 64) and out.dtype == torch.float16
    # The custom op (what a torch.compile graph calls at run time) takes it too.
    assert torch.equal(torch.ops.nsa.selection_attention(*args, a["kv_lens"], None), out)


GPU_CASES = {
    "f16": dict(),
    "bf16_kvlens": dict(dtype=torch.bfloat16, kv_lens=True, index_dtype=torch.int32),
    "nsa27b_dims": dict(B=3, G=2, h=16, Dk=192, Dv=128, S_kv=700, n=8, kv_lens=True),
    "d128": dict(B=4, G=2, h=8, Dk=128, Dv=128, S_kv=300, n=5),
}


@pytest.mark.parametrize("views", [False, True], ids=["contiguous", "views"])
@pytest.mark.parametrize("name", GPU_CASES)
@gpu
def test_gpu_fast_path_equals_python_path_bitwise(strict_cuda, name, views):
    a = half(**GPU_CASES[name])
    if views:
        a = strided(a) if a["Q"].dtype == torch.float16 else a
    a = {k: (None if t is None else t.cuda()) for k, t in a.items()}
    args = (a["Q"], a["K"], a["V"], a["ranges"])

    def no_reference(*x):
        raise AssertionError("the call ran the PyTorch reference, not the kernel")

    strict_cuda.setattr(csk, "_packed", no_reference)  # both paths must launch the kernel
    fast = csk.selection_attention_cuda(*args, kv_lens=a["kv_lens"], scale=0.2)
    strict_cuda.setattr(csk, "_fast_enabled", False)
    slow = csk.selection_attention_cuda(*args, kv_lens=a["kv_lens"], scale=0.2)
    assert torch.equal(fast, slow)


BUGS = [
    (
        "kv_lens_too_big",
        lambda a: a.update(kv_lens=torch.tensor([3, 51], device="cuda")),
        ValueError,
        "kv_lens: expected values in [0, S_kv=50], got min 3, max 51",
    ),
    (
        "kv_lens_on_cpu",
        lambda a: a.update(kv_lens=torch.tensor([3, 5])),
        ValueError,
        "kv_lens: expected device cuda:0",
    ),
    ("K_dtype", lambda a: a.update(K=a["K"].bfloat16()), TypeError, "K: expected dtype"),
    ("V_tokens", lambda a: a.update(V=a["V"][:, :, :7]), ValueError, "V: expected shape"),
    ("ranges_on_cpu", lambda a: a.update(ranges=a["ranges"].cpu()), ValueError, "ranges:"),
]


@pytest.mark.parametrize("mutate,exc,msg", [b[1:] for b in BUGS], ids=[b[0] for b in BUGS])
@gpu
def test_gpu_caller_bugs_still_raise_the_python_errors(strict_cuda, mutate, exc, msg):
    a = cuda_case(kv_lens=True)
    mutate(a)
    with pytest.raises(exc) as info:
        csk.selection_attention_cuda(a["Q"], a["K"], a["V"], a["ranges"], kv_lens=a["kv_lens"])
    assert msg in str(info.value)


@gpu
def test_gpu_failed_launch_goes_down_the_python_route(strict_cuda):
    """A non-OK launch status is not an answer: the Python path runs and reports it."""
    a = cuda_case()
    a["Q"] = a["Q"].repeat(1, 1, 1, 80, 1)  # h = 320 > the kernel's head limit: UNSUPPORTED
    calls = []
    route = csk._route
    strict_cuda.setattr(csk, "_route", lambda *x: calls.append(1) or route(*x))
    out = csk.selection_attention_cuda(a["Q"], a["K"], a["V"], a["ranges"])
    assert calls == [1]
    ref = csk._packed(
        a["Q"],
        a["K"],
        a["V"],
        a["ranges"],
        None,
        0.125,
        validate(a["Q"], a["K"], a["V"], a["ranges"]),
    )
    assert torch.equal(out, ref)


@gpu
def test_gpu_fast_path_captures_in_a_graph_with_kv_lens(strict_cuda):
    a = cuda_case(kv_lens=True)
    args = (a["Q"], a["K"], a["V"], a["ranges"])
    eager = csk.selection_attention_cuda(*args, kv_lens=a["kv_lens"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        csk.selection_attention_cuda(*args, kv_lens=a["kv_lens"])
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = csk.selection_attention_cuda(*args, kv_lens=a["kv_lens"])
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)

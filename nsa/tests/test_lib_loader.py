"""The ctypes binding and the cached loader of libnsa_sel.so.

Tests that need a real library read NSA_SEL_LIB (the Makefile points it at build/libnsa_sel.so)
and are skipped when it is unset. Nothing here compiles: the build step is mocked.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nsa import grouped_selection_attention, selection_attention_cuda
from nsa.kernels import _lib, cuda_sel_kernel
from nsa.tests.conftest import make_case

pytestmark = pytest.mark.usefixtures("nsa_env")
HEADER = _lib.source_root() / "csrc" / "include" / "nsa_sel" / "sel_attention.h"
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@pytest.fixture
def real_lib_path():
    path = os.environ.get("NSA_SEL_LIB")
    if not path:
        pytest.skip("NSA_SEL_LIB is unset (make test sets it to build/libnsa_sel.so)")
    return path


def params_for(Q, K, V, r, kl, out, scale, *, as_struct=False):
    B, S, G, h, Dk = Q.shape
    args = (
        Q.data_ptr(),
        K.data_ptr(),
        V.data_ptr(),
        r.data_ptr(),
        0 if kl is None else kl.data_ptr(),
        out.data_ptr(),
        B,
        S,
        G,
        h,
        Dk,
        V.shape[-1],
        K.shape[2],
        r.shape[3],
        *Q.stride(),
        *K.stride(),
        *V.stride(),
        *out.stride(),
        *r.stride(),
        0 if kl is None else kl.stride(0),
        scale,
        DTYPE_CODE[Q.dtype],
        int(r.dtype == torch.int64),
        0 if kl is None else int(kl.dtype == torch.int64),
    )
    return _lib.NsaSelParams(*args) if as_struct else _lib.pack_params(*args)


# --- layout ---------------------------------------------------------------------------------


def header_fields():
    text = HEADER.read_text()
    body = re.search(r"typedef struct NsaSelParams \{(.*?)\} NsaSelParams;", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    fields = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        m = re.match(r"((?:const\s+)?\w+\s*\**)\s*(.*)", decl, re.S)
        ctype = m.group(1).replace(" ", "")
        for name in m.group(2).split(","):
            name = name.strip()
            star = name.startswith("*")
            fields.append((ctype + ("*" if star else ""), name.lstrip("*")))
    return fields


def test_struct_mirrors_the_header():
    expect = {
        "constvoid*": ctypes.c_void_p,
        "void*": ctypes.c_void_p,
        "int64_t": ctypes.c_int64,
        "float": ctypes.c_float,
        "int32_t": ctypes.c_int32,
    }
    fields = header_fields()
    assert [name for _, name in fields] == [name for name, _ in _lib.NsaSelParams._fields_]
    for (ctype, name), (_, pytype) in zip(fields, _lib.NsaSelParams._fields_):
        assert expect[ctype] is pytype, name
    version = re.search(r"#define NSA_SEL_ABI_VERSION (\d+)", HEADER.read_text()).group(1)
    assert int(version) == _lib.ABI_VERSION


def test_packed_bytes_equal_the_structure():
    args = list(range(1, 43))
    args[38] = 0.125  # scale
    assert _lib.pack_params(*args) == bytes(_lib.NsaSelParams(*args))
    assert _lib._PACKER.size == ctypes.sizeof(_lib.NsaSelParams) == 320


# --- a real library -------------------------------------------------------------------------


def test_real_library_abi(real_lib_path):
    lib = _lib.get_library(0)
    assert lib._cdll.nsa_sel_params_size() == ctypes.sizeof(_lib.NsaSelParams)
    assert lib._cdll.nsa_sel_abi_version() == _lib.ABI_VERSION
    assert os.path.samefile(lib.path, real_lib_path)


def test_abi_mismatch_is_reported(real_lib_path, monkeypatch):
    monkeypatch.setattr(_lib, "ABI_VERSION", _lib.ABI_VERSION + 1)
    with pytest.raises(_lib.LibraryUnavailable, match="ABI mismatch"):
        _lib.Library(real_lib_path)


@pytest.mark.parametrize("as_struct", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpp_reference_agrees_with_python_oracle(real_lib_path, dtype, as_struct):
    """The C++ oracle through our params: a check of every field's offset, not just the size."""
    lib = _lib.get_library(0)
    Q, K, V, r, kl = make_case(
        B=3,
        S=2,
        G=2,
        h=5,
        Dk=24,
        Dv=40,
        S_kv=77,
        n=4,
        dtype=dtype,
        seed=3,
        kv_lens=True,
        index_dtype=torch.int32,
    )
    kl = kl.long()
    K = torch.cat([K, K], dim=2)[:, :, :77]  # a slice of a larger cache
    V = V.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    out = torch.full((3, 2, 2, 5, 40), float("nan"), dtype=dtype)
    params = params_for(Q, K, V, r, kl, out, 0.3, as_struct=as_struct)
    assert lib.validate(params) == (0, "")
    assert lib.reference_cpu(params) == (0, "")
    gold = grouped_selection_attention(Q.double(), K.double(), V.double(), r, kv_lens=kl, scale=0.3)
    err = (out.double() - gold).abs()
    assert err.max().item() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_cpp_validate_reports_a_message(real_lib_path):
    lib = _lib.get_library(0)
    Q, K, V, r, _ = make_case(dtype=torch.float16)
    out = torch.empty(2, 1, 2, 4, 32, dtype=torch.float16)
    params = _lib.NsaSelParams.from_buffer_copy(params_for(Q, K, V, r, None, out, 1.0))
    params.dtype = 7
    status, message = lib.validate(params)
    assert status == _lib.Status.INVALID_ARGUMENT and message


def test_real_library_without_gpu_reports_and_wrapper_falls_back(real_lib_path, nsa_env):
    lib = _lib.get_library(0)
    if lib.built_with_cuda and torch.cuda.is_available():
        pytest.skip("a real GPU is present: host pointers must not reach the kernel")
    # A configuration the kernel covers (d = 64), so the answer is about the device, not coverage.
    Q, K, V, r, kl = make_case(Dk=64, Dv=64, dtype=torch.float16, kv_lens=True)
    out = torch.empty(2, 1, 2, 4, 64, dtype=torch.float16)
    status, message = lib.launch(params_for(Q, K, V, r, kl, out, 0.2), 0, 0)
    assert status in (_lib.Status.NO_DEVICE, _lib.Status.NOT_BUILT) and message
    # The wrapper, pushed down the CUDA path with CPU tensors, turns that into a fallback.
    nsa_env.setenv("NSA_SEL_CUDA", "1")
    nsa_env.setattr(cuda_sel_kernel, "_on_kernel_device", lambda t: True)
    nsa_env.setattr(cuda_sel_kernel, "_current_stream", lambda device: 0)
    with pytest.warns(RuntimeWarning, match=re.escape(message[:40])):
        got = selection_attention_cuda(Q, K, V, r, kv_lens=kl)
    gold = grouped_selection_attention(Q.double(), K.double(), V.double(), r, kv_lens=kl)
    assert (got.double() - gold).abs().mean() <= 1e-3
    nsa_env.setenv("NSA_SEL_CUDA_STRICT", "1")
    with pytest.raises(RuntimeError, match="NSA_SEL_CUDA_STRICT=1"):
        selection_attention_cuda(Q, K, V, r, kv_lens=kl)


# --- locating and caching -------------------------------------------------------------------


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A source tree with csrc/ and CMakeLists.txt, and no nvcc (for a stable key)."""
    root = tmp_path / "root"
    (root / "csrc" / "src").mkdir(parents=True)
    (root / "csrc" / "src" / "a.cpp").write_bytes(b"int a() { return 1; }\n")
    (root / "csrc" / "b.h").write_bytes(b"#pragma once\n")
    (root / "CMakeLists.txt").write_text("project(x)\n")
    monkeypatch.setattr(_lib, "find_nvcc", lambda: None)
    return root


def test_cache_key_follows_every_input(fake_root):
    key = _lib.cache_key(fake_root, "sm_90", "nvcc 13.0")
    assert key == _lib.cache_key(fake_root, "sm_90", "nvcc 13.0")
    assert key.startswith("sm_90-")
    assert _lib.cache_key(fake_root, "sm_80", "nvcc 13.0") != key
    assert _lib.cache_key(fake_root, "sm_90", "nvcc 12.8") != key
    src = fake_root / "csrc" / "src" / "a.cpp"
    src.write_bytes(src.read_bytes().replace(b"1", b"2"))  # one byte
    key2 = _lib.cache_key(fake_root, "sm_90", "nvcc 13.0")
    assert key2 != key
    (fake_root / "csrc" / "src" / "new.cu").write_bytes(b"")
    key3 = _lib.cache_key(fake_root, "sm_90", "nvcc 13.0")
    assert key3 != key2
    (fake_root / "CMakeLists.txt").write_text("project(y)\n")
    assert _lib.cache_key(fake_root, "sm_90", "nvcc 13.0") != key3


def test_cache_key_of_the_real_tree_is_stable():
    root = _lib.source_root()
    assert _lib.cache_key(root, "sm_90", "v") == _lib.cache_key(root, "sm_90", "v")


def cache_dest(root, cache, arch="sm_90"):
    return cache / _lib.cache_key(root, arch, _lib.nvcc_version(None)) / _lib.LIB_NAME


def test_cache_miss_without_build_flag_names_the_remedy(fake_root, tmp_path):
    with pytest.raises(_lib.LibraryUnavailable, match="not built.*NSA_SEL_CUDA_BUILD=1"):
        _lib.load_cached("sm_90", build=False, root=fake_root, cache=tmp_path / "c")


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(_lib.LibraryUnavailable, match="sources.*not at.*NSA_SEL_LIB"):
        _lib.load_cached("sm_90", build=True, root=tmp_path / "nothing", cache=tmp_path / "c")


def test_corrupt_cached_library_is_reported_without_build(fake_root, tmp_path):
    cache = tmp_path / "c"
    dest = cache_dest(fake_root, cache)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\x7fELF half-written")
    with pytest.raises(_lib.LibraryUnavailable, match="unusable.*NSA_SEL_CUDA_BUILD=1"):
        _lib.load_cached("sm_90", build=False, root=fake_root, cache=cache)


def test_corrupt_cached_library_is_rebuilt(fake_root, tmp_path, monkeypatch, real_lib_path):
    cache = tmp_path / "c"
    dest = cache_dest(fake_root, cache)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\x7fELF half-written")
    builds = []

    def fake_build(root, arch, to, nvcc):
        builds.append(arch)
        shutil.copyfile(real_lib_path, to)

    monkeypatch.setattr(_lib, "build_library", fake_build)
    lib = _lib.load_cached("sm_90", build=True, root=fake_root, cache=cache)
    assert builds == ["sm_90"] and lib.path == str(dest)
    assert (cache / f"{dest.parent.name}.lock").exists()
    # Now cached: no second build.
    _lib.load_cached("sm_90", build=True, root=fake_root, cache=cache)
    assert builds == ["sm_90"]


def test_build_that_leaves_garbage_is_reported(fake_root, tmp_path, monkeypatch):
    def fake_build(root, arch, to, nvcc):
        to.parent.mkdir(parents=True, exist_ok=True)
        to.write_bytes(b"not a library")

    monkeypatch.setattr(_lib, "build_library", fake_build)
    with pytest.raises(_lib.LibraryUnavailable, match="freshly built library is unusable"):
        _lib.load_cached("sm_90", build=True, root=fake_root, cache=tmp_path / "c")


def test_library_finished_by_another_process_is_not_rebuilt(
    fake_root, tmp_path, monkeypatch, real_lib_path
):
    cache = tmp_path / "c"
    dest = cache_dest(fake_root, cache)
    real_lock = _lib.file_lock

    def lock_then_other_process_finishes(path, timeout_s):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_lib_path, dest)
        return real_lock(path, timeout_s)

    def no_build(*a):
        raise AssertionError("must re-check for the finished library after taking the lock")

    monkeypatch.setattr(_lib, "file_lock", lock_then_other_process_finishes)
    monkeypatch.setattr(_lib, "build_library", no_build)
    lib = _lib.load_cached("sm_90", build=True, root=fake_root, cache=cache)
    assert lib.path == str(dest)


def test_lock_times_out_instead_of_hanging(fake_root, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    dest = cache_dest(fake_root, cache)
    lock_path = cache / f"{dest.parent.name}.lock"
    cache.mkdir(parents=True)
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # "another process" is building
    monkeypatch.setattr(_lib, "build_library", lambda *a: pytest.fail("built without the lock"))
    try:
        t0 = time.monotonic()
        with pytest.raises(_lib.LibraryUnavailable, match="timed out.*build lock"):
            _lib.load_cached("sm_90", build=True, root=fake_root, cache=cache, lock_timeout_s=0.3)
        assert time.monotonic() - t0 < 5
    finally:
        os.close(holder)
    with _lib.file_lock(lock_path, 0.3):  # free again
        pass


def test_build_runs_cmake_and_moves_the_library_atomically(
    fake_root, tmp_path, monkeypatch, capsys
):
    dest = tmp_path / "c" / "key" / _lib.LIB_NAME
    commands = []

    def fake_run(cmd, **kw):
        commands.append(cmd)
        if "--build" in cmd:
            Path(cmd[cmd.index("--build") + 1], _lib.LIB_NAME).write_bytes(b"lib")
        return subprocess.CompletedProcess(cmd, 0, "ok", "")

    monkeypatch.setattr(_lib.subprocess, "run", fake_run)
    _lib.build_library(fake_root, "sm_90", dest, "/opt/cuda/bin/nvcc")
    assert dest.read_bytes() == b"lib"
    configure, build = commands
    assert "-DNSA_SEL_CUDA_ARCHS=90" in configure and "-DNSA_SEL_BUILD_TESTS=OFF" in configure
    assert "-DNSA_SEL_WITH_CUDA=ON" in configure
    assert "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc" in configure
    assert build[build.index("--target") + 1] == "nsa_sel"
    tmp_dir = Path(configure[configure.index("-B") + 1])
    assert tmp_dir.parent == dest.parent and not tmp_dir.exists()  # built in the cache, cleaned
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building the CUDA selection kernel for sm_90" in err


def test_build_failure_is_reported_with_the_log(fake_root, tmp_path, monkeypatch):
    dest = tmp_path / "c" / "key" / _lib.LIB_NAME

    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "nvcc fatal: unsupported gpu arch")

    monkeypatch.setattr(_lib.subprocess, "run", failing_run)
    with pytest.raises(_lib.LibraryUnavailable, match="(?s)configure step.*unsupported gpu arch"):
        _lib.build_library(fake_root, "sm_90", dest, "/opt/cuda/bin/nvcc")
    assert not dest.exists()
    assert "unsupported gpu arch" in (dest.parent / "build.log").read_text()


def test_build_without_tools_is_reported(fake_root, tmp_path, monkeypatch):
    dest = tmp_path / "c" / "key" / _lib.LIB_NAME
    with pytest.raises(_lib.LibraryUnavailable, match="nvcc not found"):
        _lib.build_library(fake_root, "sm_90", dest, None)
    monkeypatch.setattr(_lib.shutil, "which", lambda name: None)
    with pytest.raises(_lib.LibraryUnavailable, match="cmake not found"):
        _lib.build_library(fake_root, "sm_90", dest, "/opt/cuda/bin/nvcc")


def test_explicit_missing_library_and_cached_failure(nsa_env, tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "libnsa_sel.so"
    nsa_env.setenv("NSA_SEL_LIB", str(missing))
    with pytest.raises(_lib.LibraryUnavailable, match=f"NSA_SEL_LIB={missing}: no such file"):
        _lib.get_library(0)
    calls = []
    monkeypatch.setattr(_lib, "_resolve", lambda *a: calls.append(a))
    with pytest.raises(_lib.LibraryUnavailable, match="no such file"):
        _lib.get_library(0)  # the failure is cached: no second resolution
    assert calls == []


def test_no_gpu_is_a_clear_reason(nsa_env, monkeypatch):
    nsa_env.delenv("NSA_SEL_LIB", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(_lib.LibraryUnavailable, match="no CUDA device"):
        _lib.get_library(0)


def test_importing_nsa_never_builds():
    code = "import nsa; from nsa.kernels import _lib; assert not _lib._CACHE"
    env = dict(os.environ, NSA_SEL_CUDA="1", NSA_SEL_CUDA_BUILD="1")
    res = subprocess.run(
        [os.sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=_lib.source_root(),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "building" not in res.stderr

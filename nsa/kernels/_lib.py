"""ctypes binding and cached loader of ``libnsa_sel.so`` (the torch-free C++/CUDA core).

The C API is ``csrc/include/nsa_sel/sel_attention.h``; :class:`NsaSelParams` mirrors its struct
field by field and is checked at load against ``nsa_sel_params_size()`` and
``nsa_sel_abi_version()``.

Where the library comes from (:func:`get_library`):

1. ``NSA_SEL_LIB=PATH``: that file, nothing else (an error if it is missing or unusable).
2. The build cache ``<NSA_SEL_CACHE_DIR>/<key>/libnsa_sel.so``, ``key`` a sha256 over every file
   under ``csrc/`` and ``CMakeLists.txt`` (sorted paths), the target arch (``sm_90``), the
   ``nvcc --version`` output and the build flags: any change of those makes a new entry.
3. On a cache miss (or an unusable cached file) with ``NSA_SEL_CUDA_BUILD=1``: a CMake build into
   a temporary folder inside the cache, moved into place with an atomic ``os.replace``, under an
   ``fcntl.flock`` on ``<cache>/<key>.lock`` (waited for with a timeout, never forever).

Every failure is a :class:`LibraryUnavailable` carrying the reason. Results, failures included,
are cached per process and per flag setting, so a failed build is not retried on every call.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Union

from .. import flags

ABI_VERSION = 1
LIB_NAME = "libnsa_sel.so"
LOCK_TIMEOUT_S = 20 * 60.0  # waiting for another process's build; then a clear error
BUILD_TIMEOUT_S = 20 * 60.0


class LibraryUnavailable(RuntimeError):
    """The CUDA library cannot be used; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Status(enum.IntEnum):
    """NsaSelStatus."""

    OK = 0
    INVALID_ARGUMENT = 1
    UNSUPPORTED = 2
    NO_DEVICE = 3
    CUDA = 4
    CUDA_STICKY = 5
    NOT_BUILT = 6


class Dtype(enum.IntEnum):
    """NsaSelDtype."""

    F16 = 0
    BF16 = 1
    F32 = 2


class IndexType(enum.IntEnum):
    """NsaSelIndexType."""

    I32 = 0
    I64 = 1


_i64 = ctypes.c_int64


class NsaSelParams(ctypes.Structure):
    """Mirror of ``NsaSelParams`` (same field order and types; strides in elements)."""

    _fields_ = [
        ("q", ctypes.c_void_p),  # [b, s, g, h, d_k]
        ("k", ctypes.c_void_p),  # [b, g, s_kv, d_k]
        ("v", ctypes.c_void_p),  # [b, g, s_kv, d_v]
        ("ranges", ctypes.c_void_p),  # [b, s, g, n, 2]
        ("kv_lens", ctypes.c_void_p),  # [b] or NULL
        ("out", ctypes.c_void_p),  # [b, s, g, h, d_v]
        ("b", _i64),
        ("s", _i64),
        ("g", _i64),
        ("h", _i64),
        ("d_k", _i64),
        ("d_v", _i64),
        ("s_kv", _i64),
        ("n", _i64),
        ("q_stride_b", _i64),
        ("q_stride_s", _i64),
        ("q_stride_g", _i64),
        ("q_stride_h", _i64),
        ("q_stride_d", _i64),
        ("k_stride_b", _i64),
        ("k_stride_g", _i64),
        ("k_stride_t", _i64),
        ("k_stride_d", _i64),
        ("v_stride_b", _i64),
        ("v_stride_g", _i64),
        ("v_stride_t", _i64),
        ("v_stride_d", _i64),
        ("o_stride_b", _i64),
        ("o_stride_s", _i64),
        ("o_stride_g", _i64),
        ("o_stride_h", _i64),
        ("o_stride_d", _i64),
        ("r_stride_b", _i64),
        ("r_stride_s", _i64),
        ("r_stride_g", _i64),
        ("r_stride_n", _i64),
        ("r_stride_e", _i64),
        ("kv_lens_stride_b", _i64),
        ("scale", ctypes.c_float),
        ("dtype", ctypes.c_int32),
        ("index_type", ctypes.c_int32),
        ("kv_lens_type", ctypes.c_int32),
    ]


# The hot path packs the same 42 fields with struct (0.3 us, against 1.4 us to build a
# Structure): native alignment ('@') matches the C layout; checked against the Structure here and
# against the library's sizeof at load.
PARAMS_FORMAT = "@6P8q24qf3i"
_PACKER = struct.Struct(PARAMS_FORMAT)
pack_params = _PACKER.pack
"""pack_params(q, k, v, ranges, kv_lens, out, b, s, g, h, d_k, d_v, s_kv, n, <24 strides>,
scale, dtype, index_type, kv_lens_type) -> bytes laid out as NsaSelParams."""
if _PACKER.size != ctypes.sizeof(NsaSelParams):  # pragma: no cover (a platform ABI surprise)
    raise ImportError(
        f"nsa: struct layout {_PACKER.size} B != ctypes layout "
        f"{ctypes.sizeof(NsaSelParams)} B for NsaSelParams"
    )

_P = ctypes.c_void_p
_SIGNATURES = {
    "nsa_sel_abi_version": (ctypes.c_int32, []),
    "nsa_sel_params_size": (ctypes.c_int64, []),
    "nsa_sel_last_error": (ctypes.c_char_p, []),
    "nsa_sel_built_with_cuda": (ctypes.c_int32, []),
    "nsa_sel_validate": (ctypes.c_int, [_P]),
    "nsa_sel_reference_cpu": (ctypes.c_int, [_P]),
    "nsa_sel_decode_supported": (ctypes.c_int, [_P]),
    "nsa_sel_decode_cuda": (ctypes.c_int, [_P, ctypes.c_int32, _P]),
}

ParamsArg = Union[bytes, NsaSelParams]


def _as_arg(params: ParamsArg):
    return ctypes.byref(params) if isinstance(params, NsaSelParams) else params


class Library:
    """A loaded, ABI-checked ``libnsa_sel.so``."""

    def __init__(self, path: Union[str, Path]):
        self.path = str(path)
        try:
            cdll = ctypes.CDLL(self.path)
        except OSError as e:
            raise LibraryUnavailable(f"cannot load {self.path}: {e}") from None
        try:
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(cdll, name)
                fn.restype = restype
                fn.argtypes = argtypes
            abi = cdll.nsa_sel_abi_version()
            size = cdll.nsa_sel_params_size()
            if abi != ABI_VERSION or size != ctypes.sizeof(NsaSelParams):
                raise LibraryUnavailable(
                    f"{self.path}: ABI mismatch: library has abi_version {abi} and "
                    f"sizeof(NsaSelParams) {size}, the binding expects {ABI_VERSION} and "
                    f"{ctypes.sizeof(NsaSelParams)} (a stale build?)"
                )
        except (AttributeError, LibraryUnavailable) as e:
            _dlclose(cdll)  # so that a rebuilt file at the same path is really reloaded
            if isinstance(e, AttributeError):
                raise LibraryUnavailable(f"{self.path}: missing symbol ({e})") from None
            raise
        self._cdll = cdll
        self._decode = cdll.nsa_sel_decode_cuda
        self._last_error = cdll.nsa_sel_last_error
        self.built_with_cuda = bool(cdll.nsa_sel_built_with_cuda())

    def last_error(self) -> str:
        """``nsa_sel_last_error()`` of this thread."""
        msg = self._last_error()
        return msg.decode("utf-8", "replace") if msg else ""

    def launch(self, params: ParamsArg, device_index: int, stream_handle: int) -> tuple:
        """``nsa_sel_decode_cuda``: returns (status, message); the message is "" on success."""
        status = self._decode(_as_arg(params), device_index, stream_handle)
        if status == 0:
            return 0, ""
        return status, self.last_error()

    def _call(self, name: str, params: ParamsArg) -> tuple:
        status = getattr(self._cdll, name)(_as_arg(params))
        return status, ("" if status == 0 else self.last_error())

    def validate(self, params: ParamsArg) -> tuple:
        """``nsa_sel_validate``: (status, message)."""
        return self._call("nsa_sel_validate", params)

    def supported(self, params: ParamsArg) -> tuple:
        """``nsa_sel_decode_supported``: (status, message)."""
        return self._call("nsa_sel_decode_supported", params)

    def reference_cpu(self, params: ParamsArg) -> tuple:
        """``nsa_sel_reference_cpu`` (host pointers): (status, message)."""
        return self._call("nsa_sel_reference_cpu", params)

    def __repr__(self) -> str:
        return f"Library({self.path!r}, built_with_cuda={self.built_with_cuda})"


def _dlclose(cdll) -> None:
    try:
        import _ctypes

        _ctypes.dlclose(cdll._handle)
    except Exception:  # best effort: only matters when a bad file is rebuilt in-process
        pass


# --------------------------------------------------------------------------------------------
# Locating, keying and building
# --------------------------------------------------------------------------------------------


def source_root() -> Path:
    """The repository root holding ``csrc/`` and ``CMakeLists.txt`` (an editable install)."""
    return Path(__file__).resolve().parents[2]


def _check_sources(root: Path) -> None:
    if not (root / "csrc").is_dir() or not (root / "CMakeLists.txt").is_file():
        raise LibraryUnavailable(
            f"the C++/CUDA sources (csrc/, CMakeLists.txt) are not at {root}: building on "
            f"demand needs the source tree (pip install -e from a checkout), or set "
            f"NSA_SEL_LIB to a prebuilt libnsa_sel.so"
        )


def find_nvcc() -> Optional[str]:
    """nvcc from CUDACXX, PATH, CUDA_HOME/CUDA_PATH or /usr/local/cuda; None if absent."""
    cudacxx, cuda_home, cuda_path = flags.cuda_toolkit_hints()
    if cudacxx and Path(cudacxx).is_file():
        return cudacxx
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (cuda_home, cuda_path, "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


_NVCC_VERSIONS: dict = {}


def nvcc_version(nvcc: Optional[str]) -> str:
    """``nvcc --version`` output (cached per process), or a marker when nvcc is missing."""
    if nvcc is None:
        return "nvcc: not found"
    if nvcc not in _NVCC_VERSIONS:
        try:
            res = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
            _NVCC_VERSIONS[nvcc] = res.stdout + res.stderr
        except (OSError, subprocess.SubprocessError) as e:
            _NVCC_VERSIONS[nvcc] = f"nvcc: failed ({e})"
    return _NVCC_VERSIONS[nvcc]


def arch_digits(arch: str) -> str:
    """ "sm_90" -> "90" (the form of CMAKE_CUDA_ARCHITECTURES)."""
    return arch[3:] if arch.startswith("sm_") else arch


def build_flags(arch: str) -> list:
    """CMake configure flags of an on-demand build (part of the cache key)."""
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DNSA_SEL_BUILD_TESTS=OFF",
        "-DNSA_SEL_WITH_CUDA=ON",
        f"-DNSA_SEL_CUDA_ARCHS={arch_digits(arch)}",
    ]


def cache_key(root: Path, arch: str, nvcc_version_text: str) -> str:
    """``<arch>-<sha256 prefix>`` over the sources, arch, nvcc version and build flags."""
    h = hashlib.sha256(b"nsa_sel cache v1\0")
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    files.append(root / "CMakeLists.txt")
    for p in files:
        data = p.read_bytes()
        h.update(f"{p.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    for part in (arch, nvcc_version_text, " ".join(build_flags(arch))):
        h.update(f"\0{len(part)}\0".encode() + part.encode())
    return f"{arch}-{h.hexdigest()[:32]}"


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, poll_s: float = 0.2):
    """Exclusive ``fcntl.flock`` on ``path``, polled with LOCK_NB; LibraryUnavailable on timeout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LibraryUnavailable(
                        f"timed out after {timeout_s:.0f} s waiting for the build lock {path} "
                        f"(another process is building the library; if none is, remove the "
                        f"lock file)"
                    ) from None
                time.sleep(poll_s)
        yield
    finally:
        os.close(fd)  # releases the lock


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def build_library(root: Path, arch: str, dest: Path, nvcc: Optional[str]) -> None:
    """Builds target ``nsa_sel`` for ``arch`` with CMake and moves it atomically to ``dest``."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise LibraryUnavailable("cannot build the CUDA library: cmake not found on PATH")
    if nvcc is None:
        raise LibraryUnavailable(
            "cannot build the CUDA library: nvcc not found (set CUDACXX "
            "or CUDA_HOME, or put nvcc on PATH)"
        )
    print(
        f"nsa: building the CUDA selection kernel for {arch} into {dest.parent} "
        f"(first use, about a minute)",
        file=sys.stderr,
        flush=True,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    log_path = dest.parent / "build.log"
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        configure = [
            cmake,
            "-S",
            str(root),
            "-B",
            str(tmp),
            *build_flags(arch),
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        build = [cmake, "--build", str(tmp), "--target", "nsa_sel", "-j", str(os.cpu_count() or 4)]
        log = []
        for step, cmd in (("configure", configure), ("build", build)):
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise LibraryUnavailable(
                    f"building the CUDA library timed out in the {step} step after "
                    f"{BUILD_TIMEOUT_S:.0f} s"
                ) from None
            log.append(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
            log_path.write_text("\n".join(log))
            if res.returncode != 0:
                raise LibraryUnavailable(
                    f"building the CUDA library failed in the {step} step (exit "
                    f"{res.returncode}; full log in {log_path}):\n{_tail(res.stdout + res.stderr)}"
                )
        built = tmp / LIB_NAME
        if not built.is_file():
            found = sorted(tmp.rglob(LIB_NAME))
            if not found:
                raise LibraryUnavailable(f"the build finished but produced no {LIB_NAME} in {tmp}")
            built = found[0]
        os.replace(built, dest)  # atomic: readers see the old file or the complete new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cached(
    arch: str,
    *,
    build: bool,
    root: Optional[Path] = None,
    cache: Optional[Path] = None,
    lock_timeout_s: Optional[float] = None,
) -> Library:
    """The cached library for ``arch``, built first when missing/unusable and ``build``."""
    root = source_root() if root is None else root
    cache = flags.cache_dir() if cache is None else cache
    _check_sources(root)
    nvcc = find_nvcc()
    key = cache_key(root, arch, nvcc_version(nvcc))
    dest = cache / key / LIB_NAME
    problem = None
    if dest.is_file():
        try:
            return Library(dest)
        except LibraryUnavailable as e:
            problem = e.reason
    if not build:
        if problem is not None:
            raise LibraryUnavailable(
                f"the cached library is unusable ({problem}); set NSA_SEL_CUDA_BUILD=1 to "
                f"rebuild it"
            )
        raise LibraryUnavailable(
            f"the CUDA library for {arch} is not built (no {dest}); set NSA_SEL_CUDA_BUILD=1 "
            f"to build it on first use, or NSA_SEL_LIB to a prebuilt libnsa_sel.so"
        )
    timeout = LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s
    with file_lock(cache / f"{key}.lock", timeout):
        # Another process may have finished the build while this one waited for the lock.
        if dest.is_file():
            try:
                return Library(dest)
            except LibraryUnavailable:
                pass  # still unusable: rebuild over it
        build_library(root, arch, dest, nvcc)
    try:
        return Library(dest)
    except LibraryUnavailable as e:
        raise LibraryUnavailable(f"the freshly built library is unusable: {e.reason}") from None


def device_arch(device_index: Optional[int]) -> str:
    """ "sm_XY" of a CUDA device; LibraryUnavailable when torch sees none."""
    import torch

    if not torch.cuda.is_available():
        raise LibraryUnavailable("no CUDA device is visible to torch")
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _resolve(config: tuple, device_index: Optional[int]) -> Library:
    lib_path, build, _ = config
    if lib_path:
        if not Path(lib_path).is_file():
            raise LibraryUnavailable(f"NSA_SEL_LIB={lib_path}: no such file")
        return Library(lib_path)
    return load_cached(device_arch(device_index), build=build)


def memoized(cache: dict, lock, key, make):
    """``cache[key]``, made once by ``make()`` under ``lock``; a LibraryUnavailable that ``make``
    raises is the cached answer (returned, not raised), so a failure is not retried per call."""
    hit = cache.get(key)
    if hit is None:
        with lock:
            hit = cache.get(key)
            if hit is None:
                try:
                    hit = make()
                except LibraryUnavailable as e:
                    hit = e
                cache[key] = hit
    return hit


def get_library(device_index: Optional[int] = None, *, build: Optional[bool] = None) -> Library:
    """The library for CUDA device ``device_index`` (cached); raises LibraryUnavailable.

    ``build``: None follows ``NSA_SEL_CUDA_BUILD``; False only looks (never builds).
    """
    config = flags.loader_config()
    if build is not None:
        config = (config[0], build, config[2])
    key = (config, None if config[0] else device_index)
    hit = _CACHE.get(key)  # the hot path: one look-up
    if hit is None:
        hit = memoized(_CACHE, _CACHE_LOCK, key, lambda: _resolve(config, device_index))
    if type(hit) is Library:
        return hit
    raise LibraryUnavailable(hit.reason)  # a fresh exception: no traceback pile-up


def clear_cache() -> None:
    """Forgets loaded libraries and cached failures (tests; after fixing a build)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def launch(params: ParamsArg, device_index: int, stream_handle: int) -> tuple:
    """``nsa_sel_decode_cuda`` through the cached library: (status, message)."""
    return get_library(device_index).launch(params, device_index, stream_handle)

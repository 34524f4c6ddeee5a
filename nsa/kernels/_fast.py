"""The eager fast path: a torch C++ extension that takes a kernel call in one C++ step.

``csrc/torch/nsa_sel_torch.cpp`` checks the arguments, allocates the output and calls
``nsa_sel_decode_cuda`` of the library the loader chose (:mod:`._lib`), for the calls the kernel
takes as they are; it returns None for every other call, which then takes the Python path
(validation, fallbacks and error messages all live there). Same launch, same result, a fraction
of the host time: the Python path costs 18-25 µs per call on the H200's host (NOTES.md, Eager).

Where the extension comes from: ``<NSA_SEL_CACHE_DIR>/torch-ext-<tag>/nsa_sel_torch_<tag>.so``,
``tag`` a sha256 prefix over its source, the C header, torch's version, the interpreter's tag and
the C++ ABI flag, so a new torch or a changed source makes a new entry. It is built by
``python -m nsa.kernels.build_fast_path`` (``make test`` and ``make gpu-check`` run it) or, on
first use, when ``NSA_SEL_CUDA_BUILD=1`` (torch.utils.cpp_extension: about 40 s). Without it
the calls take the Python path, and ``kernel_status()`` says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

from .. import flags
from . import _lib

SOURCE = Path("csrc") / "torch" / "nsa_sel_torch.cpp"
HEADER = Path("csrc") / "include" / "nsa_sel" / "sel_attention.h"

_LOCK = threading.Lock()
_MODULES: dict = {}  # (cache dir, build flag) -> module | LibraryUnavailable


def ext_tag(root: Path) -> str:
    """sha256 prefix over the extension's inputs: its source, the header, torch and Python."""
    import torch

    h = hashlib.sha256(b"nsa_sel torch ext v1\0")
    for rel in (SOURCE, HEADER):
        data = (root / rel).read_bytes()
        h.update(f"{rel.as_posix()}\0{len(data)}\0".encode() + data)
    for part in (
        torch.__version__,
        str(getattr(torch.version, "git_version", "")),
        sys.implementation.cache_tag or "",
        str(torch._C._GLIBCXX_USE_CXX11_ABI),
    ):
        h.update(f"\0{len(part)}\0".encode() + part.encode())
    return h.hexdigest()[:16]


def ext_location(root: Path, cache: Path) -> tuple:
    """(module name, folder) of the extension for these sources and this torch."""
    tag = ext_tag(root)
    return f"nsa_sel_torch_{tag}", cache / f"torch-ext-{tag}"


def built_file(folder: Path, name: str) -> Optional[Path]:
    found = sorted(folder.glob(f"{name}*.so")) if folder.is_dir() else []
    return found[0] if found else None


def _import(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def build(root: Path, cache: Path, *, verbose: bool = False):
    """Builds the extension into the cache (under a lock, moved into place) and imports it."""
    from torch.utils import cpp_extension

    name, folder = ext_location(root, cache)
    with _lib.file_lock(cache / f"{folder.name}.lock", _lib.LOCK_TIMEOUT_S):
        done = built_file(folder, name)
        if done is not None:
            return _import(name, done)
        print(
            f"nsa: building the eager fast path ({SOURCE}) into {folder} (first use, ~40 s)",
            file=sys.stderr,
            flush=True,
        )
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-ext-", dir=cache))
        try:
            try:
                module = cpp_extension.load(
                    name=name,
                    sources=[str(root / SOURCE)],
                    extra_include_paths=[str(root / "csrc" / "include")],
                    extra_cflags=["-O2"],
                    build_directory=str(tmp),
                    verbose=verbose,
                )
            except Exception as e:  # compiler errors, a missing ninja or compiler
                text = str(e).strip().splitlines()
                raise _lib.LibraryUnavailable(
                    "building the eager fast path failed: " + "\n".join(text[-20:])
                ) from None
            built = built_file(tmp, name)
            if built is None:
                raise _lib.LibraryUnavailable(f"the fast-path build produced no {name}.so")
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(built, folder / built.name)  # atomic: readers see all of it or nothing
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.modules[name] = module
    return module


def load_module(*, build_missing: Optional[bool] = None, cache: Optional[Path] = None):
    """The extension module (cached per process); LibraryUnavailable with the reason if none.

    ``build_missing``: None follows NSA_SEL_CUDA_BUILD.
    """
    cache = flags.cache_dir() if cache is None else cache
    build_missing = flags.build_enabled() if build_missing is None else build_missing
    hit = _lib.memoized(
        _MODULES, _LOCK, (str(cache), build_missing), lambda: _load(cache, build_missing)
    )
    if isinstance(hit, _lib.LibraryUnavailable):
        raise _lib.LibraryUnavailable(hit.reason)  # a fresh exception: no traceback pile-up
    return hit


def _load(cache: Path, build_missing: bool):
    try:
        return _find_or_build(cache, build_missing)
    except _lib.LibraryUnavailable:
        raise
    except Exception as e:  # an unreadable or foreign file in the cache
        raise _lib.LibraryUnavailable(
            f"the eager fast path failed to load: {type(e).__name__}: {e}"
        ) from None


def _find_or_build(cache: Path, build_missing: bool):
    root = _lib.source_root()
    if not (root / SOURCE).is_file() or not (root / HEADER).is_file():
        raise _lib.LibraryUnavailable(
            f"the fast path's source ({SOURCE}) is not at {root} (an installed package without "
            f"the checkout): calls take the Python path"
        )
    name, folder = ext_location(root, cache)
    built = built_file(folder, name)
    if built is not None:
        return _import(name, built)
    if not build_missing:
        raise _lib.LibraryUnavailable(
            f"the eager fast path is not built (no {folder / name}.so): run "
            f"`python -m nsa.kernels.build_fast_path`, or set NSA_SEL_CUDA_BUILD=1"
        )
    return build(root, cache)


def launcher_for(lib) -> Optional[object]:
    """The extension's launcher bound to ``lib`` (a loaded :class:`._lib.Library`), or None.

    Cached on ``lib``; the reason for a None is in ``lib.fast_reason``.
    """
    launcher = getattr(lib, "_fast_launcher", False)
    if launcher is not False:
        return launcher
    reason = ""
    try:
        launcher = load_module().Launcher(lib.path)
    except _lib.LibraryUnavailable as e:
        launcher, reason = None, e.reason
    except Exception as e:  # the library file does not bind (ABI, symbols)
        launcher, reason = None, f"the eager fast path cannot bind {lib.path}: {e}"
    lib._fast_launcher, lib.fast_reason = launcher, reason
    return launcher


def clear_cache() -> None:
    """Forgets loaded modules and failures (tests)."""
    with _LOCK:
        _MODULES.clear()

"""Environment flags of the nsa package: the one module that reads them.

Every flag is read when its function is called (never cached at import), so a test or a user can
change the environment between calls.

=======================  =======================================================================
``NSA_SEL_CUDA=1``        use the CUDA kernel where it applies (default off)
``NSA_SEL_CUDA_BUILD=1``  build the CUDA library on demand when no up-to-date build is cached
``NSA_SEL_CUDA_STRICT=1`` raise instead of falling back to the PyTorch reference
``NSA_SEL_LIB=PATH``      use this prebuilt ``libnsa_sel.so`` (no cache look-up, no build)
``NSA_SEL_CACHE_DIR=DIR`` build cache (default ``~/.cache/nsa_sel``)
=======================  =======================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

_environ = os.environ


def _make_getter():
    """A fast ``os.environ.get`` for the eager hot path.

    ``os.environ.get`` of an unset name costs about 1 us (a KeyError raised and caught inside
    the Mapping machinery); CPython's ``os.environ`` keeps its values in a dict ``_data`` that
    every ``os.environ[...] = ...`` / ``del`` updates, so reading that dict is exact and ~10x
    cheaper. Falls back to ``os.environ.get`` where that layout is absent.
    """
    data = getattr(_environ, "_data", None)
    encode = getattr(_environ, "encodekey", None)
    decode = getattr(_environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:
        return _environ.get
    keys: dict = {}

    def get(name: str) -> Optional[str]:
        key = keys.get(name)
        if key is None:
            key = keys[name] = encode(name)
        value = data.get(key)
        return None if value is None else decode(value)

    return get


_get = _make_getter()


def cuda_enabled() -> bool:
    """``NSA_SEL_CUDA=1``: route eligible calls to the CUDA kernel."""
    return _get("NSA_SEL_CUDA") == "1"


def build_enabled() -> bool:
    """``NSA_SEL_CUDA_BUILD=1``: build the library on a cache miss."""
    return _get("NSA_SEL_CUDA_BUILD") == "1"


def strict() -> bool:
    """``NSA_SEL_CUDA_STRICT=1``: a failure of the CUDA path raises instead of falling back."""
    return _get("NSA_SEL_CUDA_STRICT") == "1"


def lib_path() -> Optional[str]:
    """``NSA_SEL_LIB``: explicit path of a prebuilt ``libnsa_sel.so``, or None."""
    return _get("NSA_SEL_LIB") or None


def cache_dir() -> Path:
    """``NSA_SEL_CACHE_DIR``: root of the build cache (default ``~/.cache/nsa_sel``)."""
    raw = _get("NSA_SEL_CACHE_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "nsa_sel"


def loader_config() -> tuple:
    """The flags the library loader depends on, as one hashable tuple (its cache key)."""
    return (
        _get("NSA_SEL_LIB") or None,
        _get("NSA_SEL_CUDA_BUILD") == "1",
        _get("NSA_SEL_CACHE_DIR"),
    )


def cuda_toolkit_hints() -> tuple:
    """Standard toolchain variables used to find nvcc: (CUDACXX, CUDA_HOME, CUDA_PATH)."""
    return (_get("CUDACXX"), _get("CUDA_HOME"), _get("CUDA_PATH"))

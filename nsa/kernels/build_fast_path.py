"""Builds the eager fast path (:mod:`nsa.kernels._fast`) into the cache; prints its path.

``python -m nsa.kernels.build_fast_path [--cache DIR]``: ``make test`` and ``make gpu-check`` run
it; a user runs it once per torch install (or sets NSA_SEL_CUDA_BUILD=1 to build on first use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import flags
from . import _fast, _lib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the eager fast path into the cache.")
    parser.add_argument("--cache", type=Path, help="cache folder (default: NSA_SEL_CACHE_DIR)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    cache = flags.cache_dir() if args.cache is None else args.cache
    root = _lib.source_root()
    try:
        name, folder = _fast.ext_location(root, cache)
        if _fast.built_file(folder, name) is None:
            _fast.build(root, cache, verbose=args.verbose)
    except _lib.LibraryUnavailable as e:
        print(f"nsa: {e.reason}", file=sys.stderr)
        return 1
    print(_fast.built_file(folder, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())

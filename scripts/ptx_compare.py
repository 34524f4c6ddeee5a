#!/usr/bin/env python3
"""Whether a change leaves the kernels it does not mean to touch as they were, without a GPU.

    python3 scripts/ptx_compare.py REF [FILE.cu ...]

Compiles each kernel file (default: csrc/src/cuda/sel_decode_d192_128.cu) to sm_90 PTX twice,
at git ref REF and in the working tree, and for each kernel entry of REF prints SAME or DIFF
against the tree's entry of the same template arguments. Template parameters appended with a
default (e.g. a new `bool X = false`) are matched by dropping the tree's trailing `Lb0` ones.
Labels, .loc lines and comments are ignored. Identical PTX means the same machine code from
ptxas, so such kernels need no new timing (used for v23c: NOTES.md).
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ptx(src_root: Path, cu: str, out: Path) -> str:
    subprocess.run(
        ["nvcc", "-O3", "-std=c++17", f"-I{src_root}/csrc/include",
         "--generate-code=arch=compute_90,code=compute_90", "-ptx", str(src_root / cu),
         "-o", str(out)],
        check=True)
    return out.read_text()


def entries(text: str) -> dict:
    out = {}
    for part in re.split(r"(?m)^\.visible \.entry ", text)[1:]:
        name = part.split("(")[0]
        lines = [re.sub(r"\$L__BB\d+_", "$L__BB_", line.replace(name, "K"))
                 for line in part.split("\n")
                 if not line.strip().startswith((".loc", "// .globl", "//"))]
        out[name] = lines
    return out


def normalise(name: str, names) -> str:
    """The tree's entry for a ref entry: the same name, or one with extra trailing Lb0 args."""
    if name in names:
        return name
    head, sep, tail = name.partition("EEEv")
    for extra in range(1, 4):
        cand = head + "ELb0" * extra + sep + tail
        if cand in names:
            return cand
    return ""


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    ref, files = sys.argv[1], sys.argv[2:] or ["csrc/src/cuda/sel_decode_d192_128.cu"]
    diffs = 0
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        src = t / "ref"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "csrc"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        for cu in files:
            old = entries(ptx(src, cu, t / "ref.ptx"))
            new = entries(ptx(ROOT, cu, t / "new.ptx"))
            for name, body in old.items():
                match = normalise(name, new)
                same = bool(match) and new[match] == body
                diffs += not same
                print(f"{'SAME' if same else 'DIFF'} {cu}: {name}")
            added = set(new) - {normalise(n, new) for n in old}
            for name in sorted(added):
                print(f"NEW  {cu}: {name}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# SASS of the library's kernels, without a GPU (tuning evidence: instruction order, resources).
#
#   scripts/sass.sh LIB                  the kernels' resource report (cuobjdump -res-usage)
#   scripts/sass.sh LIB PATTERN          the SASS of the first kernel whose mangled name contains
#                                        PATTERN, e.g. Li192ELi128ELi1ELi1ELb0ELb1ELb1E (bf16 comes
#                                        first; the template arguments: DK, DV, MT, TEAMS,
#                                        KV_SPLIT, EARLY, TMA)
#   scripts/sass.sh LIB PATTERN --ops    that kernel's opcode counts
#
# cuobjdump and nvdisasm come from PyPI (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm), unpacked
# once into .deps/cuda-tools (git-ignored); where the machine has them on PATH, those are used.
set -euo pipefail
cd "$(dirname "$0")/.."
lib=${1:?usage: scripts/sass.sh LIB [PATTERN [--ops]]}
pattern=${2:-}
tools="$PWD/.deps/cuda-tools"
if ! command -v cuobjdump >/dev/null || ! command -v nvdisasm >/dev/null; then
  bin=$(find "$tools" -name nvdisasm -path '*/bin/*' 2>/dev/null | head -n1 || true)
  if [[ -z "$bin" ]]; then
    mkdir -p "$tools"
    python3 -m pip download --quiet --no-deps -d "$tools" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    for whl in "$tools"/*.whl; do python3 -m zipfile -e "$whl" "$tools"; done
    bin=$(find "$tools" -name nvdisasm -path '*/bin/*' | head -n1)
    chmod +x "$(dirname "$bin")"/*
  fi
  export PATH="$(dirname "$bin"):$PATH"
fi
if [[ -z "$pattern" ]]; then
  exec cuobjdump -res-usage "$lib"
fi
# One function: from its "Function :" header to the next one.
sass=$(cuobjdump -sass "$lib" | awk -v pat="$pattern" '
  /Function : / { if (found) exit; if (index($0, pat)) found = 1 }
  found { print }')
[[ -n "$sass" ]] || { echo "sass: no kernel matches $pattern" >&2; exit 1; }
if [[ "${3:-}" == "--ops" ]]; then
  # The opcode of each instruction line (after the predicate, if any), without its modifiers.
  grep -oE '/\*[0-9a-f]{4,}\*/ +(@!?U?P[A-Z0-9]+ +)?[A-Z][A-Z0-9_]+' <<<"$sass" |
    awk '{print $NF}' | sort | uniq -c | sort -rn
else
  echo "$sass"
fi

#!/usr/bin/env bash
# python3 -m pytest "$@", but "no tests collected" (exit 5) is reported loudly and fails, so an
# empty or unimportable test folder can never pass as green.
set -uo pipefail
"${PYTHON:-python3}" -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "pytest: NO TESTS COLLECTED (exit 5) from: $*" >&2
fi
exit $rc

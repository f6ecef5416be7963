#!/usr/bin/env bash
# Installs genki with its test extras and runs the whole test suite.
# pytest exit code 5 (no tests collected) is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; treating as failure" >&2
    exit 1
fi
exit "$rc"

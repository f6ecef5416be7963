#!/usr/bin/env bash
# Installs genki with its test extras, checks lint and types, and runs the whole test suite.
# pytest exit code 5 (no tests collected) is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev || exit 1
status=0
.venv/bin/ruff check engine replay benchmarks tests || { echo "scripts/test.sh: ruff found problems" >&2; status=1; }
.venv/bin/mypy engine replay || { echo "scripts/test.sh: mypy found problems" >&2; status=1; }
# One pytest worker per core, whole files per worker (module fixtures such as a tansu
# broker start once); `bash scripts/test.sh -n 0` runs in one process.
.venv/bin/python -m pytest -n auto --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; treating as failure" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
exit "$status"

#!/usr/bin/env bash
# Installs genki and runs the main job on the embedded default (no broker, no services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/genki demo "$@"

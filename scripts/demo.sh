#!/usr/bin/env bash
# The main job end to end on a fresh machine: installs what it needs, then runs `radnode demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
ulimit -s 32768 2>/dev/null || true   # Holoscan asks for a 32 MB stack
exec .venv/bin/radnode demo "$@"

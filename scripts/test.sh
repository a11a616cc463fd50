#!/usr/bin/env bash
# The test suite on a fresh machine: installs what it needs (Debian packages, .venv), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash deploy/ohif/install.sh   # the OHIF viewer build and Debian chromium for the browser test
ulimit -s 32768 2>/dev/null || true   # Holoscan asks for a 32 MB stack
exec .venv/bin/python -m pytest "$@"

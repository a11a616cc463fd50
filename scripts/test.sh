#!/usr/bin/env bash
# The test suite on a fresh machine: installs what it needs (Debian packages, .venv), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash deploy/ohif/install.sh   # the OHIF viewer build and Debian chromium for the browser test
ulimit -s 32768 2>/dev/null || true   # Holoscan asks for a 32 MB stack
# Two worker processes (pytest-xdist), each taking whole test modules: many tests wait on servers, peers and
# subprocesses, so two keep both cores busy. RADNODE_TEST_WORKERS=0 runs them in this process, one after another.
exec .venv/bin/python -m pytest -n "${RADNODE_TEST_WORKERS:-2}" --dist loadfile "$@"

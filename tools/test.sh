#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run them under Xvfb.
# Usage: bash tools/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_setup.sh
# One OpenMP thread per process unless asked otherwise: on a small, busy CPU, threads spin-waiting
# for each other made the suite several times slower (tests/conftest.py's one_torch_thread).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m pytest "$@"

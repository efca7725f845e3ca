#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run them under Xvfb.
# Usage: bash tools/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_setup.sh
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m pytest "$@"

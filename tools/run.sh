#!/usr/bin/env bash
# Install glas-seg, then open napari with its Segment widget and a GlaS sample image.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_setup.sh
if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
  echo "No display found: running napari under Xvfb (set DISPLAY to see the window)." >&2
  exec xvfb-run -a .venv/bin/napari src/glas_seg/sample_data/glas_train_12.png -w glas-seg "$@"
fi
exec .venv/bin/napari src/glas_seg/sample_data/glas_train_12.png -w glas-seg "$@"

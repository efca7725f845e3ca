"""The plugin manifest is found in the editable install and in a built wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_manifest_validates_in_editable_install():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover()
    manifest = pm.get_manifest("glas-seg")
    commands = {c.id for c in manifest.contributions.commands}
    assert {"glas-seg.segment_widget", "glas-seg.sample_glas"} <= commands
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "glas-seg"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_wheel_ships_manifest_weights_and_sample(tmp_path):
    out = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    wheel = next(tmp_path.glob("glas_seg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "glas_seg/napari.yaml" in names
    assert "glas_seg/weights/unet-glands.safetensors" in names
    assert "glas_seg/sample_data/glas_train_12.png" in names
    manifest = yaml.safe_load(zipfile.ZipFile(wheel).read("glas_seg/napari.yaml"))
    assert manifest["name"] == "glas-seg"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "glas-seg = glas_seg:napari.yaml" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # Validate the manifest inside the wheel from a clean virtual environment-free install.
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    code = ("import sys; sys.path.insert(0, %r); from npe2 import PluginManifest; "
            "m = PluginManifest.from_file(%r); print(m.name)") % (str(target), str(target / "glas_seg" / "napari.yaml"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "glas-seg", out.stderr

"""Exported models (TorchScript, ONNX) reproduce glas-seg's own probabilities on a GlaS image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glas_seg.backend.checkpoint import ModelConfig, save_model
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.export import export_model, run_exported, sidecar_path, working_scale_input
from glas_seg.backend.image_io import read_image
from glas_seg.backend.inference import prepare_input
from glas_seg.backend.models import build_architecture, get_architecture
from glas_seg.backend.registry import load_model
from glas_seg.cli import main

from conftest import REPO

SAMPLE = REPO / "src" / "glas_seg" / "sample_data" / "glas_train_12.png"
TOLERANCE = {"torchscript": 1e-4, "onnx": 1e-3}  # issue 15

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _crop(x: np.ndarray, multiple: int, side: int = 192) -> np.ndarray:
    """A ``side``-pixel crop from the middle of a (1, 3, h, w) array (``side`` a multiple of the stride)."""
    side = side // multiple * multiple
    top, left = (x.shape[2] - side) // 2, (x.shape[3] - side) // 2
    return np.ascontiguousarray(x[:, :, top : top + side, left : left + side])


def _glas_seg_probabilities(model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exported input, probabilities) on the same crop, the latter through glas-seg's own
    normalisation (inference.prepare_input) and network, as segment() computes them."""
    multiple = int(model.network.size_multiple)
    normalised = _crop(prepare_input(image, model).numpy(), multiple)
    with torch.no_grad():
        expected = torch.softmax(model.network(torch.from_numpy(normalised)), dim=1).numpy()
    return _crop(working_scale_input(image, model.config), multiple), expected


@pytest.mark.parametrize("name, fmt, suffix", [
    ("unet-glands", "torchscript", ".pt"),
    ("unet-glands", "onnx", ".onnx"),
    ("unetpp-glands", "onnx", ".onnx"),
])
def test_bundled_model_exports_match_pytorch_on_a_glas_image(tmp_path, name, fmt, suffix):
    model = load_model(name, "cpu")
    path = export_model(model, tmp_path / f"{name}{suffix}", format=fmt)
    rgb, expected = _glas_seg_probabilities(model, read_image(SAMPLE))
    got = run_exported(path, rgb)
    assert got.shape == expected.shape == (1, 3, *rgb.shape[2:])
    assert np.abs(got - expected).max() <= TOLERANCE[fmt]
    # Not a trivial match: the network is confident about glands and background in this crop.
    assert (expected[0, 0] > 0.9).mean() > 0.05 and (expected[0, 1] > 0.9).mean() > 0.05


def test_sidecar_records_what_another_runtime_needs(tmp_path):
    path = export_model("unet-glands", tmp_path / "u.pt", format="torchscript")
    meta = json.loads(sidecar_path(path).read_text())
    config = load_model("unet-glands", "cpu").config
    assert meta["format"] == "torchscript" and meta["file"] == "u.pt"
    assert meta["classes"] == ["background", "interior", "boundary"]
    assert meta["input"]["layout"] == "NCHW" and meta["input"]["range"] == [0.0, 1.0]
    assert meta["scale"] == config.scale == 0.5 and meta["tile_size"] == config.tile_size
    assert meta["image_pixel_size_um"] == 0.62 and meta["working_pixel_size_um"] == 1.24
    assert meta["size_multiple"] == load_model("unet-glands", "cpu").network.size_multiple
    post = meta["postprocessing"]
    assert post["min_size_image_pixels"] == config.min_size and post["targets"] == config.targets
    assert post["interior_threshold"] == 0.5 and post["min_size_working_pixels"] == 100
    assert ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in meta["glas_seg_config"].items()}) == config


def test_efficientnet_unet_exports_to_both_formats(tmp_path):
    """The lead's new architecture, with random weights: every layer is still exercised."""
    torch.manual_seed(0)
    arch = get_architecture("efficientnet_unet")
    config = ModelConfig(name="effunet-test", architecture="efficientnet_unet", mean=arch.input_mean,
                         std=arch.input_std, targets="inner", tile_size=512)
    network = build_architecture("efficientnet_unet").eval()
    file = save_model(tmp_path / "effunet.safetensors", network, config)
    model = load_model(file, "cpu")
    rgb, expected = _glas_seg_probabilities(model, read_image(SAMPLE))
    for fmt, suffix in (("torchscript", ".pt"), ("onnx", ".onnx")):
        path = export_model(model, tmp_path / f"effunet{suffix}", format=fmt)
        assert np.abs(run_exported(path, rgb) - expected).max() <= TOLERANCE[fmt], fmt
        assert json.loads(sidecar_path(path).read_text())["size_multiple"] == 32


def test_instance_models_and_bad_formats_are_refused(tmp_path):
    with pytest.raises(GlasSegError, match="detections"):
        export_model("maskrcnn-glands", tmp_path / "m.onnx", format="onnx")
    with pytest.raises(GlasSegError, match="format"):
        export_model("unet-glands", tmp_path / "m.onnx", format="tflite")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export_writes_model_and_sidecar(tmp_path, capsys):
    out = tmp_path / "deep" / "unet.onnx"
    assert main(["export", "unet-glands", "--format", "onnx", "--out", str(out)]) == 0
    assert out.is_file() and sidecar_path(out).is_file()
    assert str(out) in capsys.readouterr().err
    assert main(["export", "maskrcnn-glands", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glas-seg: error:") and len(err.strip().splitlines()) == 1
